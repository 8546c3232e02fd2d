"""The decoder's self-attention KV cache: one preallocated buffer, written by index.

Shapes never change during a stream, so a compiled or graph-captured step can read and write it
in place. `length` is how many positions hold valid keys/values; a window restart resets it to
zero and the re-prefill overwrites the buffer from the start.
"""

from __future__ import annotations

import torch


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
        self.max_positions = max_positions
        self.length = 0

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys/values [B, H, T, D] at positions [start, start + T)."""
        end = start + keys.shape[2]
        assert end <= self.max_positions, f"KV cache overflow: {end} > {self.max_positions}"
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values

    def write_rows(
        self, layer: int, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Store one position per row: keys/values [B, H, 1, D] at positions [B]."""
        rows = torch.arange(keys.shape[0], device=keys.device)
        self.keys[layer, rows, :, positions] = keys[:, :, 0]
        self.values[layer, rows, :, positions] = values[:, :, 0]

    def rows(self, first: int, count: int) -> KVCache:
        """A cache over rows [first, first + count) of this one, sharing its storage."""
        view = KVCache.__new__(KVCache)
        view.keys = self.keys[:, first : first + count]
        view.values = self.values[:, first : first + count]
        view.max_positions = self.max_positions
        view.length = 0
        return view

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, P, D] of one layer, every slot."""
        return self.keys[layer], self.values[layer]

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, end, D] of positions [0, end)."""
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def reset(self) -> None:
        self.length = 0
