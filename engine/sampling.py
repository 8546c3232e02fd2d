"""From decoder logits to tokens: guidance, temperature, top-k, top-p, sampling.

The order and the maths are those of `transformers` (ClassifierFreeGuidanceLogitsProcessor, then
TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper), so that greedy decoding agrees
token for token with the reference and sampling has the same distribution. `guide` and `warp`
are that maths, written once: with per-stream settings as tensors they serve the eager step
(`sample_streams`, settings from each stream's `SamplingOptions`) and the compiled one
(`sample_tensors`, settings [N, 5] from `settings_tensor`, so that changing them does not
compile again). Our CPU kernels have their own (`engine/kernels/sampling.h`, `sample_top_k`).

The draws: the eager step draws by inverse CDF from one uniform per stream and codebook of the
stream's seeded generator (among the top-k candidates when top-k is on); the compiled step by an
exponential race, `argmax(probs / E)` with E ~ Exp(1) from the same generators (no data-dependent
shapes): the same distribution, other draws for the same seed.
"""

from __future__ import annotations

import dataclasses
import functools
from types import ModuleType

import torch

from engine.options import SamplingOptions


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance: cond, uncond [N, K, V], scale [N] -> `uncond + (cond - uncond)
    * scale` [N, K, V]; a scale of 1 gives exactly the conditional row."""
    s = scale[:, None, None]
    return torch.where(s == 1.0, cond, uncond + (cond - uncond) * s)


def warp(
    logits: torch.Tensor,
    temperature: torch.Tensor | float,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """logits [..., V] float32 -> logits after temperature, top-k and top-p (masked tokens
    -inf). Each setting is a number or a tensor that broadcasts against logits [..., 1] (per
    stream: [N, 1, 1]); top_k: a top_k of V keeps all; top_p: a tensor's 1 is off; None skips
    the step for every row."""
    logits = logits / temperature
    if top_k is not None:
        descending = logits.sort(dim=-1, descending=True).values
        index = (top_k.long() - 1).expand(*logits.shape[:-1], 1)
        logits = logits.masked_fill(logits < descending.gather(-1, index), float("-inf"))
    if top_p is not None:
        ascending, order = logits.sort(dim=-1)
        remove = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        remove[..., -1:] = False  # keep at least one token
        if isinstance(top_p, torch.Tensor):
            remove = remove & (top_p < 1)
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def logits_to_probs(logits: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """logits: [..., V] float32 -> probabilities [..., V] after temperature, top-k and top-p."""
    top_k = None
    if 0 < options.top_k < logits.shape[-1]:
        top_k = torch.tensor(options.top_k, device=logits.device)
    top_p = options.top_p if 0 < options.top_p < 1 else None
    return warp(logits, options.temperature, top_k, top_p).softmax(dim=-1)


def _top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits [..., k] and their token ids. Unsorted: half the time of a sorted
    top-k; the candidates' order does not change the distribution, and batched and lone
    streams take them in the same order."""
    return torch.topk(logits, k, dim=-1, sorted=False)


def top_k_probs(
    logits: torch.Tensor, options: SamplingOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [..., V] -> (probabilities [..., k], their token ids [..., k]) of the top-k
    survivors only, after temperature and top-p: `logits_to_probs` without the V - k zeros."""
    values, index = _top_k(logits, options.top_k)
    return logits_to_probs(values, dataclasses.replace(options, top_k=0)), index


def _pick(probs: torch.Tensor, u: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Inverse-CDF draws: probabilities [..., n] and uniforms [..., 1] in [0, 1) -> the chosen
    candidates' ids [...] (`index` [..., n], or the positions themselves). A candidate of
    probability 0 is never chosen; uniforms scale to the sum, so rounding cannot run past it."""
    cdf = probs.cumsum(dim=-1)
    at = torch.searchsorted(cdf, u * cdf[..., -1:], right=True).clamp_(max=probs.shape[-1] - 1)
    return (at if index is None else index.gather(-1, at))[..., 0]


def _draw(
    probs: torch.Tensor, index: torch.Tensor | None, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row of probabilities [..., n] over candidate ids [..., n] -> ids [...]: the
    distribution of `torch.multinomial`, from one uniform per row of `generator`."""
    u = torch.rand(*probs.shape[:-1], 1, generator=generator, device=probs.device)
    return _pick(probs, u, index)


def sample(
    logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None
) -> torch.Tensor:
    """logits: [N, K, V] guided float32 -> tokens [N, K]."""
    if options.greedy:
        return logits.argmax(dim=-1)
    if 0 < options.top_k < logits.shape[-1]:
        # The same distribution as drawing from the whole masked vocabulary (a masked token has
        # probability 0), drawn among k tokens instead of V: 3x cheaper per step (1 ms of a
        # CPU decode step's 10-13 was sampling).
        return _draw(*top_k_probs(logits, options), generator)
    return _draw(logits_to_probs(logits, options), None, generator)


@functools.lru_cache(maxsize=64)
def _kernel_settings(
    settings: tuple[tuple[float, float], ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(guidance scales, temperatures) float32 [N] of `sample_top_k`, made once per setting: a
    step's few ops after the decoder has streamed the caches cold each cost ~0.05-0.1 ms."""
    return torch.tensor([g for g, _ in settings]), torch.tensor([t for _, t in settings])


def _on_kernels(options: SamplingOptions, vocab: int) -> bool:
    """Whether `sample_top_k` (engine/kernels) draws for a stream: top-k without top-p."""
    return not options.greedy and 0 < options.top_k < vocab and not 0 < options.top_p < 1


def sample_streams(
    logits: torch.Tensor,
    options: list[SamplingOptions],
    generators: list[torch.Generator | None],
    kernels: ModuleType | None = None,
) -> torch.Tensor:
    """Streams' step, logits [R * N, K, V] (R = 2: stream i's conditional row 2i and null row
    2i + 1; R = 1: no null rows) -> tokens [N, K]: guidance (`uncond + (cond - uncond) * scale`,
    as `transformers`' ClassifierFreeGuidanceLogitsProcessor), then what `sample` gives each
    stream alone, draw for draw, whether it is sampled alone or batched (each stream's own
    generator gives its uniforms).

    With our CPU `kernels` (a decoder's `kernels`), top-k streams without top-p are drawn by one
    kernel call per k (`sample_top_k`: guidance, top-k, temperature, softmax and the draws, ~4 us
    per row): after a decode step has streamed the weights through the caches, each PyTorch op
    costs ~0.1 ms of cold dispatch, and the same maths in PyTorch is a dozen of them per stream.
    Its candidates go in token order, PyTorch's top-k in its own: the same distribution, other
    draws from the same uniforms, so a decoder samples one way, alone and batched alike."""
    rows = logits.shape[0] // len(options)
    tokens: list[torch.Tensor | None] = [None] * len(options)
    fast: list[int] = []  # the streams the kernel draws for, by k (one call per k)
    if kernels is not None and logits.device.type == "cpu":
        fast = [i for i, o in enumerate(options) if _on_kernels(o, logits.shape[-1])]
        for k in sorted({options[i].top_k for i in fast}):
            group = [i for i in fast if options[i].top_k == k]
            tokens_k = _draw_on_kernels(kernels, logits, rows, options, generators, group, k)
            for i, row in zip(group, tokens_k, strict=True):
                tokens[i] = row
    rest = [i for i in range(len(options)) if i not in fast]
    if rest:
        drawn = _sample_with_torch(logits, rows, options, generators, rest)
        for i, row in zip(rest, drawn, strict=True):
            tokens[i] = row
    return torch.stack(tokens)


def _draw_on_kernels(
    kernels: ModuleType,
    logits: torch.Tensor,
    rows: int,
    options: list[SamplingOptions],
    generators: list[torch.Generator | None],
    group: list[int],
    k: int,
) -> torch.Tensor:
    """Tokens [len(group), K] of the streams `group`, all top-k with this `k`, by `sample_top_k`."""
    picked = logits
    if len(group) < len(options):
        picked = logits.unflatten(0, (-1, rows))[group].flatten(0, 1)
    settings = _kernel_settings(
        tuple((options[i].guidance_scale, options[i].temperature) for i in group)
    )
    uniforms = torch.empty(len(group), logits.shape[1])
    for row, i in zip(uniforms, group, strict=True):
        torch.rand(logits.shape[1], generator=generators[i], out=row)
    return kernels.sample_top_k(picked.float().contiguous(), rows, *settings, k, uniforms)


def _sample_with_torch(
    logits: torch.Tensor,
    rows: int,
    options: list[SamplingOptions],
    generators: list[torch.Generator | None],
    streams: list[int],
) -> torch.Tensor:
    """`sample_streams` in PyTorch for the given streams: guidance, then top-k, temperature and
    softmax once for all of them when they share k and none is greedy (a handful of ops per
    step instead of a handful per stream), the draws from each stream's uniforms."""
    per_stream = logits.unflatten(0, (-1, rows))[streams]  # [n, R, K, V]
    options = [options[i] for i in streams]
    generators = [generators[i] for i in streams]
    if rows == 1:
        guided = per_stream[:, 0]
    else:
        scales = torch.tensor([o.guidance_scale for o in options], dtype=logits.dtype)
        guided = guide(per_stream[:, 0], per_stream[:, 1], scales.to(logits.device))
    ks = {o.top_k for o in options}
    k = ks.pop() if len(ks) == 1 else 0
    if not 0 < k < logits.shape[-1] or any(o.greedy for o in options):
        return torch.stack(
            [
                sample(guided[i : i + 1], o, g)[0]
                for i, (o, g) in enumerate(zip(options, generators, strict=True))
            ]
        )
    values, index = _top_k(guided, k)  # [N, K, k]
    if any(0 < o.top_p < 1 for o in options):
        probs = torch.stack(
            [
                logits_to_probs(values[i], dataclasses.replace(o, top_k=0))
                for i, o in enumerate(options)
            ]
        )
    else:  # logits_to_probs without top-p: temperature and softmax
        temperatures = torch.tensor([o.temperature for o in options], device=logits.device)
        probs = warp(values, temperatures[:, None, None]).softmax(dim=-1)
    u = torch.stack(
        [torch.rand(guided.shape[1], 1, generator=g, device=logits.device) for g in generators]
    )
    return _pick(probs, u, index)


# ---- per-stream settings as tensors: the compiled step (engine/static_step.py) ----------------


def settings_tensor(
    samplings: list[SamplingOptions], vocab: int, device: torch.device | str
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


def probs_from(logits: torch.Tensor, settings: torch.Tensor) -> torch.Tensor:
    """`logits_to_probs` with per-stream settings: logits [N, K, V] float32, settings [N, 5]
    (`settings_tensor`) -> probabilities [N, K, V]."""
    _, temperature, top_k, top_p, _ = (c[:, None, None] for c in settings.unbind(1))
    return warp(logits, temperature, top_k, top_p).softmax(dim=-1)


def sample_tensors(
    cond: torch.Tensor, uncond: torch.Tensor | None, settings: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Streams' conditional and null logits [N, K, V] float32 (uncond None: guidance off for
    all), settings [N, 5] (`settings_tensor`) and noise [N, K, V] drawn from Exp(1) -> tokens
    [N, K]: guidance, then argmax for greedy streams, else the exponential race over the warped
    probabilities. Shapes and settings are tensors only: the compiled step's sampling."""
    guided = cond if uncond is None else guide(cond, uncond, settings[:, 0])
    drawn = (probs_from(guided, settings) / noise).argmax(dim=-1)
    greedy = settings[:, 4, None] > 0  # [N, 1]
    return torch.where(greedy, guided.argmax(dim=-1), drawn)
