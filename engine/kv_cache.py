"""The decoder's self-attention KV cache: one preallocated buffer, written by index.

Shapes never change during a stream, so a compiled or graph-captured step can read and write it
in place. `length` is how many positions hold valid keys/values; a window restart resets it to
zero and the re-prefill overwrites the buffer from the start.

Two quantized caches are read only by our CPU kernels (`engine.kernels`); each key and value
vector (one position of one head) has its own float32 scale:

- int8: `x ~ scale * q`, `scale = max|x| / 127`, int8 [L, B, H, P, D]: a quarter of float32's bytes.
- int4 (heads of 64): `x ~ scale * (u - 8)`, `u = round(x / scale) + 8` in [1, 15],
  `scale = max|x| / 7`, two per byte, byte r holding dims r and r + 32: 32 bytes per vector
  (uint8 [L, B, H, P, 32], P rounded up to a multiple of 16). Keys go by blocks of 16
  positions, [8][16][4] bytes (byte 4j + b of position l at [j][l][b]), values by pairs of
  positions, byte 2r + j of pair g holding position 2g + j: the orders the kernel's dot
  products read them in (engine/kernels/attention.h). Half the int8 cache's bytes: what several
  stations batched in one step mostly read.
"""

from __future__ import annotations

import torch

KINDS = ("float32", "bfloat16", "int8", "int4")
Q4_HEAD = 64
Q4_BLOCK = 16  # positions per block of int4 keys


def quantize_vectors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float -> (int8 [..., D], float32 scales [...]), one scale per vector."""
    scales = x.float().abs().amax(dim=-1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return torch.round(x.float() / scales[..., None]).to(torch.int8), scales


def quantize_q4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., 64] float -> (uint8 [..., 32]: byte r = u[r] | u[r + 32] << 4, float32 scales [...])."""
    scales = x.float().abs().amax(dim=-1) / 7.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    u = (torch.round(x.float() / scales[..., None]).clamp(-7, 7) + 8).to(torch.uint8)
    half = x.shape[-1] // 2
    return u[..., :half] | (u[..., half:] << 4), scales


def dequantize_q4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The inverse of `quantize_q4` up to rounding: [..., 32] uint8 and [...] -> [..., 64] float32."""
    u = torch.cat([packed & 15, packed >> 4], dim=-1).float()
    return (u - 8) * scales[..., None]


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
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"KV cache kind must be one of {KINDS}, got {kind!r}")
        if kind == "int4" and head_dim != Q4_HEAD:
            raise ValueError(f"an int4 KV cache holds heads of {Q4_HEAD}, not {head_dim}")
        self.kind = kind
        slots = max_positions
        if kind == "int4":
            slots = -(-max_positions // Q4_BLOCK) * Q4_BLOCK
        width = head_dim // 2 if kind == "int4" else head_dim
        dtype = {"int4": torch.uint8, "int8": torch.int8}.get(kind) or getattr(torch, kind)
        shape = (layers, batch, heads, slots, width)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)  # [L, B, H, P, D]
        self.values = torch.zeros(shape, device=device, dtype=dtype)  # [L, B, H, P, D]
        self.key_scales = self.value_scales = None  # [L, B, H, P] float32 for int8 and int4
        if self.quantized:
            self.key_scales = torch.ones(shape[:-1], device=device)
            self.value_scales = torch.ones(shape[:-1], device=device)
        self.max_positions = max_positions
        self.length = 0

    @property
    def quantized(self) -> bool:
        return self.kind in ("int8", "int4")

    def _pairs(self) -> torch.Tensor:
        """int4 values as [L, B, H, P / 2, 2, 32]: [..., g, j, :] is position 2g + j (a view)."""
        layers, b, h, p, w = self.values.shape
        return self.values.view(layers, b, h, p // 2, w, 2).transpose(-1, -2)

    def _key_blocks(self) -> torch.Tensor:
        """int4 keys as [L, B, H, P / 16, 16, 8, 4]: [..., n, l, :, :] is position 16n + l's
        32 bytes (a view)."""
        layers, b, h, p, w = self.keys.shape
        blocks = self.keys.view(layers, b, h, p // Q4_BLOCK, w // 4, Q4_BLOCK, 4)
        return blocks.transpose(-3, -2)

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys/values [B, H, T, D] at positions [start, start + T)."""
        end = start + keys.shape[2]
        assert end <= self.max_positions, f"KV cache overflow: {end} > {self.max_positions}"
        if self.kind == "int4":
            keys, self.key_scales[layer, :, :, start:end] = quantize_q4(keys)
            values, self.value_scales[layer, :, :, start:end] = quantize_q4(values)
            at = torch.arange(start, end, device=keys.device)
            b, h, t, w = keys.shape
            blocks = keys.view(b, h, t, w // 4, 4)
            self._key_blocks()[layer, :, :, at // Q4_BLOCK, at % Q4_BLOCK] = blocks
            pairs = self._pairs()[layer]
            for j in (0, 1):  # positions 2g + j of the range, g consecutive
                first = start + (start + j) % 2
                pairs[:, :, first // 2 : (end - j + 1) // 2, j] = values[:, :, first - start :: 2]
            return
        if self.kind == "int8":
            keys, self.key_scales[layer, :, :, start:end] = quantize_vectors(keys)
            values, self.value_scales[layer, :, :, start:end] = quantize_vectors(values)
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values

    def write_rows(
        self, layer: int, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Store one position per row: keys/values [B, H, 1, D] at positions [B]."""
        rows = torch.arange(keys.shape[0], device=keys.device)
        keys, values = keys[:, :, 0], values[:, :, 0]
        if self.kind == "int4":
            keys, self.key_scales[layer, rows, :, positions] = quantize_q4(keys)
            values, self.value_scales[layer, rows, :, positions] = quantize_q4(values)
            b, h, w = keys.shape
            blocks = self._key_blocks()[layer]
            blocks[rows, :, positions // Q4_BLOCK, positions % Q4_BLOCK] = keys.view(
                b, h, w // 4, 4
            )
            self._pairs()[layer, rows, :, positions // 2, positions % 2] = values
            return
        if self.kind == "int8":
            keys, self.key_scales[layer, rows, :, positions] = quantize_vectors(keys)
            values, self.value_scales[layer, rows, :, positions] = quantize_vectors(values)
        self.keys[layer, rows, :, positions] = keys.to(self.keys.dtype)
        self.values[layer, rows, :, positions] = values.to(self.values.dtype)

    def rows(self, first: int, count: int) -> KVCache:
        """A cache over rows [first, first + count) of this one, sharing its storage."""
        view = KVCache.__new__(KVCache)
        view.kind = self.kind
        view.keys = self.keys[:, first : first + count]
        view.values = self.values[:, first : first + count]
        view.key_scales = view.value_scales = None
        if self.quantized:
            view.key_scales = self.key_scales[:, first : first + count]
            view.value_scales = self.value_scales[:, first : first + count]
        view.max_positions = self.max_positions
        view.length = 0
        return view

    def layer(self, layer: int) -> tuple[torch.Tensor, ...]:
        """One layer, every slot: (keys, values) [B, H, P, D], or for a quantized cache
        (keys, key scales, values, value scales), scales [B, H, P]."""
        if self.quantized:
            return (
                self.keys[layer],
                self.key_scales[layer],
                self.values[layer],
                self.value_scales[layer],
            )
        return self.keys[layer], self.values[layer]

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, end, D] of positions [0, end) (a quantized cache: dequantized)."""
        if self.kind == "int4":
            _, b, h, p, w = self.values.shape
            keys = self._key_blocks()[layer].reshape(b, h, p, w)  # positions in order (copies)
            values = self._pairs()[layer].reshape(b, h, p, w)
            keys = dequantize_q4(keys[:, :, :end], self.key_scales[layer, :, :, :end])
            return keys, dequantize_q4(values[:, :, :end], self.value_scales[layer, :, :, :end])
        keys, values = self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
        if self.kind == "int8":
            keys = keys.float() * self.key_scales[layer, :, :, :end, None]
            values = values.float() * self.value_scales[layer, :, :, :end, None]
        return keys, values

    def reset(self) -> None:
        self.length = 0
