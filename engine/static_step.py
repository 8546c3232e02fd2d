"""A decoder step whose tensor shapes never change, so that it can be compiled and captured.

On a GPU the eager step (`Decoder.decode_one_step`, then guidance and sampling) is a few hundred
small kernel launches, and launching them, not the maths, bounds it. `StaticStep` runs the same
maths with shapes fixed for the life of a stream, so `torch.compile(mode="reduce-overhead")` can
replay it as one CUDA graph:

- self-attention over all P slots of the preallocated KV cache, with a per-row mask
  `arange(P) <= position[row]`; the new keys/values are written by index at tensor positions;
- cross-attention keys/values copied (when the prompt changes) into fixed buffers padded to a
  multiple of `TEXT_BUCKET` text tokens;
- a blend's conditional rows summed by weight (`Mix`: each stream's rows and weights as
  tensors, `engine.rows`), then guidance, temperature, top-k, top-p and the draw inside the
  step, with per-stream settings as tensors. The draw is an exponential race, `argmax(probs / E)` with E ~ Exp(1) drawn by each
  stream's seeded generator and passed in: the distribution of `torch.multinomial`, other draws.

Modes: "eager" runs the function as it is; "compile" with `torch.compile` (no graphs, also on a
CPU); "graphs" with `mode="reduce-overhead"` (CUDA graphs). When compiling or capturing fails,
one warning says what failed and the same function runs eagerly (or, when only the graph capture
was skipped, compiled without graphs). The prefill stays eager (`Decoder.prefill`).

Shapes are fixed per row layout: when a batch lays its rows out anew (a blend with another
number of texts, a transition beginning or ending), the step meets new shapes and
`torch.compile` compiles (and captures) it once more for them; a layout seen before reuses its
graph. Plain prompts only (one conditional row per stream) take no `Mix`.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from engine.decoder import CrossKV, Decoder
from engine.kv_cache import KVCache
from engine.options import SamplingOptions

log = logging.getLogger(__name__)

MODES = ("eager", "compile", "graphs")
TEXT_BUCKET = 64  # cross-attention buffers hold a multiple of this many text tokens


class Mix(NamedTuple):
    """Which rows make each stream's conditional and null logits (a batch with blends)."""

    rows: torch.Tensor  # [N, M] long: stream i's conditional rows (padded with weight 0)
    weights: torch.Tensor  # [N, M] float32: their weights (sum 1 per stream)
    nulls: torch.Tensor  # [N] long: stream i's null row (guidance 1: any row)


def guide(logits: torch.Tensor, scale: torch.Tensor, mix: Mix | None = None) -> torch.Tensor:
    """logits: [N * R, K, V], rows (conditional, null) per stream when R == 2 (or the rows
    `mix` names: a stream's conditional logits are its rows' weighted sum); scale: [N].
    Returns guided logits [N, K, V]; a scale of 1 gives exactly the conditional row."""
    if mix is not None:
        cond = (logits[mix.rows] * mix.weights[:, :, None, None]).sum(dim=1)
        uncond = logits[mix.nulls]
    else:
        grouped = logits.view(scale.shape[0], -1, *logits.shape[1:])  # [N, R, K, V]
        if grouped.shape[1] == 1:
            return grouped[:, 0]
        cond, uncond = grouped[:, 0], grouped[:, 1]
    s = scale[:, None, None]
    return torch.where(s == 1.0, cond, uncond + (cond - uncond) * s)


def probs_from(logits: torch.Tensor, settings: torch.Tensor) -> torch.Tensor:
    """`sampling.logits_to_probs` with per-stream tensors. logits: [N, K, V] float32;
    settings: [N, 5] from `settings_tensor`. Returns probabilities [N, K, V]."""
    _, temperature, top_k, top_p, _ = (c[:, None, None] for c in settings.unbind(1))
    logits = logits / temperature
    descending = logits.sort(dim=-1, descending=True).values
    index = (top_k.long() - 1).expand(*logits.shape[:-1], 1)  # top_k == V keeps all
    logits = logits.masked_fill(logits < descending.gather(-1, index), float("-inf"))
    ascending, order = logits.sort(dim=-1)
    remove = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    remove[..., -1:] = False  # keep at least one token
    remove = remove & (top_p < 1)  # top_p == 1 is off
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf")).softmax(dim=-1)


def sample_rows(
    logits: torch.Tensor, settings: torch.Tensor, noise: torch.Tensor, mix: Mix | None = None
) -> torch.Tensor:
    """logits: [N * R, K, V] float32 (or rows as `mix` names them); settings: [N, 5]; noise:
    [N, K, V] drawn from Exp(1). Returns tokens [N, K]: argmax for greedy streams, else the
    exponential race."""
    guided = guide(logits, settings[:, 0], mix)
    drawn = (probs_from(guided, settings) / noise).argmax(dim=-1)
    greedy = settings[:, 4, None] > 0
    return torch.where(greedy, guided.argmax(dim=-1), drawn)


def settings_tensor(
    samplings: list[SamplingOptions], vocab: int, device: torch.device
) -> torch.Tensor:
    """[N, 5] float32: guidance scale, temperature, top-k (vocab when off), top-p (1 when off),
    greedy (1 or 0), one row per stream."""
    rows = [
        [
            s.guidance_scale,
            s.temperature,
            s.top_k if 0 < s.top_k < vocab else vocab,
            s.top_p if 0 < s.top_p < 1 else 1.0,
            float(s.greedy),
        ]
        for s in samplings
    ]
    return torch.tensor(rows, dtype=torch.float32, device=device)


def decode_logits(
    d: Decoder,
    ids: torch.Tensor,
    positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cross_keys: torch.Tensor,
    cross_values: torch.Tensor,
    cross_mask: torch.Tensor,
) -> torch.Tensor:
    """One position per row, the maths of `Decoder.forward` with T == 1 and `rows_at`, over the
    whole cache. ids: [B, K]; positions: [B] long; keys, values: [L, B, H, P, D] the KV cache,
    written in place at `positions`; cross_keys, cross_values: [L, B, H, S, D]; cross_mask:
    [B, 1, 1, S] bool. Returns float32 logits [B, K, V]."""
    b = ids.shape[0]
    x = sum(F.embedding(ids[:, k], d.embed[k]) for k in range(d.num_codebooks))
    x = (x + d.positions[positions])[:, None]  # [B, 1, E]
    rows = torch.arange(b, device=ids.device)
    slots = torch.arange(keys.shape[3], device=ids.device)
    self_mask = (slots <= positions[:, None])[:, None, None, :]  # [B, 1, 1, P]
    for i, w in enumerate(d.layers):
        h = F.layer_norm(x, (d.hidden,), *w.ln_self)
        q, k, v = w.qkv(h).chunk(3, dim=-1)
        keys[i, rows, :, positions] = d._split_heads(k)[:, :, 0].to(keys.dtype)
        values[i, rows, :, positions] = d._split_heads(v)[:, :, 0].to(values.dtype)
        q = d._split_heads(q)  # a bfloat16 cache (our CPU kernels' layout) attends as q's dtype
        a = F.scaled_dot_product_attention(
            q, keys[i].to(q.dtype), values[i].to(q.dtype), attn_mask=self_mask
        )
        x = x + w.out_self(d._merge_heads(a))

        h = F.layer_norm(x, (d.hidden,), *w.ln_cross)
        q = d._split_heads(w.q_cross(h))
        a = F.scaled_dot_product_attention(q, cross_keys[i], cross_values[i], attn_mask=cross_mask)
        x = x + w.out_cross(d._merge_heads(a))

        h = F.layer_norm(x, (d.hidden,), *w.ln_ffn)
        x = x + w.fc2(d.activation(w.fc1(h)))
    return d.logits(F.layer_norm(x[:, 0], (d.hidden,), *d.final_ln))


def decode_step(
    d: Decoder,
    *tensors: torch.Tensor,
    settings: torch.Tensor,
    noise: torch.Tensor,
    mix: Mix | None = None,
) -> torch.Tensor:
    """`decode_logits(d, *tensors)`, then blending (`mix`), guidance and sampling with settings
    [N, 5] and noise [N, K, V]: tokens [N, K]. This is the function that gets compiled."""
    return sample_rows(decode_logits(d, *tensors), settings, noise, mix)


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
                    decode_step, mode=compile_mode, fullgraph=True, dynamic=False
                )
            except Exception as err:  # noqa: BLE001 - e.g. a Python that torch.compile refuses
                self._fall_back(err)
        self._cross: CrossKV | None = None  # the prompt batch now in the buffers
        # its keys, values [L, B, H, S', D] (S' a multiple of TEXT_BUCKET) and mask [B, 1, 1, S']
        self._cross_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._noise: torch.Tensor | None = None  # [N, K, V]
        self._settings: tuple[list[SamplingOptions], torch.Tensor] | None = None
        self._mix: Mix | None = None  # fixed buffers of the latest blend rows and weights
        self._graph_skips_seen = False

    def __call__(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        cross: CrossKV,
        samplings: list[SamplingOptions],
        generators: list[torch.Generator],
        mix: Mix | None = None,
    ) -> torch.Tensor:
        """ids: [B, K] at `positions` [B] long; rows per stream: B // len(samplings), in the
        order (conditional, null), or as `mix` names them (blends). Returns tokens [N, K], one
        row per stream."""
        args = (self.decoder, ids, positions, cache.keys, cache.values, *self._load_cross(cross))
        sampling: dict[str, Any] = dict(
            settings=self._settings_for(samplings),
            noise=self._draw(samplings, generators, ids.shape[1]),
        )
        if mix is not None:
            sampling["mix"] = self._load_mix(mix)
        if self._run is not decode_step:
            for t in (cache.keys, cache.values):
                torch._dynamo.mark_static_address(t)
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
        buffers = self._load_cross(cross)
        return decode_logits(self.decoder, ids, positions, cache.keys, cache.values, *buffers)

    def _compiled(self, args: tuple, sampling: dict) -> torch.Tensor:
        from torch._dynamo.utils import counters

        if self.mode == "graphs":
            torch.compiler.cudagraph_mark_step_begin()
        skips = counters["inductor"]["cudagraph_skips"]
        # A graph's output is overwritten by its next replay: keep a copy.
        tokens = self._run(*args, **sampling).clone()
        skipped = counters["inductor"]["cudagraph_skips"] > skips
        if self.mode == "graphs" and skipped and not self._graph_skips_seen:
            self._graph_skips_seen = True
            log.warning(
                "the static decoder step was compiled, but CUDA graphs were not captured "
                "(device %s; TORCH_LOGS=cudagraphs says why); it runs compiled without them",
                args[1].device,
            )
        return tokens

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
