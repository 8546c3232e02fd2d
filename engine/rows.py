"""A stream's rows in a decode batch: one conditional row per text, and the null row.

Classifier-free guidance over a blend of texts (DESIGN.md, "Prompts as blends"): with the
conditional logits `c_i` of one row per text (each row with its own self-attention cache over
the same tokens, and cross-attention to its own text) and the null row `u` (zero text states),

    logits = u + g * (sum_i w_i * c_i - u),      sum_i w_i = 1.

A plain prompt is the blend of one: rows (conditional, null), logits `u + g * (c - u)`, exactly
`transformers`' guidance. Sampling takes the blend as one conditional row and the null row:
`mix_rows` sums each stream's conditional rows by weight first, so one sampling call (ours or
`engine.sampling`) serves every stream, whatever its number of rows. The compiled step takes
the same rows and weights as tensors (`Mix`, `stream_rows`), so that new weights are new values,
not new code.

- `Prompt` is what a stream is conditioned on: text conditions with weights that sum to 1.
  Rows are matched by their condition object (`is`): whoever changes prompts (`AudioStream`)
  hands the same object for the same text, so a text that stays keeps its row and cache.
- `Change` is a prompt change from a frame on: a switch, or a transition whose weights glide
  from the blend before to the new one over `frames` frames, `w = (1 - t) * old + t * new` with
  `t = (frame - start) / frames` clamped to [0, 1], for the frame each step samples. While it
  glides, the rows are both blends' texts; once t reaches 1, the rows whose weight is 0 leave.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from engine.conditioning import TextCondition


@dataclass(frozen=True, eq=False)
class Prompt:
    """Text conditions with weights that sum to 1 (a blend); one part is a plain prompt."""

    parts: tuple[tuple[TextCondition, float], ...]

    def __post_init__(self) -> None:
        assert self.parts, "a prompt has at least one part"
        conditions = [c for c, _ in self.parts]
        assert len({id(c) for c in conditions}) == len(conditions), "a condition appears twice"
        assert all(w >= 0 for _, w in self.parts), f"negative weight in {self.weights}"
        assert abs(math.fsum(self.weights) - 1) < 1e-6, f"weights must sum to 1: {self.weights}"

    @classmethod
    def of(cls, condition: TextCondition) -> Prompt:
        """The plain prompt of one condition."""
        return cls(((condition, 1.0),))

    @classmethod
    def weighted(cls, parts: Sequence[tuple[TextCondition, float]]) -> Prompt:
        """Conditions with weights > 0, normalised to sum 1."""
        total = math.fsum(w for _, w in parts)
        if not parts or not total > 0 or any(not w > 0 for _, w in parts):
            raise ValueError(f"a prompt needs weights > 0, got {[w for _, w in parts]}")
        return cls(tuple((c, w / total) for c, w in parts))

    @property
    def conditions(self) -> tuple[TextCondition, ...]:
        return tuple(c for c, _ in self.parts)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(w for _, w in self.parts)

    def weight_of(self, condition: TextCondition) -> float:
        return next((w for c, w in self.parts if c is condition), 0.0)


@dataclass(frozen=True, eq=False)
class Change:
    """From stream frame `start` on, `new`; with `old` and `frames` > 0 a glide from `old`."""

    start: int
    new: Prompt
    old: Prompt | None = None
    frames: int = 0  # frames the glide lasts (0: a switch)

    def progress(self, frame: int) -> float:
        """t in [0, 1] at `frame`: 0 until the glide starts, 1 once it is over."""
        if self.old is None or self.frames <= 0:
            return 1.0
        return min(max((frame - self.start) / self.frames, 0.0), 1.0)

    def conditions(self) -> tuple[TextCondition, ...]:
        """The rows while it glides: the old blend's texts of weight > 0, then the new ones."""
        if self.old is None or self.frames <= 0:
            return self.new.conditions
        old = tuple(c for c, w in self.old.parts if w > 0)
        return old + tuple(c for c in self.new.conditions if all(c is not o for o in old))

    def at(self, frame: int) -> Prompt:
        """The blend heard at `frame` (parts of weight 0 left out)."""
        t = self.progress(frame)
        if t == 1.0:
            return self.new
        assert self.old is not None
        parts = [
            (c, (1 - t) * self.old.weight_of(c) + t * self.new.weight_of(c))
            for c in self.conditions()
        ]
        return Prompt.weighted([(c, w) for c, w in parts if w > 0])


class Rows:
    """The rows a stream holds now: `conditions` (one conditional row each, in row order), the
    null row when `guided`, and the conditional rows' weights at each frame (`glide`: the
    transition they follow, None once it is over or for a switch)."""

    def __init__(
        self,
        conditions: tuple[TextCondition, ...],
        weights: tuple[float, ...],
        guided: bool,
        glide: Change | None = None,
        start_weights: tuple[float, ...] | None = None,
    ) -> None:
        self.conditions = conditions
        self.guided = guided
        self.glide = glide
        self._end = list(weights)  # at the end of the glide, or always
        self._start = list(start_weights) if start_weights is not None else self._end

    @classmethod
    def of(cls, change: Change, guided: bool) -> Rows:
        """The rows from the start of `change`: a glide's hold both blends' texts."""
        if change.progress(change.start) == 1.0:
            return cls(change.new.conditions, change.new.weights, guided)
        assert change.old is not None
        conditions = change.conditions()
        return cls(
            conditions,
            tuple(change.new.weight_of(c) for c in conditions),
            guided,
            change,
            tuple(change.old.weight_of(c) for c in conditions),
        )

    @property
    def keys(self) -> tuple[TextCondition | None, ...]:
        """The rows in order: each conditional row's condition, then None for the null row."""
        return (*self.conditions, None) if self.guided else self.conditions

    @property
    def count(self) -> int:
        """Rows in the batch: conditional rows, and the null row."""
        return len(self.conditions) + self.guided

    @property
    def plain(self) -> bool:
        """One conditional row: its logits need no mixing."""
        return len(self.conditions) == 1

    def gliding(self, frame: int) -> bool:
        """Whether the weights still move at `frame`."""
        return self.glide is not None and self.glide.progress(frame) < 1.0

    def weights(self, frame: int) -> list[float]:
        """The conditional rows' weights for the step that samples `frame` (sum 1)."""
        if self.glide is None:
            return self._end
        t = self.glide.progress(frame)
        return [(1 - t) * a + t * b for a, b in zip(self._start, self._end, strict=True)]

    def settled(self) -> Rows:
        """The rows once the glide is over: those of weight 0 leave, the others keep their
        order (and their caches)."""
        kept = [(c, w) for c, w in zip(self.conditions, self._end, strict=True) if w > 0]
        return Rows(tuple(c for c, _ in kept), tuple(w for _, w in kept), self.guided)

    def with_guided(self, guided: bool) -> Rows:
        return Rows(self.conditions, tuple(self._end), guided, self.glide, tuple(self._start))


def mix_rows(
    logits: torch.Tensor, groups: Sequence[tuple[int, Sequence[float], int | None]], rows: int
) -> torch.Tensor:
    """Streams' rows -> one conditional row (and the null row) per stream, what sampling takes.

    logits: [R, K, V] of a batch's rows; groups: per stream (its first row, the weights of its
    conditional rows from there, its null row or None); rows: 2 with null rows, 1 without.
    Returns [N * rows, K, V]: row `rows * i` is stream i's `sum_j w_j * logits[first + j]`
    (summed in row order, the same alone or batched), row `rows * i + 1` its null row, or for
    a stream without one (its guidance dropped, beside others with theirs) its conditional row
    again: guidance then gives that row exactly (`uncond + (cond - uncond) * s` = cond)."""
    out = logits.new_empty(len(groups) * rows, *logits.shape[1:])
    for i, (first, weights, null) in enumerate(groups):
        cond = out[rows * i]
        if len(weights) == 1:
            cond.copy_(logits[first])
        else:
            torch.mul(logits[first], weights[0], out=cond)
            for j in range(1, len(weights)):
                cond.add_(logits[first + j], alpha=weights[j])
        if rows == 2:
            out[rows * i + 1].copy_(cond if null is None else logits[null])
    return out


class Mix(NamedTuple):
    """Which rows make each stream's conditional and null logits, as tensors (what the compiled
    step takes at every step, plain prompts too: `DecodeBatch._static_mix`)."""

    rows: torch.Tensor  # [N, M] long: stream i's conditional rows (padded with weight 0)
    weights: torch.Tensor  # [N, M] float32: their weights (sum 1 per stream)
    nulls: torch.Tensor  # [N] long: stream i's null row (guidance 1: any row)


def stream_rows(logits: torch.Tensor, mix: Mix) -> tuple[torch.Tensor, torch.Tensor]:
    """`mix_rows` with tensors only: logits [R, K, V] of a batch's rows -> each stream's
    conditional logits [N, K, V] (the weighted sum of the rows `mix` names) and its null logits
    [N, K, V] (`mix.nulls`)."""
    cond = (logits[mix.rows] * mix.weights[:, :, None, None]).sum(dim=1)
    return cond, logits[mix.nulls]
