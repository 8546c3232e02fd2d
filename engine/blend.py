"""A prompt blend: one or more texts with weights, the value a station plays.

Classifier-free guidance generalises to several texts (DESIGN.md, "Prompts as blends"): with
one conditional row per text and the null row, `logits = null + g * (sum_i w_i * cond_i - null)`,
weights normalised to sum 1. `Blend` is that value, and nothing else: no torch here, so the
config, the API, the state file and the scheduler all share it.

- `Blend.parse(value)` takes what a user writes: a plain string (a blend of one), or a list of
  `{"text": ..., "weight": ...}` (JSON / TOML shape; a missing weight is 1). Texts are cleaned as
  prompts always were (control characters refused, runs of whitespace collapsed, a maximum
  length), weights must be finite and > 0, at most `MAX_PARTS` texts, no text twice. Errors are
  `ValueError`s naming the bad part: `prompt[1].weight: must be > 0, got -1`.
- `dominant` is the text with the largest weight (first on a tie): what ICY StreamTitle shows.
- `describe()` reads `warm jazz trio 70% + rain on a window 30%`; `to_json()` is the list shape.
- Two blends are equal when they hold the same texts with the same weights (order aside, weights
  compared to 1e-9).
- `Blend.glide(old, new, t)` is a transition at progress t in [0, 1]: the union of both texts
  with weights `(1 - t) * old + t * new`. While t < 1 it keeps every text, also those at weight 0
  (at t = 0 the new texts are there at weight 0: their rows are prefilled before they are heard);
  at t = 1 it is `new`. A transition therefore holds at most 2 * MAX_PARTS texts.
- `prefill_rows(new, old, transition_seconds, guided)`: the decoder rows a change prefills (one
  per text, both blends' in a transition, and the null row of a guided stream); a plain
  prompt's are `PLAIN_ROWS`. A prefill of other rows costs about `Prefill.at_rows` of a
  plain one (`engine.lane`, docs/engine.md).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_PARTS = 4  # texts in one blend (a transition holds up to twice as many rows)
MAX_TEXT_LENGTH = 2000  # characters in one text, whoever sets it (listeners get a lower limit)
_EQUAL_DIGITS = 9  # weights equal to this many decimals are the same blend
PLAIN_ROWS = 2  # a plain prompt's decoder rows: conditional and null (guidance)


@dataclass(frozen=True, eq=False)
class Blend:
    """Texts with weights that sum to 1: `parts = (("warm jazz trio", 0.7), ("rain", 0.3))`."""

    parts: tuple[tuple[str, float], ...]

    def __post_init__(self) -> None:
        assert self.parts, "a blend has at least one part"
        texts = [t for t, _ in self.parts]
        assert len(set(texts)) == len(texts), f"a text appears twice in {texts}"
        assert all(w >= 0 for _, w in self.parts), f"negative weight in {self.parts}"
        assert abs(sum(w for _, w in self.parts) - 1) < 1e-6, f"weights must sum to 1: {self.parts}"

    @classmethod
    def of(cls, text: str) -> Blend:
        """The blend of one text (already clean)."""
        return cls(((text, 1.0),))

    @classmethod
    def weighted(cls, parts: Iterable[tuple[str, float]]) -> Blend:
        """A blend from clean (text, weight > 0) pairs, weights normalised to sum 1."""
        pairs = list(parts)
        total = math.fsum(w for _, w in pairs)
        return cls(tuple((t, w / total) for t, w in pairs))

    @classmethod
    def parse(
        cls,
        value: Any,
        where: str = "prompt",
        max_length: int = MAX_TEXT_LENGTH,
        max_parts: int = MAX_PARTS,
        allow_empty: bool = True,
    ) -> Blend:
        """A checked blend from a string or a list of {text, weight}; ValueError names the part."""
        if isinstance(value, str):
            return cls.of(clean_text(value, where, max_length, allow_empty))
        if not isinstance(value, list | tuple):
            raise ValueError(
                f"{where}: must be a string or a list of {{text, weight}}, got {_kind(value)}"
            )
        if not value:
            raise ValueError(f"{where}: must hold at least one {{text, weight}}")
        if len(value) > max_parts:
            raise ValueError(f"{where}: at most {max_parts} texts in a blend, got {len(value)}")
        pairs: list[tuple[str, float]] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(value):
            text, weight = _parse_part(item, f"{where}[{i}]", max_length, allow_empty)
            if text in seen:
                raise ValueError(f"{where}[{i}].text: {text!r} is already {where}[{seen[text]}]")
            seen[text] = i
            pairs.append((text, weight))
        return cls.weighted(pairs)

    @classmethod
    def glide(cls, old: Blend, new: Blend, t: float) -> Blend:
        """The blend at progress t in [0, 1] of a transition from `old` to `new` (see module doc)."""
        if not 0 <= t <= 1:
            raise ValueError(f"glide progress must be in [0, 1], got {t}")
        if t == 1:
            return new
        before, after = dict(old.parts), dict(new.parts)
        texts = list(before) + [text for text in after if text not in before]
        weights = [(1 - t) * before.get(x, 0.0) + t * after.get(x, 0.0) for x in texts]
        return cls.weighted(zip(texts, weights, strict=True))

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.parts)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(w for _, w in self.parts)

    @property
    def dominant(self) -> str:
        """The text with the largest weight (the first one on a tie)."""
        best = max(w for _, w in self.parts)
        return next(t for t, w in self.parts if w == best)

    def describe(self) -> str:
        """`warm jazz trio 70% + rain on a window 30%`; a blend of one is just its text."""
        if len(self.parts) == 1:
            return self.parts[0][0]
        return " + ".join(f"{t} {_percent(w)}" for t, w in self.parts)

    def to_json(self) -> list[dict[str, Any]]:
        """[{"text": ..., "weight": ...}, ...]: `Blend.parse(b.to_json()) == b`."""
        return [{"text": t, "weight": w} for t, w in self.parts]

    def to_value(self) -> str | list[dict[str, Any]]:
        """The shortest form `parse` takes back: the plain text for a blend of one."""
        if len(self.parts) == 1:
            return self.parts[0][0]
        return self.to_json()

    def _key(self) -> frozenset[tuple[str, float]]:
        return frozenset((t, round(w, _EQUAL_DIGITS)) for t, w in self.parts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Blend):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Blend({self.describe()!r})"


def prefill_rows(
    new: Blend, old: Blend | None = None, transition_seconds: float = 0.0, guided: bool = True
) -> int:
    """Decoder rows a change to `new` prefills: one per text (a transition from `old`: both
    blends' texts of weight > 0) and, for a `guided` stream, the null row (`PLAIN_ROWS` for a
    plain prompt; one without guidance, or while it is dropped: `TokenStream.guided_next`)."""
    texts = set(new.texts)
    if old is not None and transition_seconds > 0:
        texts |= {t for t, w in old.parts if w > 0}
    return len(texts) + guided


def clean_text(
    text: str, where: str = "prompt", max_length: int = MAX_TEXT_LENGTH, allow_empty: bool = True
) -> str:
    """A prompt text as the engine gets it: no control characters, whitespace collapsed."""
    if not isinstance(text, str):
        raise ValueError(f"{where}: must be a string, got {_kind(text)}")
    if any(unicodedata.category(c) in ("Cc", "Cs") or c in "\u2028\u2029" for c in text):
        raise ValueError(f"{where}: must not contain control characters (newlines, tabs, ...)")
    text = " ".join(text.split())
    if len(text) > max_length:
        raise ValueError(f"{where}: too long ({len(text)} characters, at most {max_length})")
    if not text and not allow_empty:
        raise ValueError(f"{where}: must not be empty")
    return text


def _parse_part(item: Any, where: str, max_length: int, allow_empty: bool) -> tuple[str, float]:
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: must be {{text, weight}}, got {_kind(item)}")
    unknown = sorted(set(item) - {"text", "weight"})
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key (known: text, weight)")
    if "text" not in item:
        raise ValueError(f"{where}.text: missing")
    text = clean_text(item["text"], f"{where}.text", max_length, allow_empty)
    weight = item.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise ValueError(f"{where}.weight: must be a number, got {_kind(weight)}")
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"{where}.weight: must be > 0, got {weight}")
    return text, float(weight)


def _percent(weight: float) -> str:
    p = weight * 100
    return f"{p:.0f}%" if p >= 1 or p == 0 else f"{p:.1f}%"


def _kind(value: Any) -> str:
    return repr(value) if isinstance(value, int | float | str | bool) else type(value).__name__
