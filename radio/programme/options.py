"""The programme's settings: `[[stations.schedule]]` slots and the station's listener keys.

`SlotConfig` is one day-part as a café owner writes it (days, start, optional end, the prompts
to rotate through, how often and in which order, the transition). `Days` and the "HH:MM" times
are parsed here; `check_station` checks the station-level keys (time zone, listener mode, skip
threshold, ...), `check_overlaps` the slots against each other. `radio.config` builds these
from `config.toml` and turns a `ValueError` into a `ConfigError` naming the key.
"""

from __future__ import annotations

import re
import zoneinfo
from dataclasses import dataclass
from typing import Any

from engine.blend import Blend

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = datetime.weekday()
ORDERS = ("listed", "shuffled")  # rotation order of a slot's prompts
LISTENER_MODES = ("now", "queue", "off")  # what a listener's prompt does
MAX_SLOT_PROMPTS = 100  # prompts in one slot's rotation
MAX_TRANSITION_SECONDS = 300.0  # longest glide from one blend to the next
MINUTES_PER_DAY = 1440
MINUTES_PER_WEEK = 7 * MINUTES_PER_DAY
_WALL_TIME = re.compile(r"^(\d{2}):(\d{2})$")
_RATE_LIMIT = re.compile(r"^\s*(\d+)\s*per\s*(\d+(?:\.\d+)?)\s*s(?:ec(?:onds?)?)?\s*$")


@dataclass(frozen=True)
class Days:
    """The days of the week a slot starts on: 0 = Monday ... 6 = Sunday."""

    numbers: tuple[int, ...] = tuple(range(7))

    @classmethod
    def parse(cls, value: Any, where: str = "days") -> Days:
        """From "mon-fri", "sat,sun", "daily", or a list of such strings; ranges may wrap
        ("fri-mon" = fri, sat, sun, mon)."""
        items = value if isinstance(value, list) else [value]
        if not items:
            raise ValueError(f"{where}: must name at least one day")
        found: set[int] = set()
        for item in items:
            if not isinstance(item, str):
                raise ValueError(f"{where}: must be a string like 'mon-fri' or a list of them")
            for part in item.split(","):
                found.update(_day_range(part.strip().lower(), where))
        return cls(tuple(sorted(found)))

    def __contains__(self, weekday: object) -> bool:
        return weekday in self.numbers

    def label(self) -> str:
        """The shortest spelling: "daily", "mon-fri", "mon-wed,fri,sun"."""
        if len(self.numbers) == 7:
            return "daily"
        runs: list[list[int]] = []
        for d in self.numbers:
            if runs and runs[-1][-1] == d - 1:
                runs[-1].append(d)
            else:
                runs.append([d])
        return ",".join(
            DAY_NAMES[r[0]] if len(r) == 1 else f"{DAY_NAMES[r[0]]}-{DAY_NAMES[r[-1]]}"
            for r in runs
        )


def _day_range(text: str, where: str) -> list[int]:
    if text in ("daily", "every day"):
        return list(range(7))
    ends = [p.strip() for p in text.split("-")]
    if len(ends) > 2 or any(e not in DAY_NAMES for e in ends):
        raise ValueError(
            f"{where}: {text!r} is not a day or a range of days (mon, tue, ... sun, 'mon-fri', 'daily')"
        )
    first, last = DAY_NAMES.index(ends[0]), DAY_NAMES.index(ends[-1])
    return [(first + i) % 7 for i in range((last - first) % 7 + 1)]


def wall_minutes(text: str, where: str, allow_24: bool = False) -> int:
    """Minutes after midnight of a local "HH:MM" ("24:00" = the next midnight, for ends)."""
    m = _WALL_TIME.match(text) if isinstance(text, str) else None
    hours, minutes = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
    if (hours, minutes) == (24, 0) and allow_24:
        return MINUTES_PER_DAY
    if not (0 <= hours <= 23 and 0 <= minutes <= 59):
        last = "24:00" if allow_24 else "23:59"
        raise ValueError(f"{where}: must be a time 'HH:MM' from 00:00 to {last}, got {text!r}")
    return hours * 60 + minutes


def parse_rate_limit(text: str, where: str) -> tuple[int, float]:
    """(count, seconds) from "N per S s"."""
    m = _RATE_LIMIT.match(text)
    if not m or float(m.group(2)) <= 0:
        raise ValueError(f"{where}: must look like '3 per 60 s', got {text!r}")
    return int(m.group(1)), float(m.group(2))


@dataclass(frozen=True)
class SlotConfig:
    """`[[stations.schedule]]`: one day-part, when it plays and what it rotates through."""

    name: str = ""  # a label shown in today's schedule, e.g. "lunch"
    days: Days = Days()  # days it starts on: "mon-fri", "sat,sun", ["mon", "wed"], "daily"
    start: str = "00:00"  # local start time, "HH:MM"
    # local end time "HH:MM" ("24:00" = midnight; not after start = on the next day);
    # "" = until the next slot starts
    end: str = ""
    prompts: tuple[Blend, ...] = ()  # texts or blends [{text, weight}, ...] to rotate through
    rotate_minutes: float = 0.0  # move to the next prompt every this many minutes; 0 = never
    # "listed" (in the order written, then again) or "shuffled" (each prompt once per round,
    # in a new order every round, never the same one twice in a row)
    order: str = "listed"
    transition_seconds: float = -1.0  # glide into this slot's prompts; -1 = the station's

    def validate(self) -> None:
        if any(ord(c) < 32 for c in self.name):
            raise ValueError("name: must not contain control characters")
        start = wall_minutes(self.start, "start")
        if self.end and wall_minutes(self.end, "end", allow_24=True) == start:
            raise ValueError(f"end: must differ from start ({self.start}); omit it to run on")
        if not self.prompts:
            raise ValueError("prompts: must list at least one prompt or blend")
        if len(self.prompts) > MAX_SLOT_PROMPTS:
            raise ValueError(f"prompts: at most {MAX_SLOT_PROMPTS}, got {len(self.prompts)}")
        for i, blend in enumerate(self.prompts):
            if blend in self.prompts[:i]:
                raise ValueError(f"prompts[{i}]: the same as prompts[{self.prompts.index(blend)}]")
        if not (self.rotate_minutes == 0 or 1 <= self.rotate_minutes <= MINUTES_PER_DAY):
            raise ValueError(
                f"rotate_minutes: must be 0 (no rotation) or in [1, 1440], got {self.rotate_minutes}"
            )
        if self.order not in ORDERS:
            raise ValueError(f"order: must be one of {ORDERS}, got {self.order!r}")
        t = self.transition_seconds
        if not (t == -1 or 0 <= t <= MAX_TRANSITION_SECONDS):
            raise ValueError(
                f"transition_seconds: must be -1 (the station's) or in [0, {MAX_TRANSITION_SECONDS:g}], got {t}"
            )

    @property
    def start_minutes(self) -> int:
        return wall_minutes(self.start, "start")

    @property
    def end_minutes(self) -> int | None:
        """Minutes after the start day's midnight at which it ends (> 1440: the next day)."""
        if not self.end:
            return None
        end = wall_minutes(self.end, "end", allow_24=True)
        return end if end > self.start_minutes else end + MINUTES_PER_DAY

    def label(self, day: int | None = None) -> str:
        """ "mon-fri 07:00-11:30", or for one day "fri 22:00-02:00"; an open end is "..." """
        days = self.days.label() if day is None else DAY_NAMES[day]
        return f"{days} {self.start}-{self.end or '...'}"


def check_station(s: Any) -> None:
    """The programme keys of a `StationConfig`; ValueError naming the key."""
    try:
        zoneinfo.ZoneInfo(s.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"timezone: {s.timezone!r} is not an IANA time zone (e.g. 'Europe/Paris', 'UTC')"
        ) from None
    if not 0 <= s.transition_seconds <= MAX_TRANSITION_SECONDS:
        raise ValueError(
            f"transition_seconds: must be in [0, {MAX_TRANSITION_SECONDS:g}], got {s.transition_seconds}"
        )
    if s.listener_prompts not in LISTENER_MODES:
        raise ValueError(
            f"listener_prompts: must be one of {LISTENER_MODES}, got {s.listener_prompts!r}"
        )
    if not 1 <= s.listener_hold_minutes <= MINUTES_PER_DAY:
        raise ValueError(
            f"listener_hold_minutes: must be in [1, 1440], got {s.listener_hold_minutes}"
        )
    if not 0 <= s.skip_threshold <= 1:
        raise ValueError(
            f"skip_threshold: must be in [0, 1] (0 = no skips), got {s.skip_threshold}"
        )
    if not 1 <= s.skip_minimum <= 10_000:
        raise ValueError(f"skip_minimum: must be in [1, 10000], got {s.skip_minimum}")
    parse_rate_limit(s.suggestion_rate_limit, "suggestion_rate_limit")
    parse_rate_limit(s.vote_rate_limit, "vote_rate_limit")
    if not 1 <= s.max_suggestions <= 1000:
        raise ValueError(f"max_suggestions: must be in [1, 1000], got {s.max_suggestions}")
    if not 1 <= s.suggestion_minutes <= 7 * MINUTES_PER_DAY:
        raise ValueError(f"suggestion_minutes: must be in [1, 10080], got {s.suggestion_minutes}")
    for i, slot in enumerate(s.schedule):
        glide = s.transition_seconds if slot.transition_seconds == -1 else slot.transition_seconds
        if slot.rotate_minutes and glide > slot.rotate_minutes * 60:
            raise ValueError(
                f"schedule[{i}].transition_seconds: a {glide:g} s glide does not fit in "
                f"rotate_minutes ({slot.rotate_minutes:g} min)"
            )


def check_overlaps(slots: tuple[SlotConfig, ...], where: str) -> None:
    """Refuse two slots that play at the same time on some day, naming both occurrences:
    `stations[0].schedule[2] (fri 22:00-02:00) overlaps stations[0].schedule[0] (sat 01:00-...)`.

    Checked in wall-clock minutes on the circular week; a slot without an end covers its start
    minute (it runs until the next slot, so only a slot around its start can collide with it)."""
    where = f"{where}." if where else ""
    spans = []  # (slot index, weekday, start minute of the week, end minute of the week)
    for i, slot in enumerate(slots):
        for day in slot.days.numbers:
            start = day * MINUTES_PER_DAY + slot.start_minutes
            end = slot.end_minutes
            spans.append(
                (i, day, start, start + 1 if end is None else start - slot.start_minutes + end)
            )
    for a, (i, day_i, s1, e1) in enumerate(spans):
        for j, day_j, s2, e2 in spans[:a]:
            if i == j:
                continue
            for shift in (-MINUTES_PER_WEEK, 0, MINUTES_PER_WEEK):
                if max(s1, s2 + shift) < min(e1, e2 + shift):
                    first, second = sorted(((i, day_i), (j, day_j)), reverse=True)
                    raise ValueError(
                        f"{where}schedule[{first[0]}] ({slots[first[0]].label(first[1])}) overlaps "
                        f"{where}schedule[{second[0]}] ({slots[second[0]].label(second[1])})"
                    )
