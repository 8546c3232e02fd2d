"""A station's programme on the running radio: its `Director` ticked on the radio's clock, and
every change it decides played through the station's `PromptTimeline`.

`StationProgramme` is the bridge between the pure director (`radio.programme.director`: what to
play, from when, why) and the live station (`radio.timing`: which frame a change starts at, when
it is heard, the on-air title):

- **Start.** `open_station()` asks the director what the station opens with (after a restart:
  what played, if it is still due) and records it on the station; the generator opens with it.
- **Tick.** `tick()` runs every second (`run`) and right after an API call changed something.
  When the director wants a blend other than the one the engine was last given, it is sent
  through the timeline: a change the director made by itself (a slot boundary, a rotation tick,
  the queue's winner) is placed at the frame heard at its instant `at`; one an API call caused
  (`requested_at` given) as soon as the horizon allows, its latency measured from the request.
- **Ahead of time.** A change the programme will make by itself (`Director.upcoming`) is sent
  once it is within the horizon (plus a margin) and its frame has been generated: the engine
  cuts at the frame heard at the boundary, so a slot starts on the minute, not a horizon late.
  If the director then wants something else, the newer change replaces it (timing rule 3).
- **Failures.** A change the engine did not take (generator down, timeout) is sent again at
  the next tick.
- **News.** The SSE event `programme` (the director's `now_playing`) goes out whenever it says
  something new (a transition's progress aside); `queue` (suggestions with votes, the skip
  tally) after every queue action.

The director's clock is injected (`time.time` in production); times it gives are converted to
the timeline's wall clock by their distance from the director's now, so a test clock that runs
ahead moves the programme without moving the audio.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.blend import Blend
from radio.programme.director import Director
from radio.station import Station
from radio.timing import Applied, PromptTimeline

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0  # how often the director is asked
PREPARE_MARGIN = 1.5  # seconds before the horizon at which a coming change is sent ahead


@dataclass(frozen=True)
class _Prepared:
    """A change sent ahead for an instant the director has not reached yet."""

    blend: Blend
    at: float  # the director's instant (Unix seconds of its clock)


class StationProgramme:
    """One station's director, ticked on the event loop and played through its timeline."""

    def __init__(self, station: Station, director: Director, timeline: PromptTimeline) -> None:
        self.station = station
        self.director = director
        self.timeline = timeline
        self.sent: Blend | None = station.blend  # the blend the engine plays (or is taking)
        self.prepared: _Prepared | None = None  # sent ahead for a coming instant
        self._sends = 0  # sends so far (a failed one is retried only if it was the latest)
        self._failing = False  # the last send failed (log once per streak)
        # the last `programme` event, for "says something new"
        self._published: dict[str, object] | None = None

    # ---- the station loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Tick every TICK_SECONDS until cancelled; a failing tick is logged, not fatal."""
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a bug here must not stop the programme
                log.exception("station %s: programme tick failed", self.station.id)

    def tick(self, requested_at: float | None = None) -> asyncio.Task[Applied] | None:
        """Ask the director; send what it wants if the engine does not play it yet. With
        `requested_at` (time.monotonic of an API request) a change is sent as soon as possible
        and its latency measured from the request. Returns the send, if one was made."""
        d = self.director
        d.tick()
        now = d.clock()
        if self.prepared is not None and now >= self.prepared.at:  # it is due: it plays
            self.sent, self.prepared = self.prepared.blend, None
        cur = d.current
        assert cur is not None, "the director was started"
        task = None
        if cur.blend != self.sent:
            at = None if requested_at is not None else self._wall(cur.at)
            task = self._send(cur.blend, cur.source, cur.transition_seconds, at, requested_at)
            self.prepared = None
        elif requested_at is None:
            self._prepare(now)
        self.publish()
        return task

    def seed(
        self, tokens: torch.Tensor, blend: Blend, requested_at: float
    ) -> asyncio.Task[Applied]:
        """Continue from a clip's tokens [K, T] with `blend` (source `clip`), as soon as
        possible."""
        self.director.clip(blend)
        self.director.tick()
        self.prepared = None
        task = self._send(blend, "clip", 0.0, None, requested_at, tokens)
        self.publish()
        return task

    # ---- what listeners see ---------------------------------------------------------------

    def listeners(self) -> int:
        return self.station.mp3_listeners + self.station.hls_listeners

    def now_playing(self) -> dict[str, Any]:
        """The station's `programme` object (API, SSE): `Director.now_playing`."""
        return self.director.now_playing(self.listeners())

    def queue_json(self) -> dict[str, Any]:
        """The queue with votes and the skip tally (SSE `queue`, GET .../suggestions)."""
        np = self.now_playing()
        return {k: np[k] for k in ("listener_prompts", "queue", "skip")}

    def publish(self) -> None:
        """SSE `programme` when the programme says something new (progress of a transition
        aside: the page animates it from its start and length)."""
        data = self.now_playing()
        key = {k: v for k, v in data.items() if k != "transition"}
        key["transition"] = None if data["transition"] is None else data["transition"]["to"]
        if key != self._published:
            self._published = key
            self.station.events.publish("programme", data)

    def publish_queue(self) -> None:
        self.station.events.publish("queue", self.queue_json())
        self.publish()

    def to_state(self) -> dict[str, Any]:
        return self.director.to_state()

    # ---- inside ---------------------------------------------------------------------------

    def _wall(self, at: float) -> float:
        """The director's instant `at` on the timeline's wall clock."""
        return self.timeline.wallclock() + (at - self.director.clock())

    def _prepare(self, now: float) -> None:
        """Send the coming change ahead once it is near and its frame has been generated."""
        nxt = self.director.upcoming()
        coming = None if nxt is None or nxt.blend is None else _Prepared(nxt.blend, nxt.at)
        if self.prepared is not None and coming == self.prepared:
            return
        if self.prepared is not None:  # the programme changed its mind: undo the cut
            stale, self.prepared = self.prepared, None
            cur = self.director.current
            if self.sent is not None and cur is not None:
                self._send(self.sent, cur.source, 0.0, self._wall(stale.at), None, keep_sent=True)
        if nxt is None or nxt.blend is None:
            return
        glide = self.director.scheduled(nxt.at).transition_seconds
        rows = self.timeline.prefill_rows(nxt.blend, glide)  # a transition prefills more rows
        lead = self.timeline.horizon.seconds(self.timeline.engine.change_cost(rows))
        if not 0 < nxt.at - now <= lead + PREPARE_MARGIN:
            return
        at = self._wall(nxt.at)
        if self.timeline.start_frame(at, rows) * self.timeline.hop > self.station.buffer.tail:
            return  # not generated yet: the engine would cut early; look again next tick
        self._send(nxt.blend, nxt.source, glide, at, None, keep_sent=True)
        self.prepared = _Prepared(nxt.blend, nxt.at)

    def _send(
        self,
        blend: Blend,
        source: str,
        transition_seconds: float,
        at: float | None,
        requested_at: float | None,
        tokens: torch.Tensor | None = None,
        keep_sent: bool = False,
    ) -> asyncio.Task[Applied]:
        self._sends += 1
        number = self._sends
        if not keep_sent:
            self.sent = blend
        change = self.timeline.change(
            blend,
            source,
            requested_at=time.monotonic() if requested_at is None else requested_at,
            at=at,
            transition_seconds=transition_seconds,
            tokens=tokens,
        )
        task = asyncio.ensure_future(change)
        task.add_done_callback(lambda t: self._done(t, number, blend))
        return task

    def _done(self, task: asyncio.Task[Applied], number: int, blend: Blend) -> None:
        error = None if task.cancelled() else task.exception()
        if task.cancelled() or error is not None:
            if not self._failing:
                log.error(
                    "station %s: the engine did not take %r (%s); trying again",
                    self.station.id,
                    blend.describe(),
                    error or "cancelled",
                )
            self._failing = True
            if number == self._sends:  # nothing newer was sent: send it again next tick
                self.sent = self.prepared = None
            return
        self._failing = False


def open_station(station: Station, director: Director) -> Blend:
    """Start `director` and record what the station opens with (unless a restart restored it
    with its history already); the blend the generator opens the station's stream with."""
    first = director.start()
    if not station.history or station.prompt != first.blend.describe():
        station.record_prompt(first.blend, first.source)
    station.blend = first.blend
    return first.blend
