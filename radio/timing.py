"""Prompt timing: where a new prompt starts, when it is heard, and which title is on air.

One `PromptTimeline` per station, on the event loop. The API only calls and awaits
`change()`; the generator reports when the engine took a change (`applied`, through the
station sink), and the clock reports what it takes from the station's buffer (`taken`) and what
it hands to the outputs (`released`). The rules, all here:

1. **Start.** A prompt asked for now starts `horizon` seconds after the moment being played
   (the buffer's head): `generation.prompt_horizon`, or with -1 (auto)
   `max(MIN_HORIZON, HORIZON_MARGIN * typical, WORST_MARGIN * worst)`, from what the engine
   expects the change to cost until its first audio is made (`change_cost`: the median and the
   most of what its last changes took, each one's prefill scaled to this change's rows, at
   least a prefill at the latest measured speed; and a chunk. The text's encoding, its
   cross-attention and the cache's rewind cost 0.05-0.7 s on 2 cores where a 25-frame prefill
   took 0.06 s: placed by the prefill alone, changes came late and the old music played on),
   so that the audio after the cut is made before the clock gets there (the chunk being read when the
   change arrives gives way at its next decoder step: its audio would come after the cut).
   With the auto horizon, a change asked for now while several stations generated together
   sustain under `KEEP_BELOW` x real time (`rtf`: their audio per second of
   generating over the last minute of it, `Generator.sustained_rtf`, restarts and slow moments
   counted in; neither the moment's rate, which swings x0.6-1.6 within seconds, nor the
   ladder's prediction, which moved x1.0-1.4 as it changed levels) starts no sooner than
   `(KEEP_BELOW - rtf) / (KEEP_BELOW - 1)` of the full buffer (`Recovery.full_seconds`) ahead, or where the buffer ends if it holds less: every cut
   throws the audio after it away, and the little left behind a 0.8 s cut, refilled at x1.1,
   drained when the other stations' window restarts made the batch's steps dearer, in 4 of 4
   `radio serve` runs of two int4 stations on 2 Zen 4 cores. A station alone keeps at most
   `ALONE_KEEP` (0.75 s): a change starts its window afresh, the window's fastest stretch (no
   warm rows, short attention), and one int8 station judged at x1.1-1.2 heard five changes
   after 0.8-0.9 s with no underrun, but after up to 3.2 s with the whole rule; with the
   horizon alone, one at x1.02-1.06 ran dry 0.6 s after a change. The rows a change
   prefills: `engine.blend.prefill_rows` (one per text, both blends' in a transition, and the
   null row while the station is guided: `PromptEngine.guided_next`). A change for an
   instant (`at`, Unix seconds: a schedule boundary) starts at the frame heard at that instant,
   never sooner than the horizon allows.
2. **Clamp.** The engine is asked for that frame clamped to what it has made,
   `[0, stream.frame]`; when it cannot rewind that far (ValueError), it starts where it is now
   (`start_prompt`, run by the generator's worker thread). The answer is the frame from which
   the new prompt is heard.
3. **Cut.** When the engine has taken it, the audio buffered from that frame on is dropped, and
   the station's prompt and history change (API, SSE `prompt`). A later change that cuts at or
   before a change not heard yet replaces it: that one is never heard.
4. **Heard.** The first sample of the new prompt is heard when it leaves the loudness stage.
   Then the change's latency (from its request) is measured and the on-air title switches: the
   ICY `StreamTitle` of the MP3 mount and the Icecast source's metadata follow `on_air`.
5. **Heard in.** The answer to the request says when: the cut is `ahead = (cut sample - buffer
   head) / sample rate` seconds from the moment being played, heard `ahead` plus the output
   latency from now, unless generation cannot feed it in time. When the chunk after the cut
   takes longer to make (`HORIZON_MARGIN x` the most the last changes' first reads took,
   `first_read_seconds`, or before one was made a chunk's seconds / the realtime factor) than
   `ahead`, or the bridge (or a hold) plays already, the clock plays the old prompt's audio on
   (a hold, `radio.clock`) until the buffer holds what it needs to leave it
   (`clock.Recovery`): the answer counts that in (at x0.9 of real time with a 3.8 s full
   buffer, about 4 s, where `ahead` alone would promise 0.2).

Samples are numbered at the model rate (frame f begins at sample f * hop); the clock numbers
what it feeds the loudness stage separately (`fed`), because the bridge plays audio that is not
in the buffer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from engine.blend import PLAIN_ROWS, Blend, prefill_rows
from radio.blending import PromptStream, seed_blend, set_blend
from radio.station import Station

if TYPE_CHECKING:
    import torch

    from radio.clock import Recovery

log = logging.getLogger(__name__)

# seconds: the auto horizon never starts a prompt sooner. Once a change cost 0.1-0.77 s in
# `radio serve` on 2 Zen 4 cores and at 0.5 s 4 of 5 came late (a hold); since it costs
# 0.08-0.3 s (freed memory kept, bfloat16 text products), at 0.45-0.5 s none of 36 in six
# runs did; at 0.4 s (with the first chunk counted at its making, not its length) one of 18 in
# three runs did, after a 0.26 s change (docs/benchmarks.md)
MIN_HORIZON = 0.5
HORIZON_MARGIN = 1.5  # the auto horizon leaves this many times what a change costs typically
WORST_MARGIN = 1.15  # ... and this many times the most one of the last changes cost
# several stations generated together at or above this many times real time (over the last
# minute of generating): a change asked for now starts at the auto horizon; below it, it keeps a
# share of the full buffer that grows to all of it at x1.0 (rule 1)
KEEP_BELOW = 1.3
# seconds: a station alone keeps no more than this of its buffer ahead of a change's cut under
# KEEP_BELOW. Its change starts its window afresh (the window's fastest stretch), so a little
# more than the horizon is enough, and the change is still heard within ~0.9 s; with the horizon
# alone (0.4-0.5 s), one int8 station at x1.02-1.06 (the Xeon on a slow minute, plain read 18
# GB/s, 2026-12-07) ran dry 0.6 s after a change in two runs of two (docs/benchmarks.md)
ALONE_KEEP = 0.75
APPLY_TIMEOUT = 15.0  # seconds a change waits for the generator to take it


@dataclass(frozen=True)
class ChangeCost:
    """What a prompt change is expected to cost, from its turn until its first audio is made
    (`PromptEngine.change_cost`), in seconds."""

    typical: float  # the median of the last changes
    worst: float  # the most one of them took


def auto_horizon(cost: ChangeCost) -> float:
    """Seconds after the moment being played at which a new prompt can start without the
    stream falling behind: the change and its first read must fit, with a margin, into the
    audio still buffered before it. The margin is x1.5 of what changes typically cost, and at
    least x1.15 of the most one of the last cost: x1.5 of the most (until 2026-12-06) kept
    five changes after one that spiked (0.47 s where the others cost 0.23-0.31 on 2 Zen 3
    cores) 0.6 s later than they needed, and heard after 1.01-1.04 s."""
    return max(MIN_HORIZON, HORIZON_MARGIN * cost.typical, WORST_MARGIN * cost.worst)


@dataclass(frozen=True)
class Horizon:
    """How far ahead of the moment being played a change starts (`generation.prompt_horizon`)."""

    fixed: float  # seconds; -1 = auto, from what changes cost
    chunk_seconds: float  # audio the generator makes per read (rule 5)

    def seconds(self, cost: ChangeCost) -> float:
        """`cost`: what the change is expected to cost until its first audio is made
        (`PromptEngine.change_cost` for the rows it prefills)."""
        if self.fixed >= 0:
            return self.fixed
        return auto_horizon(cost)


@dataclass(frozen=True)
class PromptChange:
    """A prompt change on its way to the engine and back (the generator carries it)."""

    blend: Blend  # the new prompt (a text is the blend of one; "" = unconditional)
    source: str  # who asked: "listener", "admin", "schedule", ... (the history keeps it)
    from_frame: int  # the frame it should be heard from (rule 1)
    requested_at: float  # clock seconds (time.monotonic) of the request: its latency's start
    transition_seconds: float = 0.0  # glide from the blend before over this long; 0 = switch
    at: float | None = None  # the instant it is due (a schedule boundary), Unix seconds
    tokens: torch.Tensor | None = field(default=None, compare=False)  # [K, T]: a clip to go on from

    @property
    def prompt(self) -> str:
        """The blend in words (`Blend.describe`): what the API and the history show."""
        return self.blend.describe()

    @property
    def title(self) -> str:
        """What ICY StreamTitle and Icecast show once it is heard: the dominant text."""
        return self.blend.dominant


@dataclass(frozen=True)
class Applied:
    """The engine took a change: the frame it is heard from, and when that will be."""

    frame: int
    heard_in: float  # seconds from the answer
    heard_at: float  # Unix seconds


class NotRunning(Exception):
    """The generator is not running: no change can be made."""


def start_prompt(stream: PromptStream, change: PromptChange) -> int:
    """Rule 2, in the generator's worker thread: hear `change` from its frame clamped to
    `[0, stream.frame]`, or from `stream.frame` when the engine cannot rewind that far.
    Returns the frame from which it is heard; other engine errors propagate. The engine is
    called through `radio.blending` (blends, clips)."""
    frame = min(max(change.from_frame, 0), stream.frame)
    try:
        return _apply(stream, change, frame)
    except ValueError:  # too far back for the engine: start where it is now
        return _apply(stream, change, stream.frame)


def _apply(stream: PromptStream, change: PromptChange, frame: int) -> int:
    if change.tokens is not None:
        return seed_blend(stream, change.tokens, change.blend, frame)
    return set_blend(stream, change.blend, frame, change.transition_seconds)


class PromptEngine(Protocol):
    """What a timeline needs of the generator (`radio.generator.Generator`)."""

    together: int  # the stations generated together

    def change_cost(self, rows: int = PLAIN_ROWS) -> ChangeCost:
        """What a prompt change that prefills `rows` decoder rows is expected to cost, from its
        turn until its first audio is made."""
        ...

    def first_read_seconds(self) -> float:
        """What the read making a change's first audio took lately (0 before one was made)."""
        ...

    def guided_next(self, station_id: str) -> bool:
        """Whether a prompt change of the station prefills its null row now (its guidance on
        and not dropped while generation cannot keep up)."""
        ...

    @property
    def sustained_rtf(self) -> float:
        """Seconds of audio per station per second of generating over the last minute of it (0
        before it is measured)."""
        ...

    @property
    def alive(self) -> bool: ...

    def set_prompt(self, station_id: str, change: PromptChange) -> asyncio.Future[int]: ...


@dataclass(frozen=True)
class _Cut:
    sample: int  # the first sample of the new prompt (model rate, buffer numbering)
    change: PromptChange


@dataclass(frozen=True)
class _Mark:
    fed: int  # the first sample of the new prompt, in the clock's `fed` numbering + latency
    change: PromptChange


class PromptTimeline:
    """One station's prompt changes in time (see the module docstring for the rules)."""

    def __init__(
        self,
        station: Station,
        engine: PromptEngine,
        *,
        hop: int,
        sample_rate: int,
        horizon: Horizon,
        output_latency: int,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
        apply_timeout: float = APPLY_TIMEOUT,
        recovery: Recovery | None = None,
    ) -> None:
        self.station = station
        self.engine = engine
        self.hop = hop
        self.sample_rate = sample_rate
        self.horizon = horizon
        self.output_latency = output_latency  # samples between the clock and the outputs
        self.clock = clock
        self.wallclock = wallclock
        self.apply_timeout = apply_timeout
        self.recovery = recovery  # the clock's rule for leaving a bridge (None: never bridges)
        self.on_air = station.blend.dominant  # the title of what listeners hear now
        self._cuts: list[_Cut] = []  # taken by the engine, not yet taken by the clock
        self._marks: list[_Mark] = []  # taken by the clock, not yet out of the loudness stage
        self._title_changed = asyncio.Event()  # set (and replaced) when on_air changes

    # ---- the API ---------------------------------------------------------------------------

    async def change(
        self,
        prompt: str | Blend,
        source: str,
        *,
        requested_at: float | None = None,
        at: float | None = None,
        transition_seconds: float = 0.0,
        tokens: torch.Tensor | None = None,
    ) -> Applied:
        """Play `prompt` (a text or a blend) as soon as the horizon allows, or from the instant
        `at` (Unix seconds), gliding over `transition_seconds`; with `tokens` [K, T] the stream
        continues from them (a clip) instead of from what it played.

        Returns once the engine has taken it. Raises NotRunning (no generator), TimeoutError
        (the generator did not take it within `apply_timeout`) or ValueError (the engine
        refused it)."""
        requested_at = self.clock() if requested_at is None else requested_at
        if not self.engine.alive:
            raise NotRunning("the generator is not running")
        blend = prompt if isinstance(prompt, Blend) else Blend.of(prompt)
        rows = self.prefill_rows(blend, transition_seconds)
        start = self.start_frame(at, rows)
        if at is None and start == self._kept_frame():
            log.info(
                "prompt change on %s starts %.1f s ahead, after the music already made: %d "
                "station(s) generate at x%.2f of real time (the last minute), too little to "
                "refill a thinner buffer",
                self.station.id,
                (start * self.hop - self.station.buffer.head) / self.sample_rate,
                self.engine.together,
                self.engine.sustained_rtf,
            )
        change = PromptChange(blend, source, start, requested_at, transition_seconds, at, tokens)
        answer = self.engine.set_prompt(self.station.id, change)
        frame = await asyncio.wait_for(asyncio.shield(answer), self.apply_timeout)
        heard_in = self.heard_in(frame)
        return Applied(frame, heard_in, self.wallclock() + heard_in)

    def prefill_rows(self, blend: Blend, transition_seconds: float = 0.0) -> int:
        """Decoder rows a change to `blend` prefills, from the station's blend now: the null
        row only while the station is guided (with guidance dropped a change prefills half the
        rows: placed as if it had the null row, one that cost 0.23 s on 2 Zen 3 cores was
        heard 1.06 s after its request)."""
        guided = self.engine.guided_next(self.station.id)
        return prefill_rows(blend, self.station.blend, transition_seconds, guided)

    def start_frame(self, at: float | None = None, rows: int = PLAIN_ROWS) -> int:
        """Rule 1: the frame a change asked for now (or for the instant `at`) starts at, for a
        change that prefills `rows` decoder rows."""
        head = self.station.buffer.head
        engine = self.engine
        horizon = self.horizon.seconds(engine.change_cost(rows))
        earliest = -(-head // self.hop) + round(horizon * self.sample_rate / self.hop)
        if at is None:
            return max(earliest, self._kept_frame())
        sample = head + (at - self.wallclock()) * self.sample_rate - self.output_latency
        return max(earliest, math.ceil(sample / self.hop))

    def _kept_frame(self) -> int:
        """The frame a change asked for now starts at by the keep of rule 1 (0: no keep)."""
        kept = min(self.kept_seconds() * self.sample_rate, len(self.station.buffer))
        return math.ceil((self.station.buffer.head + kept) / self.hop) if kept > 0 else 0

    def kept_seconds(self) -> float:
        """Rule 1: seconds of the buffer a change asked for now keeps ahead of its cut while
        generation sustains little more than real time (0: the horizon alone decides); a
        station alone keeps at most ALONE_KEEP (its change starts its window afresh: its fast
        stretch)."""
        if self.horizon.fixed >= 0 or self.recovery is None:
            return 0.0
        rtf = self.engine.sustained_rtf
        if not 0 < rtf < KEEP_BELOW:
            return 0.0
        share = min((KEEP_BELOW - rtf) / (KEEP_BELOW - 1.0), 1.0)
        kept = share * self.recovery.full_seconds
        return kept if self.engine.together >= 2 else min(kept, ALONE_KEEP)

    def heard_in(self, frame: int) -> float:
        """Rule 5: seconds from now until frame `frame` leaves the loudness stage."""
        ahead = max(frame * self.hop - self.station.buffer.head, 0) / self.sample_rate
        return self._live_in(ahead) + self.output_latency / self.sample_rate

    def _live_in(self, ahead: float) -> float:
        """Seconds until the audio `ahead` seconds past the moment being played is played
        live, with a bridge before it when generation cannot make what follows in time."""
        health, recovery = self.station.health, self.recovery
        rtf = health.realtime_factor
        if recovery is None or rtf <= 0:  # (not measured yet: the first chunk has not come)
            return ahead
        need = recovery.needed(rtf)
        if health.bridging or health.holding:  # the head stands still until it holds `need`
            return ahead + max(need - ahead, 0.0) / rtf
        # the read after the cut: as the last changes' first reads took, else a chunk at `rtf`
        read = self.engine.first_read_seconds() or self.horizon.chunk_seconds / rtf
        if HORIZON_MARGIN * read <= ahead:  # (the horizon's margin)
            return ahead
        return max(ahead, need / rtf)  # the bridge from `ahead` on, the buffer then empty

    # ---- reports ---------------------------------------------------------------------------

    def applied(self, change: PromptChange, frame: int) -> None:
        """Rule 3 (the generator, through the station sink): the engine hears `change` from
        `frame`. Called in the worker's order, before any PCM of the new prompt arrives."""
        st = self.station
        sample = frame * self.hop
        st.buffer.truncate(sample, keep_reserve=True)  # the old audio, should the new be late
        self._cuts = [c for c in self._cuts if c.sample < sample] + [_Cut(sample, change)]
        st.health.prompt_changes += 1
        st.record_prompt(change.blend, change.source)
        log.info(
            "prompt changed on %s: %r, to be heard %.1f s from now",
            st.id,
            change.prompt,
            self.heard_in(frame),
        )

    def taken(self, head: int, n: int, fed: int) -> None:
        """The clock took live samples [head, head + n) from the buffer; they are samples
        [fed, fed + n) of what it feeds the loudness stage."""
        while self._cuts and n > 0 and self._cuts[0].sample < head + n:
            cut = self._cuts.pop(0)
            # a cut inside audio already played: all live audio taken since is new
            offset = max(cut.sample - head, 0)
            self._marks.append(_Mark(fed + offset + self.output_latency, cut.change))

    def released(self, fed: int) -> None:
        """The clock has fed the loudness stage `fed` samples: rule 4 for what left it."""
        while self._marks and self._marks[0].fed < fed:
            self._heard(self._marks.pop(0).change)

    def _heard(self, change: PromptChange) -> None:
        self.on_air = change.title
        self._title_changed.set()
        self._title_changed = asyncio.Event()  # for the next change
        health = self.station.health
        if change.at is None:  # asked for now: the latency from the request
            latency = self.clock() - change.requested_at
            health.prompt_latency_seconds = latency
            health.prompts_heard += 1
            log.info(
                "prompt change on %s: heard %.2f s after it was sent", self.station.id, latency
            )
        else:  # due at an instant (a schedule boundary): how late it was heard
            health.schedule_lag_seconds = self.wallclock() - change.at
            log.info(
                "programme change on %s: heard %.2f s after it was due",
                self.station.id,
                health.schedule_lag_seconds,
            )

    # ---- the title -------------------------------------------------------------------------

    async def titles(self) -> AsyncIterator[str]:
        """The on-air title now, then each time it changes (the latest one when several
        changed meanwhile), until cancelled."""
        while True:
            changed = self._title_changed  # set at the next change, even while we yield
            yield self.on_air
            await changed.wait()
