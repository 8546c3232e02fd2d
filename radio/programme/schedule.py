"""Day-part slots as instants: which slot plays at a given moment, and when it ends.

A slot is written in wall-clock time in the station's time zone ("mon-fri 22:00-02:00"); this
module turns each day's occurrence into Unix seconds and cuts time into `Segment`s: a slot's
occurrence, or a gap between slots (where the station plays its own prompt). All queries are
pure functions of an instant; nothing reads a clock.

The rules (docs/programming.md tells them with examples):

- An occurrence belongs to the day it starts on: "fri 22:00-02:00" runs into Saturday.
- An end not after the start is on the next day; "24:00" is the next midnight; no end means
  "until the next slot starts" (whichever slot, whichever day).
- Lengths are wall-clock: 01:00-04:00 lasts 2 real hours on the spring-forward day and 4 on the
  fall-back day.
- A wall time the clocks skip (02:30 on Europe/Paris' spring-forward day) happens when the
  clocks jump, i.e. at 03:00 local; a slot lying wholly inside the skipped hour does not play
  that day.
- A wall time that happens twice (02:30 on the fall-back day) means the first time.

Both rules keep the mapping from wall time to instant non-decreasing, so slots that do not
overlap on the wall clock (checked at load) never overlap in real time either.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass

from radio.programme.options import SlotConfig

NO_SLOT = -1  # Segment.slot of a gap between slots (or of a station without a schedule)
_SEARCH_DAYS = 8  # occurrences are looked up this many local days around an instant
_CACHE_DAYS = 64  # local days whose occurrences are remembered


@dataclass(frozen=True)
class Segment:
    """A stretch of time with one programme: slot `slot`'s occurrence, or a gap (NO_SLOT)."""

    slot: int  # index in the station's schedule; NO_SLOT = none (the station's own prompt)
    start: float | None  # Unix seconds, inclusive; None = since ever (no slot before)
    end: float | None  # Unix seconds, exclusive; None = for ever (no slot after)

    def contains(self, t: float) -> bool:
        return (self.start is None or self.start <= t) and (self.end is None or t < self.end)


class Schedule:
    """A station's slots in its time zone; every query takes the instant it is about."""

    def __init__(self, slots: Sequence[SlotConfig], timezone: str) -> None:
        self.slots = tuple(slots)
        self.zone = zoneinfo.ZoneInfo(timezone)
        self._occurrences: dict[dt.date, list[Segment]] = {}

    def segment_at(self, t: float) -> Segment:
        """The slot occurrence playing at `t`, or the gap around `t` when none is."""
        found = self._around(t)
        for seg in found:
            if seg.contains(t):
                return seg
        before = [s.end for s in found if s.end is not None and s.end <= t]
        after = [s.start for s in found if s.start is not None and s.start > t]
        return Segment(NO_SLOT, max(before, default=None), min(after, default=None))

    def next_boundary(self, t: float) -> float | None:
        """When the segment playing at `t` ends (None: never)."""
        return self.segment_at(t).end

    def day(self, t: float) -> list[Segment]:
        """The slot occurrences that play during the local day of `t` (midnight to midnight),
        including one that began the evening before; in time order."""
        date = self.local(t).date()
        midnight = self.instant(date, 0)
        next_midnight = self.instant(date + dt.timedelta(days=1), 0)
        return [
            s
            for s in self._around(t)
            if s.start is not None
            and s.start < next_midnight
            and (s.end is None or s.end > midnight)
        ]

    def local(self, t: float) -> dt.datetime:
        """`t` as an aware local datetime of the station's zone."""
        return dt.datetime.fromtimestamp(t, self.zone)

    def instant(self, date: dt.date, minutes: int) -> float:
        """Unix seconds of local wall time `minutes` after midnight of `date` (see module doc:
        a skipped time is the moment the clocks jump, a repeated time its first occurrence)."""
        return wall_instant(self.zone, date, minutes)

    def _around(self, t: float) -> list[Segment]:
        date = self.local(t).date()
        if date not in self._occurrences:
            if len(self._occurrences) >= _CACHE_DAYS:
                self._occurrences.clear()
            self._occurrences[date] = self._build(date)
        return self._occurrences[date]

    def _build(self, centre: dt.date) -> list[Segment]:
        """Occurrences starting within _SEARCH_DAYS local days of `centre`, ends filled in."""
        raw: list[tuple[float, int, float | None]] = []  # (start, slot, end or None)
        for offset in range(-_SEARCH_DAYS, _SEARCH_DAYS + 1):
            date = centre + dt.timedelta(days=offset)
            for i, slot in enumerate(self.slots):
                if date.weekday() not in slot.days:
                    continue
                end_minutes = slot.end_minutes
                raw.append(
                    (
                        self.instant(date, slot.start_minutes),
                        i,
                        None if end_minutes is None else self.instant(date, end_minutes),
                    )
                )
        raw.sort()
        out = []
        for k, (start, i, end) in enumerate(raw):
            if end is None:  # until the next slot starts
                end = raw[k + 1][0] if k + 1 < len(raw) else None
            if end is None or start < end:  # empty: the slot fell into a skipped hour
                out.append(Segment(i, start, end))
        return out


def wall_instant(zone: dt.tzinfo, date: dt.date, minutes: int) -> float:
    """Unix seconds of local `date` + `minutes` (may exceed a day) in `zone`, by the module's
    daylight-saving rules."""
    naive = dt.datetime.combine(date, dt.time()) + dt.timedelta(minutes=minutes)
    first = naive.replace(tzinfo=zone, fold=0).timestamp()  # a repeated time: the first one
    if dt.datetime.fromtimestamp(first, zone).replace(tzinfo=None) == naive:
        return first
    # skipped: fold=0 read it with the offset before the jump (an instant after the jump),
    # fold=1 with the offset after it (an instant before); the jump lies in between
    other = naive.replace(tzinfo=zone, fold=1).timestamp()
    lo, hi = min(first, other), max(first, other)
    after = dt.datetime.fromtimestamp(hi, zone).utcoffset()
    while hi - lo > 1:  # the first second with the new offset
        mid = (lo + hi) // 2
        if dt.datetime.fromtimestamp(mid, zone).utcoffset() == after:
            hi = mid
        else:
            lo = mid
    return hi
