"""The decode step's memory-bound parts, PyTorch's kernels against ours (engine/kernels).

For musicgen-small shapes (24 layers, hidden 1024, 16 heads of 64) and one station (2 rows with
guidance), one decode step's worth of work with every layer's own weights and cache, so the
bytes come from memory as in the real step, not from a warm cache:

- the projections (qkv, out, cross q, cross out, fc1, fc2): bfloat16 `F.linear`, int8 dynamic
  (`torch.ops.quantized.linear_dynamic`), `linear_bf16` and `linear_int8` (one Python call per
  projection: the fused decode step saves those calls too);
- self-attention over P cached positions: float32 SDPA (the cache PyTorch's kernels need to be
  fast), bfloat16 SDPA, `decode_attention` over a bfloat16 cache, and `attend_step_q8` /
  `attend_step_q4` (which also write the step's key/value) over an int8 / int4 cache;
- `linear_int4` (engine/kernels/int4_gemm.h, AVX-512 VNNI or AVX2: any x86-64 CPU of the last
  decade) against a plain read of its own bytes and against int8 dynamic, interleaved call by call (a shared
  machine's bandwidth swings), at each `--int4-rows`: ms, GB/s and its share of the read;
- a prefill's projections (one layer's, `--prefill-rows` rows: compute-bound): float32
  `F.linear` (what an int8 decoder prefills with without our kernels) against `linear_int8`;
- where the products run on AMX tiles (Xeon Sapphire Rapids and later): `linear_int8` and
  `linear_int4` on the tiles against VNNI (the tiles off), interleaved call by call, 24 layers
  at each `--amx-rows` and one layer at `--prefill-rows`;
- a window restart's two KV cache layout changes (its warm rows in, then in place of the lane's
  rows: `KVCache.select_rows`) for `--layout-stations` stations, int8 and int4 caches of 1500
  positions: an indexed copy (index_select, index_put) against select_rows's row by row copies;
- a plain read of 256 MB first, the ceiling this machine's memory allows: every memory-bound
  line gives its GB/s as a share of it ("of read").

    python bench/bench_kernels.py [--rows 2] [--layers 24] [--repeat 10] [--int4-rows 2 8]

Prints the instruction set of our kernels (engine.kernels.isa()), milliseconds per step, GB/s
and the share of the plain read; ratios are within one run.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

from engine import kernels
from engine.kernels import int4
from engine.kv_cache import KVCache, quantize_vectors
from engine.linear import INT4_GROUP, Int8DynamicLinear, pack_int4, pack_int8

HIDDEN, FFN, HEADS, HEAD_DIM = 1024, 4096, 16, 64
SHAPES = [(3 * HIDDEN, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, HIDDEN),
          (FFN, HIDDEN), (HIDDEN, FFN)]  # fmt: skip


def timed(fn, repeat: int) -> float:
    fn()
    fn()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat * 1e3


READ = {"GB/s": 0.0}  # the plain read of this run (`read_bandwidth`)


def line(name: str, ms: float, nbytes: int, base: float | None = None) -> None:
    ratio = f"  x{base / ms:.2f}" if base else ""
    gbs = nbytes / ms / 1e6
    share = f"  {gbs / READ['GB/s']:4.0%} of read" if READ["GB/s"] else ""
    print(f"  {name:<34} {ms:7.2f} ms  {gbs:6.1f} GB/s{share}{ratio}")


PLAIN_READ_FLOATS = 64 * 2**20  # 268 MB, far past the caches


def plain_read(repeat: int) -> float:
    """GB/s of a plain read of 256 MB with every thread: this machine's ceiling now."""
    data = torch.randn(PLAIN_READ_FLOATS)
    return data.nbytes / timed(lambda: data.max(), repeat) / 1e6


def streaming_read(repeat: int) -> float | None:
    """GB/s of our kernels' streaming read of as many bytes (`stream_read`: every thread a
    contiguous share, asking 2 KB ahead into L1, nothing done with the bytes): what memory gives
    a loop that only reads. None without our kernels. On the Xeon this read got 25-32 GB/s in
    minutes when the plain read (a PyTorch max()) got 18-20: the plain read is the issue's
    gauge of how fast the memory is now, this one how fast a step's streams could go."""
    k = kernels.get()
    if k is None:
        return None
    data = torch.ones(PLAIN_READ_FLOATS * 4, dtype=torch.uint8)
    return data.nbytes / timed(lambda: k.stream_read(data), repeat) / 1e6


def read_bandwidth(repeat: int) -> None:
    READ["GB/s"] = plain_read(repeat)
    print(f"plain read of {PLAIN_READ_FLOATS * 4 / 1e6:.0f} MB: {READ['GB/s']:.1f} GB/s")
    streaming = streaming_read(repeat)
    if streaming is not None:
        print(f"streaming read (ours, 2 KB ahead into L1), as many bytes: {streaming:.1f} GB/s")


def bench_prefill(rows: int, repeat: int, k) -> None:
    """One layer's projections over `rows` rows, compute-bound: GMAC/s."""
    weights = [torch.randn(n, m) * 0.02 for n, m in SHAPES]
    inputs = {m: torch.randn(rows, m) for _, m in SHAPES}
    macs = rows * sum(w.numel() for w in weights)
    print(f"prefill projections, one layer, {rows} rows ({macs / 1e9:.1f} GMAC)")

    def dense():
        for w in weights:
            F.linear(inputs[w.shape[1]], w)

    def report(name: str, ms: float, base: float | None = None) -> None:
        ratio = f"  x{base / ms:.2f}" if base else ""
        print(f"  {name:<34} {ms:7.2f} ms  {macs / ms / 1e6:6.1f} GMAC/s{ratio}")

    base = timed(dense, repeat)
    report("float32 F.linear", base)
    if k is not None:
        packed = [pack_int8(w) for w in weights]

        def ours():
            for (data, scales), w in zip(packed, weights, strict=True):
                k.linear_int8(inputs[w.shape[1]], data, scales)

        report("linear_int8 (ours)", timed(ours, repeat), base)


def bench_linears(rows: int, layers: int, repeat: int, k) -> None:
    weights = [[torch.randn(n, m) * 0.02 for n, m in SHAPES] for _ in range(layers)]
    bf16 = [[w.bfloat16() for w in layer] for layer in weights]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = [[Int8DynamicLinear(w) for w in layer] for layer in weights]
    inputs = {m: torch.randn(rows, m) for _, m in SHAPES}
    nbytes = sum(w.nbytes for layer in bf16 for w in layer)
    print(f"projections, {layers} layers, {rows} rows ({nbytes / 1e6:.0f} MB of bfloat16 weights)")

    def eager():
        for layer in bf16:
            for w in layer:
                F.linear(inputs[w.shape[1]].bfloat16(), w)

    def dynamic():
        for layer in int8:
            for lin, w in zip(layer, weights[0], strict=True):
                lin(inputs[w.shape[1]])

    base = timed(eager, repeat)
    line("bfloat16 F.linear", base, nbytes)
    line("int8 dynamic (half the bytes)", timed(dynamic, repeat), nbytes // 2, base)
    if k is not None:

        def ours():
            for layer in bf16:
                for w in layer:
                    k.linear_bf16(inputs[w.shape[1]], w)

        line("linear_bf16 (ours)", timed(ours, repeat), nbytes, base)
        packed = [[pack_int8(w) for w in layer] for layer in weights]

        def ours_int8():
            for layer in packed:
                for (data, scales), w in zip(layer, weights[0], strict=True):
                    k.linear_int8(inputs[w.shape[1]], data, scales)

        line("linear_int8 (ours, half the bytes)", timed(ours_int8, repeat), nbytes // 2, base)


def bench_attention(rows: int, layers: int, positions: int, repeat: int, k) -> None:
    shape = (layers, rows, HEADS, positions, HEAD_DIM)
    keys32, values32 = torch.randn(shape), torch.randn(shape)
    keys16, values16 = keys32.bfloat16(), values32.bfloat16()
    q = torch.randn(rows, HEADS, 1, HEAD_DIM)
    lengths = torch.full((rows,), positions)
    nbytes = keys32.nbytes * 2
    print(f"self-attention over {positions} positions ({nbytes / 1e6:.0f} MB as float32)")

    def sdpa(keys, values, query):
        def run():
            for i in range(layers):
                F.scaled_dot_product_attention(query, keys[i], values[i])

        return run

    base = timed(sdpa(keys32, values32, q), repeat)
    line("float32 SDPA", base, nbytes)
    line("bfloat16 SDPA", timed(sdpa(keys16, values16, q.bfloat16()), repeat), nbytes // 2, base)
    if k is not None:

        def ours():
            for i in range(layers):
                k.decode_attention(q[:, :, 0], keys16[i], values16[i], lengths, HEAD_DIM**-0.5)

        line("decode_attention, bfloat16 (ours)", timed(ours, repeat), nbytes // 2, base)
        del keys16, values16
        keys8, key_scales = quantize_vectors(keys32)
        values8, value_scales = quantize_vectors(values32)
        qkv = torch.randn(rows, 3 * HEADS * HEAD_DIM)
        positions = lengths - 1

        def ours_int8():
            for i in range(layers):
                k.attend_step_q8(
                    qkv, keys8[i], key_scales[i], values8[i], value_scales[i], positions, 0.125
                )

        line("attend_step_q8, int8 cache (ours)", timed(ours_int8, repeat), nbytes // 4, base)
        del keys8, values8
        int4 = KVCache(layers, rows, HEADS, keys32.shape[3], HEAD_DIM, device=q.device, kind="int4")
        for i in range(layers):
            int4.write(i, 0, keys32[i], values32[i])

        def ours_int4():
            for i in range(layers):
                k.attend_step_q4(qkv, *int4.layer(i), positions, 0.125)

        line("attend_step_q4, int4 cache (ours)", timed(ours_int4, repeat), nbytes // 8, base)


def interleaved(fns: dict, repeat: int) -> dict:
    """Mean ms per call of each function, taking turns call by call."""
    for fn in fns.values():
        fn()
    spent = dict.fromkeys(fns, 0.0)
    for _ in range(repeat):
        for name, fn in fns.items():
            began = time.perf_counter()
            fn()
            spent[name] += time.perf_counter() - began
    return {name: t / repeat * 1e3 for name, t in spent.items()}


def bench_amx(rows_list: list[int], layers: int, prefill_rows: int, repeat: int, k) -> None:
    """`linear_int8` and `linear_int4` on AMX tiles against VNNI, in turns call by call: ms and
    the ratio."""
    tiles = kernels.amx_rows()
    if not tiles:
        print(
            "int8 and int4 products on AMX tiles: not here (no AMX tiles, or ENDLESS_RADIO_AMX=0)"
        )
        return
    four = int4.get()
    print(
        f"int8 and int4 products on AMX tiles (from {tiles} rows by default) against VNNI, in turns"
    )
    weights = [[torch.randn(n, m) * 0.02 for n, m in SHAPES] for _ in range(layers)]
    packed = {
        "int8": [[pack_int8(w) for w in layer] for layer in weights],
        "int4": [[pack_int4(w, INT4_GROUP) for w in layer] for layer in weights],
    }
    try:
        for rows in [*rows_list, prefill_rows]:
            prefill = rows == prefill_rows
            inputs = {m: torch.randn(rows, m) for _, m in SHAPES}

            def product(kind: str, on: int, inputs=inputs, prefill=prefill):
                chosen = packed[kind][:1] if prefill else packed[kind]

                def run():
                    kernels.set_amx_rows(on)
                    for layer in chosen:
                        for (data, scales), w in zip(layer, weights[0], strict=True):
                            x = inputs[w.shape[1]]
                            if kind == "int8":
                                k.linear_int8(x, data, scales)
                            else:
                                four.linear_int4(x, data, scales, w.shape[0])

                return run

            what = "1 layer (a prefill)" if prefill else f"{layers} layers"
            for kind in ("int8", "int4") if four is not None else ("int8",):
                if kind == "int4" and rows < kernels.AMX_INT4_MIN_ROWS:
                    print(f"  int4 {rows:4d} rows: VNNI either way (its tiles from 3 rows)")
                    continue
                ms = interleaved(
                    {"amx": product(kind, 1), "vnni": product(kind, 0)},
                    max(1, repeat // 5 if prefill else repeat),
                )
                print(
                    f"  {kind} {rows:4d} rows, {what:<20} AMX {ms['amx']:7.2f} ms, VNNI "
                    f"{ms['vnni']:7.2f} ms: AMX takes x{ms['amx'] / ms['vnni']:.2f} the time"
                )
    finally:
        kernels.set_amx_rows(tiles)


def bench_int4(rows_list: list[int], layers: int, repeat: int, group: int) -> None:
    k4 = int4.get()
    if k4 is None:
        print(f"linear_int4: unavailable ({int4.unavailable_reason()})")
        return
    # one layer quantized, its bytes copied for every layer: each layer's weights come from
    # memory as in a real step (the codes' values do not change the kernel's time)
    first = [pack_int4(torch.randn(n, m) * 0.02, group, k4) for n, m in SHAPES]
    packed = [[(c.clone(), s.clone()) for c, s in first] for _ in range(layers)]
    nbytes = sum(c.nbytes + s.nbytes for layer in packed for c, s in layer)
    data = torch.randn(nbytes // 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = [
            [Int8DynamicLinear(torch.randn(n, m) * 0.02) for n, m in SHAPES] for _ in range(layers)
        ]
    int8_bytes = sum(n * m + 4 * n for n, m in SHAPES) * layers
    print(f"linear_int4, groups of {group}, {layers} layers: {nbytes / 1e6:.0f} MB per step "
          f"(int8: {int8_bytes / 1e6:.0f} MB)")  # fmt: skip
    for rows in rows_list:
        inputs = {m: torch.randn(rows, m) for _, m in SHAPES}

        def ours(inputs=inputs):
            for layer in packed:
                for (c, s), (n, m) in zip(layer, SHAPES, strict=True):
                    k4.linear_int4(inputs[m], c, s, n)

        def dynamic(inputs=inputs):
            for layer in int8:
                for lin, (_, m) in zip(layer, SHAPES, strict=True):
                    lin(inputs[m])

        ms = interleaved({"int4": ours, "read": lambda: data.max(), "int8": dynamic}, repeat)
        print(f" {rows} rows:")
        line("linear_int4 (ours)", ms["int4"], nbytes)
        line("plain read of the same bytes", ms["read"], nbytes)
        line("int8 dynamic (PyTorch)", ms["int8"], int8_bytes)
        print(f"  linear_int4 at {ms['read'] / ms['int4']:.0%} of the plain read's speed; "
              f"x{ms['int8'] / ms['int4']:.2f} int8 dynamic's step")  # fmt: skip


def _indexed_layout(tensors: list[torch.Tensor], sources: list[int | None]) -> list[torch.Tensor]:
    """The reference for a layout change: fresh buffers, and the kept rows by one indexed copy
    (how `KVCache.select_rows` did it before it copied row by row into reused buffers)."""
    new = [j for j, s in enumerate(sources) if s is not None]
    index = torch.tensor([s for s in sources if s is not None])
    out = []
    for t in tensors:
        rows = t.new_zeros(t.shape[0], len(sources), *t.shape[2:])
        rows[:, new] = t.index_select(1, index)
        out.append(rows)
    return out


def bench_layout(stations: int, layers: int, positions: int, repeat: int, k) -> None:
    """A window restart's two layout changes of the KV cache (its warm rows in, then in place
    of the lane's rows), `stations` stations of 2 rows: an indexed copy against `select_rows`;
    and the whole cache changing kind (`KVCache.converted`, the radio's cheaper-cache rung)."""
    rows = 2 * stations
    warm_in = [*range(rows - 2), None, None, rows - 2, rows - 1]  # the last station's restart
    promote = [*range(rows - 2), rows, rows + 1]
    print(
        f"KV cache layout changes of a window restart, {stations} station(s), {positions} positions"
    )
    for kind in ("int8", "int4"):
        cache = KVCache(
            layers, rows, HEADS, positions, HEAD_DIM, device=torch.device("cpu"), kind=kind
        )
        for t in cache.tensors():
            t.fill_(3)  # touched, as a live cache's pages are
        ms = interleaved(
            {
                "indexed": lambda c=cache: _indexed_layout(
                    _indexed_layout(list(c.tensors()), warm_in), promote
                ),
                "rows": lambda c=cache: c.select_rows(warm_in).select_rows(promote),
            },
            repeat,
        )
        nbytes = sum(t.nbytes for t in cache.tensors())
        print(
            f"  {kind} cache, {nbytes / 1e6:.0f} MB: indexed copy {ms['indexed']:.0f} ms, "
            f"select_rows {ms['rows']:.0f} ms (x{ms['indexed'] / ms['rows']:.1f})"
        )
    if k is None:
        return
    # the radio's cheaper-cache rung: the whole cache (its warm rows too) to int4 and back
    cache = KVCache(
        layers, 2 * rows, HEADS, positions, HEAD_DIM, device=torch.device("cpu"), kind="int8"
    )
    for t in cache.tensors():
        t.fill_(3)
    int4 = cache.converted("int4", k)
    ms = interleaved(
        {
            "to int4": lambda: cache.converted("int4", k),
            "to int8": lambda: int4.converted("int8", k),
            "into int4": lambda: cache.converted("int4", k, into=int4),
            "into int8": lambda: int4.converted("int8", k, into=cache),
        },
        repeat,
    )
    print(
        f"  the cache changing kind ({2 * rows} rows with the warm ones, every position): into "
        f"new memory int8 -> int4 {ms['to int4']:.0f} ms, int4 -> int8 {ms['to int8']:.0f} ms; "
        f"into buffers kept or prepared {ms['into int4']:.0f} / {ms['into int8']:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2, help="batch rows (2 per station)")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--positions", type=int, nargs="+", default=[500, 1000, 1500])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--prefill-rows", type=int, default=1000, help="0: no prefill figures")
    parser.add_argument("--int4-rows", type=int, nargs="*", default=[2, 8])
    parser.add_argument("--int4-group", type=int, default=INT4_GROUP)
    parser.add_argument(
        "--amx-rows", type=int, nargs="*", default=[1, 2, 4, 8, 16, 50], help="where AMX runs"
    )
    parser.add_argument("--int4-only", action="store_true", help="only the linear_int4 rows")
    parser.add_argument(
        "--layout-stations", type=int, nargs="*", default=[1, 2], help="stations of the layout rows"
    )
    args = parser.parse_args()
    k = kernels.get()
    ours = kernels.isa() if k is not None else f"unavailable ({kernels.unavailable_reason()})"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; our kernels: {ours}")
    read_bandwidth(args.repeat)
    if args.int4_rows:
        bench_int4(args.int4_rows, args.layers, args.repeat, args.int4_group)
    if args.int4_only:
        return
    if k is not None and args.amx_rows:
        bench_amx(args.amx_rows, args.layers, args.prefill_rows or 1000, args.repeat, k)
    bench_linears(args.rows, args.layers, args.repeat, k)
    for positions in args.positions:
        bench_attention(args.rows, args.layers, positions, args.repeat, k)
    if args.prefill_rows:
        bench_prefill(args.prefill_rows, max(1, args.repeat // 5), k)
    for stations in args.layout_stations:
        bench_layout(stations, args.layers, 1500, max(2, args.repeat // 3), k)


if __name__ == "__main__":
    main()
