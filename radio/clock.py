"""The real-time clock: one asyncio task per station releasing audio at wall-clock rate.

Every `TICK` the clock works out, from its clock (`time.monotonic`) and the moment it started,
how many samples are due (so timing errors never accumulate), takes them from the station's
buffer, runs them through loudness normalization and hands the same PCM to every output (MP3
mount, HLS), so all listeners hear the same moment. It tells the station's `PromptTimeline`
what it took and what it released (that is how a prompt change is known to be heard), and the
generator how far it played (`on_played`, in frames).

Never silent: when the buffer runs dry (generation fell behind), `Bridge` plays a loop built
from the last seconds of real audio, crossfaded at its seam and a few dB quieter, counts an
underrun, says so once in the log, and crossfades back to live audio once the generator has
built up `recover_seconds` again and is faster than real time (see `_caught_up`). The live
timeline simply resumes where it stopped, so no latency piles up beyond the bounded buffer.

A prompt change is not a reason for a bridge: when the buffer runs dry exactly at a prompt
change's cut (the new prompt's first audio is late), the clock plays on the old prompt's audio
that was cut away (the buffer's reserve, `PcmBuffer.reserve_here`), which follows what was
played without a seam, full volume. That is a hold, not an underrun: the listener hears the old
music a little longer and the new prompt later. The clock leaves a hold by the bridge's rule
and crossfades into the new prompt over `HOLD_FADE_SECONDS`; should the reserve run out first,
the bridge takes over (an underrun, as ever).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import numpy as np

from radio.station import Station
from radio.timing import PromptTimeline

log = logging.getLogger(__name__)

TICK = 0.05  # seconds between releases (a sample due now leaves at most this late)
MAX_CATCH_UP = 1.0  # after a longer stall (suspend, debugger) the clock skips instead
BRIDGE_SECONDS = 2.0  # recent audio the bridge loops
BRIDGE_GAIN = 10 ** (-4 / 20)  # the bridge plays 4 dB quieter: a lull, not a stutter
FADE_SECONDS = 0.05  # crossfades into and out of the bridge, and at its seam
HOLD_FADE_SECONDS = 0.25  # the crossfade from a hold's old music into the new prompt's
GROWTH_WINDOW = 0.4  # seconds over which the buffer must grow faster than real time to recover
RECOVER_GROWTH = 1.05  # ... and how much faster


class Output(Protocol):
    def push(self, pcm: np.ndarray, wallclock: datetime) -> None: ...


@dataclass(frozen=True)
class Recovery:
    """When the clock leaves a bridge (`StationClock._caught_up`): `recover_seconds` buffered
    and growing at `RECOVER_GROWTH` x real time or more, or `full_seconds` buffered."""

    recover_seconds: float
    full_seconds: float

    def needed(self, rtf: float) -> float:
        """Seconds of audio the buffer must hold to leave a bridge while generation runs at
        `rtf` x real time (no consumption in a bridge: the buffer grows at `rtf`)."""
        return self.recover_seconds if rtf >= RECOVER_GROWTH else self.full_seconds


class Bridge:
    """A seamless loop of recent audio, played while the generator catches up."""

    def __init__(self, recent: np.ndarray, fade: int) -> None:
        # recent: [C, n]; loop = recent[:, :n-fade] with its head crossfaded from its tail, so
        # that playing it over and over has no seam
        n = recent.shape[1]
        fade = min(fade, n // 4)
        if n == 0:
            self.loop = np.zeros((recent.shape[0], 1), np.float32)
        elif fade == 0:
            self.loop = recent.astype(np.float32, copy=True)
        else:
            ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
            loop = recent[:, : n - fade].astype(np.float32, copy=True)
            loop[:, :fade] = recent[:, :fade] * ramp + recent[:, n - fade :] * (1 - ramp)
            self.loop = loop
        self.loop *= BRIDGE_GAIN
        self.pos = 0

    def render(self, n: int) -> np.ndarray:
        """The next n samples of the loop: [C, n]."""
        length = self.loop.shape[1]
        idx = (self.pos + np.arange(n)) % length
        self.pos = (self.pos + n) % length
        return self.loop[:, idx]


class Crossfade:
    """Old audio [C, L] fading out under the live audio over its length, across ticks."""

    def __init__(self, old: np.ndarray) -> None:
        self.old = old
        self.pos = 0

    @property
    def done(self) -> bool:
        return self.pos >= self.old.shape[1]

    def mix(self, live: np.ndarray) -> np.ndarray:
        """live [C, n] with the next part of the fade mixed in."""
        length = self.old.shape[1]
        k = min(length - self.pos, live.shape[1])
        ramp = np.arange(self.pos + 1, self.pos + k + 1, dtype=np.float32) / (length + 1)
        out = live.copy()
        out[:, :k] = live[:, :k] * ramp + self.old[:, self.pos : self.pos + k] * (1 - ramp)
        self.pos += k
        return out


class StationClock:
    """Takes audio from `station.buffer` at real-time pace and pushes it to `outputs`.

    `run()` is the asyncio task; `start(now)` and `tick(now)` are its steps, which tests drive
    with a fake clock."""

    def __init__(
        self,
        station: Station,
        sample_rate: int,
        hop: int,
        outputs: Sequence[Output],
        process: Callable[[np.ndarray], np.ndarray],
        timeline: PromptTimeline,
        on_played: Callable[[int], None],
        prime_seconds: float,
        recover_seconds: float,
        full_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        speed_judged: Callable[[], bool] = lambda: True,
    ) -> None:
        self.station = station
        self.sample_rate = sample_rate
        self.hop = hop
        self.outputs = outputs
        self.process = process  # loudness: pcm [C, n] -> [C, n], a constant latency late
        self.timeline = timeline  # told what is taken and released (prompt changes heard)
        self.on_played = on_played  # tells the generator how far the clock is (in frames)
        self.prime_seconds = prime_seconds  # buffered audio needed to go on air
        self.recover_seconds = recover_seconds  # buffered audio needed to leave the bridge
        self.full_seconds = full_seconds  # ... or this much, however slow generation is
        # whether the generator has measured its steady speed and chosen its weights for it
        # (`Generator.speed_judged`): a station goes on air only then
        self.speed_judged = speed_judged
        self.clock = clock
        self.fade = round(FADE_SECONDS * sample_rate)
        self._recent: deque[np.ndarray] = deque()  # last BRIDGE_SECONDS of live audio
        self._recent_len = 0
        self._bridge: Bridge | None = None
        self._bridge_started = 0.0
        self._held: np.ndarray | None = None  # a hold's old audio still to play [C, n]
        self._hold_started = 0.0
        self._crossfade: Crossfade | None = None  # out of a hold, into the new prompt
        # (time, buffered s) in a bridge or a hold, and before going on air
        self._growth: deque[tuple[float, float]] = deque()
        self._fade_in = 0  # samples of the fade-in of the bridge still to apply
        self._fed = 0  # samples handed to the loudness stage so far
        self._t0 = 0.0  # clock() at which the samples counted in _released began
        self._released = 0  # samples released since _t0

    async def run(self) -> None:
        """Wait until the buffer is primed, then release audio every TICK until cancelled."""
        st = self.station
        said_error = ""
        while not self.primed(self.clock()):
            if st.health.error and st.health.error != said_error:
                log.error("station %s: not starting: %s", st.id, st.health.error)
                said_error = st.health.error
            await asyncio.sleep(TICK / 2)
            st.health.last_tick = self.clock()
        self.start(self.clock())
        while True:
            next_at = self.tick(self.clock())
            await asyncio.sleep(max(next_at - self.clock(), 0.005))

    def primed(self, now: float) -> bool:
        """Ready to go on air: by the rule that ends a bridge (`_caught_up`, with
        `prime_seconds`: enough buffered and the buffer growing faster than real time), and the
        generator's own smoothed factor at x1.05 or more, and its speed judged (the ladder's
        choice of weights made); or the buffer full. Going on air while generation is slower
        than real time (its first chunks, before the radio has moved to cheaper weights), or
        just before the move (a stall of a second while int4 weights load), would start the
        station with a bridge."""
        buffered = len(self.station.buffer) / self.sample_rate
        if buffered >= self.full_seconds:
            return True
        slow = self.station.health.realtime_factor < RECOVER_GROWTH or not self.speed_judged()
        if buffered < self.prime_seconds or slow:
            self._measure_growth(now, buffered)
            return False
        return self._caught_up(now, self.prime_seconds)

    def start(self, now: float) -> None:
        """Go on air: the release count starts at `now`."""
        log.info("station %s: on air", self.station.id)
        self.station.health.started = True
        self._t0, self._released = now, 0

    def tick(self, now: float) -> float:
        """Release what is due at `now`; returns when the next tick is due."""
        st = self.station
        due = int((now - self._t0) * self.sample_rate) - self._released
        if due > MAX_CATCH_UP * self.sample_rate:  # the loop was stalled: skip, don't burst
            log.warning(
                "station %s: clock stalled %.1f s, skipping ahead", st.id, due / self.sample_rate
            )
            self._t0 = now - self._released / self.sample_rate
            due = 0
        if due > 0:
            self._release(due, now)
            self._released += due
        st.health.last_tick = now
        st.health.buffer_seconds = len(st.buffer) / self.sample_rate
        return self._t0 + self._released / self.sample_rate + TICK

    def _release(self, n: int, now: float) -> None:
        pcm = self._next_audio(n, now)  # [C, n]
        out = self.process(pcm)
        wallclock = datetime.now(UTC)
        for o in self.outputs:
            o.push(out, wallclock)
        self._fed += n
        self.on_played(self.station.buffer.head // self.hop)
        self.timeline.released(self._fed)

    def _next_audio(self, n: int, now: float) -> np.ndarray:
        if self._bridge is not None:
            if self._caught_up(now):
                return self._leave_bridge(n, now)
            return self._bridge_audio(n)
        if self._held is not None:
            if not self._caught_up(now):
                return self._hold_audio(n, now)
            self._leave_hold(now)
        live = self._faded(self._take_live(n))
        if live.shape[1] == n:
            return live
        rest = n - live.shape[1]
        reserve = self.station.buffer.reserve_here()
        if reserve is not None:
            return np.concatenate([live, self._enter_hold(reserve, rest, now)], axis=1)
        return np.concatenate([live, self._enter_bridge(rest, now)], axis=1)

    def _take_live(self, n: int) -> np.ndarray:
        """Up to n samples from the buffer: the start of the block the loudness stage gets
        next (the timeline is told where they are fed)."""
        buffer = self.station.buffer
        head = buffer.head
        live = buffer.take(n)  # [C, <= n]
        self.timeline.taken(head, live.shape[1], self._fed)
        self._remember(live)
        return live

    def _caught_up(self, now: float, enough: float | None = None) -> bool:
        """Leave the bridge once `recover_seconds` (or `enough`) are buffered and the buffer
        grows faster than real time (generation is fast again), or it is nearly full: no
        flapping while slow."""
        buffered = len(self.station.buffer) / self.sample_rate
        self._measure_growth(now, buffered)
        if buffered < (self.recover_seconds if enough is None else enough):
            return False
        if buffered >= self.full_seconds:
            return True
        t0, b0 = self._growth[0]
        return now - t0 >= GROWTH_WINDOW and (buffered - b0) / (now - t0) >= RECOVER_GROWTH

    def _measure_growth(self, now: float, buffered: float) -> None:
        """Keep (time, buffered) samples back to the latest one GROWTH_WINDOW old."""
        self._growth.append((now, buffered))
        while len(self._growth) > 1 and now - self._growth[1][0] >= GROWTH_WINDOW:
            self._growth.popleft()

    def _remember(self, live: np.ndarray) -> None:
        if live.shape[1] == 0:
            return
        self._recent.append(live)
        self._recent_len += live.shape[1]
        limit = BRIDGE_SECONDS * self.sample_rate
        while self._recent_len - self._recent[0].shape[1] >= limit:
            self._recent_len -= self._recent.popleft().shape[1]

    def _enter_hold(self, reserve: np.ndarray, n: int, now: float) -> np.ndarray:
        st = self.station
        st.health.holds += 1
        st.health.holding = True
        self._hold_started = now
        self._held = reserve
        self._growth.clear()
        log.info(
            "station %s: the new prompt's music is not ready yet; the old one plays on (%.1f s "
            "of it made) until it is",
            st.id,
            reserve.shape[1] / self.sample_rate,
        )
        return self._hold_audio(n, now)

    def _hold_audio(self, n: int, now: float) -> np.ndarray:
        """The next n samples of the hold's old audio; the bridge when it runs out."""
        assert self._held is not None, "hold audio outside a hold"
        pcm, self._held = self._held[:, :n], self._held[:, n:]
        self._remember(pcm)
        if pcm.shape[1] == n:
            return pcm
        self._end_hold(now)  # the old prompt's audio ran out first
        return np.concatenate([pcm, self._enter_bridge(n - pcm.shape[1], now)], axis=1)

    def _leave_hold(self, now: float) -> None:
        """The new prompt's audio plays from here, crossfaded in from the hold's old audio."""
        assert self._held is not None, "leaving a hold outside one"
        fade = round(HOLD_FADE_SECONDS * self.sample_rate)
        self._crossfade = Crossfade(self._held[:, :fade])
        log.info(
            "station %s: the new prompt plays after %.1f s more of the old one",
            self.station.id,
            now - self._hold_started,
        )
        self._end_hold(now)

    def _faded(self, live: np.ndarray) -> np.ndarray:
        """Live audio under what remains of a crossfade out of a hold."""
        if self._crossfade is None:
            return live
        out = self._crossfade.mix(live)
        if self._crossfade.done:
            self._crossfade = None
        return out

    def _end_hold(self, now: float) -> None:
        self._held = None
        self.station.health.holding = False
        self.station.health.held_seconds += now - self._hold_started

    def _enter_bridge(self, n: int, now: float) -> np.ndarray:
        st = self.station
        st.health.underruns += 1
        self._bridge_started = now
        st.health.bridging = True
        log.warning(
            "station %s: generation fell behind, the buffer is empty; playing a bridge from "
            "recent audio until it catches up",
            st.id,
        )
        if self._recent:
            recent = np.concatenate(list(self._recent), axis=1)
        else:
            recent = np.zeros((st.channels, 0), np.float32)
        self._bridge = Bridge(recent, self.fade)
        self._growth.clear()
        self._fade_in = self.fade
        return self._bridge_audio(n)

    def _bridge_audio(self, n: int) -> np.ndarray:
        assert self._bridge is not None, "bridge audio outside a bridge"
        pcm = self._bridge.render(n)
        if self._fade_in:
            k = min(self._fade_in, n)
            done = self.fade - self._fade_in
            ramp = np.arange(done, done + k, dtype=np.float32) / self.fade
            pcm[:, :k] *= ramp
            self._fade_in -= k
        return pcm

    def _leave_bridge(self, n: int, now: float) -> np.ndarray:
        st = self.station
        bridge = self._bridge_audio(n)
        live = self._take_live(n)
        k = min(self.fade, live.shape[1])
        ramp = np.linspace(0.0, 1.0, k, dtype=np.float32)
        out = live.copy()
        out[:, :k] = live[:, :k] * ramp + bridge[:, :k] * (1 - ramp)
        if live.shape[1] < n:  # cannot happen after recover_seconds, but never go short
            out = np.concatenate([out, bridge[:, live.shape[1] :]], axis=1)
        lasted = now - self._bridge_started
        st.health.bridge_seconds += lasted
        log.info(
            "station %s: generation caught up; live again after %.1f s of bridge", st.id, lasted
        )
        self._bridge = None
        st.health.bridging = False
        return out
