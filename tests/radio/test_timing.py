"""Prompt timing with a fake clock and a fake generator: where a change starts (horizon, auto
horizon, an instant), the engine's clamp and retry, the cut, when it is heard (and only then the
title), what the answer promises, and a change that replaces one not heard yet."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from engine.blend import Blend
from engine.options import SamplingOptions
from radio.blending import open_blend, open_text, set_blend, takes_blends
from radio.clock import Recovery
from radio.config import StationConfig
from radio.station import Station
from radio.timing import (
    ALONE_KEEP,
    MIN_HORIZON,
    ChangeCost,
    Horizon,
    NotRunning,
    PromptChange,
    PromptTimeline,
    auto_horizon,
    start_prompt,
)

RATE, HOP = 32000, 640  # 50 frames per second
LATENCY = 6400  # samples between the clock and the outputs (a slow loudness stage: 0.2 s)
WALL = 1_700_000_000.0  # Unix time when the fake clock reads 0


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def wall(self) -> float:
        return WALL + self.t


class FakeEngine:
    """A generator that takes each change when the test says so (`take`)."""

    def __init__(self) -> None:
        self.alive = True
        self.plain_change = 0.01  # what a plain prompt's change costs (two rows)
        self.first_read = 0.0  # what a change's first read took lately (0: none made yet)
        self.worst = 0.0  # the most the last changes cost (0: as typical)
        self.guided = True  # a change prefills the null row (False: guidance dropped)
        self.sustained_rtf, self.together = 0.0, 0
        self.asked: list[tuple[str, PromptChange, asyncio.Future[int]]] = []

    def change_cost(self, rows: int = 2) -> ChangeCost:  # a 0.2 s chunk's first read with it
        cost = self.plain_change * rows / 2 + 0.2
        return ChangeCost(cost, self.worst or cost)

    def first_read_seconds(self) -> float:
        return self.first_read

    def guided_next(self, station_id: str) -> bool:
        return self.guided

    def set_prompt(self, station_id: str, change: PromptChange) -> asyncio.Future[int]:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.asked.append((station_id, change, fut))
        return fut

    def take(self, timeline: PromptTimeline, frame: int | None = None) -> PromptChange:
        """As the worker does: report the change (the sink), then answer the future."""
        _, change, fut = self.asked.pop(0)
        frame = change.from_frame if frame is None else frame
        timeline.applied(change, frame)
        fut.set_result(frame)
        return change


def station(prompt: str = "old") -> Station:
    st = Station(StationConfig(), 0, 1, SamplingOptions())
    st.record_prompt(prompt, "config")
    return st


def timeline(
    st: Station,
    engine: FakeEngine,
    clock: FakeClock,
    fixed: float = -1.0,
    recovery: Recovery | None = None,
):
    return PromptTimeline(
        st,
        engine,
        hop=HOP,
        sample_rate=RATE,
        horizon=Horizon(fixed, chunk_seconds=0.2),
        output_latency=LATENCY,
        clock=clock,
        wallclock=clock.wall,
        apply_timeout=0.2,
        recovery=recovery,
    )


def fill(st: Station, start: int, n: int, value: float) -> None:
    st.buffer.append(start, np.full((1, n), value, np.float32))


def test_auto_horizon_covers_what_a_change_costs_with_a_margin():
    """x1.5 of what changes typically cost, at least x1.15 of the most one of the last did."""
    assert auto_horizon(ChangeCost(0.21, 0.4)) == MIN_HORIZON == 0.5  # a fast change (GPU)
    assert auto_horizon(ChangeCost(1.4, 1.4)) == pytest.approx(1.5 * 1.4)  # a slow CPU
    assert auto_horizon(ChangeCost(0.5, 0.6)) == pytest.approx(1.5 * 0.5)  # one a little dearer
    assert auto_horizon(ChangeCost(0.5, 0.7)) == pytest.approx(1.15 * 0.7)  # one that spiked
    assert Horizon(0.0, 0.2).seconds(ChangeCost(5.0, 5.0)) == 0.0  # a fixed horizon is fixed
    assert Horizon(-1, 0.2).seconds(ChangeCost(1.4, 2.0)) == auto_horizon(ChangeCost(1.4, 2.0))


def test_a_change_starts_a_horizon_after_the_moment_being_played():
    st, engine, clock = station(), FakeEngine(), FakeClock()
    fill(st, 0, 5 * RATE, 1.0)
    st.buffer.take(RATE + 100)  # head: sample 32100, inside frame 50
    tl = timeline(st, engine, clock, fixed=1.0)
    assert tl.start_frame() == 51 + 50  # the next whole frame, plus 1 s
    tl = timeline(st, engine, clock)  # auto: the tiny model's prefill gives the minimum
    assert tl.start_frame() == 51 + 25  # 0.5 s
    engine.plain_change = 1.2  # a slow change moves it later: 1.5 x (1.2 + 0.2) s
    assert tl.start_frame() == 51 + 105
    engine.plain_change = 1.6  # 1.5 x (1.6 + 0.2)
    assert tl.start_frame() == 51 + 135
    engine.worst = 2.7  # one of the last changes cost 2.7 s: 1.15 x 2.7
    assert tl.start_frame() == 51 + 155


def test_a_change_close_to_real_time_keeps_a_share_of_the_buffer():
    """Rule 1 under x1.3 over the last minute: a change asked for now starts no sooner than
    (1.3 - rtf) / 0.3 of the full buffer ahead (all of it at x1.0 or slower), or where the
    buffer ends; a station alone at most ALONE_KEEP ahead; at x1.3 or more, for an instant or
    with a fixed horizon, the horizon alone."""
    st, engine, clock = station(), FakeEngine(), FakeClock()
    fill(st, 0, 5 * RATE, 1.0)
    st.buffer.take(RATE)  # head: frame 50, 4 s buffered
    tl = timeline(st, engine, clock, recovery=Recovery(1.0, 3.8))
    assert tl.start_frame() == 50 + 25  # not judged yet: the auto horizon, 0.5 s
    st.health.realtime_factor = 0.9  # the moment's rate (a window's end) does not count
    assert tl.start_frame() == 50 + 25
    engine.sustained_rtf, engine.together = 1.1, 1  # alone: its window starts afresh
    assert tl.kept_seconds() == ALONE_KEEP == 0.75  # two thirds of 3.8 s, at most 0.75
    assert tl.start_frame() == 50 + 38
    engine.sustained_rtf = 1.28  # a fifteenth of 3.8 s: less than the horizon, which decides
    assert tl.kept_seconds() == pytest.approx(3.8 / 15) and tl.start_frame() == 50 + 25
    engine.sustained_rtf, engine.together = 1.4, 2
    assert tl.kept_seconds() == 0.0 and tl.start_frame() == 50 + 25
    engine.sustained_rtf = 1.1  # two thirds of 3.8 s: 2.53 s
    assert tl.kept_seconds() == pytest.approx(3.8 * 2 / 3)
    assert tl.start_frame() == 50 + 127
    assert tl.heard_in(177) == pytest.approx(127 / 50 + LATENCY / RATE)  # the answer says so
    engine.sustained_rtf = 0.9  # the whole full buffer
    assert tl.start_frame() == 50 + 190
    st.buffer.take(2 * RATE)  # head: frame 150, 2 s left: the cut where the buffer ends
    assert tl.start_frame() == 150 + 100
    assert tl.start_frame(at=WALL + 0.1) == 150 + 25  # an instant: the horizon alone
    assert timeline(st, engine, clock, 0.5, Recovery(1.0, 3.8)).start_frame() == 150 + 25
    assert timeline(st, engine, clock).start_frame() == 150 + 25  # no bridge: no rule


async def test_a_change_that_keeps_the_buffer_says_why(caplog):
    caplog.set_level(logging.INFO, logger="radio.timing")
    st, engine, clock = station(), FakeEngine(), FakeClock()
    fill(st, 0, 5 * RATE, 1.0)
    st.buffer.take(RATE)  # head: frame 50
    tl = timeline(st, engine, clock, recovery=Recovery(1.0, 3.8))
    engine.sustained_rtf, engine.together = 1.1, 2
    asked = asyncio.ensure_future(tl.change("new", "listener"))
    await asyncio.sleep(0)
    assert engine.asked[0][1].from_frame == 50 + 127
    assert (
        "prompt change on main starts 2.5 s ahead, after the music already made: 2 station(s) "
        "generate at x1.10 of real time (the last minute), too little to refill a thinner "
        "buffer" in caplog.text
    )
    engine.take(tl)
    await asked
    caplog.clear()
    engine.sustained_rtf = 1.4  # margin enough: the horizon, and nothing said
    asked = asyncio.ensure_future(tl.change("newer", "listener"))
    await asyncio.sleep(0)
    engine.take(tl)
    await asked
    assert "starts" not in caplog.text


async def test_with_guidance_dropped_a_change_is_placed_by_its_rows_without_the_null_row():
    """While the station has no null row (`PromptEngine.guided_next`: guidance dropped while
    generation cannot keep up), a change prefills one row per text alone: it is asked what that
    costs (half a plain prompt's prefill here) and starts that much sooner."""
    st, engine, clock = station("old"), FakeEngine(), FakeClock()
    fill(st, 0, 5 * RATE, 1.0)
    st.buffer.take(RATE + 100)  # head inside frame 50
    engine.plain_change = 1.0
    tl = timeline(st, engine, clock)
    engine.guided = False
    assert tl.prefill_rows(Blend.of("new")) == 1
    assert tl.prefill_rows(Blend.of("new"), transition_seconds=5.0) == 2  # old and new
    asked = asyncio.ensure_future(tl.change("new", "listener"))
    await asyncio.sleep(0)
    assert engine.asked[0][1].from_frame == 51 + round(1.5 * (0.5 + 0.2) * 50)
    engine.take(tl)
    await asked
    engine.guided = True  # wanted back: the next change prefills the null row again
    asked = asyncio.ensure_future(tl.change("newer", "listener"))
    await asyncio.sleep(0)
    assert engine.asked[0][1].from_frame == 51 + round(1.5 * (1.0 + 0.2) * 50)
    engine.take(tl)
    await asked


async def test_a_blend_or_a_transition_starts_later_for_its_larger_prefill():
    """The auto horizon asks the engine what a change of the rows it prefills costs: a blend of
    3 texts 4 rows (x2 here), a transition from it to a new text 5 (x2.5)."""
    st, engine, clock = station("old"), FakeEngine(), FakeClock()
    fill(st, 0, 5 * RATE, 1.0)
    st.buffer.take(RATE + 100)  # head inside frame 50
    engine.plain_change = 1.0
    tl = timeline(st, engine, clock)
    three = Blend.parse([{"text": "a"}, {"text": "b"}, {"text": "c"}])
    assert tl.prefill_rows(Blend.of("new")) == 2
    assert tl.prefill_rows(Blend.of("new"), transition_seconds=5.0) == 3  # old and new
    assert tl.prefill_rows(three) == 4 and tl.prefill_rows(three, 5.0) == 5
    assert tl.start_frame(rows=2) == 51 + round(1.5 * (1.0 + 0.2) * 50)
    assert tl.start_frame(rows=4) == 51 + round(1.5 * (2.0 + 0.2) * 50)
    assert Horizon(0.5, 0.2).seconds(ChangeCost(2.5, 2.5)) == 0.5  # a fixed horizon stays fixed
    asked = asyncio.ensure_future(tl.change(three, "admin", transition_seconds=5.0))
    await asyncio.sleep(0)
    assert engine.asked[0][1].from_frame == 51 + round(1.5 * (2.5 + 0.2) * 50)
    engine.take(tl)
    await asked


def test_a_change_for_an_instant_starts_at_the_frame_heard_then():
    st, engine, clock = station(), FakeEngine(), FakeClock()
    fill(st, 0, 5 * RATE, 1.0)
    st.buffer.take(RATE)  # head: frame 50, being played now
    tl = timeline(st, engine, clock, fixed=0.5)
    # heard 3 s from now: 3 s of samples past the head, less what the loudness stage holds
    assert tl.start_frame(at=WALL + 3.0) == (RATE + 3 * RATE - LATENCY) // HOP  # frame 190
    assert tl.heard_in(190) == pytest.approx(3.0)
    # an instant the horizon cannot reach (now, or past): as soon as the horizon allows
    assert tl.start_frame(at=WALL + 0.1) == tl.start_frame() == 50 + 25
    assert tl.start_frame(at=WALL - 60) == 75


async def test_the_answer_says_when_the_change_is_heard():
    st, engine, clock = station(), FakeEngine(), FakeClock()
    fill(st, 0, 4 * RATE, 1.0)
    st.buffer.take(RATE)  # 3 s buffered ahead of the clock
    tl = timeline(st, engine, clock)
    clock.t = 10.0
    task = asyncio.create_task(tl.change("new", "listener", requested_at=9.5))
    await asyncio.sleep(0)
    [(sid, change, _)] = engine.asked
    assert (sid, change) == ("main", PromptChange(Blend.of("new"), "listener", 50 + 25, 9.5))
    engine.take(tl)
    applied = await task
    heard_in = (75 * HOP - RATE + LATENCY) / RATE  # 0.5 s of buffer + 0.2 s of loudness
    assert (applied.frame, applied.heard_in) == (75, pytest.approx(heard_in))
    assert applied.heard_at == pytest.approx(WALL + 10.0 + heard_in)


def test_the_answer_counts_in_the_bridge_a_change_the_generator_cannot_feed_causes():
    """Rule 5 when generation is slow: a cut whose next chunk takes longer to make (as the last
    changes' first reads took, or before one was made a chunk at the station's speed) than the
    audio before it lasts (or that comes while the bridge plays) is heard once the clock has
    buffered enough to leave the bridge: `Recovery` (1 s and growing, or 3.8 s when generation
    is under x1.05 and the buffer cannot grow faster than real time)."""
    st, engine, clock = station(), FakeEngine(), FakeClock()
    fill(st, 0, 4 * RATE, 1.0)
    st.buffer.take(RATE)  # head: frame 50
    tl = PromptTimeline(
        st,
        engine,
        hop=HOP,
        sample_rate=RATE,
        horizon=Horizon(-1, chunk_seconds=0.2),
        output_latency=LATENCY,
        clock=clock,
        wallclock=clock.wall,
        recovery=Recovery(1.0, 3.8),
    )
    out = LATENCY / RATE
    assert tl.heard_in(75) == pytest.approx(0.5 + out)  # not measured yet: the cut alone
    st.health.realtime_factor = 1.2  # the chunk after the cut is made in 0.17 s: in time
    assert tl.heard_in(75) == pytest.approx(0.5 + out)
    assert tl.heard_in(55) == pytest.approx(1.0 / 1.2 + out)  # 0.1 s ahead: a bridge first
    st.health.realtime_factor = 0.9  # under x1.05: the bridge lasts until the buffer is full
    assert tl.heard_in(55) == pytest.approx(3.8 / 0.9 + out)
    assert tl.heard_in(75) == pytest.approx(0.5 + out)  # its next chunk made in 0.22 s: in time
    st.health.realtime_factor = 0.55  # 0.36 s, with the horizon's margin 0.55 s: too close
    assert tl.heard_in(75) == pytest.approx(3.8 / 0.55 + out)
    engine.first_read = 0.3  # the last changes' first reads took 0.3 s: x1.5 is 0.45, in time
    assert tl.heard_in(75) == pytest.approx(0.5 + out)
    engine.first_read = 0.35  # 0.525 s with the margin: not
    assert tl.heard_in(75) == pytest.approx(3.8 / 0.55 + out)
    engine.first_read = 0.0
    st.health.realtime_factor, st.health.bridging = 1.2, True  # the bridge plays now
    assert tl.heard_in(75) == pytest.approx(0.5 + 0.5 / 1.2 + out)  # 0.5 s more, then 0.5 s
    assert tl.heard_in(150) == pytest.approx(2.0 + out)  # 2 s buffered: it leaves at once
    assert timeline(st, engine, clock).heard_in(55) == pytest.approx(0.1 + out)  # no rule


async def test_the_cut_changes_the_prompt_but_the_title_waits_until_heard():
    st, engine, clock = station(), FakeEngine(), FakeClock()
    fill(st, 0, 4 * RATE, 1.0)
    tl = timeline(st, engine, clock, fixed=0.5)
    events = st.events.subscribe()
    titles = tl.titles()
    assert await anext(titles) == "old"
    task = asyncio.create_task(tl.change("new", "admin"))
    await asyncio.sleep(0)
    engine.take(tl)
    frame = (await task).frame
    assert frame == 25
    # the cut: old audio from the new prompt's first sample on is gone; prompt and history
    # change at once (API, SSE)
    assert st.buffer.tail == 25 * HOP and st.prompt == "new" and st.health.prompt_changes == 1
    assert [(r.prompt, r.source) for r in st.history] == [("new", "admin"), ("old", "config")]
    assert events.get_nowait()[0] == "prompt"
    # ... but listeners still hear the old prompt: the title waits
    assert tl.on_air == "old" and st.health.prompt_latency_seconds is None
    fill(st, 25 * HOP, RATE, 2.0)  # the new prompt's audio

    # the clock takes [0, 16000) and later [16000, 19200): the cut (16000) is in the second
    tl.taken(0, 16000, fed=0)
    tl.released(16000)
    tl.taken(16000, 3200, fed=16000)
    tl.released(19200)
    assert tl.on_air == "old"  # taken, but still inside the loudness stage (0.2 s)
    clock.t = 0.9
    tl.released(16000 + LATENCY)  # sample 16000 + LATENCY - 1 left: not the first new one yet
    assert tl.on_air == "old"
    next_title = asyncio.create_task(anext(titles))
    tl.released(16000 + LATENCY + 1)  # now it has left
    assert tl.on_air == "new" and st.health.prompt_latency_seconds == pytest.approx(0.9)
    assert await asyncio.wait_for(next_title, 1) == "new"


async def test_a_change_that_cuts_before_one_not_heard_yet_replaces_it():
    st, engine, clock = station(), FakeEngine(), FakeClock()
    fill(st, 0, 4 * RATE, 1.0)
    tl = timeline(st, engine, clock, fixed=1.0)
    first = asyncio.create_task(tl.change("first", "listener"))
    await asyncio.sleep(0)
    engine.take(tl)  # cut at frame 50
    await first
    second = asyncio.create_task(tl.change("second", "listener"))
    await asyncio.sleep(0)
    engine.take(tl, frame=40)  # the engine cut earlier: the first change is never heard
    await second
    tl.taken(0, 2 * RATE, fed=0)
    tl.released(2 * RATE + LATENCY)
    assert tl.on_air == "second"
    # a later cut than a pending one leaves that one in place: both are heard, in order
    third = asyncio.create_task(tl.change("third", "listener"))
    await asyncio.sleep(0)
    engine.take(tl, frame=120)
    await third
    fourth = asyncio.create_task(tl.change("fourth", "listener"))
    await asyncio.sleep(0)
    engine.take(tl, frame=130)
    await fourth
    heard = []
    fed = 2 * RATE
    for head in range(2 * RATE, 150 * HOP, 640):
        tl.taken(head, 640, fed)
        fed += 640
        tl.released(fed)
        if not heard or heard[-1] != tl.on_air:
            heard.append(tl.on_air)
    assert heard == ["second", "third", "fourth"]


async def test_a_cut_inside_audio_already_played_is_heard_with_the_next_live_audio():
    st, engine, clock = station(), FakeEngine(), FakeClock()
    fill(st, 0, RATE, 1.0)
    st.buffer.take(RATE)  # everything played: head 32000
    tl = timeline(st, engine, clock, fixed=0.0)
    task = asyncio.create_task(tl.change("new", "admin"))
    await asyncio.sleep(0)
    engine.take(tl, frame=40)  # sample 25600, before the head
    await task
    tl.taken(RATE, 0, fed=100)  # nothing live (a bridge plays): not heard
    tl.released(100 + LATENCY + 1)
    assert tl.on_air == "old"
    tl.taken(RATE, 500, fed=200)
    tl.released(200 + LATENCY + 1)
    assert tl.on_air == "new"


async def test_refusals_reach_the_caller():
    st, engine, clock = station(), FakeEngine(), FakeClock()
    tl = timeline(st, engine, clock)
    engine.alive = False
    with pytest.raises(NotRunning):
        await tl.change("x", "listener")
    engine.alive = True
    with pytest.raises(TimeoutError):  # the generator never answers (apply_timeout 0.2 s)
        await tl.change("x", "listener")
    task = asyncio.create_task(tl.change("x", "listener"))
    await asyncio.sleep(0)
    engine.asked[-1][2].set_exception(ValueError("bad prompt"))
    with pytest.raises(ValueError, match="bad prompt"):
        await task
    assert st.prompt == "old" and st.health.prompt_changes == 0


class FakeStream:
    """An engine stream of today (`set_prompt(text, from_frame)`) that can rewind at most to
    frame `floor`."""

    def __init__(self, frame: int, floor: int) -> None:
        self.frame, self.floor = frame, floor
        self.asked: list[int] = []
        self.calls: list[tuple] = []

    def set_prompt(self, text: str, from_frame: int | None = None) -> int:
        assert from_frame is not None
        self.asked.append(from_frame)
        self.calls.append(("prompt", text, from_frame))
        if text == "boom":
            raise RuntimeError("the engine broke")
        if from_frame < self.floor:
            raise ValueError(f"from_frame {from_frame} is too far back")
        self.frame = min(self.frame, from_frame)
        return from_frame

    def seed(self, tokens, prompt: str | None = None, from_frame: int | None = None) -> int:
        self.calls.append(("seed", tokens, prompt, from_frame))
        return self.set_prompt(prompt or "", from_frame)


class BlendStream(FakeStream):
    """The engine's blend-aware stream: `set_prompt(prompt: str | Blend, from_frame=None,
    transition_seconds=0.0)`."""

    def set_prompt(self, prompt, from_frame=None, transition_seconds=0.0) -> int:
        self.calls.append(("blend", prompt, from_frame, transition_seconds))
        self.frame = min(self.frame, from_frame)
        return from_frame


def change(prompt: str | Blend, frame: int, **kw) -> PromptChange:
    blend = prompt if isinstance(prompt, Blend) else Blend.of(prompt)
    return PromptChange(blend, "admin", frame, 0.0, **kw)


def test_the_engine_is_asked_for_what_it_can_do():
    stream = FakeStream(frame=100, floor=60)
    assert start_prompt(stream, change("a", 80)) == 80 and stream.asked == [80]  # within reach
    stream = FakeStream(frame=100, floor=60)
    assert start_prompt(stream, change("a", 150)) == 100  # beyond what it made: from where it is
    stream = FakeStream(frame=100, floor=60)
    assert start_prompt(stream, change("a", 20)) == 100 and stream.asked == [20, 100]  # too far
    stream = FakeStream(frame=100, floor=0)
    assert start_prompt(stream, change("a", -5)) == 0  # never before the stream began
    with pytest.raises(RuntimeError, match="broke"):
        start_prompt(FakeStream(100, 0), change("boom", 80))


JAZZ_RAIN = Blend.parse([{"text": "jazz", "weight": 0.3}, {"text": "rain", "weight": 0.7}])


def test_a_blend_reaches_todays_engine_as_its_dominant_text():
    stream = FakeStream(frame=100, floor=0)
    assert not takes_blends(stream)
    assert start_prompt(stream, change(JAZZ_RAIN, 80, transition_seconds=5.0)) == 80
    assert stream.calls == [("prompt", "rain", 80)]  # the largest weight; no transition


def test_a_blend_aware_engine_gets_the_blend_and_its_transition():
    stream = BlendStream(frame=100, floor=0)
    assert takes_blends(stream)
    assert start_prompt(stream, change(JAZZ_RAIN, 80, transition_seconds=5.0)) == 80
    assert stream.calls == [("blend", JAZZ_RAIN, 80, 5.0)]
    assert set_blend(stream, Blend.of("x"), 90) == 90
    assert stream.calls[-1] == ("blend", Blend.of("x"), 90, 0.0)
    # opening: a blend-aware stream gets a blend of several texts before its first frame
    opened = BlendStream(frame=0, floor=0)
    open_blend(opened, JAZZ_RAIN)
    open_blend(opened, Blend.of("solo"))  # one text: opened with it already
    assert opened.calls == [("blend", JAZZ_RAIN, 0, 0.0)] and open_text(JAZZ_RAIN) == "rain"
    old = FakeStream(frame=0, floor=0)
    open_blend(old, JAZZ_RAIN)
    assert old.calls == []


def test_a_change_with_tokens_seeds_the_stream():
    stream = FakeStream(frame=100, floor=0)
    tokens = object()
    assert start_prompt(stream, change(JAZZ_RAIN, 80, tokens=tokens)) == 80
    assert stream.calls[0] == ("seed", tokens, "rain", 80)
