"""The decoder's self-attention KV cache: one preallocated buffer, written by index.

Shapes never change during a stream, so a compiled or graph-captured step can read and write it
in place. `length` is how many positions hold valid keys/values; a window restart resets it to
zero and the re-prefill overwrites the buffer from the start.

An int8 cache (read only by our CPU kernels, `engine.kernels`) keeps each key and value vector
(one position of one head) as int8 with its own float32 scale, `x ~ scale * q` with
`scale = max|x| / 127`: a quarter of float32's bytes.
"""

from __future__ import annotations

import torch


def quantize_vectors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float -> (int8 [..., D], float32 scales [...]), one scale per vector."""
    scales = x.float().abs().amax(dim=-1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return torch.round(x.float() / scales[..., None]).to(torch.int8), scales


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
        dtype: torch.dtype,
    ) -> None:
        shape = (layers, batch, heads, max_positions, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)  # [L, B, H, P, D]
        self.values = torch.zeros(shape, device=device, dtype=dtype)  # [L, B, H, P, D]
        self.key_scales = self.value_scales = None  # [L, B, H, P] float32 for an int8 cache
        if dtype == torch.int8:
            self.key_scales = torch.ones(shape[:-1], device=device)
            self.value_scales = torch.ones(shape[:-1], device=device)
        self.max_positions = max_positions
        self.length = 0

    @property
    def quantized(self) -> bool:
        return self.key_scales is not None

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys/values [B, H, T, D] at positions [start, start + T)."""
        end = start + keys.shape[2]
        assert end <= self.max_positions, f"KV cache overflow: {end} > {self.max_positions}"
        if self.quantized:
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
        if self.quantized:
            keys, self.key_scales[layer, rows, :, positions] = quantize_vectors(keys)
            values, self.value_scales[layer, rows, :, positions] = quantize_vectors(values)
        self.keys[layer, rows, :, positions] = keys.to(self.keys.dtype)
        self.values[layer, rows, :, positions] = values.to(self.values.dtype)

    def rows(self, first: int, count: int) -> KVCache:
        """A cache over rows [first, first + count) of this one, sharing its storage."""
        view = KVCache.__new__(KVCache)
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
        """One layer, every slot: (keys, values) [B, H, P, D], or for an int8 cache
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
        """Keys and values [B, H, end, D] of positions [0, end) (an int8 cache: dequantized)."""
        keys, values = self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
        if self.quantized:
            keys = keys.float() * self.key_scales[layer, :, :, :end, None]
            values = values.float() * self.value_scales[layer, :, :, :end, None]
        return keys, values

    def reset(self) -> None:
        self.length = 0
