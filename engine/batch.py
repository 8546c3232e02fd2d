"""Several token streams sharing one decoder step: stations batched on one model.

A decode step on a CPU or a small GPU batch is bound by reading the weights, not by the maths,
so N streams in one step of 2N rows (conditional and null row each) cost little more than one.
Each stream keeps its own prompt, sampling settings, window position and re-prefills; the
batch owns the KV cache (rows 2i, 2i+1 belong to stream i), stacks the streams' text states for
cross-attention, and steps every stream by one position at a time. Rows at different points of
their windows attend with a per-row mask (`Decoder.forward(rows_at=...)`).
"""

from __future__ import annotations

import torch

from engine.conditioning import stack_rows
from engine.decoder import CrossKV, Decoder
from engine.kv_cache import KVCache
from engine.options import WindowOptions
from engine.sampling import sample_streams
from engine.static_step import StaticStep
from engine.token_stream import TokenStream

ROWS = 2  # conditional and null row per stream


class DecodeBatch:
    def __init__(
        self, decoder: Decoder, window: WindowOptions, size: int, compile: str = "none"
    ) -> None:
        """`compile`: "none", or how the batched step runs `engine.static_step`."""
        self.decoder = decoder
        self.window = window
        self.size = size
        self.cache = decoder.new_cache(ROWS * size, window.window)
        self.streams: list[TokenStream] = []
        self.steps = 0
        self._cross: CrossKV | None = None
        self._static = StaticStep(decoder, compile) if compile != "none" else None

    def join(self, stream: TokenStream) -> KVCache:
        """Give `stream` its rows of the shared cache (called by TokenStream.__init__)."""
        if len(self.streams) >= self.size:
            raise ValueError(f"this batch holds {self.size} streams")
        if stream.window != self.window:
            raise ValueError("every stream of a batch uses the same window options")
        first = ROWS * len(self.streams)
        self.streams.append(stream)
        return self.cache.rows(first, ROWS)

    def text_changed(self) -> None:
        """A stream has a new prompt: rebuild the stacked cross-attention inputs."""
        self._cross = None

    def _stacked_cross(self) -> CrossKV:
        if self._cross is None:
            states, masks = stack_rows(
                [s._text[0] for s in self.streams], [s._text[1] for s in self.streams]
            )
            self._cross = self.decoder.cross_kv(states, masks)
        return self._cross

    @torch.inference_mode()
    def step(self) -> None:
        """One decoder step for every stream (a stream at its window end re-prefills instead)."""
        if len(self.streams) != self.size:
            raise RuntimeError(f"the batch has {len(self.streams)} of its {self.size} streams")
        stepping = [s for s in self.streams if not s._restart_if_full()]
        if len(stepping) < len(self.streams):
            # Re-prefilled streams already have this step's tokens; step the others alone.
            for stream in stepping:
                stream._step()
            return
        ids = torch.cat([s._next_ids() for s in self.streams])  # [2N, K]
        rows_at = [s._fed for s in self.streams for _ in range(ROWS)]
        if self._static is not None:
            at = torch.tensor(rows_at, device=ids.device)
            samplings = [s.sampling for s in self.streams]
            generators = [s.generator for s in self.streams]
            tokens = self._static(ids, at, self.cache, self._stacked_cross(), samplings, generators)
            for stream, row in zip(self.streams, tokens, strict=True):
                stream._stepped(tokens=row)
            self.steps += 1
            return
        logits = self.decoder.decode_one_step(ids, self.cache, self._stacked_cross(), rows_at)
        samplings = [s.sampling for s in self.streams]
        generators = [s.generator for s in self.streams]
        tokens = sample_streams(logits, samplings, generators, self.decoder.kernels)
        for stream, row in zip(self.streams, tokens, strict=True):
            stream._stepped(tokens=row)
        self.steps += 1
