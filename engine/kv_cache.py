"""The decoder's self-attention KV cache: one preallocated buffer, written by index.

Shapes never change during a stream, so a compiled or graph-captured step can read and write it
in place. `length` is how many positions hold valid keys/values; a window restart resets it to
zero and the re-prefill overwrites the buffer from the start.

Two quantized caches are read only by our CPU kernels (`engine.kernels`); each key and value
vector (one position of one head) has its own scale:

- int8: `x ~ scale * q`, `scale = max|x| / 127` (float32 [L, B, H, P]), int8 [L, B, H, P, D]: a
  quarter of float32's bytes.
- int4 (heads of 64): `x ~ scale * (u - 8)`, `u = round(x / scale) + 8` in [1, 15],
  `scale = max|x| / 7` in bfloat16, two per byte, byte r holding dims r and r + 32: 32 bytes per
  vector. A head's positions go by blocks of 16, one 1088-byte record each, uint8
  [L, B, H, P / 16, 1088] (P rounded up to a multiple of 16): keys [8][16][4] (byte 4j + b of
  position l at [j][l][b]), values [4][2][16][4] (byte 16h + j of position 4G + p at
  [G][h][j][p]), then the 16 key scales and the 16 value scales. Attention reads it as one
  sequential stream, in the order its dot products want (engine/kernels/common.h): 68 bytes
  per position and head, half the int8 cache's; what several stations batched in one step
  mostly read.
"""

from __future__ import annotations

from types import ModuleType

import torch

KINDS = ("float32", "bfloat16", "int8", "int4")
Q4_HEAD = 64
Q4_BLOCK = 16  # positions per block of the int4 cache
Q4_BLOCK_BYTES = 1088  # keys 512 | values 512 | key scales 32 | value scales 32


def quantize_vectors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float -> (int8 [..., D], float32 scales [...]), one scale per vector."""
    scales = x.float().abs().amax(dim=-1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return torch.round(x.float() / scales[..., None]).to(torch.int8), scales


def quantize_q4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., 64] float -> (uint8 [..., 32]: byte r = u[r] | u[r + 32] << 4, bfloat16 scales [...])."""
    scales = (x.float().abs().amax(dim=-1) / 7.0).to(torch.bfloat16)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    u = (torch.round(x.float() / scales.float()[..., None]).clamp(-7, 7) + 8).to(torch.uint8)
    half = x.shape[-1] // 2
    return u[..., :half] | (u[..., half:] << 4), scales


def dequantize_q4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The inverse of `quantize_q4` up to rounding: [..., 32] uint8 and [...] -> [..., 64] float32."""
    u = torch.cat([packed & 15, packed >> 4], dim=-1).float()
    return (u - 8) * scales.float()[..., None]


class KVCache:
    def __init__(
        self,
        layers: int,
        batch: int,
        heads: int,
        max_positions: int,
        head_dim: int,
        *,
        device: torch.device,
        kind: str,
        touched: bool = True,
    ) -> None:
        """`touched`: False leaves the buffers unwritten (their memory untouched, to be filled
        before anything reads it: `engine.batch.DecodeBatch.prepare_kind`)."""
        if kind not in KINDS:
            raise ValueError(f"KV cache kind must be one of {KINDS}, got {kind!r}")
        if kind == "int4" and head_dim != Q4_HEAD:
            raise ValueError(f"an int4 KV cache holds heads of {Q4_HEAD}, not {head_dim}")
        self.kind = kind
        self.max_positions = max_positions
        self.length = 0
        self.keys: torch.Tensor | None = None  # [L, B, H, P, D]; for int4, `blocks`
        self.values: torch.Tensor | None = None
        self.key_scales: torch.Tensor | None = None  # [L, B, H, P] float32 for int8
        self.value_scales: torch.Tensor | None = None
        self.blocks: torch.Tensor | None = None  # int4: [L, B, H, P / 16, 1088] uint8
        # the whole buffers the tensors above are the first rows of (`select_rows` reuses them)
        self._buffers: dict[str, torch.Tensor] = {}
        if kind == "int4":
            blocks = -(-max_positions // Q4_BLOCK)
            shape = (layers, batch, heads, blocks, Q4_BLOCK_BYTES)
            make = torch.zeros if touched else torch.empty
            self.blocks = make(shape, device=device, dtype=torch.uint8)
            self._buffers = {"blocks": self.blocks}
            return
        dtype = torch.int8 if kind == "int8" else getattr(torch, kind)
        shape = (layers, batch, heads, max_positions, head_dim)
        make = torch.zeros if touched else torch.empty
        self.keys = make(shape, device=device, dtype=dtype)
        self.values = make(shape, device=device, dtype=dtype)
        if kind == "int8":
            self.key_scales = (torch.ones if touched else torch.empty)(shape[:-1], device=device)
            self.value_scales = (torch.ones if touched else torch.empty)(shape[:-1], device=device)
        names = ("keys", "values", "key_scales", "value_scales")
        self._buffers = {n: t for n in names if (t := getattr(self, n)) is not None}

    @property
    def batch(self) -> int:
        """Rows (CFG: two per station)."""
        return self.tensors()[0].shape[1]

    @property
    def quantized(self) -> bool:
        return self.kind in ("int8", "int4")

    def _kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values of a float or int8 cache."""
        assert self.keys is not None and self.values is not None, f"a {self.kind} cache"
        return self.keys, self.values

    def _scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """key and value scales of an int8 cache."""
        assert self.key_scales is not None and self.value_scales is not None, "an int8 cache"
        return self.key_scales, self.value_scales

    def _blocks(self) -> torch.Tensor:
        assert self.blocks is not None, f"an int4 cache has blocks, not a {self.kind} one"
        return self.blocks

    def _q4_parts(self) -> tuple[torch.Tensor, ...]:
        """Views of the int4 blocks by position: keys [L, B, H, P / 16, 16, 8, 4] ([..., n, l, :, :]
        is position 16n + l's 32 bytes), values [L, B, H, P / 16, 4, 4, 2, 16] ([..., n, G, p, :, :]
        is position 16n + 4G + p's), key and value scales bfloat16 [L, B, H, P / 16, 16]."""
        blocks = self._blocks()
        layers, b, h, n, _ = blocks.shape
        keys = blocks[..., :512].view(layers, b, h, n, 8, Q4_BLOCK, 4).transpose(-3, -2)
        values = blocks[..., 512:1024].view(layers, b, h, n, 4, 2, 16, 4)
        values = values.permute(0, 1, 2, 3, 4, 7, 5, 6)
        key_scales = blocks[..., 1024:1056].view(torch.bfloat16)
        value_scales = blocks[..., 1056:1088].view(torch.bfloat16)
        return keys, values, key_scales, value_scales

    def _write_q4(self, layer: int, index: tuple, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize keys/values [..., 64] into the int4 blocks at `index` (rows, heads, block,
        position in block), which selects [...] of them."""
        rows, heads, n, lane = index
        k_part, v_part, k_scales, v_scales = (t[layer] for t in self._q4_parts())
        packed, k_scales[rows, heads, n, lane] = quantize_q4(keys)
        k_part[rows, heads, n, lane] = packed.unflatten(-1, (8, 4))
        packed, v_scales[rows, heads, n, lane] = quantize_q4(values)
        v_part[rows, heads, n, lane // 4, lane % 4] = packed.unflatten(-1, (2, 16))

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys/values [B, H, T, D] at positions [start, start + T)."""
        end = start + keys.shape[2]
        assert end <= self.max_positions, f"KV cache overflow: {end} > {self.max_positions}"
        if self.kind == "int4":
            at = torch.arange(start, end, device=keys.device)
            everything = slice(None)
            self._write_q4(
                layer, (everything, everything, at // Q4_BLOCK, at % Q4_BLOCK), keys, values
            )
            return
        if self.kind == "int8":
            key_scales, value_scales = self._scales()
            keys, key_scales[layer, :, :, start:end] = quantize_vectors(keys)
            values, value_scales[layer, :, :, start:end] = quantize_vectors(values)
        cached_keys, cached_values = self._kv()
        cached_keys[layer, :, :, start:end] = keys
        cached_values[layer, :, :, start:end] = values

    def write_rows(
        self, layer: int, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Store one position per row: keys/values [B, H, 1, D] at positions [B]."""
        rows = torch.arange(keys.shape[0], device=keys.device)
        keys, values = keys[:, :, 0], values[:, :, 0]
        if self.kind == "int4":
            index = (rows, slice(None), positions // Q4_BLOCK, positions % Q4_BLOCK)
            self._write_q4(layer, index, keys, values)
            return
        if self.kind == "int8":
            key_scales, value_scales = self._scales()
            keys, key_scales[layer, rows, :, positions] = quantize_vectors(keys)
            values, value_scales[layer, rows, :, positions] = quantize_vectors(values)
        cached_keys, cached_values = self._kv()
        cached_keys[layer, rows, :, positions] = keys.to(cached_keys.dtype)
        cached_values[layer, rows, :, positions] = values.to(cached_values.dtype)

    def rows(self, first: int, count: int) -> KVCache:
        """A cache over rows [first, first + count) of this one, sharing its storage."""
        view = KVCache.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view._buffers = {}  # a part of this cache: never a spare to write over
        for name in ("keys", "values", "key_scales", "value_scales", "blocks"):
            t = getattr(self, name)
            setattr(view, name, None if t is None else t[:, first : first + count])
        view.length = 0
        return view

    def select_rows(
        self, sources: list[int | None], spare: KVCache | None = None, capacity: int = 0
    ) -> KVCache:
        """A new cache of len(sources) rows: row j holds this cache's row sources[j], or zeros
        for None (a row about to be prefilled). How a batch lays its rows out anew.

        Row by row: each row is one strided copy, where an indexed copy of them all (index_select
        then index_put) ran x5-9 slower (`bench/bench_kernels.py`: a window restart's two layout
        changes, musicgen-small's int8 cache of one station, 193 ms against 32 ms).

        `spare`: a cache this one replaced that nothing reads any more (the layout before the
        last change): its buffers are written over where they hold enough rows, and the new
        cache's rows are their first ones (a view). Buffers that must be new get room for
        `capacity` rows, so the next changes fit in them. Fresh memory is what costs: the kernel
        zeroes each page at its first touch, and allocating two stations' int4 cache at every
        layout change (warm rows coming and going, 240-321 MB) took 0.5-1.2 s each on our 2-core
        VM, against tens of milliseconds written over.
        """
        out = KVCache.__new__(KVCache)
        out.__dict__.update(self.__dict__)
        out._buffers = {}
        n = len(sources)
        for name in ("keys", "values", "key_scales", "value_scales", "blocks"):
            t = getattr(self, name)
            if t is None:
                continue
            buffer = None if spare is None else spare._buffers.get(name)
            mine = self._buffers.get(name)
            if (
                buffer is None
                or buffer.shape[1] < n
                or buffer.shape[2:] != t.shape[2:]
                or buffer.shape[0] != t.shape[0]
                or buffer.dtype != t.dtype
                or buffer.device != t.device
                or (mine is not None and buffer.data_ptr() == mine.data_ptr())
            ):
                buffer = t.new_empty(t.shape[0], max(n, capacity), *t.shape[2:])
                buffer[:, n:].fill_(0)  # its pages touched now, not at the next change
            rows = buffer[:, :n]
            for j, s in enumerate(sources):
                if s is None:
                    rows[:, j].fill_(1 if name.endswith("scales") else 0)
                else:
                    rows[:, j].copy_(t[:, s])
            setattr(out, name, rows)
            out._buffers[name] = buffer
        out.length = 0
        return out

    def relaid(self, sources: list[int | None], capacity: int = 0) -> KVCache:
        """`select_rows(sources)` written into this cache's own buffers, where they have room
        for `capacity` rows (and the layout's) and the rows kept stay in order (sources
        increasing, as a batch's lanes keep theirs): the rows moving to a lower row are copied
        first, lowest first, then those moving to a higher one, highest first, so none is
        written over before it is read; new rows are emptied last. This cache is then no longer
        valid. Otherwise new buffers, with room for `capacity` rows. The compiled step's layout
        changes (a GPU's): no second cache beside this one (a cache as large as the memory
        allows has no room for two), and the step keeps reading at the same addresses (a CUDA
        graph is recorded again when they move)."""
        kept = [s for s in sources if s is not None]
        n = len(sources)
        if not self.holds(max(n, capacity)) or any(
            a >= b for a, b in zip(kept, kept[1:], strict=False)
        ):
            return self.select_rows(sources, capacity=capacity)
        down = [j for j, s in enumerate(sources) if s is not None and s > j]
        up = [j for j, s in reversed(list(enumerate(sources))) if s is not None and s < j]
        out = KVCache.__new__(KVCache)
        out.__dict__.update(self.__dict__)
        out._buffers = dict(self._buffers)
        for name, buffer in self._buffers.items():
            for j in down + up:
                buffer[:, j].copy_(buffer[:, sources[j]])
            for j, s in enumerate(sources):
                if s is None:
                    buffer[:, j].fill_(1 if name.endswith("scales") else 0)
            setattr(out, name, buffer[:, :n])
        out.length = 0
        return out

    def converted(
        self,
        kind: str,
        kernels: ModuleType,
        positions: int | None = None,
        into: KVCache | None = None,
    ) -> KVCache:
        """This cache as an int8 or int4 one (`kind`; this one the other): the same rows and
        positions, each requantized from what this one holds as a step writes it (`kernels`:
        `engine.kernels`' module; one memory-bound pass over both). `positions`: how many hold
        keys (all slots by default). `into`: a cache of `kind` that nothing reads any more
        (the one this cache was converted from, kept for the way back): its buffers are written
        over where they have room, as `select_rows` does with its spare; otherwise new buffers
        with room for as many rows as this one's, of which only what is written is touched
        (the slots after `positions` hold whatever the memory held until steps write them: a
        step writes its position before it attends to it). What the radio's cheaper-cache rung
        switches with, between two steps (`engine.batch.DecodeBatch`); this cache is left as it
        was."""
        if {self.kind, kind} != {"int8", "int4"}:
            raise ValueError(
                f"a KV cache converts between int8 and int4, not {self.kind} to {kind}"
            )
        source = self.tensors()
        layers, rows, heads = source[0].shape[:3]
        if (
            into is not None
            and into.kind == kind
            and into.max_positions == self.max_positions
            and into.holds(rows)
            and next(iter(into._buffers.values())).shape[0] == layers
        ):
            base = into
        else:
            buffers = self._buffers or {"first": source[0]}  # a `rows` view: its own rows
            capacity = max(b.shape[1] for b in buffers.values())
            device = source[0].device
            base = KVCache(
                layers,
                capacity,
                heads,
                self.max_positions,
                Q4_HEAD,
                device=device,
                kind=kind,
                touched=False,
            )
        out = KVCache.__new__(KVCache)
        out.__dict__.update(base.__dict__)
        out._buffers = dict(base._buffers)
        for name, buffer in out._buffers.items():
            setattr(out, name, buffer[:, :rows])
        positions = self.max_positions if positions is None else min(positions, self.max_positions)
        if kind == "int4":
            kernels.requantize_q8_to_q4(*source, out._blocks(), positions)
        else:
            kernels.requantize_q4_to_q8(source[0], *out.tensors(), positions)
        out.length = self.length
        return out

    def holds(self, rows: int) -> bool:
        """Whether every buffer has room for `rows` rows (a spare for `select_rows`)."""
        return bool(self._buffers) and all(b.shape[1] >= rows for b in self._buffers.values())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What the kernels take, every layer: (keys, key scales, values, value scales) for int8,
        (blocks,) for int4, (keys, values) otherwise."""
        if self.kind == "int4":
            return (self._blocks(),)
        keys, values = self._kv()
        if self.kind == "int8":
            key_scales, value_scales = self._scales()
            return keys, key_scales, values, value_scales
        return keys, values

    def float_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole buffers a float cache's keys and values [L, B, H, P, D] are the first rows
        of ([L, >= B, H, P, D]; the tensors themselves for a view of part of a cache)."""
        keys, values = self._kv()
        assert not self.quantized, f"a float cache, not {self.kind}"
        return self._buffers.get("keys", keys), self._buffers.get("values", values)

    def layer(self, layer: int) -> tuple[torch.Tensor, ...]:
        """`tensors()` of one layer, every slot."""
        return tuple(t[layer] for t in self.tensors())

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, end, D] of positions [0, end) (a quantized cache: dequantized)."""
        if self.kind == "int4":
            k_part, v_part, k_scales, v_scales = (t[layer] for t in self._q4_parts())
            b, h, n = k_part.shape[:3]
            slots = n * Q4_BLOCK  # positions in order (copies)
            keys = dequantize_q4(k_part.reshape(b, h, slots, 32), k_scales.reshape(b, h, slots))
            values = dequantize_q4(v_part.reshape(b, h, slots, 32), v_scales.reshape(b, h, slots))
            return keys[:, :, :end], values[:, :, :end]
        cached_keys, cached_values = self._kv()
        keys, values = cached_keys[layer, :, :, :end], cached_values[layer, :, :, :end]
        if self.kind == "int8":
            key_scales, value_scales = self._scales()
            keys = keys.float() * key_scales[layer, :, :, :end, None]
            values = values.float() * value_scales[layer, :, :, :end, None]
        return keys, values

    def reset(self) -> None:
        self.length = 0
