"""The station clock driven by a fake clock: it releases exactly what wall-clock time says, skips
after a stall instead of bursting, plays a bridge (never silence) when the buffer runs dry and
leaves it once generation is fast again, a prompt change whose first audio is late holds the old
prompt's audio on instead of a bridge, and a prompt change's title switches in the very release
that carries its first sample out of the loudness stage."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pytest

from engine.blend import Blend
from engine.options import SamplingOptions
from radio.clock import BRIDGE_GAIN, HOLD_FADE_SECONDS, TICK, StationClock
from radio.config import StationConfig
from radio.station import Station
from radio.timing import ChangeCost, Horizon, PromptChange, PromptTimeline

RATE, HOP = 32000, 640
LATENCY = 6400  # a fake loudness stage's delay (the real one: a 20 ms slice and 2.5 ms)


class DelayLine:
    """A stand-in for the loudness stage: the same samples, LATENCY samples late."""

    def __init__(self) -> None:
        self._held = np.zeros((1, LATENCY), np.float32)

    def __call__(self, pcm: np.ndarray) -> np.ndarray:
        joined = np.concatenate([self._held, pcm], axis=1)
        self._held = joined[:, pcm.shape[1] :]
        return joined[:, : pcm.shape[1]]


class Recorder:
    """An output (MP3 mount, HLS) that keeps what it was given."""

    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []

    def push(self, pcm: np.ndarray, wallclock: datetime) -> None:
        self.blocks.append(pcm.copy())

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.blocks, axis=1)


class NoEngine:
    alive = True
    sustained_rtf = 0.0
    together = 0

    def change_cost(self, rows=2):
        return ChangeCost(0.0, 0.0)

    def first_read_seconds(self):
        return 0.0

    def guided_next(self, station_id):
        return True

    def set_prompt(self, station_id, change):  # pragma: no cover - not used here
        raise AssertionError("the clock never asks the engine")


class Rig:
    """A station with a buffer, its timeline, and its clock on a fake time."""

    def __init__(self, buffered: float = 2.0, prime: float = 1.0, full: float = 3.8) -> None:
        self.station = Station(StationConfig(), 0, 1, SamplingOptions())
        self.station.record_prompt("old", "config")
        self.now = 0.0
        self.timeline = PromptTimeline(
            self.station,
            NoEngine(),
            hop=HOP,
            sample_rate=RATE,
            horizon=Horizon(0.5, 0.2),
            output_latency=LATENCY,
            clock=lambda: self.now,
        )
        self.out = Recorder()
        self.played: list[int] = []
        self.clock = StationClock(
            self.station,
            RATE,
            HOP,
            [self.out],
            process=DelayLine(),
            timeline=self.timeline,
            on_played=self.played.append,
            prime_seconds=prime,
            recover_seconds=prime,
            full_seconds=full,
            clock=lambda: self.now,
        )
        self.tail = 0
        self.generate(buffered, value=1.0)

    def generate(self, seconds: float, value: float) -> None:
        n = round(seconds * RATE)
        self.station.buffer.append(self.tail, np.full((1, n), value, np.float32))
        self.tail += n

    def run(self, until: float, step: float = TICK) -> None:
        while self.now < until - 1e-9:
            self.now = round(self.now + step, 9)
            self.clock.tick(self.now)

    @property
    def released(self) -> int:
        return sum(b.shape[1] for b in self.out.blocks)


def test_releases_exactly_what_the_time_says():
    rig = Rig()
    rig.clock.start(0.0)
    assert rig.station.health.started
    next_at = rig.clock.tick(0.1)
    assert rig.released == 3200 and next_at == pytest.approx(0.1 + TICK)
    for t in (0.13, 0.37, 0.38, 0.999):  # late, early, irregular ticks: no drift
        rig.now = t
        rig.clock.tick(t)
        assert rig.released == int(t * RATE)
    assert rig.played[-1] == int(0.999 * RATE) // HOP  # the generator hears how far we are
    assert rig.station.health.last_tick == 0.999


def test_after_a_stall_the_clock_skips_instead_of_bursting():
    rig = Rig(buffered=3.0)
    rig.clock.start(0.0)
    rig.clock.tick(0.5)
    assert rig.released == 16000
    next_at = rig.clock.tick(3.0)  # the loop was stalled 2.5 s: nothing released at once
    assert rig.released == 16000 and next_at == pytest.approx(3.0 + TICK)
    rig.clock.tick(3.2)
    assert rig.released == 16000 + 6400  # and the pace goes on from there


def test_an_empty_buffer_plays_a_bridge_then_live_audio_again():
    rig = Rig(buffered=1.5)
    rig.clock.start(0.0)
    rig.run(1.5)
    health = rig.station.health
    assert health.underruns == 0 and not health.bridging
    rig.run(2.0)  # the buffer ran dry at 1.5 s
    assert health.underruns == 1 and health.bridging
    assert rig.released == 2 * RATE  # never short: the bridge filled the gap
    out = rig.out.audio[0, LATENCY:]  # out[i]: input sample i, out of the loudness stage
    assert out[:48000].min() == 1.0  # live audio up to 1.5 s
    # then recent audio, 4 dB quieter (after a 50 ms fade-in): a lull, not silence
    assert np.allclose(out[49600:], BRIDGE_GAIN, atol=1e-6) and len(out[49600:]) > 0
    # generation is slow: past recover_seconds, but growing slower than real time: stay
    for _ in range(30):
        rig.generate(0.05, value=1.0)
        rig.run(rig.now + 0.1)
    assert health.bridging and len(rig.station.buffer) == 1.5 * RATE
    # fast again: it grows faster than real time over GROWTH_WINDOW: back to live audio
    for _ in range(5):
        rig.generate(0.2, value=1.0)
        rig.run(rig.now + 0.1)
        if not health.bridging:
            break
    assert not health.bridging and health.underruns == 1
    assert rig.now == pytest.approx(2.0 + 3.0 + 0.2)  # the second fast tick
    assert health.bridge_seconds == pytest.approx(rig.now - 1.6)


def test_a_full_buffer_ends_the_bridge_however_slow_generation_is():
    rig = Rig(buffered=1.0, full=2.0)
    rig.clock.start(0.0)
    rig.run(1.3)
    assert rig.station.health.bridging
    rig.generate(2.5, value=1.0)  # all at once, then nothing more: no growth to measure
    rig.run(rig.now + TICK)
    assert not rig.station.health.bridging


def test_the_title_switches_with_the_first_new_sample_out_of_the_loudness_stage():
    rig = Rig(buffered=3.0)
    st, tl = rig.station, rig.timeline
    rig.clock.start(0.0)
    rig.run(0.5)
    # the engine took a change at frame 50 (sample 32000), asked for at t = 0.45
    tl.applied(PromptChange(Blend.of("new"), "admin", 50, requested_at=0.45), 50)
    rig.tail = 50 * HOP
    rig.generate(2.0, value=2.0)  # the new prompt's audio
    titles = []
    while rig.now < 2.0:
        rig.run(rig.now + TICK)
        titles.append((rig.now, tl.on_air, rig.out.blocks[-1].max()))
    # the first output block that holds new audio (2.0) is the one after which the title is
    # "new"; every block before it has old audio only and the old title
    first_new = next(i for i, (_, _, peak) in enumerate(titles) if peak == 2.0)
    assert all(title == "old" for _, title, _ in titles[:first_new])
    assert all(title == "new" for _, title, _ in titles[first_new:])
    heard_at = titles[first_new][0]
    assert heard_at == pytest.approx((32000 + LATENCY) / RATE + TICK, abs=1e-9)  # 1.3 s
    assert st.health.prompt_latency_seconds == pytest.approx(heard_at - 0.45)


def test_a_late_new_prompt_holds_the_old_music_on_then_crossfades_into_it():
    """The buffer runs dry exactly at a prompt change's cut: the old prompt's audio that was cut
    away plays on, full volume and without a seam (no underrun, no bridge), the title stays,
    and once the new prompt's audio has built up the clock crossfades into it, from the cut."""
    rig = Rig(buffered=0.0)
    st, tl, health = rig.station, rig.timeline, rig.station.health
    old = np.linspace(0.1, 0.9, 4 * RATE, dtype=np.float32)[None]  # distinct sample values
    st.buffer.append(0, old)
    rig.clock.start(0.0)
    rig.run(0.5)
    tl.applied(PromptChange(Blend.of("new"), "admin", 50, requested_at=0.45), 50)  # cut at 1.0 s
    assert len(st.buffer) == 0.5 * RATE
    rig.run(1.6)  # the new prompt's audio is late: nothing came after the cut
    assert health.holds == 1 and health.holding
    assert health.underruns == 0 and not health.bridging
    out = rig.out.audio[0, LATENCY:]  # out[i]: input sample i, out of the loudness stage
    played = out.shape[0]
    assert np.array_equal(out, old[0, :played])  # the old music, as if nothing was cut
    assert tl.on_air == "old" and health.prompts_heard == 0
    assert st.buffer.head == 50 * HOP  # the live timeline waits at the cut
    # the new prompt's audio arrives, faster than real time: the clock leaves the hold
    rig.tail = 50 * HOP
    for _ in range(10):
        rig.generate(0.3, value=2.0)
        rig.run(rig.now + TICK)
        if not health.holding:
            break
    assert not health.holding and health.underruns == 0 and health.holds == 1
    left_at = rig.now
    rig.run(left_at + 1.0)
    out = rig.out.audio[0, LATENCY:]
    start = round((left_at - TICK) * RATE)  # the release that left the hold
    fade = round(HOLD_FADE_SECONDS * RATE)
    assert np.array_equal(out[:start], old[0, :start])  # the hold played the old music on
    mixed = out[start : start + fade]
    ramp = np.arange(1, fade + 1, dtype=np.float32) / (fade + 1)
    np.testing.assert_allclose(
        mixed, 2.0 * ramp + old[0, start : start + fade] * (1 - ramp), rtol=1e-6
    )
    assert np.all(out[start + fade :] == 2.0)  # then the new prompt, from its first sample
    assert health.held_seconds == pytest.approx(left_at - TICK - 1.0, abs=TICK + 1e-9)
    rig.run(rig.now + 0.5)
    assert tl.on_air == "new" and health.prompts_heard == 1


def test_a_hold_whose_old_music_runs_out_becomes_a_bridge():
    rig = Rig(buffered=1.2)
    tl, health = rig.timeline, rig.station.health
    rig.clock.start(0.0)
    rig.run(0.2)
    tl.applied(PromptChange(Blend.of("new"), "admin", 50, requested_at=0.15), 50)  # 0.2 s left
    rig.run(1.1)
    assert health.holding and health.underruns == 0
    rig.run(1.4)  # the 0.2 s of old music past the cut are gone: the bridge, an underrun
    assert not health.holding and health.bridging and health.underruns == 1
    assert rig.released == round(1.4 * RATE)  # never short


def test_no_hold_after_the_new_prompt_has_started_or_without_a_cut():
    """The reserve is the old prompt's audio at the cut only: once new audio was taken, or
    when a re-anchor (not a prompt change) cut the buffer, a dry buffer is a bridge."""
    rig = Rig(buffered=2.0)
    tl, health = rig.timeline, rig.station.health
    rig.clock.start(0.0)
    rig.run(0.5)
    tl.applied(PromptChange(Blend.of("new"), "admin", 50, requested_at=0.45), 50)
    rig.tail = 50 * HOP
    rig.generate(0.5, value=2.0)  # new audio in time, then nothing
    rig.run(2.0)
    assert health.holds == 0 and health.underruns == 1 and health.bridging
    other = Rig(buffered=2.0)
    other.clock.start(0.0)
    other.run(0.5)
    other.station.buffer.truncate(50 * HOP)  # a re-anchor's cut keeps no reserve
    other.run(1.5)
    assert other.station.health.holds == 0 and other.station.health.underruns == 1


def test_on_air_once_primed_and_keeping_up_or_full():
    """The clock goes on air by the bridge's leaving rule: `prime_seconds` buffered and growing
    faster than real time (and the generator's factor saying so, its speed judged), or a full
    buffer; never into a bridge while generation is slow."""
    fast = Rig(buffered=0.0)
    fast.station.health.realtime_factor = 1.5
    for _ in range(6):  # 0.15 s of audio per 0.1 s: x1.5
        assert not fast.clock.primed(fast.now)
        fast.generate(0.15, value=1.0)
        fast.now += 0.1
    assert not fast.clock.primed(fast.now)  # 0.9 s: not yet primed
    fast.generate(0.15, value=1.0)
    fast.now += 0.1
    judged = False
    fast.clock.speed_judged = lambda: judged
    assert not fast.clock.primed(fast.now)  # the generator has not chosen its weights yet
    judged = True
    assert fast.clock.primed(fast.now)  # 1.05 s, growing x1.5
    fast.station.health.realtime_factor = 0.9  # the generator measures itself slower: wait
    assert not fast.clock.primed(fast.now)
    slow = Rig(buffered=0.0, full=3.0)
    primed_at = None
    while primed_at is None:  # 0.09 s per 0.1 s: x0.9, slower than real time
        slow.generate(0.09, value=1.0)
        slow.now = round(slow.now + 0.1, 9)
        if slow.clock.primed(slow.now):
            primed_at = slow.now
    assert len(slow.station.buffer) >= 3.0 * RATE  # only once full
    assert primed_at == pytest.approx(3.4)
