"""The generator's worker thread with a fake model: how far ahead it runs, which station it
serves first, what crosses back to the loop and in which order, and what a failure does.

The fake streams (tests/radio/fake_engine.py) do no work (a read is instant and its audio says
which frames it holds), so these tests run the real thread and the real command queue in a few
milliseconds each. Healing: tests/radio/test_healing.py; the watchdog: test_watchdog.py."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from engine.blend import Blend
from engine.options import SamplingOptions, WindowOptions
from radio.generator import TIMED_PREFILL_FRAMES
from radio.testing import FaultInjector
from radio.timing import PromptChange
from tests.radio.fake_engine import CHUNK, HOP, FakeModel, frames


async def test_each_station_runs_at_most_buffer_ahead_of_its_clock(run):
    model = FakeModel()
    gen, sink = await run(model, ("a", "b"), buffer_ahead=1.0)  # 50 frames
    await sink.until(lambda: len(sink.pcm("a")) == 5 and len(sink.pcm("b")) == 5)
    await asyncio.sleep(0.2)  # the worker waits for the clocks now
    assert sink.pcm("a") == sink.pcm("b") == [0, 10, 20, 30, 40]
    assert all(
        (pcm[0] == frames(10 * i, 10 * i + 10)).all() for i, pcm in enumerate(sink.audio["a"])
    )
    assert gen.prefill_seconds == 0.25 and gen.alive
    gen.played("a", 25)  # station a's clock moved: a gets 25 frames more, in chunks ...
    await sink.until(lambda: len(sink.pcm("a")) >= 8)
    await asyncio.sleep(0.2)
    assert sink.pcm("a")[5:] == [50, 60, 70]
    assert sink.pcm("b")[5:] == [50]  # ... and b, a chunk from due, is read along its first


async def test_the_stations_due_are_read_together_with_those_a_chunk_from_due(run):
    model = FakeModel()
    gen, sink = await run(model, ("a", "b", "c"), buffer_ahead=1.0)  # 50 frames
    await sink.until(lambda: all(len(sink.pcm(s)) == 5 for s in "abc"))
    await asyncio.sleep(0.1)
    assert model.together == [["a music", "b music", "c music"]] * 5  # one read per round
    assert [c[1] for c in sink.calls if c[0] == "pcm"] == ["a", "b", "c"] * 5
    gen.played("c", 10)  # c is due (40 frames ahead): a and b (50) are read along
    await sink.until(lambda: len(sink.pcm("b")) == 6)
    gen.played("a", 25)  # a is due (35): c (50) along, b (60) not; then a alone (45)
    await sink.until(lambda: len(sink.pcm("a")) == 8)
    await asyncio.sleep(0.1)
    groups = [["c music", "a music", "b music"], ["a music", "c music"]]
    assert model.together[5:] == groups  # the least ahead first
    assert sink.pcm("a")[5:] == [50, 60, 70] and sink.pcm("c")[5:] == [50, 60]
    assert sink.pcm("b")[5:] == [50] and [s.reads for s in model.streams] == [8, 6, 7]


async def test_when_reading_together_fails_each_station_is_read_alone(run, caplog):
    model = FakeModel()
    gen, sink = await run(model, ("a", "b", "c"), buffer_ahead=1.0)
    await sink.until(lambda: all(len(sink.pcm(s)) == 5 for s in "abc"))
    model.streams[1].read_error = RuntimeError("b broke")
    for sid in "abc":
        gen.played(sid, 20)
    await sink.until(lambda: len(sink.pcm("a")) == len(sink.pcm("c")) == 7)
    (failure,) = sink.of("failure", "b")
    assert failure.reason == "generation failed (RuntimeError: b broke)"
    assert sink.pcm("a") == sink.pcm("c") == [0, 10, 20, 30, 40, 50, 60]  # none lost or twice
    assert sink.pcm("b") == [0, 10, 20, 30, 40] and sink.of("failure", "a") == []
    assert model.together[5:] == [["a music", "b music", "c music"], ["a music", "c music"]]
    assert (
        "stations a, b, c: reading their chunks together failed (RuntimeError: b broke); "
        "reading each alone" in [r.getMessage() for r in caplog.records]
    )


async def test_a_prompt_change_lands_before_the_new_audio(run):
    model = FakeModel()
    gen, sink = await run(model, ("a",), buffer_ahead=1.0)
    await sink.until(lambda: len(sink.pcm("a")) == 5)  # frames 0..49 made
    frame = await gen.set_prompt("a", PromptChange(Blend.of("jazz"), "admin", 30, 0.0))
    assert frame == 30 and model.streams[0].prompt == "jazz"
    gen.played("a", 30)
    await sink.until(lambda: len(sink.pcm("a")) >= 10)  # 30..75: up to 50 frames ahead
    i = sink.calls.index(("prompt", "a", "jazz", 30))
    # the stream went back to the cut, its first read half a chunk (the new prompt heard
    # sooner), then whole chunks ...
    assert sink.pcm("a")[5:] == [30, 35, 45, 55, 65]
    assert sink.calls[i + 1] == ("pcm", "a", 30)  # ... and the cut came first
    # beyond what it made: from where it is; too far back for the engine: the same
    assert await gen.set_prompt("a", PromptChange(Blend.of("rock"), "admin", 500, 0.0)) == 75
    model.streams[0].floor = 35
    assert await gen.set_prompt("a", PromptChange(Blend.of("pop"), "admin", 20, 0.0)) == 75


async def test_steady_chunks_are_longer_once_a_station_has_two_of_them_ahead(run):
    """Short chunks (10 frames) until the station has 2 x 25 frames ahead, 25-frame ones then;
    short ones again when little is ahead (the clock took most of it, a prompt change cut it),
    so that the first audio after a change comes as soon as before (the first of them half
    long: `Generator.change_frames`). Each length's thread
    costs are kept apart (a short read costs more per frame)."""
    model = FakeModel()
    gen, sink = await run(model, ("a",), buffer_ahead=2.0, steady_frames=25)  # 100 frames
    sink.lengths = (CHUNK, 25, CHUNK // 2)
    await sink.until(lambda: len(sink.pcm("a")) == 7)
    await asyncio.sleep(0.1)
    assert sink.pcm("a") == [0, 10, 20, 30, 40, 50, 75]  # ahead 100: waits for the clock
    assert [a.shape[1] // HOP for a in sink.audio["a"]] == [10] * 5 + [25] * 2
    assert (sink.audio["a"][6] == frames(75, 100)).all()
    gen.played("a", 80)  # 20 frames ahead: short chunks until 50 are, then steady ones
    await sink.until(lambda: len(sink.pcm("a")) == 12)
    assert sink.pcm("a")[7:] == [100, 110, 120, 130, 155]  # 50 ahead at 130
    await asyncio.sleep(0.1)
    assert await gen.set_prompt("a", PromptChange(Blend.of("jazz"), "admin", 100, 0.0)) == 100
    await sink.until(lambda: len(sink.pcm("a")) == 13)
    assert sink.calls[-2:] == [("prompt", "a", "jazz", 100), ("pcm", "a", 100)]
    # the change's first audio: half a short chunk, then short chunks until 50 frames are ahead
    assert sink.audio["a"][12].shape[1] == CHUNK // 2 * HOP
    await sink.until(lambda: len(sink.pcm("a")) == 14)
    assert sink.pcm("a")[12:] == [100, 105]
    kinds = [gen.tuner.key, *gen.tuner._other]
    assert {key[2] for key in kinds if key is not None} == {CHUNK, 25, CHUNK // 2}


async def test_a_prompt_change_stops_the_chunk_being_read(run):
    """A chunk takes 1 s here (a slow engine); a prompt change posted while one is read is
    taken at its next decoder step, not when it ends: the chunk's audio would be after the cut.
    The interrupted chunk is read again afterwards: no frame is lost or sent twice."""
    model = FakeModel()
    gen, sink = await run(model, ("a",), buffer_ahead=1.0)
    await sink.until(lambda: len(sink.pcm("a")) == 5)  # frames 0..49 made
    stream = model.streams[0]
    stream.read_seconds = 1.0
    gen.played("a", 20)  # due again: the worker starts reading frames 50..59 (1 s)
    await asyncio.sleep(0.3)
    loop = asyncio.get_running_loop()
    began = loop.time()
    frame = await gen.set_prompt("a", PromptChange(Blend.of("jazz"), "admin", 60, 0.0))
    assert loop.time() - began < 0.5, "the change waited for the chunk being read"
    assert frame == 50 and stream.interrupted == 1 and stream.prompt == "jazz"
    await sink.until(lambda: len(sink.pcm("a")) >= 6, timeout=5)
    assert sink.pcm("a") == [0, 10, 20, 30, 40, 50]
    assert (sink.audio["a"][5] == frames(50, 55)).all()  # the change's first read: half a chunk


async def test_sampling_changes_answer_with_the_engines_verdict(run):
    model = FakeModel()
    gen, sink = await run(model)
    assert await gen.set_sampling("a", SamplingOptions(temperature=0.5)) is True
    assert model.streams[0].sampling == SamplingOptions(temperature=0.5)
    with pytest.raises(ValueError, match="too hot"):
        await gen.set_sampling("a", SamplingOptions(temperature=3.0))
    with pytest.raises(KeyError):
        await gen.set_prompt("nope", PromptChange(Blend.of("x"), "admin", 0, 0.0))


async def test_a_failing_station_is_down_alone_and_a_prompt_revives_it(run):
    faults = FaultInjector()
    faults.fail_next_step("a")
    gen, sink = await run(FakeModel(), ("a", "b"), faults=faults)
    await sink.until(lambda: len(sink.pcm("b")) == 5)
    (failure,) = sink.of("failure")
    assert failure.reason == "generation failed (InjectedFault: injected fault)"
    assert (failure.in_a_row, failure.retry_in) == (1, 1.0)
    assert sink.pcm("a") == [] and faults.injected == 1
    await gen.set_prompt("a", PromptChange(Blend.of("again"), "admin", 0, 0.0))
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    i = sink.calls.index(("prompt", "a", "again", 0))
    assert sink.calls[i + 1] == ("reopened", "a", 0)  # the prompt's prefill reopened it


async def test_injected_faults_silence_audio_and_slow_the_steps(run):
    faults = FaultInjector()
    faults.silence("a", 15 * HOP)  # the first chunk and half of the second
    faults.slow_down(0.1)
    gen, sink = await run(FakeModel(), ("a",), faults=faults, buffer_ahead=4.0)
    await sink.until(lambda: len(sink.pcm("a")) >= 3)
    faults.slow_down(0)
    first, second, third = sink.audio["a"][:3]
    assert not first.any() and not second[0, : 5 * HOP].any()
    assert (second[0, 5 * HOP :] == frames(15, 20)).all() and (third[0] == frames(20, 30)).all()
    assert sink.times[2] - sink.times[0] >= 0.19  # two more steps of at least 0.1 s each
    assert faults.injected == 2


async def test_fault_hooks_apply_to_their_own_station_in_a_group(run):
    faults = FaultInjector()
    faults.silence("b", 10 * HOP)  # b's first chunk
    model = FakeModel()
    gen, sink = await run(model, ("a", "b"), faults=faults)
    await sink.until(lambda: len(sink.pcm("a")) == len(sink.pcm("b")) == 5)
    assert model.together[:2] == [["a music", "b music"]] * 2
    assert not sink.audio["b"][0].any() and (sink.audio["b"][1][0] == frames(10, 20)).all()
    assert all(
        (pcm[0] == frames(10 * i, 10 * i + 10)).all() for i, pcm in enumerate(sink.audio["a"])
    )


async def test_a_model_that_cannot_open_reports_every_station_and_the_thread_dies(run):
    gen, sink = await run(FakeModel(fail=True), ("a", "b"))
    await sink.until(lambda: len(sink.calls) == 2)
    assert sink.calls == [
        ("error", "a", "cannot open stream: no memory"),
        ("error", "b", "cannot open stream: no memory"),
    ]
    await asyncio.sleep(0.1)
    assert not gen.alive  # the supervisor restarts it (tests/radio/test_healing.py)
    assert gen.death == "cannot open the stations' streams: RuntimeError: no memory"


async def test_stop_ends_the_thread(run):
    gen, sink = await run(FakeModel())
    await sink.until(lambda: len(sink.calls) >= 1)
    gen.stop()
    assert not gen.alive


def test_the_first_chunk_does_not_seed_the_real_time_factor():
    from radio.generator import RTF_SMOOTHING, next_rtf

    # the chunks of a start on musicgen-small, 2 cores: a cold first one, then x1.07-1.2
    rtfs = [0.53, 1.07, 1.20, 1.11, 1.17]
    average, seen = 0.0, []
    for i, rtf in enumerate(rtfs, start=1):
        average = next_rtf(average, rtf, i)
        seen.append(average)
    assert seen[0] == 0.0  # nothing known yet after the cold chunk
    assert seen[1] == 1.07  # the second starts the average
    assert seen[2] == (1 - RTF_SMOOTHING) * 1.07 + RTF_SMOOTHING * 1.20
    assert all(a >= 1.05 for a in seen[1:])  # on air by the clock's rule from the second chunk
    # had the first seeded it, the average would still be under x1.05 after all five
    seeded = 0.53
    for rtf in rtfs[1:]:
        seeded = (1 - RTF_SMOOTHING) * seeded + RTF_SMOOTHING * rtf
    assert seeded < 1.05


def test_another_thread_count_is_tried_with_audio_ahead_or_when_falling_behind():
    from radio.generator import trial_allowed

    fast, slow = 0.005, 0.030  # seconds per frame; real time at 50 frames/s is 0.020
    made = 100  # 2 s of audio made
    assert not trial_allowed(fast, 1, 50, ahead_frames=20, made_frames=made)  # little ahead: no
    assert trial_allowed(fast, 1, 50, ahead_frames=100, made_frames=made)  # 2 s ahead: yes
    assert trial_allowed(slow, 1, 50, ahead_frames=0, made_frames=made)  # behind: yes, whatever
    assert trial_allowed(fast, 5, 50, ahead_frames=0, made_frames=made)  # 5 stations: behind
    # never in a station's first 1.5 s, which its first listeners wait for
    assert not trial_allowed(slow, 1, 50, ahead_frames=0, made_frames=70)
    assert trial_allowed(slow, 1, 50, ahead_frames=0, made_frames=75)
    # behind with warm rows (the next window built beside this one: they end within `context`
    # frames): not a reason; 2 s ahead still is
    assert not trial_allowed(slow, 1, 50, ahead_frames=35, made_frames=made, warm=True)
    assert trial_allowed(slow, 1, 50, ahead_frames=100, made_frames=made, warm=True)
    # in the first seconds only when the count in use runs under x0.25 (two threads stalling
    # beside a busy process made them at x0.04), not at a cold first chunk's x0.41
    assert trial_allowed(0.100, 1, 50, ahead_frames=0, made_frames=10)
    assert not trial_allowed(0.0488, 1, 50, ahead_frames=0, made_frames=10)
    # a trial predicted to lose clearly (x15: 7.5 s for a 25-frame read) only where it leaves
    # a second buffered, however far behind the count in use is; a close one as before
    stall = dict(trial_cost=0.300, frames=25)
    assert not trial_allowed(fast, 1, 50, ahead_frames=200, made_frames=made, **stall)
    assert not trial_allowed(slow, 1, 50, ahead_frames=0, made_frames=made, **stall)
    assert trial_allowed(fast, 1, 50, ahead_frames=425, made_frames=made, **stall)
    assert trial_allowed(
        fast, 1, 50, ahead_frames=100, made_frames=made, trial_cost=0.006, frames=25
    )
    assert trial_allowed(slow, 1, 50, ahead_frames=0, made_frames=made, trial_cost=0.035, frames=25)
    # (two stations: a read's frames are made for each)
    assert not trial_allowed(fast, 2, 50, ahead_frames=400, made_frames=made, **stall)


async def test_chunks_are_read_through_the_thread_tuner(run):
    gen, sink = await run(FakeModel(), ("a",), buffer_ahead=3.0)
    await sink.until(lambda: len(sink.pcm("a")) == 15)
    tuner = gen.tuner
    assert tuner is not None and tuner.current in tuner.counts
    # from TRIAL_AHEAD_SECONDS of audio ahead on, a chunk measures another count where there is one
    assert len(tuner.cost) == min(2, len(tuner.counts))


async def test_a_stalled_chunk_stops_and_the_next_goes_on(run, caplog):
    """The tuner's stall guard is the read's interrupt (asked before each decoder step): when it
    says a chunk stalls (its threads waiting for cores), the chunk stops, is told in the log,
    and the next read goes on from the frames made."""
    caplog.set_level(logging.INFO, logger="radio.generator")
    model = FakeModel()
    gen, sink = await run(model, ("a",), buffer_ahead=3.0)
    await sink.until(lambda: len(sink.pcm("a")) == 3)
    tuner = gen.tuner
    assert tuner is not None
    asked: list[bool] = []

    def stalling() -> bool:  # the first time it is asked from now on: a stall
        tuner.stopped = not asked
        asked.append(tuner.stopped)
        return tuner.stopped

    tuner.stalling = stalling  # type: ignore[method-assign]
    await sink.until(lambda: len(sink.pcm("a")) == 8)
    assert asked[0] and not any(asked[1:]) and model.streams[0].interrupted == 1
    assert "station(s) a: a chunk stopped after" in caplog.text
    assert "its threads waiting for cores (another process is busy)" in caplog.text
    starts = sink.pcm("a")
    assert starts == sorted(set(starts))  # every chunk once, in order


async def test_the_thread_tuner_keeps_its_costs_per_row_count(run):
    """A glide (three rows a step for seconds, then two again) makes every step dearer whatever
    the thread count: its costs are kept apart, and the two-row costs come back after it."""
    model = FakeModel()
    gen, sink = await run(model, ("a",))
    await sink.until(lambda: len(sink.pcm("a")) == 5)

    async def read_with(rows: int) -> None:
        model.streams[0].tokens.rows = rows
        async with asyncio.timeout(10):
            while gen.tuner.key != (rows, 0, CHUNK):  # the next chunks read with that many rows
                gen.played("a", len(sink.pcm("a")) * CHUNK)
                await asyncio.sleep(0.01)

    tuner = gen.tuner
    assert tuner is not None and tuner.cost and tuner.key == (2, 0, CHUNK)
    plain = tuner.cost
    await read_with(3)  # a glide begins
    assert tuner.cost is not plain
    await read_with(2)  # it is over
    assert tuner.cost is plain


async def test_the_prefill_is_timed_on_fifty_frames_at_start(run):
    """A short timing, scaled: a second less before a radio's first sound on musicgen-small
    than timing a long prompt change's 100 frames; a shorter change's own (the default 25)."""
    model = FakeModel()
    _, sink = await run(model, ("a",), window=WindowOptions(prompt_context=100))
    await sink.until(lambda: len(sink.pcm("a")) >= 1)  # timed before the first chunk
    assert model.timed_frames == TIMED_PREFILL_FRAMES == 50
    model = FakeModel()
    _, sink = await run(model, ("a",))
    await sink.until(lambda: len(sink.pcm("a")) >= 1)
    assert model.timed_frames == WindowOptions().change_context == 25
    model = FakeModel()
    _, sink = await run(model, ("a",), window=WindowOptions(prompt_context=30))
    await sink.until(lambda: len(sink.pcm("a")) >= 1)
    assert model.timed_frames == 30  # never more than a prompt change reads


@pytest.mark.parametrize("warm", [True, False])
async def test_a_buffer_shorter_than_what_stalls_the_stream_is_warned_about(run, caplog, warm):
    """The fake's whole-context prefill takes 0.25 s (a prompt change's 100 frames 0.05 s),
    a chunk 0.2 s: a 0.3 s buffer holds a prompt change, not a prefilled window restart."""
    caplog.set_level(logging.WARNING, logger="radio.generator")
    window = WindowOptions(warm_restarts=warm)
    gen, sink = await run(FakeModel(), ("a",), buffer_ahead=0.3, window=window)
    await sink.until(lambda: len(sink.pcm("a")) >= 1)
    warned = [r.getMessage() for r in caplog.records if "buffer is shorter" in r.getMessage()]
    if warm:
        assert warned == []
    else:
        assert warned and "window restarts and prompt changes will make" in warned[0]


async def test_what_a_change_costs_is_measured_whole(run):
    """A change's text encoding, cross-attention and rewind are not in its prefill's time:
    the generator times each whole change and expects the next to cost the median and the most
    of the last five, each one's prefill scaled to the new change's rows, never less than a
    prefill at the latest measured speed, and a chunk for its first audio (`change_cost`, which
    the timeline's horizon covers). The read that made a change's first audio is timed too
    (`first_read_seconds`, which the answer's rule 5 weighs)."""
    from engine.lane import FIXED_ROW_FRAMES, Prefill
    from radio.timing import ChangeCost

    model = FakeModel()
    gen, sink = await run(model, ("a",))
    await sink.until(lambda: len(sink.pcm("a")) >= 3)
    stream = model.streams[0]
    plain = stream.set_prompt
    chunk = gen.chunk_frames / model.frame_rate

    def least() -> float:  # a prefill of a change's share at the latest speed
        return gen.prefill_seconds * 25 / 500

    cost = 1.7 * least() + chunk  # none ran yet: a change costs more than its prefill
    assert gen.change_cost() == ChangeCost(pytest.approx(cost), pytest.approx(cost))
    assert gen.first_read_seconds() == 0.0

    def slow_set_prompt(text, from_frame=None):
        time.sleep(0.15)  # 0.05 s of it the prefill
        stream.tokens.last_prefill = Prefill(0.05, 2, 25)
        return plain(text, from_frame)

    stream.set_prompt = slow_set_prompt
    await gen.set_prompt("a", PromptChange(Blend.of("jazz"), "admin", 20, 0.0))
    slow = gen.change_cost().worst
    assert 0.15 + chunk <= slow < 0.35 + chunk
    # its prefill at 4 rows: rows x frames and the part that does not grow (FIXED_ROW_FRAMES)
    four = 0.05 * (4 * 25 + FIXED_ROW_FRAMES) / (2 * 25 + FIXED_ROW_FRAMES)
    assert gen.change_cost(rows=4).worst == pytest.approx(slow - 0.05 + four)
    one = 0.05 * (25 + FIXED_ROW_FRAMES) / (2 * 25 + FIXED_ROW_FRAMES)  # guidance dropped
    assert gen.change_cost(rows=1).worst == pytest.approx(slow - 0.05 + one)
    await sink.until(lambda: gen.first_read_seconds() > 0)
    assert gen.first_read_seconds() < chunk  # the fake reads far faster than real time
    stream.set_prompt = plain  # a quick one (nothing prefilled anew): the slow one still counts
    await gen.set_prompt("a", PromptChange(Blend.of("rock"), "admin", 30, 0.0))
    assert gen.change_cost().worst == slow
    # five more: the slow one leaves; whole changes, not the most of each part from different
    # ones (a prefill of 0.3 and another's 0.3 beside it); one spiked: the most, not typical
    for prefill in (0.3, 0.01, 0.3, 0.01):
        gen._learn_change(0.31, Prefill(prefill, 2, 25), None)
    gen._learn_change(0.5, None, None)
    assert least() < 0.31
    assert gen.change_cost() == ChangeCost(pytest.approx(0.31 + chunk), pytest.approx(0.5 + chunk))


async def test_whether_a_change_prefills_the_null_row_is_each_stations_own(run):
    """`guided_next` (what the timeline counts a change's rows by) is what each station's
    stream says (guidance dropped: False), not one flag for the radio."""
    model = FakeModel()
    gen, sink = await run(model, ("a", "b"))
    await sink.until(lambda: len(sink.pcm("b")) >= 1)
    assert gen.guided_next("a") and gen.guided_next("b")
    model.streams[1].tokens.guided_next = False
    assert gen.guided_next("a") and not gen.guided_next("b")


async def test_prompt_changes_are_placed_by_the_prefills_that_ran(run):
    """The start-up figure is timed cold; each prefill that runs (a prompt change's, a cold
    window restart's) replaces it, in a whole context's terms for a plain prompt (scaled by its
    frames and rows); one shorter than a prompt change's re-read does not count."""
    from engine.lane import FIXED_ROW_FRAMES, Prefill

    gen, sink = await run(FakeModel(), ("a",))  # window: context 500, prompt changes 25
    await sink.until(lambda: len(sink.pcm("a")) >= 1)
    assert gen.prefill_seconds == 0.25
    gen._learn_prefill(Prefill(0.3, 2, 25))
    assert gen.prefill_seconds == pytest.approx(0.3 * 500 / 25)
    gen._learn_prefill(Prefill(0.6, 3, 25))  # a transition: three rows
    transition = 0.6 * 500 / 25 * (2 * 25 + FIXED_ROW_FRAMES) / (3 * 25 + FIXED_ROW_FRAMES)
    assert gen.prefill_seconds == pytest.approx(transition)
    gen._learn_prefill(Prefill(0.05, 2, 5))  # a re-anchor from 5 frames: fixed costs x100
    assert gen.prefill_seconds == pytest.approx(transition)
    gen._learn_prefill(Prefill(5.5, 2, 500))  # a cold window restart
    assert gen.prefill_seconds == 5.5
