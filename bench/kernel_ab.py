"""Two versions of our CPU kernels, timed in turns in one process.

    git worktree add /tmp/b HEAD          # then change /tmp/b/engine/kernels
    python bench/kernel_ab.py --b /tmp/b/engine/kernels
    python bench/kernel_ab.py --b /tmp/b/engine/kernels --parts attention-q4 --positions 1000

This VM's memory speed moves by a fifth between two runs a minute apart, so a kernel variant
timed in one process and the original in the next measure the minute as much as the change.
Here both are loaded side by side: A, the kernels this checkout imports (`engine.kernels`,
`engine.kernels.int4`), and B, the folder given (its `cpu.cpp` and `int4.cpp` built for the same
instruction set under module names of their own; each shared object resolves its own symbols,
as Python loads extensions locally). Each part runs A, B, A, B ... on the same inputs (each
version packing its own weights), and the figure is the median over rounds of B's time over A's
in the same round, with the rounds' spread: under 1 means B is faster. Parts, in a decode step's
shapes (musicgen-small, 24 layers, `--rows` rows: 2 per station):

- `int8`: the projections with int8 weights (`linear_int8`);
- `int4`: the same with int4 weights, groups of 64 (`linear_int4`);
- `attention-q8`, `attention-q4`: the self-attention over an int8 / int4 KV cache at
  `--positions` (`attend_step_q8`, `attend_step_q4`, which also write the step's key/value);
- `folded`: the cross-attention folded into the text (`cross_attend_folded`, on the calling
  thread), the first half of the rows reading `--text` text positions, the others (guidance's
  null rows) none;
- `stream-int8`, `stream-int8-kv4`, `stream-int4`: the whole thing, two streams of the `--size`
  model (int8 weights and cache; int8 weights and the int4 cache; int4 weights and cache; the
  tiny model's heads of 16 take no int4 cache: int8 there), one loaded on A's modules and one
  on B's, reading 25 frames (decoder steps and the codec) in turns; `--stations` streams each,
  one batch (the radio's stations on one model: their KV cache a larger share of each step).
  A part alone can gain what the step does not (a prefetch into L1 made the int8 product x0.96
  and the stream x1.00 on Zen 3): confirm a change here before taking it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import PROMPT, load_options, model_dir  # noqa: E402
from bench_kernels import HEAD_DIM, HEADS, SHAPES  # noqa: E402

from engine import MusicModel, SamplingOptions, WindowOptions, kernels  # noqa: E402
from engine.extensions import build, source_digest  # noqa: E402
from engine.kernels import int4  # noqa: E402
from engine.kv_cache import KVCache, quantize_vectors  # noqa: E402
from engine.linear import INT4_GROUP, KernelModules, pack_int4, pack_int8  # noqa: E402
from engine.model import read_together  # noqa: E402

PARTS = (
    "int8",
    "int4",
    "attention-q8",
    "attention-q4",
    "folded",
    "stream-int8",
    "stream-int8-kv4",
    "stream-int4",
)


def build_b(folder: Path, build_dir: Path | None) -> tuple[ModuleType, ModuleType]:
    """B's kernel modules (cpu.cpp, int4.cpp) for the instruction set A runs, built in
    `build_dir` (None: PyTorch's extension cache, where A's builds are)."""
    variant, reason = kernels.choose_variant()
    if variant is None:
        raise SystemExit(f"our kernels cannot run here: {reason}")
    if build_dir is not None:  # PyTorch reads it at each build; A is loaded already
        build_dir.mkdir(parents=True, exist_ok=True)
        os.environ["TORCH_EXTENSIONS_DIR"] = str(build_dir)
    modules = []
    for stem, source in (("cpu", "cpu.cpp"), ("int4", "int4.cpp")):
        path = folder / source
        if not path.is_file():
            raise SystemExit(f"--b {folder}: no {source} there (give an engine/kernels folder)")
        digest = source_digest(folder, [path, *sorted(folder.rglob("*.h"))])
        modules.append(
            build(
                f"endless_radio_ab_{stem}_{variant.name}_{digest}",
                path,
                variant.compile_flags(),
                what=f"B's {source} ({variant.name})",
                takes="~20-40 s",
            )
        )
    return modules[0], modules[1]


T = TypeVar("T")


def in_turn(make: Callable[[], T]) -> Iterator[T]:
    """Four copies of a part's inputs, read in turn by A and B alike (one order: never the copy
    just read), so that each run finds them in memory, as a step does (the weights between two
    layers' reads evict them from L3), not where the run before it left them: 27 MB of int4
    cache at 500 positions fit in a 32 MB L3."""
    return itertools.cycle([make() for _ in range(4)])


def parts(
    names: list[str],
    rows: int,
    positions: int,
    text: int,
    layers: int,
    size: str,
    stations: int,
    a: tuple,
    b: tuple,
) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """Each part's (A's run, B's run), on the same inputs."""
    out = {}
    inputs = {m: torch.randn(rows, m) for _, m in SHAPES}
    weights = [torch.randn(n, m) * 0.02 for n, m in SHAPES]
    qkv = torch.randn(rows, 3 * HEADS * HEAD_DIM)
    at = torch.full((rows,), positions - 1)
    shape = (layers, rows, HEADS, positions, HEAD_DIM)

    def products(project: Callable, packed: list) -> Callable[[], None]:
        """Every layer's projections through `project(x, packed weights, out features)`."""

        def run() -> None:
            for layer in packed:
                for w, (n, m) in zip(layer, SHAPES, strict=True):
                    project(inputs[m], w, n)

        return run

    def per_layer(first: list) -> list:
        """One layer's packed weights copied for every layer: a step reads each from memory."""
        return [[tuple(t.clone() for t in w) for w in first] for _ in range(layers)]

    if "int8" in names:
        out["int8"] = tuple(
            products(
                lambda x, w, n, k=k: k.linear_int8(x, *w),
                per_layer([pack_int8(w, k) for w in weights]),
            )
            for k in (a[0], b[0])
        )
    if "int4" in names:
        out["int4"] = tuple(
            products(
                lambda x, w, n, k4=k4: k4.linear_int4(x, *w, n),
                per_layer([pack_int4(w, INT4_GROUP, k4) for w in weights]),
            )
            for k4 in (a[1], b[1])
        )
    if "attention-q8" in names:
        q8_caches = in_turn(
            lambda: (*quantize_vectors(torch.randn(shape)), *quantize_vectors(torch.randn(shape)))
        )

        def q8(k: ModuleType) -> Callable[[], None]:
            def run() -> None:
                keys8, key_scales, values8, value_scales = next(q8_caches)
                for i in range(layers):
                    k.attend_step_q8(
                        qkv, keys8[i], key_scales[i], values8[i], value_scales[i], at, 0.125
                    )

            return run

        out["attention-q8"] = (q8(a[0]), q8(b[0]))
    if "attention-q4" in names:

        def q4_cache() -> KVCache:
            cache = KVCache(
                layers, rows, HEADS, positions, HEAD_DIM, device=torch.device("cpu"), kind="int4"
            )
            for i in range(layers):
                cache.write(i, 0, torch.randn(shape[1:]), torch.randn(shape[1:]))
            return cache

        q4_caches = in_turn(q4_cache)

        def q4(k: ModuleType) -> Callable[[], None]:
            def run() -> None:
                cache = next(q4_caches)
                for i in range(layers):
                    k.attend_step_q4(qkv, *cache.layer(i), at, 0.125)

            return run

        out["attention-q4"] = (q4(a[0]), q4(b[0]))
    if "folded" in names:
        hidden, read = HEADS * HEAD_DIM, (rows + 1) // 2
        shape5 = (layers, rows, HEADS, 2, text)
        turns = in_turn(  # 4 x 17 MB at the defaults
            lambda: (
                torch.randint(-127, 128, (*shape5, hidden), dtype=torch.int8),
                torch.rand(shape5) / 1e3,
            )
        )
        folded_rows = torch.ones(rows, dtype=torch.bool)
        bias, h = torch.zeros(rows, text), torch.randn(rows, hidden)
        lengths = torch.tensor([text] * read + [0] * (rows - read))

        def folded(k: ModuleType) -> Callable[[], None]:
            def run() -> None:
                vectors, scales = next(turns)
                for i in range(layers):
                    k.cross_attend_folded(h, vectors, scales, folded_rows, bias, lengths, i)

            return run

        out["folded"] = (folded(a[0]), folded(b[0]))
    # int4 weights and cache; the tiny model's heads of 16 take no int4 cache: int8 there
    small = size == "small"
    stream_modes = {
        "int8": "int8",
        "int8-kv4": "int8-kv4" if small else "int8",
        "int4": "int4-kv4" if small else "int4",
    }
    for name, mode in stream_modes.items():
        if f"stream-{name}" in names:
            out[f"stream-{name}"] = streams(mode, size, b, stations)
    return out


def streams(
    mode: str, size: str, b: tuple, stations: int
) -> tuple[Callable[[], None], Callable[[], None]]:
    """Reads of 25 frames of two batches of `stations` streams of one model in `mode`: A's
    loaded on the modules `engine.kernels` gives, B's on B's."""
    path = model_dir(size)
    model_a = MusicModel.load(load_options(path, mode))
    model_b = MusicModel.load(load_options(path, mode), KernelModules(*b))

    def reader(model: MusicModel) -> Callable[[], None]:
        prompts = [f"{PROMPT} {i}" if i else PROMPT for i in range(stations)]
        batch = model.open_streams(
            prompts, [SamplingOptions(seed=i) for i in range(stations)], WindowOptions()
        )
        read_together(batch, 25)  # the first chunk's prefill

        def run() -> None:
            read_together(batch, 25)

        return run

    return reader(model_a), reader(model_b)


def timed(fn: Callable[[], None]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--b", type=Path, required=True, help="B's engine/kernels folder")
    parser.add_argument(
        "--parts", default=",".join(PARTS[:4]), help=f"of {', '.join(PARTS)} (default: the first 4)"
    )
    parser.add_argument("--rows", type=int, default=2, help="batch rows (2 per station)")
    parser.add_argument("--positions", type=int, default=1000, help="cached positions attended")
    parser.add_argument(
        "--text",
        type=int,
        default=19,
        help="text positions a folded row reads (19: bench_engine's prompt's tokens)",
    )
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument(
        "--stations", type=int, default=1, help="streams read together by the stream parts"
    )
    parser.add_argument(
        "--size", choices=("small", "tiny"), default="small", help="the stream parts' model"
    )
    parser.add_argument("--rounds", type=int, default=30, help="A, B turns per part")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--build-dir", type=Path, help="where B is built (default: PyTorch's extension cache)"
    )
    args = parser.parse_args()
    names = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in names if p not in PARTS]
    if unknown or not names:
        parser.error(f"--parts: {', '.join(unknown) or 'none'} not of {', '.join(PARTS)}")
    if min(args.rows, args.positions, args.text, args.layers, args.stations) < 1 or args.rounds < 2:
        parser.error(
            "--rows, --positions, --text, --layers, --stations must be >= 1 and --rounds >= 2"
        )
    torch.set_num_threads(args.threads)
    a = (kernels.get(), int4.get())
    if a[0] is None or a[1] is None:
        raise SystemExit(f"our kernels cannot run here: {kernels.unavailable_reason()}")
    b = build_b(args.b.resolve(), args.build_dir)
    print(
        f"A: {a[0].__name__} ({Path(kernels.__file__).parent}), B: {b[0].__name__} ({args.b}); "
        f"{a[0].isa()} kernels, "
        f"{args.threads} thread(s), {args.rows} rows, {args.layers} layers, "
        f"{args.positions} positions, {args.stations} station(s) a stream part, "
        f"{args.rounds} rounds",
        flush=True,
    )
    print("| part | A ms (median) | B ms (median) | B / A, median of rounds | rounds' spread |")
    print("| --- | --- | --- | --- | --- |")
    for name, (run_a, run_b) in parts(
        names, args.rows, args.positions, args.text, args.layers, args.size, args.stations, a, b
    ).items():
        run_a(), run_b()  # warm-up: first touches, the OpenMP team
        times_a, times_b = [], []
        for _ in range(args.rounds):
            times_a.append(timed(run_a))
            times_b.append(timed(run_b))
        ratios = sorted(tb / ta for ta, tb in zip(times_a, times_b, strict=True))
        low, high = ratios[len(ratios) // 10], ratios[-1 - len(ratios) // 10]
        print(
            f"| {name} | {1000 * statistics.median(times_a):.2f} | "
            f"{1000 * statistics.median(times_b):.2f} | **{statistics.median(ratios):.3f}** | "
            f"{low:.3f}-{high:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
