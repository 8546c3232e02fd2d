"""The real-time clock: one asyncio task per station releasing audio at wall-clock rate.

Every `TICK` the clock works out, from `time.monotonic()` and the moment it started, how many
samples are due (so timing errors never accumulate), takes them from the station's buffer,
runs them through loudness normalization and hands the same PCM to every output (MP3 mount,
HLS), so all listeners hear the same moment.

Never silent: when the buffer runs dry (generation fell behind), `Bridge` plays a loop built
from the last seconds of real audio, crossfaded at its seam and a few dB quieter, counts an
underrun, says so once in the log, and crossfades back to live audio once the generator has
built up `recover_seconds` again and is faster than real time (see `_caught_up`). The live
timeline simply resumes where it stopped, so no latency piles up beyond the bounded buffer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

import numpy as np

from radio.station import Station

log = logging.getLogger(__name__)

TICK = 0.1  # seconds between releases
MAX_CATCH_UP = 1.0  # after a longer stall (suspend, debugger) the clock skips instead
BRIDGE_SECONDS = 2.0  # recent audio the bridge loops
BRIDGE_GAIN = 10 ** (-4 / 20)  # the bridge plays 4 dB quieter: a lull, not a stutter
FADE_SECONDS = 0.05  # crossfades into and out of the bridge, and at its seam
GROWTH_WINDOW = 0.4  # seconds over which the buffer must grow faster than real time to recover


class Output(Protocol):
    def push(self, pcm: np.ndarray, wallclock: datetime) -> None: ...


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


class StationClock:
    """Takes audio from `station.buffer` at real-time pace and pushes it to `outputs`."""

    def __init__(
        self,
        station: Station,
        sample_rate: int,
        hop: int,
        outputs: Sequence[Output],
        process: Callable[[np.ndarray], np.ndarray],
        process_latency: int,
        on_played: Callable[[int], None],
        prime_seconds: float,
        recover_seconds: float,
        full_seconds: float,
    ) -> None:
        self.station = station
        self.sample_rate = sample_rate
        self.hop = hop
        self.outputs = outputs
        self.process = process  # loudness: pcm [C, n] -> [C, n], `process_latency` samples late
        self.process_latency = process_latency
        self.on_played = on_played  # tells the generator how far the clock is (in frames)
        self.prime_seconds = prime_seconds
        self.recover_seconds = recover_seconds  # buffered audio needed to leave the bridge
        self.full_seconds = full_seconds  # ... or this much, however slow generation is
        self.fade = round(FADE_SECONDS * sample_rate)
        self._recent: deque[np.ndarray] = deque()  # last BRIDGE_SECONDS of live audio
        self._recent_len = 0
        self._bridge: Bridge | None = None
        self._bridge_started = 0.0
        self._growth: deque[tuple[float, float]] = deque()  # (time, buffered s) in a bridge
        self._fade_in = 0  # samples of the fade-in of the bridge still to apply
        self._out = 0  # samples handed to the loudness stage so far
        # (output sample where a new prompt is first heard, time.monotonic() of its POST)
        self._heard_at: tuple[int, float] | None = None

    async def run(self) -> None:
        st = self.station
        while len(st.buffer) < self.prime_seconds * self.sample_rate:
            if st.health.error:
                log.error("station %s: not starting: %s", st.id, st.health.error)
            await asyncio.sleep(TICK / 2)
            st.health.last_tick = time.monotonic()
        log.info("station %s: on air", st.id)
        st.health.started = True
        t0 = time.monotonic()
        released = 0  # samples released since t0
        while True:
            now = time.monotonic()
            due = int((now - t0) * self.sample_rate) - released
            if due > MAX_CATCH_UP * self.sample_rate:  # the loop was stalled: skip, don't burst
                log.warning(
                    "station %s: clock stalled %.1f s, skipping ahead",
                    st.id,
                    due / self.sample_rate,
                )
                t0 = now - released / self.sample_rate
                due = 0
            if due > 0:
                self._release(due, datetime.now(UTC))
                released += due
            st.health.last_tick = now
            st.health.buffer_seconds = len(st.buffer) / self.sample_rate
            next_at = t0 + (released / self.sample_rate) + TICK
            await asyncio.sleep(max(next_at - time.monotonic(), 0.005))

    def _release(self, n: int, wallclock: datetime) -> None:
        pcm = self._next_audio(n)  # [C, n]
        out = self.process(pcm)
        for o in self.outputs:
            o.push(out, wallclock)
        self._out += n
        self.on_played(self.station.buffer.head // self.hop)
        if self._heard_at is not None and self._out > self._heard_at[0]:
            latency = time.monotonic() - self._heard_at[1]
            self.station.health.prompt_latency_seconds = latency
            self._heard_at = None
            log.info(
                "prompt change on %s: heard %.2f s after it was sent", self.station.id, latency
            )

    def _next_audio(self, n: int) -> np.ndarray:
        st = self.station
        if self._bridge is not None:
            if self._caught_up():
                return self._leave_bridge(n)
            return self._bridge_audio(n)
        head = st.buffer.head
        live = st.buffer.take(n)
        self._check_prompt_heard(head, live.shape[1])
        self._remember(live)
        if live.shape[1] == n:
            return live
        return np.concatenate([live, self._enter_bridge(n - live.shape[1])], axis=1)

    def _caught_up(self) -> bool:
        """Leave the bridge once `recover_seconds` are buffered and the buffer grows faster than
        real time (generation is fast again), or it is nearly full: no flapping while slow."""
        now = time.monotonic()
        buffered = len(self.station.buffer) / self.sample_rate
        self._growth.append((now, buffered))
        if buffered < self.recover_seconds:
            return False
        if buffered >= self.full_seconds:
            return True
        t0, b0 = self._growth[0]
        return now - t0 >= GROWTH_WINDOW and (buffered - b0) / (now - t0) >= 1.05

    def _check_prompt_heard(self, head: int, n: int) -> None:
        """If the first sample of a new prompt is among the n live samples taken from `head`,
        note where it will leave the loudness stage (its latency is taken when it does)."""
        st = self.station
        if st.pending_prompt is None or n == 0:
            return
        sample, posted = st.pending_prompt
        if sample >= head + n:
            return
        # sample < head: the cut fell inside audio already played, so all live audio taken
        # since is new; otherwise the new prompt starts inside this block
        offset = max(sample - head, 0)
        self._heard_at = (self._out + offset + self.process_latency, posted)
        st.pending_prompt = None

    def _remember(self, live: np.ndarray) -> None:
        if live.shape[1] == 0:
            return
        self._recent.append(live)
        self._recent_len += live.shape[1]
        limit = BRIDGE_SECONDS * self.sample_rate
        while self._recent_len - self._recent[0].shape[1] >= limit:
            self._recent_len -= self._recent.popleft().shape[1]

    def _enter_bridge(self, n: int) -> np.ndarray:
        st = self.station
        st.health.underruns += 1
        self._bridge_started = time.monotonic()
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
        self._growth = deque(maxlen=round(GROWTH_WINDOW / TICK) + 1)
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

    def _leave_bridge(self, n: int) -> np.ndarray:
        st = self.station
        bridge = self._bridge_audio(n)
        head = st.buffer.head
        live = st.buffer.take(n)
        self._check_prompt_heard(head, live.shape[1])
        self._remember(live)
        k = min(self.fade, live.shape[1])
        ramp = np.linspace(0.0, 1.0, k, dtype=np.float32)
        out = live.copy()
        out[:, :k] = live[:, :k] * ramp + bridge[:, :k] * (1 - ramp)
        if live.shape[1] < n:  # cannot happen after recover_seconds, but never go short
            out = np.concatenate([out, bridge[:, live.shape[1] :]], axis=1)
        lasted = time.monotonic() - self._bridge_started
        st.health.bridge_seconds += lasted
        log.info(
            "station %s: generation caught up; live again after %.1f s of bridge", st.id, lasted
        )
        self._bridge = None
        st.health.bridging = False
        return out
