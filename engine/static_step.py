"""The buffers and the compilation of a decoder step whose tensor shapes never change.

On a GPU the eager step (`Decoder.decode_one_step`, then guidance and sampling) is a few hundred
small kernel launches, and launching them, not the maths, bounds it. The decoder's step is
already shape-static (`Decoder.step_logits`: keys/values written at tensor positions, attention
over all P slots of the preallocated KV cache with the mask `arange(P) <= position[row]`), and
so is the sampling of `engine.sampling.sample_tensors`. `StaticStep` runs the two as one
function, `torch.compile(mode="reduce-overhead")` replays it as one CUDA graph, and this module
keeps what a replay needs at fixed addresses:

- cross-attention keys/values copied (when the prompt changes) into fixed buffers padded to a
  multiple of `TEXT_BUCKET` text tokens, with their mask;
- per-stream sampling settings as a tensor (`engine.sampling.settings_tensor`), each stream's rows
  and weights as tensors (`Mix`, `engine.rows.stream_rows`), and the Exp(1) noise of the draw
  (an exponential race, `argmax(probs / E)`), drawn by each stream's seeded generator.

Modes: "eager" runs the function as it is; "compile" with `torch.compile` (no graphs, also on a
CPU); "graphs" with `mode="reduce-overhead"` (CUDA graphs). When compiling or capturing fails,
one warning says what failed and the same function runs eagerly (or, when only the graph capture
was skipped, compiled without graphs). The prefill stays eager (`Decoder.prefill`).

Shapes are fixed per row layout: when a batch lays its rows out anew (guidance on or off, a
blend with another number of texts, a transition beginning or ending, a longer text's bucket),
the step meets new shapes. The first compile already takes the sizes a layout changes as
symbols (`_layout_dims_dynamic`), and a batch hands every step a `Mix`, plain prompts too, so
every later layout runs the code compiled before the station went on air; CUDA graphs record a
graph per size (a capture, not a compile). A size of 1 stays specialized (one station's stream
count): another station count in the same process compiles once more, with it as a symbol.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from engine.decoder import CrossKV, Decoder
from engine.kv_cache import KVCache
from engine.options import SamplingOptions
from engine.rows import Mix, stream_rows
from engine.sampling import sample_tensors, settings_tensor

log = logging.getLogger(__name__)

MODES = ("eager", "compile", "graphs")
# A new row layout (a station count, a transition's glide rows, guidance off, a longer text's
# bucket, a window) is a new shape. Compiled with dynamic=False each was a compile of its own
# (minutes on a GPU, on the generator's thread) and past Dynamo's 8 entries a fullgraph compile
# raised, the step eager for good. Now the first compile marks the dims a layout changes as
# symbols, and what still specializes (a size of 1) recompiles with Dynamo's automatic dynamic
# shapes: the limit is a margin for that.
RECOMPILE_LIMIT = 64
TEXT_BUCKET = 64  # cross-attention buffers hold a multiple of this many text tokens


def decode_step(
    d: Decoder,
    ids: torch.Tensor,
    positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *cross: torch.Tensor,
    settings: torch.Tensor,
    noise: torch.Tensor,
    mix: Mix,
) -> torch.Tensor:
    """`d.step_logits` over the first B rows of the cache's buffers `keys`, `values` [L, >= B,
    H, P, D] (B: the rows of `ids`), then each stream's rows (`mix`), guidance and sampling with
    settings [N, 5] and noise [N, K, V]: tokens [N, K]. This is the function that gets compiled.
    (The buffers whole, their rows taken here: a cache laid out within room for more rows is a
    view whose strides are not its shape's, a new kind of input to compile. A batch keeps room
    for a row more than it lays out, so the rows are never the whole buffer: that too would be
    another kind, contiguous.)"""
    rows = ids.shape[0]
    logits = d.step_logits(ids, positions, keys[:, :rows], values[:, :rows], *cross)
    cond, uncond = stream_rows(logits, mix)
    return sample_tensors(cond, uncond, settings, noise)


def _weights(d: Decoder) -> list[torch.Tensor]:
    """Every tensor the step reads from the decoder (for CUDA graphs: fixed addresses)."""
    found = [*d.embed, d.positions, *d.final_ln]
    for part in [d.lm_heads, *(v for w in d.layers for v in vars(w).values())]:
        items = part if isinstance(part, tuple) else (part,)
        for item in items:
            weight = item if isinstance(item, torch.Tensor) else getattr(item, "weight", None)
            if isinstance(weight, torch.Tensor):
                found.append(weight)
    return found


# The dims a new row layout changes, per argument of `decode_step` after the decoder: ids [B, K],
# positions [B], the cache's buffers of keys and values [L, >= B, H, P, D], the cross-attention's
# keys and values [L, B, H, S', D] and mask [B, 1, 1, S'].
_LAYOUT_DIMS = ((0,), (0,), (1,), (1,), (1, 3), (1, 3), (0, 3))
_SAMPLING_DIMS = {"settings": (0,), "noise": (0,)}  # [N, 5], [N, K, V]


def _layout_dims_dynamic(args: tuple, sampling: dict) -> None:
    """Mark as symbols, before the first compile, the dims a new row layout changes, so that one
    compile serves every layout (a dim of size 1 stays specialized)."""
    for t, dims in zip(args[1:], _LAYOUT_DIMS, strict=True):
        for dim in dims:
            torch._dynamo.maybe_mark_dynamic(t, dim)
    for name, dims in _SAMPLING_DIMS.items():
        for dim in dims:
            torch._dynamo.maybe_mark_dynamic(sampling[name], dim)
    for t in sampling["mix"]:
        for dim in range(t.dim()):
            torch._dynamo.maybe_mark_dynamic(t, dim)


class StaticStep:
    """The static step of one stream or one batch of streams, with its fixed buffers."""

    def __init__(self, decoder: Decoder, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.decoder = decoder
        self.mode = mode
        self._run = decode_step
        if mode != "eager":
            for t in _weights(decoder):
                torch._dynamo.mark_static_address(t)
            compile_mode = "reduce-overhead" if mode == "graphs" else "default"
            try:
                self._run = torch.compile(
                    decode_step,
                    mode=compile_mode,
                    fullgraph=True,
                    dynamic=None,  # (automatic: static first, then what changes)
                    recompile_limit=RECOMPILE_LIMIT,
                )
            except Exception as err:  # noqa: BLE001 - e.g. a Python that torch.compile refuses
                self._fall_back(err)
        self._cross: CrossKV | None = None  # the prompt batch now in the buffers
        # its keys, values [L, B, H, S', D] (S' a multiple of TEXT_BUCKET) and mask [B, 1, 1, S']
        self._cross_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._noise: torch.Tensor | None = None  # [N, K, V]
        self._settings: tuple[list[SamplingOptions], torch.Tensor] | None = None
        self._mix: Mix | None = None  # fixed buffers of the latest rows and weights (`Mix`)
        self._graph_skips_seen = False
        self._compiles = 0  # compiles this step has taken (`_said_compiled`)
        self._threads: int | None = None  # torch's thread count the compiled step runs on

    def __call__(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        cross: CrossKV,
        samplings: list[SamplingOptions],
        generators: list[torch.Generator],
        mix: Mix,
    ) -> torch.Tensor:
        """ids: [B, K] at `positions` [B] long; each stream's rows as `mix` names them (its
        conditional rows with their weights, its null row). Returns tokens [N, K], one row per
        stream."""
        assert not cache.quantized, f"the static step reads a float KV cache, not {cache.kind}"
        # (one lane's ids may be a row expanded: its strides would be a new kind of input)
        ids = ids.contiguous()
        keys, values = cache.float_buffers()
        args = (self.decoder, ids, positions, keys, values, *self._load_cross(cross))
        sampling: dict[str, Any] = dict(
            settings=self._settings_for(samplings),
            noise=self._draw(samplings, generators, ids.shape[1]),
            mix=self._load_mix(mix),
        )
        if self._run is not decode_step:
            for t in (keys, values):
                torch._dynamo.mark_static_address(t)
            _layout_dims_dynamic(args, sampling)
            try:
                return self._compiled(args, sampling)
            except Exception as err:  # noqa: BLE001 - any failure to compile or capture
                self._fall_back(err)
        # A retry after a failed compiled call writes the same keys/values at the same positions.
        return decode_step(*args, **sampling)

    def _fall_back(self, err: Exception) -> None:
        first = (str(err).strip().splitlines() or [""])[0]
        log.warning(
            "the static decoder step could not be compiled (mode %r): %s: %s; "
            "it runs eagerly instead",
            self.mode,
            type(err).__name__,
            first,
        )
        self._run = decode_step

    def logits(
        self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, cross: CrossKV
    ) -> torch.Tensor:
        """The step's logits [B, K, V], eagerly, over the same fixed buffers (for tests)."""
        keys, values = cache.tensors()
        return self.decoder.step_logits(ids, positions, keys, values, *self._load_cross(cross))

    def _compiled(self, args: tuple, sampling: dict) -> torch.Tensor:
        from torch._dynamo.utils import counters

        if self.mode == "graphs":
            torch.compiler.cudagraph_mark_step_begin()
        skips = counters["inductor"]["cudagraph_skips"]
        graphs = counters["stats"]["unique_graphs"]
        began = time.perf_counter()
        # Dynamo guards on torch's thread count (Inductor's CPU code is built for one): the
        # radio's thread tuner moves it between reads and prefills, and each new count compiled
        # the step again while on air. The step runs on the count of its first call.
        threads = torch.get_num_threads()
        if self._threads is None:
            self._threads = threads
        if threads != self._threads:
            torch.set_num_threads(self._threads)
        try:
            # A graph's output is overwritten by its next replay: keep a copy.
            tokens = self._run(*args, **sampling).clone()
        finally:
            if threads != self._threads:
                torch.set_num_threads(threads)
        if counters["stats"]["unique_graphs"] > graphs:
            self._said_compiled(time.perf_counter() - began, args[1].shape[0], len(tokens))
        skipped = counters["inductor"]["cudagraph_skips"] > skips
        if self.mode == "graphs" and skipped and not self._graph_skips_seen:
            self._graph_skips_seen = True
            log.warning(
                "the static decoder step was compiled, but CUDA graphs were not captured "
                "(device %s; TORCH_LOGS=cudagraphs says why); it runs compiled without them",
                args[1].device,
            )
        return tokens

    def _said_compiled(self, seconds: float, rows: int, streams: int) -> None:
        """Say that the step compiled: its first time for this batch (before its first sound),
        or again, for a row layout the compiled code did not fit (while on air: the stations
        wait)."""
        self._compiles += 1
        if self._compiles == 1:
            log.info(
                "the decoder step compiled in %.1f s (mode %r, %d rows of %d streams); later row "
                "layouts run the same code",
                seconds,
                self.mode,
                rows,
                streams,
            )
            return
        log.warning(
            "the decoder step compiled again in %.1f s, for a row layout of %d rows and %d "
            "streams that the compiled code did not fit (TORCH_LOGS=recompiles says why)",
            seconds,
            rows,
            streams,
        )

    def _load_cross(self, cross: CrossKV) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fixed buffers (keys, values, mask) holding a prompt batch's cross-attention keys
        and values, copied in when it is new."""
        if cross is self._cross and self._cross_buffers is not None:
            return self._cross_buffers
        keys, values = torch.stack(cross.keys), torch.stack(cross.values)  # [L, B, H, S, D]
        s = keys.shape[3]
        size = -(-s // TEXT_BUCKET) * TEXT_BUCKET
        shape = (*keys.shape[:3], size, keys.shape[4])
        buffers = self._cross_buffers
        if buffers is None or buffers[0].shape != shape:
            buffers = (
                keys.new_zeros(shape),
                keys.new_zeros(shape),
                torch.zeros(shape[1], 1, 1, size, dtype=torch.bool, device=keys.device),
            )
            if self.mode != "eager":
                for t in buffers:
                    torch._dynamo.mark_static_address(t)
        cross_keys, cross_values, cross_mask = buffers
        cross_keys.zero_()[:, :, :, :s] = keys
        cross_values.zero_()[:, :, :, :s] = values
        cross_mask.zero_()[..., :s] = cross.mask
        self._cross, self._cross_buffers = cross, buffers
        return buffers

    def _load_mix(self, mix: Mix) -> Mix:
        """Copy a step's blend rows and weights into fixed buffers (new ones for new shapes)."""
        if self._mix is None or any(
            a.shape != b.shape for a, b in zip(self._mix, mix, strict=True)
        ):
            self._mix = Mix(*(t.clone() for t in mix))
            if self.mode != "eager":
                for t in self._mix:
                    torch._dynamo.mark_static_address(t)
            return self._mix
        for buffer, t in zip(self._mix, mix, strict=True):
            buffer.copy_(t)
        return self._mix

    def _settings_for(self, samplings: list[SamplingOptions]) -> torch.Tensor:
        if self._settings is None or self._settings[0] != samplings:
            tensor = settings_tensor(samplings, self.decoder.vocab, self.decoder.device)
            self._settings = (list(samplings), tensor)
        return self._settings[1]

    def _draw(
        self, samplings: list[SamplingOptions], generators: list[torch.Generator], k: int
    ) -> torch.Tensor:
        """Exp(1) noise [N, K, V], each stream's rows from its own generator (a greedy stream's
        rows are not read: they stay as they are)."""
        shape = (len(samplings), k, self.decoder.vocab)
        if self._noise is None or self._noise.shape != shape:
            self._noise = torch.ones(shape, device=self.decoder.device)
            if self.mode != "eager":
                torch._dynamo.mark_static_address(self._noise)
        for row, sampling, generator in zip(self._noise, samplings, generators, strict=True):
            if not sampling.greedy:
                # A draw of exactly 0 (probability ~0) would divide by zero in the race.
                row.exponential_(generator=generator).clamp_(min=torch.finfo(row.dtype).tiny)
        return self._noise
