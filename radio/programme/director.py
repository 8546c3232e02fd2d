"""The director: what a station should play now, from when and why, and what comes next.

It combines the station's programme (its prompt, the day-part `Schedule`, each slot's rotation),
the listeners (`listener_prompts` "now" / "queue" / "off", the `VoteBox`), and the admin (a
prompt, a pin, a clip) into one answer, a `Change`: a blend, the instant it is due, its `source`
and its transition. It is pure logic over an injected clock: no asyncio, no engine.

Who wins, first match:

1. an admin **pin** (until unpinned, or for N minutes): nothing else changes the music;
2. an **overlay** (one at a time, the newest replaces the older):
   - a listener's prompt in "now" mode, an admin prompt or a clip: until the programme's next
     change (rotation tick or slot boundary; with no schedule: until replaced, as before);
   - a **hold**: in "queue" mode, at each rotation tick (or slot boundary) the most-voted
     suggestion is taken and plays for `listener_hold_minutes`, cut short by a slot boundary;
3. the **schedule**: the slot playing now (its rotation item), or the station's `prompt`
   between slots.

The rotation clock never stops under an overlay: when a hold ends, the item due at that moment
plays until the next regular tick. Where nothing rotates (rotate_minutes = 0, or between
slots), the queue is looked at every `listener_hold_minutes`, counted from the slot's start (or
from the Unix epoch). A **skip** vote that passes ends a listener's hold or prompt, else moves
the rotation on to its next item, which then gets a full period; pins, admin prompts and clips
cannot be skipped, nor a slot with a single prompt.

How the station's loop calls it (`radio.programme_runner`; `clock` is `time.time`):

    director = Director.from_state(station_config, saved or None)   # or Director(station_config)
    first = director.start()                                   # the blend to open the stream with
    every second, and right after an API call changed something:
        change = director.tick()
        if change is not None:   # a new blend is due (the first tick always gives one)
            start = max(change.at, clock() + horizon)          # a boundary may be just past
            generator.set_blend(sid, change.blend, start, change.transition_seconds, change.source)
            station.record_prompt(change, ...)                 # history keeps change.source
        now_playing = director.now_playing(listeners)          # API object, SSE "programme"
    every few seconds: state["programme"] = director.to_state()   # radio/restarts.py

API handlers call `listener_prompt`, `upvote`, `skip`, `admin_prompt`, `clip`, `pin`, `unpin`,
`remove_suggestion`, `clear_queue` and `set_station` (a live schedule edit, checked by
`radio.config.with_programme`); `Refused.code` says which 4xx to answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from engine.blend import Blend
from radio.config import ConfigError, StationConfig, programme_settings, with_programme
from radio.programme.changes import (
    Change,
    Overlay,
    Upcoming,
    anchor_from_json,
    number,
    overlay_from_json,
    resumed_from_json,
)
from radio.programme.options import SlotConfig
from radio.programme.rotation import Anchor, item_index
from radio.programme.schedule import NO_SLOT, Schedule, Segment
from radio.programme.votes import Refused, SkipTally, Suggestion, VoteBox, VoteRules

STATE_FORMAT = 1  # the shape of to_state(); a newer one is refused by from_state
_LOOKAHEAD = 64  # schedule events examined when looking for the next audible change


class Director:
    """One station's programme state; owned by the event loop, all times from `clock()`."""

    def __init__(self, station: StationConfig, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.station = station
        self.schedule = Schedule(station.schedule, station.timezone)
        self.votes = VoteBox(VoteRules.of_station(station))
        self.current: Change | None = None  # what tick() last said
        self.previous: Change | None = None  # what played before it (for the transition)
        self.overlay: Overlay | None = None
        self.anchor: tuple[tuple[int, float | None], Anchor, str] | None = None  # a skip's
        self.resumed: tuple[float, str, str] | None = None  # (when, source, reason) of a resume
        self.checked: float | None = None  # the time of the last tick
        self.edited: dict[str, Any] | None = None  # the programme as changed live (admin API)
        self._base = _fingerprint(station)  # the config programme that edit started from

    # --- the station loop -------------------------------------------------------------------

    def start(self) -> Change:
        """What the station starts with: after a restart, what played if it is still due."""
        change = self.tick()
        assert self.current is not None, "tick() always sets current"
        return change if change is not None else self.current

    def tick(self) -> Change | None:
        """The change due now, if the blend to play differs from what `tick` said last."""
        now = self.clock()
        self._advance(now)
        want = self._wanted(now)
        if self.current is not None and want.blend == self.current.blend:
            return None
        self.previous, self.current = self.current, want
        return want

    def upcoming(self) -> Upcoming | None:
        """The next time the music will change by itself (None: not before someone acts)."""
        now = self.clock()
        playing = self._wanted(now).blend
        ov = self._active_overlay(now)
        if ov is not None:
            return None if ov.until is None else self._after_overlay(ov)
        for at, why in self._events_after(now):
            if self._takes_suggestion(at):
                return Upcoming(at, why, None, "vote")
            change = self._scheduled(at)
            if change.blend != playing:
                return Upcoming(at, why, change.blend, change.source)
        return None

    def scheduled(self, t: float) -> Change:
        """What the schedule alone plays at instant t (slot, rotation item; no overlays)."""
        return self._scheduled(t)

    def now_playing(self, listeners: int = 0) -> dict[str, Any]:
        """The JSON the API and the SSE `programme` event show (item 5 of issue 14)."""
        now = self.clock()
        # what is due now, not what `tick` said last: between a boundary and the next tick (up
        # to a second) the listeners already hear the change that was sent ahead for it
        cur = self._wanted(now)
        seg = self.schedule.segment_at(now)
        nxt = self.upcoming()
        top = self.votes.queue(now)
        ov = self._active_overlay(now)
        return {
            "playing": cur.to_json(),
            "transition": self._transition(now),
            "next": None if nxt is None else nxt.to_json(),
            "slot": None if seg.slot == NO_SLOT else self._slot_json(seg, now),
            "pinned": (
                None
                if ov is None or ov.kind != "pin"
                else {"until": ov.until, **ov.change.to_json()}
            ),
            "listener_prompts": self.station.listener_prompts,
            "queue": [s.to_json() for s in top],
            "skip": dataclasses.asdict(self.votes.skip_tally(cur.at, listeners)),
            "today": self.today(),
        }

    def today(self) -> list[dict[str, Any]]:
        """Today's slots (local day of the station), the one playing marked `current`."""
        now = self.clock()
        return [self._slot_json(seg, now) for seg in self.schedule.day(now)]

    # --- listeners ---------------------------------------------------------------------------

    def listener_prompt(self, address: str, blend: Blend) -> Suggestion | None:
        """A listener's prompt: "now" plays it (None), "queue" queues it (the Suggestion)."""
        now = self.clock()
        self._advance(now)
        mode = self.station.listener_prompts
        if mode == "off":
            raise Refused("off", "listeners cannot change the music on this station")
        if mode == "queue":
            return self.votes.suggest(address, blend, now)
        if self._pinned(now):
            raise Refused("pinned", "the admin pinned the music")
        self._set_prompt(blend, "listener", "a listener's prompt", None, now)
        return None

    def upvote(self, address: str, suggestion_id: int) -> Suggestion:
        self._require_queue()
        return self.votes.upvote(address, suggestion_id, self.clock())

    def skip(self, address: str, listeners: int) -> SkipTally:
        """A skip vote; when it passes, the next `tick()` gives the change."""
        now = self.clock()
        self._advance(now)
        if self.station.listener_prompts == "off":
            raise Refused("off", "listeners cannot change the music on this station")
        ov = self._active_overlay(now)
        if ov is not None and ov.change.source not in ("listener", "vote"):
            raise Refused("pinned", f"the {ov.change.source} chose this; it cannot be skipped")
        seg = self.schedule.segment_at(now)
        slot = self._slot(seg)
        if ov is None and (slot is None or len(slot.prompts) < 2):
            raise Refused("no_skip", "this slot has a single prompt: there is nothing to skip to")
        cur = self.current or self._wanted(now)
        tally = self.votes.skip(address, cur.at, listeners, now)
        if tally.passed:
            reason = f"skip vote ({tally.votes} of {tally.needed} needed)"
            if ov is not None:
                self.overlay = None
                self.resumed = (now, "vote", reason)
            else:
                k, _ = self._anchor(seg).tick_at(now, self._period(seg))
                self.anchor = ((seg.slot, seg.start), Anchor(now, k + 1), reason)
            self.checked = now  # the skip is no queue tick: it moves the rotation on
        return tally

    # --- admin -------------------------------------------------------------------------------

    def admin_prompt(self, blend: Blend, transition_seconds: float | None = None) -> None:
        """Play `blend` now until the programme's next change (replaces a pin)."""
        now = self.clock()
        self._advance(now)
        self._set_prompt(blend, "admin", "set by the admin", transition_seconds, now)

    def clip(self, blend: Blend) -> None:
        """A station seeded from an uploaded clip continues with `blend` (source `clip`)."""
        now = self.clock()
        self._advance(now)
        self._set_prompt(blend, "clip", "continues an uploaded clip", 0.0, now)

    def pin(
        self, blend: Blend, minutes: float | None = None, transition_seconds: float | None = None
    ) -> None:
        """Play `blend` whatever the schedule and the listeners say, until `unpin` or for
        `minutes`. Suggestions keep collecting votes meanwhile."""
        if minutes is not None and not 0 < minutes <= 7 * 1440:
            raise ValueError(f"minutes: must be in (0, 10080] or absent, got {minutes}")
        now = self.clock()
        self._advance(now)
        glide = self._glide(transition_seconds)
        change = Change(blend, "admin", now, glide, "pinned by the admin")
        self.overlay = Overlay("pin", change, None if minutes is None else now + minutes * 60)

    def unpin(self) -> bool:
        """End a pin (the schedule resumes); False when nothing was pinned."""
        now = self.clock()
        self._advance(now)
        if not self._pinned(now):
            return False
        self.overlay = None
        self.resumed = (now, *self._resume_source(now, "unpinned by the admin"))
        return True

    def remove_suggestion(self, suggestion_id: int) -> Suggestion:
        return self.votes.remove(suggestion_id)

    def clear_queue(self) -> int:
        return self.votes.clear()

    def set_station(self, station: StationConfig) -> None:
        """A live programme edit (built with `radio.config.with_programme`): new slots and
        listener rules from now on; the queue, votes and any pin or overlay stay."""
        now = self.clock()
        self._advance(now)
        self.edited = programme_settings(station)
        self._use(station)
        self.anchor = None

    # --- state file --------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """JSON for the state file (radio/statefile.py keeps it per station)."""
        ov = self.overlay
        return {
            "format": STATE_FORMAT,
            "current": None if self.current is None else self.current.to_json(),
            "previous": None if self.previous is None else self.previous.to_json(),
            "overlay": (
                None
                if ov is None
                else {"kind": ov.kind, "until": ov.until, "change": ov.change.to_json()}
            ),
            "anchor": (
                None
                if self.anchor is None
                else {
                    "slot": self.anchor[0][0],
                    "segment_start": self.anchor[0][1],
                    "at": self.anchor[1].at,
                    "index": self.anchor[1].index,
                    "reason": self.anchor[2],
                }
            ),
            "resumed": None if self.resumed is None else list(self.resumed),
            "checked": self.checked,
            "queue": self.votes.to_state(),
            "programme": (
                None if self.edited is None else {"settings": self.edited, "base": self._base}
            ),
        }

    @classmethod
    def from_state(
        cls,
        station: StationConfig,
        data: Mapping[str, Any] | None,
        clock: Callable[[], float] = time.time,
    ) -> Director:
        """A director that goes on where `to_state()` left off; ValueError naming the bad key
        (the caller logs it and starts with `Director(station)`). A live programme edit comes
        back unless config.toml's programme changed since it was made (then the file wins)."""
        d = cls(station, clock)
        if data is None:
            return d
        where = "programme"
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected an object")
        fmt = data.get("format")
        if fmt != STATE_FORMAT:
            raise ValueError(f"{where}.format: expected {STATE_FORMAT}, got {fmt!r}")
        edit = data.get("programme")
        if edit is not None:
            if not isinstance(edit, Mapping) or not isinstance(edit.get("settings"), dict):
                raise ValueError(f"{where}.programme: expected {{settings, base}}")
            if edit.get("base") == d._base:
                try:
                    d.edited = dict(edit["settings"])
                    d._use(with_programme(station, d.edited, f"{where}.programme.settings"))
                except ConfigError as e:
                    raise ValueError(str(e)) from None
        d.current = Change.optional(data.get("current"), f"{where}.current")
        d.previous = Change.optional(data.get("previous"), f"{where}.previous")
        d.overlay = overlay_from_json(data.get("overlay"), f"{where}.overlay")
        d.anchor = anchor_from_json(data.get("anchor"), f"{where}.anchor")
        d.resumed = resumed_from_json(data.get("resumed"), f"{where}.resumed")
        checked = data.get("checked")
        d.checked = None if checked is None else number(checked, f"{where}.checked")
        queue = data.get("queue")
        if not isinstance(queue, Mapping):
            raise ValueError(f"{where}.queue: expected an object")
        d.votes = VoteBox.from_state(d.votes.rules, queue, f"{where}.queue")
        return d

    # --- inside ------------------------------------------------------------------------------

    def _use(self, station: StationConfig) -> None:
        self.station = station
        self.schedule = Schedule(station.schedule, station.timezone)
        self.votes.rules = VoteRules.of_station(station)

    def _advance(self, now: float) -> None:
        """Let time pass up to `now`: overlays end, the queue's winner is taken at a tick."""
        self.votes.expire(now)
        ov = self.overlay
        if ov is not None and ov.until is not None and now >= ov.until:
            self.overlay = None
            reason = f"the schedule resumes after {ov.change.reason}"
            self.resumed = (ov.until, *self._resume_source(ov.until, reason))
        self._pick_up(now)
        self.checked = now

    def _pick_up(self, now: float) -> None:
        if self.station.listener_prompts != "queue" or self._pickup_blocked(now):
            return
        seg = self.schedule.segment_at(now)
        tick = self._last_pickup(seg, now)
        if self.checked is not None and tick <= self.checked:
            return  # this tick was looked at already
        until = tick + self.station.listener_hold_minutes * 60
        if seg.end is not None:
            until = min(until, seg.end)
        if until <= now:
            return  # its hold would be over already (the radio was down)
        s = self.votes.take(now)
        if s is None:
            return
        reason = f"suggestion #{s.id} ({s.votes} vote{'s' if s.votes != 1 else ''})"
        change = Change(s.blend, "vote", tick, self.station.transition_seconds, reason)
        self.overlay = Overlay("hold", change, until)

    def _pickup_blocked(self, t: float) -> bool:
        ov = self._active_overlay(t)
        return ov is not None and ov.kind in ("pin", "hold")

    def _last_pickup(self, seg: Segment, t: float) -> float:
        """The latest queue tick at or before t: a rotation tick, else one every hold."""
        period = self._period(seg)
        if period > 0:
            return self._anchor(seg).tick_at(t, period)[1]
        hold = self.station.listener_hold_minutes * 60
        base = seg.start if seg.start is not None else 0.0
        return base + math.floor((t - base) / hold) * hold

    def _takes_suggestion(self, at: float) -> bool:
        """Would the queue's winner (if any) be taken at the event at `at`?"""
        return (
            self.station.listener_prompts == "queue"
            and bool(self.votes.queue(self.clock()))
            and not self._pickup_blocked(at)
        )

    def _set_prompt(
        self, blend: Blend, source: str, reason: str, glide: float | None, now: float
    ) -> None:
        seg = self.schedule.segment_at(now)
        until = self._next_schedule_event(seg, now)
        self.overlay = Overlay(
            "prompt", Change(blend, source, now, self._glide(glide), reason), until
        )

    def _wanted(self, now: float) -> Change:
        ov = self._active_overlay(now)
        return ov.change if ov is not None else self._scheduled(now)

    def _scheduled(self, t: float) -> Change:
        """What the schedule plays at t, with the latest cause: slot start, tick, skip, resume."""
        seg = self.schedule.segment_at(t)
        slot = self._slot(seg)
        if slot is None:
            blend = self.station.blend
            start = seg.start if seg.start is not None else -math.inf
            causes = [(start, "config", "the station's prompt")]
            glide = self.station.transition_seconds
        else:
            period = self._period(seg)
            k, began = self._anchor(seg).tick_at(t, period)
            seed = zlib.crc32(f"{self.station.id}/{seg.slot}/{int(seg.start or 0)}".encode())
            i = item_index(k, len(slot.prompts), slot.order, seed)
            blend = slot.prompts[i]
            name = slot.name or f"schedule[{seg.slot}]"
            assert seg.start is not None, "a slot's occurrence has a start"
            causes = [(seg.start, "schedule", f"slot '{name}' starts")]
            if began > seg.start:
                anchor = self.anchor
                causes.append(
                    (began, "vote", anchor[2])
                    if anchor is not None and anchor[1].at == began
                    else (began, "rotation", f"rotation: prompt {i + 1} of {len(slot.prompts)}")
                )
            glide = self._glide(None if slot.transition_seconds == -1 else slot.transition_seconds)
        if self.resumed is not None and self.resumed[0] <= t:
            causes.append(self.resumed)
        at, source, reason = max(causes, key=lambda c: c[0])
        return Change(blend, source, at if math.isfinite(at) else 0.0, glide, reason)

    def _events_after(self, now: float) -> Iterator[tuple[float, str]]:
        """(time, why) of the schedule's own events after `now`, in order: ticks and bounds."""
        t = now
        for _ in range(_LOOKAHEAD):
            seg = self.schedule.segment_at(t)
            nxt = self._next_schedule_event(seg, t)
            queue_tick = None
            if self._takes_suggestion(t) and self._period(seg) == 0:
                queue_tick = self._last_pickup(seg, t) + self.station.listener_hold_minutes * 60
            if queue_tick is not None and (nxt is None or queue_tick < nxt):
                yield queue_tick, "queue"
                t = queue_tick
                continue
            if nxt is None:
                return
            yield nxt, "slot" if nxt == seg.end else "rotation"
            t = nxt

    def _next_schedule_event(self, seg: Segment, t: float) -> float | None:
        """The next rotation tick or the segment's end, whichever comes first (None: never)."""
        tick = self._anchor(seg).next_tick(t, self._period(seg))
        ends = [x for x in (tick, seg.end) if x is not None]
        return min(ends) if ends else None

    def _after_overlay(self, ov: Overlay) -> Upcoming:
        assert ov.until is not None
        why = {"pin": "pin_end", "hold": "hold_end", "prompt": "prompt_end"}[ov.kind]
        if self._takes_suggestion(ov.until) and self._is_pickup(ov.until):
            return Upcoming(ov.until, why, None, "vote")
        change = self._scheduled(ov.until)
        source = self._resume_source(ov.until, "")[0]
        if change.at >= ov.until:  # the overlay ends at a slot boundary or tick
            source = change.source
        return Upcoming(ov.until, why, change.blend, source)

    def _is_pickup(self, t: float) -> bool:
        seg = self.schedule.segment_at(t)
        return self._last_pickup(seg, t) == t

    def _resume_source(self, t: float, reason: str) -> tuple[str, str]:
        seg = self.schedule.segment_at(t)
        return ("config" if seg.slot == NO_SLOT else "schedule"), reason or "the schedule resumes"

    def _active_overlay(self, t: float) -> Overlay | None:
        ov = self.overlay
        if ov is None or (ov.until is not None and t >= ov.until):
            return None
        return ov

    def _pinned(self, t: float) -> bool:
        ov = self._active_overlay(t)
        return ov is not None and ov.kind == "pin"

    def _require_queue(self) -> None:
        if self.station.listener_prompts != "queue":
            raise Refused("off", "this station has no suggestion queue")

    def _slot(self, seg: Segment) -> SlotConfig | None:
        return None if seg.slot == NO_SLOT else self.station.schedule[seg.slot]

    def _period(self, seg: Segment) -> float:
        slot = self._slot(seg)
        return 0.0 if slot is None else slot.rotate_minutes * 60

    def _anchor(self, seg: Segment) -> Anchor:
        if self.anchor is not None and self.anchor[0] == (seg.slot, seg.start):
            return self.anchor[1]
        return Anchor(seg.start if seg.start is not None else 0.0, 0)

    def _glide(self, seconds: float | None) -> float:
        return self.station.transition_seconds if seconds is None else seconds

    def _transition(self, now: float) -> dict[str, Any] | None:
        cur, prev = self.current, self.previous
        if cur is None or prev is None or cur.transition_seconds <= 0:
            return None
        progress = (now - cur.at) / cur.transition_seconds
        if not 0 <= progress < 1:
            return None
        return {
            "from": prev.blend.to_json(),
            "to": cur.blend.to_json(),
            "progress": round(progress, 3),
            "blend": Blend.glide(prev.blend, cur.blend, progress).to_json(),
        }

    def _slot_json(self, seg: Segment, now: float) -> dict[str, Any]:
        slot = self.station.schedule[seg.slot]
        return {
            "slot": seg.slot,
            "name": slot.name,
            "days": slot.days.label(),
            "start": _local(self.schedule, seg.start),
            "end": _local(self.schedule, seg.end),
            "start_at": seg.start,
            "end_at": seg.end,
            "prompts": [b.describe() for b in slot.prompts],
            "rotate_minutes": slot.rotate_minutes,
            "order": slot.order,
            "current": seg.contains(now),
        }


def _local(schedule: Schedule, t: float | None) -> str | None:
    return None if t is None else schedule.local(t).strftime("%H:%M")


def _fingerprint(station: StationConfig) -> str:
    """Identifies config.toml's programme for a station (is a live edit still based on it?)."""
    text = json.dumps(programme_settings(station), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
