"""What the director says and remembers: `Change`, `Upcoming`, `Overlay`, and their JSON.

`Change` is "play this blend from then on, because of that source, gliding over so long";
`Upcoming` the next change the programme will make by itself; `Overlay` something playing over
the schedule (a pin, a queue hold, a prompt set by hand). The `*_from_json` readers take back
what `Director.to_state()` wrote, with a ValueError naming the bad key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.blend import Blend
from radio.programme.rotation import Anchor

SOURCES = ("config", "schedule", "rotation", "listener", "vote", "admin", "clip")


@dataclass(frozen=True)
class Change:
    """Play `blend` from `at` on, because of `source`."""

    blend: Blend
    source: str  # one of SOURCES
    at: float  # when it is due, Unix seconds (a boundary may already be a little past)
    transition_seconds: float  # glide from the blend before over this long; 0 = switch
    reason: str  # for people: "slot 'lunch' starts", "rotation: prompt 2 of 3", ...

    def to_json(self) -> dict[str, Any]:
        return {
            "blend": self.blend.to_json(),
            "text": self.blend.describe(),
            "dominant": self.blend.dominant,
            "source": self.source,
            "at": self.at,
            "transition_seconds": self.transition_seconds,
            "reason": self.reason,
        }

    @classmethod
    def optional(cls, data: Any, where: str) -> Change | None:
        return None if data is None else cls.from_json(data, where)

    @classmethod
    def from_json(cls, data: Any, where: str) -> Change:
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected an object")
        source = data.get("source")
        if source not in SOURCES:
            raise ValueError(f"{where}.source: expected one of {SOURCES}, got {source!r}")
        return cls(
            Blend.parse(data.get("blend"), f"{where}.blend"),
            source,
            number(data.get("at"), f"{where}.at"),
            number(data.get("transition_seconds"), f"{where}.transition_seconds"),
            str(data.get("reason", "")),
        )


@dataclass(frozen=True)
class Upcoming:
    """The next audible change: when, what (None: the queue's winner, unknown yet), and why."""

    at: float  # Unix seconds
    why: str  # "slot" (a slot boundary), "rotation" (a tick), "queue", "hold_end", "pin_end", ...
    blend: Blend | None
    source: str

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "why": self.why,
            "blend": None if self.blend is None else self.blend.to_json(),
            "text": None if self.blend is None else self.blend.describe(),
            "source": self.source,
        }


@dataclass(frozen=True)
class Overlay:
    """Something playing over the schedule: a pin, a hold or a prompt set by hand."""

    kind: str  # "pin", "hold" (a suggestion taken from the queue) or "prompt"
    change: Change
    until: float | None  # Unix seconds; None = until replaced (or unpinned)


def number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a number")
    return float(value)


def overlay_from_json(data: Any, where: str) -> Overlay | None:
    if data is None:
        return None
    if not isinstance(data, Mapping) or data.get("kind") not in ("pin", "hold", "prompt"):
        raise ValueError(f"{where}: expected {{kind: pin|hold|prompt, until, change}}")
    until = data.get("until")
    return Overlay(
        data["kind"],
        Change.from_json(data.get("change"), f"{where}.change"),
        None if until is None else number(until, f"{where}.until"),
    )


def anchor_from_json(data: Any, where: str) -> tuple[tuple[int, float | None], Anchor, str] | None:
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected an object")
    slot, index = data.get("slot"), data.get("index")
    if isinstance(slot, bool) or not isinstance(slot, int):
        raise ValueError(f"{where}.slot: expected an integer")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"{where}.index: expected a non-negative integer")
    start = data.get("segment_start")
    key = (slot, None if start is None else number(start, f"{where}.segment_start"))
    return key, Anchor(number(data.get("at"), f"{where}.at"), index), str(data.get("reason", ""))


def resumed_from_json(data: Any, where: str) -> tuple[float, str, str] | None:
    if data is None:
        return None
    if not isinstance(data, list) or len(data) != 3 or data[1] not in SOURCES:
        raise ValueError(f"{where}: expected [at, source, reason]")
    return number(data[0], f"{where}[0]"), data[1], str(data[2])
