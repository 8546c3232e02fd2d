"""The ladder (radio/ladder.py): window restarts re-read a shorter context while generation
cannot keep up with real time, the whole context again once it can; its predictions from this
machine's figures, and the generator moving on it (fake engine, real worker thread) while
window restarts prefill or are warm (their warm rows' measured extra cost in the prefill's place)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import statistics
import time

import pytest

from engine.blend import Blend
from engine.memory import WARM_BYTES
from engine.options import WindowOptions
from radio import generator, ladder
from radio.generator import Generator
from radio.ladder import (
    CHEAP_CACHE,
    CLEARLY,
    COARSE,
    COARSEST,
    DOWN_BELOW,
    MARGIN,
    MARGIN_BACK,
    SHORTEST_RESTARTS,
    UNGUIDED,
    UP_ABOVE,
    PositionCost,
    Rates,
    Sustained,
    choose_level,
    context_frames,
    predicted_rtf,
    window_frames,
)
from radio.timing import PromptChange
from tests.radio.fake_engine import (
    CHUNK,
    COARSE_PARTS,
    FRAME_RATE,
    FakeModel,
    FakeStream,
    spec,
)

WINDOW, CONTEXT, RATE = 1500, 500, 50.0  # musicgen-small's defaults: 30 s windows, 10 s context
COLD = WindowOptions(warm_restarts=False)  # window restarts prefill: what the ladder shortens


def test_the_prediction_counts_the_prefill_of_every_window():
    rates = Rates(frames_per_second=57.0, prefill_seconds=4.47, stations=1)  # this Zen 3, int8
    # 1000 new frames (20 s) take 1000 / 57 s of steps and one 4.47 s prefill
    assert predicted_rtf(rates, WINDOW, CONTEXT, 0, RATE) == pytest.approx(20 / (1000 / 57 + 4.47))
    # half the context: 1250 new frames per window, half the prefill
    assert predicted_rtf(rates, WINDOW, CONTEXT, 2, RATE) == pytest.approx(
        25 / (1250 / 57 + 4.47 / 2)
    )
    two = Rates(57.0, 4.47, stations=2)  # each station's restart stops both
    assert predicted_rtf(two, WINDOW, CONTEXT, 0, RATE) < predicted_rtf(
        rates, WINDOW, CONTEXT, 0, RATE
    )
    assert [context_frames(CONTEXT, level) for level in (0, 2, 3)] == [500, 250, 125]


def test_a_machine_that_cannot_keep_up_takes_the_first_level_that_does():
    slow = Rates(57.0, 4.47, 1)  # whole context: x0.91; half: x1.04
    assert choose_level(0, slow, WINDOW, CONTEXT, RATE) == 2
    slower = Rates(45.0, 4.47, 1)
    assert choose_level(0, slower, WINDOW, CONTEXT, RATE) == 3
    fast = Rates(83.0, 1.12, 1)  # the AVX-512 machine: x1.52 with the whole context
    assert choose_level(0, fast, WINDOW, CONTEXT, RATE) == 0
    assert choose_level(3, fast, WINDOW, CONTEXT, RATE) == 0  # back up, all the way
    assert choose_level(2, Rates(0.0, 4.47, 1), WINDOW, CONTEXT, RATE) == 2  # nothing measured


def test_it_does_not_flap_between_the_thresholds():
    # a rate where the whole context is predicted between DOWN_BELOW and UP_ABOVE
    rates = Rates(70.0, 4.47, 1)
    whole = predicted_rtf(rates, WINDOW, CONTEXT, 0, RATE)
    assert DOWN_BELOW <= whole < UP_ABOVE
    assert choose_level(0, rates, WINDOW, CONTEXT, RATE) == 0  # keeps up: stays
    assert choose_level(2, rates, WINDOW, CONTEXT, RATE) == 2  # not enough margin to go back


def test_coarse_weights_are_the_last_levels_taken_only_when_the_shortest_restarts_fall_short():
    # int8 at 40 frames/s: even a quarter of the context re-read cannot keep up (x0.77)
    slow = Rates(40.0, 4.47, 1, coarse_speedup=1.5)
    shortest = predicted_rtf(slow, WINDOW, CONTEXT, SHORTEST_RESTARTS, RATE)
    assert shortest < DOWN_BELOW
    # coarse weights: int4 in the last half of the layers, then in all of them (1.5x the steps
    # and the shortest prefill; half of them the bytes' share of that: x1.2), the same
    # restarts and (no window levels without a measured slope) whole windows
    assert predicted_rtf(slow, WINDOW, CONTEXT, COARSE, RATE) == pytest.approx(1.2 * shortest)
    assert predicted_rtf(slow, WINDOW, CONTEXT, COARSEST, RATE) == pytest.approx(1.5 * shortest)
    for level in (COARSE, COARSEST):
        assert context_frames(CONTEXT, level) == context_frames(CONTEXT, SHORTEST_RESTARTS)
        assert window_frames(WINDOW, CONTEXT, level, windows=False) == WINDOW
    # x0.93 with half the layers int4: all of them
    assert choose_level(0, slow, WINDOW, CONTEXT, RATE) == COARSEST
    # a little faster, and half of them keep up with a margin: the music keeps the other
    # half's int8; keeping up without it is not enough (a prompt change's cut needs it)
    faster = Rates(50.0, 4.47, 1, coarse_speedup=1.5)
    assert predicted_rtf(faster, WINDOW, CONTEXT, SHORTEST_RESTARTS, RATE) < DOWN_BELOW
    assert predicted_rtf(faster, WINDOW, CONTEXT, COARSE, RATE) >= UP_ABOVE
    assert choose_level(0, faster, WINDOW, CONTEXT, RATE) == COARSE
    thin = Rates(47.0, 4.47, 1, coarse_speedup=1.5)
    assert DOWN_BELOW <= predicted_rtf(thin, WINDOW, CONTEXT, COARSE, RATE) < UP_ABOVE
    assert choose_level(0, thin, WINDOW, CONTEXT, RATE) == COARSEST
    assert choose_level(COARSE, thin, WINDOW, CONTEXT, RATE) == COARSEST  # nor kept there
    # without the coarse levels the ladder ends with the shortest restarts
    assert choose_level(0, Rates(40.0, 4.47, 1), WINDOW, CONTEXT, RATE) == SHORTEST_RESTARTS
    # a machine where a quarter of the context keeps up never goes coarse
    assert choose_level(0, Rates(57.0, 4.47, 1, coarse_speedup=1.5), WINDOW, CONTEXT, RATE) == 2
    # and back up once int8 is predicted fast enough
    assert choose_level(COARSEST, Rates(83.0, 1.12, 1, 1.5), WINDOW, CONTEXT, RATE) == 0
    # from all layers int4 never to half of them (the two took turns), back to int8 weights
    # once those are predicted at x1.15; the half, reached on the way down, is kept at x1.15
    for frames, back in ((50.0, COARSEST), (58.0, COARSEST), (61.0, SHORTEST_RESTARTS)):
        rates = Rates(frames, 4.47, 1, coarse_speedup=1.5)
        assert predicted_rtf(rates, WINDOW, CONTEXT, COARSE, RATE) >= UP_ABOVE
        shortest = predicted_rtf(rates, WINDOW, CONTEXT, SHORTEST_RESTARTS, RATE)
        assert (shortest >= UP_ABOVE) == (back == SHORTEST_RESTARTS)
        assert choose_level(COARSEST, rates, WINDOW, CONTEXT, RATE) == back
        kept = back if back < COARSE else COARSE
        assert choose_level(COARSE, rates, WINDOW, CONTEXT, RATE) == kept


def test_guidance_off_is_the_last_level_taken_only_when_every_layers_int4_weights_fall_short():
    slow = Rates(30.0, 4.47, 1, coarse_speedup=1.5, guidance_speedup=1.3)
    coarsest = predicted_rtf(slow, WINDOW, CONTEXT, COARSEST, RATE)
    assert coarsest < DOWN_BELOW
    # half the rows a step: x1.3 on top of every layer's int4 weights, the same restarts and
    # windows
    unguided = predicted_rtf(slow, WINDOW, CONTEXT, UNGUIDED, RATE)
    assert unguided == pytest.approx(1.3 * coarsest) and unguided >= DOWN_BELOW
    assert context_frames(CONTEXT, UNGUIDED) == context_frames(CONTEXT, COARSEST)
    assert window_frames(WINDOW, CONTEXT, UNGUIDED) == window_frames(WINDOW, CONTEXT, COARSEST)
    assert ladder.coarse_share(UNGUIDED) == 1.0
    assert choose_level(0, slow, WINDOW, CONTEXT, RATE) == UNGUIDED
    assert choose_level(COARSEST, slow, WINDOW, CONTEXT, RATE) == UNGUIDED
    # without it (drop_guidance_when_behind off, or no coarse levels) there is no such level
    assert UNGUIDED not in Rates(30.0, 4.47, 1, coarse_speedup=1.5).levels
    assert UNGUIDED not in Rates(30.0, 4.47, 1, guidance_speedup=1.3).levels
    assert (
        choose_level(0, dataclasses.replace(slow, guidance_speedup=0.0), WINDOW, CONTEXT, RATE)
        == COARSEST
    )
    # where every layer's int4 weights keep up, guidance stays on
    enough = Rates(36.0, 4.47, 1, coarse_speedup=1.5, guidance_speedup=1.3)
    assert predicted_rtf(enough, WINDOW, CONTEXT, COARSEST, RATE) >= DOWN_BELOW
    assert choose_level(0, enough, WINDOW, CONTEXT, RATE) == COARSEST
    # and back: to every layer's int4 weights with guidance once they are predicted at x1.15
    # (not before: kept at x1.02-1.15), to int8 weights once those are
    assert predicted_rtf(enough, WINDOW, CONTEXT, COARSEST, RATE) < UP_ABOVE
    assert choose_level(UNGUIDED, enough, WINDOW, CONTEXT, RATE) == UNGUIDED
    back = Rates(45.0, 4.47, 1, coarse_speedup=1.5, guidance_speedup=1.3)
    assert predicted_rtf(back, WINDOW, CONTEXT, COARSEST, RATE) >= UP_ABOVE
    assert choose_level(UNGUIDED, back, WINDOW, CONTEXT, RATE) == COARSEST
    assert (
        choose_level(
            UNGUIDED, Rates(83.0, 1.12, 1, 1.5, guidance_speedup=1.3), WINDOW, CONTEXT, RATE
        )
        == 0
    )


def test_a_share_of_coarse_layers_speeds_steps_by_its_share_of_the_bytes():
    """`share_speedup`: the step's time shrinks by the share of what all layers int4 save;
    `full_speedup` undoes it (a speedup measured on half of the layers, all layers' implied)."""
    assert ladder.share_speedup(1.5, 0.0) == 1.0 and ladder.share_speedup(0.0, 0.5) == 1.0
    assert ladder.share_speedup(1.5, 1.0) == pytest.approx(1.5)
    assert ladder.share_speedup(1.5, 0.5) == pytest.approx(1.2)
    for full in (1.1, 1.5, 2.5):
        for share in (0.25, 0.5, 1.0):
            measured = ladder.share_speedup(full, share)
            assert ladder.full_speedup(measured, share) == pytest.approx(full)
    assert [ladder.coarse_share(level) for level in (0, SHORTEST_RESTARTS, COARSE, COARSEST)] == [
        0.0,
        0.0,
        0.5,
        1.0,
    ]


def test_window_levels_come_once_the_cost_of_positions_is_measured():
    """Past the shortest restarts, windows end at two thirds and at half of `window` (still
    room for the warm rows and a second of new music): levels only there when steps are
    measured to cost more at later positions, else they would only restart more often."""
    flat = Rates(40.0, 4.47, 1)
    assert flat.levels == [0, 2, 3] and flat.top == flat.shortest == SHORTEST_RESTARTS
    sloped = dataclasses.replace(flat, slope=1e-6, coarse_speedup=1.5)
    assert sloped.levels == [0, 2, 3, 4, 5, COARSE, COARSEST] and sloped.shortest == 5
    spans = [window_frames(WINDOW, CONTEXT, level) for level in sloped.levels]
    assert spans == [1500, 1500, 1500, 1000, 750, 750, 750]
    assert [context_frames(CONTEXT, level) for level in (4, 5, COARSE, COARSEST)] == [125] * 4
    assert window_frames(150, 40, 5) == 75 and window_frames(120, 60, 5) == 80  # 2 x 15 + 50


def test_the_coarse_levels_take_shorter_windows_only_where_they_are_clearly_faster():
    """`windows_pay`: a slope for which the last window level's windows are predicted `CLEARLY`
    faster than whole ones, and kept until whole ones are `CLEARLY` faster; a slope near 0
    (fitted just above it one chunk, not the next) keeps the coarse levels' windows whole, as
    their prediction says."""
    flat = Rates(60.0, 0.5, 1, coarse_speedup=1.5, position=800.0)
    assert not ladder.windows_pay(flat, WINDOW, CONTEXT)
    near = dataclasses.replace(flat, slope=1e-9)
    whole = predicted_rtf(near, WINDOW, CONTEXT, SHORTEST_RESTARTS, RATE)
    assert predicted_rtf(near, WINDOW, CONTEXT, 5, RATE) < CLEARLY * whole
    assert not ladder.windows_pay(near, WINDOW, CONTEXT)
    assert predicted_rtf(near, WINDOW, CONTEXT, COARSEST, RATE) == pytest.approx(
        whole * 1.5  # whole windows, every layer's int4 weights
    )
    steep = dataclasses.replace(flat, slope=4e-6)
    assert ladder.windows_pay(steep, WINDOW, CONTEXT)
    # within the band (shorter windows 1.6% faster) the windows stay as they are
    mild = dataclasses.replace(flat, slope=1e-6)
    ratio = predicted_rtf(mild, WINDOW, CONTEXT, 5, RATE) / predicted_rtf(
        mild, WINDOW, CONTEXT, SHORTEST_RESTARTS, RATE
    )
    assert 1 / CLEARLY < ratio < CLEARLY
    assert not ladder.windows_pay(mild, WINDOW, CONTEXT)
    assert ladder.windows_pay(dataclasses.replace(mild, short_windows=True), WINDOW, CONTEXT)
    assert not ladder.windows_pay(dataclasses.replace(flat, short_windows=True), WINDOW, CONTEXT)
    span = (WINDOW // 2 - 125) / (
        ((WINDOW // 2 - 125) * (1 / 60 + 4e-6 * ((125 + WINDOW // 2) / 2 - 800)) + 0.5 / 4) / 1.5
    )
    assert predicted_rtf(steep, WINDOW, CONTEXT, COARSEST, RATE) == pytest.approx(span / RATE)


def test_the_prediction_weighs_the_positions_a_window_attends_over():
    # two int4 stations on Zen 4 (bench/timeline.py): a frame costs a station ~9 ms at the
    # window's mean position 812 and ~2.6 us more per position; a warm restart ~0.4 s
    measured = 1 / (0.009 * 2)
    rates = Rates(measured, 1.6, 2, slope=2.6e-6, position=812.5)
    shortest = predicted_rtf(rates, WINDOW, CONTEXT, 3, RATE)  # measured where it runs
    assert shortest == pytest.approx(27.5 / (1375 * 2 * 0.009 + 2 * 1.6 / 4))
    cost = 0.009 + 2.6e-6 * (562.5 - 812.5)  # windows of 1000: mean position 562.5
    assert predicted_rtf(rates, WINDOW, CONTEXT, 4, RATE) == pytest.approx(
        17.5 / (875 * 2 * cost + 2 * 1.6 / 4)
    )
    # a whole context re-read: 500 frames more at the start of every window, and a later mean
    cost0 = 0.009 + 2.6e-6 * (1000 - 812.5)
    assert predicted_rtf(rates, WINDOW, CONTEXT, 0, RATE) == pytest.approx(
        20 / (1000 * 2 * cost0 + 2 * 1.6)
    )
    # behind at the shortest restarts, shorter windows keep up: the first that does
    slower = dataclasses.replace(rates, frames_per_second=1 / (0.0099 * 2))
    assert predicted_rtf(slower, WINDOW, CONTEXT, 3, RATE) < DOWN_BELOW
    assert choose_level(3, slower, WINDOW, CONTEXT, RATE) == 4
    # a slope too small to pay for the extra restarts: the fastest level, not the last
    flat = dataclasses.replace(slower, slope=1e-9, frames_per_second=1 / (0.02 * 2))
    assert choose_level(0, flat, WINDOW, CONTEXT, RATE) == SHORTEST_RESTARTS
    # where none keeps up, a level only a little faster is not worth the move (noise would
    # make the ladder flap between them)
    near = dataclasses.replace(slower, frames_per_second=1 / (0.0125 * 2), slope=1.3e-6)
    at3, at5 = (predicted_rtf(near, WINDOW, CONTEXT, level, RATE) for level in (3, 5))
    assert at3 < at5 < CLEARLY * at3 and at5 < DOWN_BELOW
    assert choose_level(3, near, WINDOW, CONTEXT, RATE) == 3


def test_until_the_slope_is_measured_a_prior_from_the_bytes_weighs_the_window():
    """A guess of the slope (`Rates.prior_slope`, from the bytes a step reads) prices a window's
    later positions before any slope is measured, as a measured one would; the window levels
    still wait for a measured slope."""
    measured = Rates(1 / 0.009, 1.6, 1, slope=2.6e-6, position=100.0)
    guessed = dataclasses.replace(measured, slope=0.0, prior_slope=2.6e-6)
    flat = dataclasses.replace(measured, slope=0.0)
    for level in (0, 2, 3):
        assert predicted_rtf(guessed, WINDOW, CONTEXT, level, RATE) == pytest.approx(
            predicted_rtf(measured, WINDOW, CONTEXT, level, RATE)
        )
        assert predicted_rtf(guessed, WINDOW, CONTEXT, level, RATE) < predicted_rtf(
            flat, WINDOW, CONTEXT, level, RATE
        )
    assert guessed.levels == flat.levels == [0, 2, 3]
    assert measured.levels == [0, 2, 3, 4, 5]


async def test_the_first_judgement_sees_the_windows_later_positions(run, monkeypatch):
    """Measured at a window's first positions (the fake's stay at 0) at x1.4, with a step whose
    KV cache grows as musicgen-small's int8 one (362 MB of weights, 52 KB per position and row):
    the whole window is predicted under the x1.3 margin (~x1.1) and the ladder takes the int4
    cache at its first judgement (nothing coarser on a guess); a model that says nothing of its
    bytes stays where it was."""
    monkeypatch.setattr(FakeStream, "read_seconds", CHUNK / FRAME_RATE / 1.4)
    levels = []
    for step_read in ((362e6, 52224.0), (0.0, 0.0)):
        model = FakeModel()
        model.cheap_cache_reason = None
        model.step_read = step_read
        gen, sink = await run(model, ("a",), buffer_ahead=1.0, window=COLD)
        gen.prefill_seconds = 1e-6
        for frame in range(0, 100, 10):
            gen.played("a", frame)
            chunks = len(sink.pcm("a"))
            await sink.until(lambda n=chunks, sink=sink: len(sink.pcm("a")) > n)
        levels.append(gen.restart_level)
    assert levels == [CHEAP_CACHE, 0], levels


def test_the_position_cost_fits_a_line_once_the_positions_spread():
    cost = PositionCost()
    for i in range(PositionCost.MIN_CHUNKS - 1):  # positions 125 .. 1500, cost 8 ms + 3 us each
        x = 125 + 1375 * i / (PositionCost.MIN_CHUNKS - 2)
        cost.add(x, 0.008 + 3e-6 * x + (1e-4 if i % 2 else -1e-4))
    assert cost.slope == 0.0  # too few chunks yet
    for i in range(200):
        x = 125 + (i * 20) % 1375
        cost.add(x, 0.008 + 3e-6 * x + (1e-4 if i % 2 else -1e-4))
    assert cost.slope == pytest.approx(3e-6, rel=0.05)
    for i in range(100):  # a new window's first positions (a prompt change): the slope stays
        cost.add(25 + i, 0.008 + 3e-6 * (25 + i))
    assert cost.slope == pytest.approx(3e-6, rel=0.05)
    narrow = PositionCost()
    for i in range(100):
        narrow.add(800 + i % 50, 0.01 + 1e-5 * (i % 50))
    assert narrow.slope == 0.0  # 50 positions say nothing about a window of 1500
    falling = PositionCost()
    for i in range(100):
        falling.add(125 + 13 * i, 0.02 - 5e-6 * 13 * i)
    assert falling.slope == 0.0  # never a negative slope


async def test_the_generator_shortens_windows_past_the_shortest_restarts(run, caplog):
    """With a measured cost per position large enough, the ladder goes past the shortest
    restarts to shorter windows (each stream's `shorten_windows`, said in the log and in the
    station's health), and back to whole windows once the machine keeps up."""
    caplog.set_level(logging.INFO, logger="radio.generator")
    model = FakeModel()
    gen, sink = await run(model, ("a",), buffer_ahead=1.0, window=COLD)
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    # a frame costs 40 us more per position: windows of 750 keep up (x1.14), 1000 do not (x0.89)
    gen.position_cost = dataclasses.replace(FixedSlope(), slope=4e-5)
    gen.prefill_seconds = 1e-6
    gen.played("a", 20)
    await sink.until(lambda: ("window", "a", 15.0) in sink.calls)
    assert gen.restart_level == 5
    assert model.streams[0].window_frames == 750 and model.streams[0].restart_context == 125
    assert "windows now span 15.0 s, generation cannot keep up otherwise" in caplog.text
    gen.position_cost = FixedSlope()  # the machine got fast again
    gen.played("a", 40)
    await sink.until(lambda: ("window", "a", None) in sink.calls)
    assert gen.restart_level == 0 and model.streams[0].window_frames is None
    assert "windows now span 30.0 s (the whole window)" in caplog.text


async def test_the_coarsest_rung_shortens_windows_once_the_slope_is_measured(run, caplog):
    """Every layer's int4 weights take the last window level's windows once a slope is measured
    for which they are clearly faster, on the same level: the ladder reached that rung before
    any slope was (a stream's first seconds), so the windows are weighed again while it stays
    there (two stations ran whole windows on it for minutes); a slope near 0 keeps them whole
    (`ladder.windows_pay`)."""
    caplog.set_level(logging.INFO, logger="radio.generator")
    model = FakeModel()
    gen, sink = await run(model, ("a",), buffer_ahead=1.0, window=COLD, coarse_when_behind=True)
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    gen.position_cost = FixedSlope(slope=0.0)  # type: ignore[assignment]
    gen.prefill_seconds = 1e6  # no restart keeps up with int8 weights
    gen.played("a", 20)
    await sink.until(lambda: model.coarse == 1.0)
    await sink.until(lambda: gen.restart_level == COARSEST)
    assert model.streams[0].restart_context == 125 and model.streams[0].window_frames is None
    gen.prefill_seconds = 1e-6  # (restarts cheap again: shorter windows cost no more of them)
    gen.position_cost = FixedSlope(slope=1e-9)  # type: ignore[assignment]
    for _ in range(20):  # a slope, but too flat for shorter windows to be faster
        gen.played("a", len(sink.pcm("a")) * CHUNK)
        await asyncio.sleep(0.02)
    assert gen.restart_level == COARSEST and model.streams[0].window_frames is None
    gen.position_cost = FixedSlope(slope=4e-5)  # type: ignore[assignment]
    async with asyncio.timeout(20):
        while ("window", "a", 15.0) not in sink.calls:
            gen.played("a", len(sink.pcm("a")) * CHUNK)
            await asyncio.sleep(0.02)
    assert gen.restart_level == COARSEST and model.streams[0].window_frames == 750
    assert "windows now span 15.0 s, generation cannot keep up otherwise" in caplog.text


async def test_the_position_cost_is_fitted_in_int8_terms(run, monkeypatch):
    """A plain chunk's cost per frame goes to the position cost times the speedup of the rungs
    it ran on, as the ladder weighs costs: a stream's first chunks on int8 weights at a window's
    first positions and its later ones on int4 weights drew a line falling with the position
    (so no window levels). Here every layer's int4 weights, guessed x2: a chunk of 10 ms a
    frame counts 20 ms."""
    monkeypatch.setattr("radio.ladder.RUNG_SECONDS", 1e6)  # (and no climbing back)
    reads = FakeStream.read

    def moving(self, frames, interrupt=None):  # the window's position moves with the frames
        pcm = reads(self, frames, interrupt)
        self.tokens.position = self.frame
        return pcm

    monkeypatch.setattr(FakeStream, "read", moving)
    model = FakeModel()
    gen, sink = await run(model, ("a",), buffer_ahead=1.0, window=COLD, coarse_when_behind=True)
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    gen.coarse_speedup = 2.0
    gen.prefill_seconds = 1e6
    gen.played("a", 20)
    await sink.until(lambda: model.coarse == 1.0)
    recorded = FixedSlope(slope=0.0)
    gen.position_cost = recorded  # type: ignore[assignment]
    model.streams[0].read_seconds = CHUNK * 0.01  # 10 ms a frame
    async with asyncio.timeout(20):
        while len(recorded.added) < 5:
            gen.played("a", len(sink.pcm("a")) * CHUNK)
            await asyncio.sleep(0.02)
    assert gen.coarse_speedup == 2.0 and model.coarse == 1.0
    costs = [cost for _, cost in recorded.added[1:]]
    assert statistics.median(costs) == pytest.approx(0.02, rel=0.25), costs
    positions = [position for position, _ in recorded.added]
    assert positions == sorted(positions) and positions[0] > 0


@dataclasses.dataclass
class FixedSlope:
    """A `PositionCost` that says what the test wants (the fake streams do not move), and keeps
    the chunks' (position, cost) it is given."""

    slope: float = 1e-9
    added: list[tuple[float, float]] = dataclasses.field(default_factory=list)

    def add(self, position: float, cost: float) -> None:
        self.added.append((position, cost))


def moves(sink) -> list[tuple]:
    return [c for c in sink.calls if c[0] == "restart_context"]


def restart_cost(gen, warm: bool, seconds: float) -> None:
    """Make a window restart cost about `seconds`: a prefill, or warm rows' extra steps."""
    if warm:
        gen.warm_cost = gen.tuner.cost[gen.tuner.current] + seconds / CONTEXT
    else:
        gen.prefill_seconds = seconds


@pytest.mark.parametrize("warm", [False, True])
async def test_the_generator_shortens_restarts_while_behind_and_restores_them(run, caplog, warm):
    """Restarts that prefill, or warm restarts whose warm rows make steps slower: the cost the
    generator measured is what the ladder weighs."""
    caplog.set_level(logging.INFO, logger="radio.generator")
    model = FakeModel()
    window = WindowOptions(warm_restarts=warm)
    gen, sink = await run(model, ("a", "b"), buffer_ahead=1.0, window=window)
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    assert gen.restart_level == 0 and gen.tuner is not None and gen.tuner.cost
    assert gen.together == 2 and gen.sustained_rtf == 0.0  # (not 10 s of generating yet)
    restart_cost(gen, warm, 1e6)  # a window restart now costs far more than a window's audio
    gen.played("a", 20)
    gen.played("b", 20)
    await sink.until(lambda: len(moves(sink)) == 2)
    assert gen.restart_level == 3
    assert [s.restart_context for s in model.streams] == [125, 125]
    assert ("restart_context", "a", 2.5) in sink.calls and (
        "restart_context",
        "b",
        2.5,
    ) in sink.calls
    assert "window restarts now re-read 2.5 s of music, generation cannot keep up" in caplog.text
    # and even that cannot keep up: said once, with the ways out
    await sink.until(lambda: "even with the shortest window restarts" in caplog.text)
    assert 'model.quantize = "int4"' in caplog.text
    restart_cost(gen, warm, 1e-6)  # the machine got fast again
    gen.played("a", 40)
    gen.played("b", 40)
    await sink.until(lambda: len(moves(sink)) == 4)
    assert gen.restart_level == 0
    assert moves(sink)[2:] == [("restart_context", "a", None), ("restart_context", "b", None)]
    assert [s.restart_context for s in model.streams] == [None, None]
    assert "window restarts now re-read 10.0 s of music (the whole context)" in caplog.text
    assert caplog.text.count("even with the shortest window restarts") == 1  # said once
    assert not gen.warned_behind  # and said again if it comes to that again


async def test_the_warning_suggests_int4_weights_only_where_they_would_be_new(run, caplog):
    """A model already on int4 weights (loaded so: `coarse_available` says why the ladder has
    no int4 level) is not told to take int4 weights."""
    caplog.set_level(logging.INFO, logger="radio.generator")
    model = FakeModel()
    model.coarse_available = lambda: "coarse weights replace int8 projections"  # type: ignore[method-assign]
    gen, sink = await run(model, ("a",), buffer_ahead=1.0, window=COLD)
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    restart_cost(gen, False, 1e6)
    gen.played("a", 20)
    await sink.until(lambda: "even with the shortest window restarts" in caplog.text)
    assert "make it keep up" in caplog.text and "fewer stations or a faster device" in caplog.text
    assert "int4" not in caplog.text


async def coarse_ready(model) -> None:
    async with asyncio.timeout(10):
        while not model.coarse_ready:
            await asyncio.sleep(0.01)


async def test_coarse_weights_while_behind_then_int8_again(run, caplog, monkeypatch):
    """`generation.coarse_when_behind`: past the shortest restarts the generator decodes with
    int4 weights (`MusicModel.use_coarse`), said once, and goes back to int8 when it can. Needed
    at once, they are quantized at once (every chunk on int8 until then is a slower one)."""
    caplog.set_level(logging.INFO, logger="radio.generator")
    monkeypatch.setattr("radio.ladder.RUNG_SECONDS", 0.0)
    model = FakeModel()
    gen, sink = await run(model, ("a",), buffer_ahead=1.0, window=COLD, coarse_when_behind=True)
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    assert model.prepared == 0  # nothing while it keeps up
    gen.prefill_seconds = 1e6  # no restart keeps up with int8 weights
    gen.played("a", 20)
    await sink.until(lambda: model.coarse)
    # (nothing keeps up: the fastest level, every layer int4)
    assert gen.restart_level == COARSEST and model.switches == [(1.0, True)]  # prepared first
    assert "quantizing them first" in caplog.text and model.prepared == COARSE_PARTS
    assert not gen.warned_behind  # not "even int4 cannot" on a guess of int4's speed
    assert model.streams[0].restart_context == 125  # and the shortest restarts
    assert "decoding with int4 weights in every layer until it can" in caplog.text
    gen.prefill_seconds = 1e-6  # the machine got fast again
    for frame in range(40, 400, 20):  # COARSE_SETTLE chunks on int4 first, their speed taken
        gen.played("a", frame)
        if not model.coarse:
            break
        chunks = len(sink.pcm("a"))
        await sink.until(lambda n=chunks: len(sink.pcm("a")) > n or not model.coarse)
    await sink.until(lambda: not model.coarse)
    await sink.until(lambda: gen.restart_level == 0)
    assert model.switches == [(True, True), (False, True)]
    assert "decoding with int8 weights again" in caplog.text
    assert model.streams[0].restart_context is None


async def playing_until(gen, sink, predicate, timeout: float = 20.0) -> None:
    """Play station "a" along as its chunks come until `predicate()`."""
    async with asyncio.timeout(timeout):
        while not predicate():
            gen.played("a", len(sink.pcm("a")) * CHUNK)
            await asyncio.sleep(0.02)


async def test_guidance_off_while_even_int4_weights_fall_behind_then_on_again(
    run, caplog, monkeypatch
):
    """`generation.drop_guidance_when_behind`: past every layer's int4 weights the generator
    drops the null rows (`MusicModel.drop_guidance`), said once, measures their speedup on the
    rung, and takes them back (then int8 weights) when it can."""
    caplog.set_level(logging.INFO, logger="radio.generator")
    monkeypatch.setattr("radio.ladder.RUNG_SECONDS", 0.0)
    model = FakeModel()
    gen, sink = await run(
        model,
        ("a",),
        buffer_ahead=1.0,
        window=COLD,
        coarse_when_behind=True,
        drop_guidance_when_behind=True,
    )
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    assert gen.guidance_speedup == ladder.GUIDANCE_SPEEDUP and not model.unguided
    # nothing keeps up: the fastest level (whole windows: no slope measured)
    gen.position_cost = FixedSlope(slope=0.0)  # type: ignore[assignment]
    gen.prefill_seconds = 1e6
    await playing_until(gen, sink, lambda: model.unguided)
    assert gen.restart_level == UNGUIDED and model.coarse == 1.0
    assert model.guidance_switches == [True]
    rungs = ("int4 weights in every layer", "guidance off")
    await sink.until(lambda: ("rungs", "a", rungs) in sink.calls)
    assert "guidance off until it can" in caplog.text
    assert "generation.drop_guidance_when_behind" in caplog.text
    # the figure said is the one that moved the ladder: under the bar to stay on the rung
    said = re.search(r"every layer \(x([\d.]+) of real time\): guidance off", caplog.text)
    assert said and float(said.group(1)) < ladder.DOWN_BELOW
    # settled on it, its speed is measured (once a slope says where the costs were taken):
    # the fake's steps cost the same without null rows
    gen.position_cost = FixedSlope()  # type: ignore[assignment]
    await playing_until(gen, sink, lambda: gen.guidance_speedup != ladder.GUIDANCE_SPEEDUP)
    assert gen.guidance_speedup == pytest.approx(1.0, abs=0.2)
    gen.prefill_seconds = 1e-6  # the machine got fast again
    await playing_until(gen, sink, lambda: gen.restart_level == 0)
    assert model.guidance_switches == [True, False] and not model.coarse
    await sink.until(lambda: sink.of("rungs")[-1] == ())
    assert "guidance on again from each station's next window restart" in caplog.text


async def test_guidance_stays_on_without_drop_guidance_when_behind(run):
    model = FakeModel()
    gen, sink = await run(model, ("a",), buffer_ahead=1.0, window=COLD, coarse_when_behind=True)
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    assert gen.guidance_speedup == 0.0
    gen.position_cost = FixedSlope(slope=0.0)  # type: ignore[assignment]
    gen.prefill_seconds = 1e6
    await playing_until(gen, sink, lambda: gen.restart_level == COARSEST)
    await playing_until(gen, sink, lambda: len(sink.pcm("a")) >= 60)
    assert gen.restart_level == COARSEST and not model.unguided


async def test_coarse_weights_are_prepared_ahead_a_part_at_a_time_once_behind(run, caplog):
    """From the moment the ladder first leaves its top level (a shorter restart keeps up), the
    int4 set is prepared a part after each chunk or while the station is ahead, with no switch;
    when it is needed later, the switch quantizes nothing more."""
    caplog.set_level(logging.INFO, logger="radio.generator")
    model = FakeModel()
    gen, sink = await run(model, ("a",), buffer_ahead=1.0, window=COLD, coarse_when_behind=True)
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    gen.prefill_seconds = 30.0  # the whole context: x0.67 of real time; half of it: x1.67
    gen.played("a", 20)
    await coarse_ready(model)
    async with asyncio.timeout(5):  # said by the worker just after the last part
        while "int4 weights ready for when generation cannot keep up otherwise" not in caplog.text:
            await asyncio.sleep(0.01)
    assert gen.restart_level == 2 and not model.coarse and model.prepared == COARSE_PARTS
    assert "preparing int4 weights between chunks" in caplog.text
    gen.prefill_seconds = 1e6  # now nothing keeps up with int8 weights
    gen.played("a", 40)
    await sink.until(lambda: model.coarse)
    assert model.switches == [(True, True)] and "quantizing them first" not in caplog.text


def test_preparing_ahead_keeps_to_its_share_of_the_chunks_time():
    """Work prepared ahead between chunks (`Generator._run_parts`) takes its share of their time
    as an account: a part longer than a chunk's share (int4 weights' files paged out: 0.13 s
    after 0.18 s chunks) is paid back by the next chunks, which run none meanwhile; the idle
    time runs a part a call. The share (`_pace`) is half of what a chunk made beyond real time
    until the stations have a buffer to spare, nothing while behind."""
    gen = Generator(FakeModel(), [spec("a", COLD)], buffer_ahead=1.0, chunk_frames=CHUNK)
    ran = []

    def parts():
        while True:
            time.sleep(0.03)
            ran.append(time.perf_counter())
            yield

    work = parts()
    for _ in range(12):  # chunks of 40 ms, a quarter of each: 10 ms of the parts' 30 ms
        assert gen._run_parts(work, 0.04, "int4 weights", lambda: False, 0.25) is False
    assert 3 <= len(ran) <= 5, len(ran)
    before = len(ran)
    for _ in range(3):  # idle: a part each time
        gen._run_parts(work, 0.0, "int4 weights", lambda: False, 0.25)
    assert len(ran) == before + 3
    assert gen._pace(1.1) == pytest.approx(0.05 / 1.1)  # half the surplus: ~4.5%
    assert gen._pace(2.0) == generator.PREPARE_SHARE  # at most the whole share
    assert gen._pace(0.95) == 0.0 and gen._pace(0.0) == 0.0  # behind: nothing ahead of need


async def test_before_on_air_what_is_prepared_ahead_is_made_at_once(run, caplog):
    """Before any station is on air (no clock has played a frame), the int4 set the ladder may
    need is quantized at once after a chunk, not a part at a time: nobody listens yet, and on
    air the same work would slow the stream or stall it at the switch."""
    caplog.set_level(logging.INFO, logger="radio.generator")
    model = FakeModel()
    gen, sink = await run(model, ("a",), buffer_ahead=4.0, window=COLD, coarse_when_behind=True)
    gen.prefill_seconds = 30.0  # the whole context: x0.67 of real time; half of it: x1.67
    await sink.until(lambda: gen.restart_level > 0)  # (a chunk or so later: the ladder moved)
    chunks = len(sink.pcm("a"))
    await sink.until(lambda: model.prepared == COARSE_PARTS)
    assert len(sink.pcm("a")) <= chunks + 2  # within a chunk or two: all parts after one
    assert not model.coarse and "int4 weights ready" in caplog.text


async def test_the_heap_reserve_is_touched_again_once_int4_weights_are_ready(
    run, caplog, monkeypatch
):
    """The generator touches a heap reserve in its idle time (`engine.memory.warm_heap`) so
    that prompt changes fault no fresh pages; int4 weights prepared ahead take those pages for
    good, so once they are ready a new reserve is touched, again in the idle time."""
    touched: list[int] = []

    def reserve(total: int):  # warm_heap's shape: a part per slice, allocated at the first
        for _ in range(3):
            yield
        touched.append(total)

    monkeypatch.setattr("radio.generator.warm_heap", reserve)
    caplog.set_level(logging.INFO, logger="radio.generator")
    model = FakeModel()
    gen, sink = await run(model, ("a",), buffer_ahead=1.0, window=COLD, coarse_when_behind=True)
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    async with asyncio.timeout(5):
        while not touched:
            await asyncio.sleep(0.01)
    assert touched == [WARM_BYTES] and model.prepared == 0
    gen.prefill_seconds = 30.0  # behind on the whole context: int4 weights prepared ahead
    gen.played("a", 20)
    await coarse_ready(model)
    async with asyncio.timeout(5):
        while len(touched) < 2:
            gen.played("a", 40)  # (ahead again: idle time)
            await asyncio.sleep(0.01)
    assert touched == [WARM_BYTES, WARM_BYTES] and model.prepared == COARSE_PARTS


def test_the_cheaper_cache_is_the_first_level_taken():
    """`CHEAP_CACHE`: the whole context with an int4 KV cache, predicted at the int8 rate times
    `cache_speedup`; every level after it keeps that cache (the coarse level too, both speedups
    there); without a cheaper cache the levels are as they were."""
    rates = Rates(57.0, 4.47, 1, coarse_speedup=1.5, cache_speedup=1.2)
    assert rates.levels == [0, CHEAP_CACHE, 2, 3, COARSE, COARSEST]
    assert rates.shortest == SHORTEST_RESTARTS
    plain = dataclasses.replace(rates, cache_speedup=0.0)
    whole = predicted_rtf(rates, WINDOW, CONTEXT, 0, RATE)  # x0.91: the first test's machine
    assert predicted_rtf(rates, WINDOW, CONTEXT, CHEAP_CACHE, RATE) == pytest.approx(1.2 * whole)
    for level in (2, 3):
        assert predicted_rtf(rates, WINDOW, CONTEXT, level, RATE) == pytest.approx(
            1.2 * predicted_rtf(plain, WINDOW, CONTEXT, level, RATE)
        )
    assert predicted_rtf(rates, WINDOW, CONTEXT, COARSE, RATE) == pytest.approx(
        1.2 * 1.2 * predicted_rtf(plain, WINDOW, CONTEXT, SHORTEST_RESTARTS, RATE)
    )
    assert predicted_rtf(rates, WINDOW, CONTEXT, COARSEST, RATE) == pytest.approx(
        1.8 * predicted_rtf(plain, WINDOW, CONTEXT, SHORTEST_RESTARTS, RATE)
    )
    assert context_frames(CONTEXT, CHEAP_CACHE) == CONTEXT
    assert window_frames(WINDOW, CONTEXT, CHEAP_CACHE) == WINDOW
    # the whole context on the int4 cache keeps up: the music keeps its memory
    assert whole < DOWN_BELOW <= 1.2 * whole
    assert choose_level(0, rates, WINDOW, CONTEXT, RATE) == CHEAP_CACHE
    assert choose_level(0, plain, WINDOW, CONTEXT, RATE) == 2  # without it: half the context
    sloped = dataclasses.replace(rates, slope=1e-6)
    assert sloped.levels == [0, CHEAP_CACHE, 2, 3, 4, 5, COARSE, COARSEST]
    assert sloped.shortest == 5
    assert Rates(40.0, 4.47, 1, 1.5).levels == [0, 2, 3, COARSE, COARSEST]


def test_the_cheaper_cache_keeps_a_margin():
    """The int4 cache, within the precision budget, is taken whenever the int8 one is predicted
    under `MARGIN` (x1.3), though it keeps up, and left only once the int8 one is predicted at
    `MARGIN_BACK` (x1.45): no flapping between the two near x1.3. The rungs after it still wait
    for `DOWN_BELOW`; without a cheaper cache nothing moves near x1.3."""
    assert DOWN_BELOW < UP_ABOVE < MARGIN < MARGIN_BACK

    def at(rtf: float, cache: float = 1.1) -> Rates:  # 1000 new frames a window, no prefill
        return Rates(rtf * RATE, 1e-9, 1, coarse_speedup=1.5, cache_speedup=cache)

    for rtf in (1.05, 1.2, 1.29):
        assert predicted_rtf(at(rtf), WINDOW, CONTEXT, 0, RATE) == pytest.approx(rtf)
        assert choose_level(0, at(rtf), WINDOW, CONTEXT, RATE) == CHEAP_CACHE, rtf
        assert choose_level(CHEAP_CACHE, at(rtf), WINDOW, CONTEXT, RATE) == CHEAP_CACHE
        assert choose_level(0, at(rtf, cache=0.0), WINDOW, CONTEXT, RATE) == 0  # no cache rung
        assert choose_level(0, at(rtf, cache=1.0), WINDOW, CONTEXT, RATE) == 0  # no faster
    assert choose_level(0, at(1.31), WINDOW, CONTEXT, RATE) == 0
    assert choose_level(CHEAP_CACHE, at(1.44), WINDOW, CONTEXT, RATE) == CHEAP_CACHE  # kept
    assert choose_level(CHEAP_CACHE, at(1.46), WINDOW, CONTEXT, RATE) == 0  # the margin back
    # from a shorter restart, the climb stops at the cache while int8 is under MARGIN_BACK
    assert choose_level(2, at(1.4), WINDOW, CONTEXT, RATE) == CHEAP_CACHE
    assert choose_level(2, at(1.5), WINDOW, CONTEXT, RATE) == 0


async def test_the_cheaper_cache_while_behind_then_int8_again(run, caplog):
    """Where the model's cache can be int4 (`MusicModel.use_cheap_cache`), the generator takes
    it first when the whole context on the int8 one is predicted under the `MARGIN` (x1.3) and
    is faster on it (the music keeps its memory), said once, its buffers prepared ahead of need
    from the moment level 0 is predicted near the margin; the int8 cache comes back when it has
    the margin again (`MARGIN_BACK`), once the rung has been kept `RUNG_SECONDS`."""
    caplog.set_level(logging.INFO, logger="radio.generator")
    model = FakeModel()
    model.cheap_cache_reason = None
    now = [0.0]
    gen, sink = await run(model, ("a",), buffer_ahead=1.0, window=COLD, clock=lambda: now[0])
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    assert gen.cache_speedup == pytest.approx(1.1) and not model.cheap_cache
    # the whole context prefilled in 14.5 s every 20 s of new music (the fake's steps cost next
    # to nothing): x1.38, over the margin but near it: the int4 cache's buffers made ahead
    gen.prefill_seconds = 14.5
    gen.played("a", 20)
    async with asyncio.timeout(5):
        while "int4 KV cache ready for when generation cannot keep up" not in caplog.text:
            await asyncio.sleep(0.01)
    assert gen.restart_level == 0 and model.cache_parts == 3 and not model.cheap_cache
    gen.prefill_seconds = 21.0  # x0.95 with the int8 cache, x1.05 predicted with the int4 one
    gen.played("a", 30)
    await sink.until(lambda: model.cheap_cache)
    assert gen.restart_level == CHEAP_CACHE and model.cache_switches == [True]
    assert not model.coarse and model.streams[0].restart_context is None  # the whole context
    said = "x0.95 of real time with the int8 KV cache, under the x1.3 margin: an int4 one"
    assert said in caplog.text
    gen.prefill_seconds = 1e-6  # the machine got fast again
    for frame in range(40, 400, 20):  # SETTLE chunks and more: the rung is kept
        gen.played("a", frame + 10)
        chunks = len(sink.pcm("a"))
        await sink.until(lambda n=chunks: len(sink.pcm("a")) > n)
    assert model.cheap_cache and gen.restart_level == CHEAP_CACHE
    now[0] = ladder.RUNG_SECONDS  # and then it is not
    gen.played("a", 420)
    await sink.until(lambda: gen.restart_level == 0)
    assert model.cache_switches == [True, False] and "an int8 KV cache again" in caplog.text
    assert gen.cache_speedup == pytest.approx(1.1)  # not measured: no slope to place it


async def test_the_margin_takes_the_cheaper_cache_and_nothing_coarser(run, caplog):
    """A station that keeps up at x1.21 with the int8 cache, under the x1.3 margin: the int4
    cache takes its place (said as a margin, not as falling behind), the whole context still
    re-read, and int4 weights are not prepared (x1.33 predicted on the cache: not behind)."""
    caplog.set_level(logging.INFO, logger="radio.generator")
    model = FakeModel()
    model.cheap_cache_reason = None
    gen, sink = await run(model, ("a",), buffer_ahead=1.0, window=COLD, coarse_when_behind=True)
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    gen.prefill_seconds = 16.5  # 20 s of new music a window in 16.5 s of prefill: x1.21
    gen.played("a", 20)
    await sink.until(lambda: model.cheap_cache)
    assert gen.restart_level == CHEAP_CACHE and model.streams[0].restart_context is None
    # x1.21 from the prefill alone; the fake chunks' wall time (longer on a loaded machine, as
    # in a full parallel suite) can take a point or two off
    margin = r"x1\.(1\d|2[01]) of real time with the int8 KV cache, under the x1\.3 margin"
    assert re.search(margin, caplog.text), caplog.text
    for frame in range(30, 200, 20):  # more chunks on the rung: still nothing coarser
        gen.played("a", frame)
        chunks = len(sink.pcm("a"))
        await sink.until(lambda n=chunks: len(sink.pcm("a")) > n)
    assert model.prepared == 0 and not model.coarse
    assert "preparing int4 weights" not in caplog.text


async def test_the_margin_before_on_air_prepares_int4_weights(run, caplog):
    """The int4 cache taken for the margin before any station is on air: the int4 weights are
    made then (at once: nobody listens yet, it costs the first sound a second), so that a
    slower minute later switches to them without a stall. On air the margin makes none (above)."""
    caplog.set_level(logging.INFO, logger="radio.generator")
    model = FakeModel()
    model.cheap_cache_reason = None
    gen, sink = await run(model, ("a",), buffer_ahead=2.0, window=COLD, coarse_when_behind=True)
    await sink.until(lambda: len(sink.pcm("a")) >= 1)
    gen.prefill_seconds = 16.5  # x1.21: the margin, not behind (as above)
    await sink.until(lambda: model.cheap_cache)
    await sink.until(lambda: model.coarse_ready)
    assert "under the margin before going on air: preparing int4 weights" in caplog.text
    assert not model.coarse and gen.restart_level == CHEAP_CACHE


def test_a_rungs_speedup_is_measured_at_the_same_positions():
    """The cost before a switch is moved along the measured slope to the positions measured on
    the rung (a switch often comes with shorter windows: earlier positions, cheaper steps), so
    the rung is not credited with what the positions did; with both rungs at once the weights
    take what the cache's guess leaves; the int4 cache left measures its speedup the other way."""
    from radio.generator import Generator
    from tests.radio.fake_engine import spec

    model = FakeModel()
    model.cheap_cache_reason = None
    gen = Generator(model, [spec("a")], coarse_when_behind=True)
    gen.position_cost = FixedSlope(slope=4e-6)  # type: ignore[assignment]
    model.cheap_cache = True
    # 10 ms a frame at position 1000 on int8; 5.5 ms at position 250 on the int4 cache, where
    # int8 would have cost 10 - 3 = 7 ms: x1.27, not x1.82
    gen._before = (0.010, 1000.0, False, False, False)
    gen._measure_rung(0.0055, 250.0)
    assert gen.cache_speedup == pytest.approx(0.007 / 0.0055) and gen._before is None
    model.coarse = True  # int4 weights straight from the int8 cache: x2 in all, x1.27 the cache's
    gen._before = (0.010, 500.0, False, False, False)
    gen._measure_rung(0.005, 500.0)
    assert gen.coarse_speedup == pytest.approx(2.0 / (0.007 / 0.0055))
    # half the layers int4 on the int4 cache: 6.3 ms a frame where the cache alone cost 7.7 ms,
    # x1.22: half of what all layers save, so all of them would go x1.58
    model.coarse = 0.5
    gen._before = (0.0077, 500.0, True, 0.0, False)
    gen._measure_rung(0.0063, 500.0)
    half = 0.0077 / 0.0063
    assert gen.coarse_speedup == pytest.approx(ladder.full_speedup(half, 0.5))
    assert ladder.share_speedup(gen.coarse_speedup, 0.5) == pytest.approx(half)
    # the int4 cache left (int8 weights both ways): 6 ms a frame at position 500 on it, 7.5 ms
    # now on the int8 one at position 500
    model.coarse, model.cheap_cache = False, False
    gen.cache_speedup, gen._before = 1.1, (0.006, 500.0, True, False, False)
    gen._measure_rung(0.0075, 500.0)
    assert gen.cache_speedup == pytest.approx(1.25) and gen._before is None
    gen.position_cost = FixedSlope(slope=0.0)  # not measured yet: the guesses stay
    model.cheap_cache = True
    gen.cache_speedup, gen._before = 1.1, (0.010, 1000.0, False, True, False)
    gen._measure_rung(0.0055, 250.0)
    assert gen.cache_speedup == 1.1 and gen._before is None


async def test_an_int4_cache_that_cannot_be_made_leaves_int8_running(run, caplog):
    """A conversion that fails (out of memory) is said, drops the rung and puts the batches
    back on the int8 cache; the stations play on."""
    caplog.set_level(logging.INFO, logger="radio.generator")
    model = FakeModel()
    model.cheap_cache_reason = None
    model.cheap_cache_error = MemoryError("out of memory")
    gen, sink = await run(model, ("a",), buffer_ahead=1.0, window=COLD)
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    gen.prefill_seconds = 21.0  # x0.95 with the int8 cache, x1.05 predicted with the int4 one
    gen.played("a", 20)
    await sink.until(lambda: "cannot convert the KV cache" in caplog.text)
    assert "out of memory" in caplog.text and model.cache_switches == [True, False]
    assert gen.cache_speedup == 0 and not model.cheap_cache and gen.restart_level != CHEAP_CACHE
    chunks = len(sink.pcm("a"))
    gen.played("a", 40)
    await sink.until(lambda: len(sink.pcm("a")) > chunks)
    assert "the generator thread died" not in caplog.text


async def test_int4_weights_come_with_the_cheaper_cache(run, caplog, monkeypatch):
    """Straight to the coarse level (nothing on int8 weights keeps up): int4 weights and the int4
    cache at once, and both back when the machine is fast again."""
    caplog.set_level(logging.INFO, logger="radio.generator")
    monkeypatch.setattr("radio.ladder.RUNG_SECONDS", 0.0)
    model = FakeModel()
    model.cheap_cache_reason = None
    gen, sink = await run(model, ("a",), buffer_ahead=1.0, window=COLD, coarse_when_behind=True)
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    gen.prefill_seconds = 1e6
    gen.played("a", 20)
    await sink.until(lambda: model.coarse)
    assert gen.restart_level == COARSEST and model.cheap_cache and model.cache_switches == [True]
    assert model.cache_parts == 0  # needed at once: nothing prepared (the conversion touches
    # only what it writes)
    assert "shortest window restarts and an int4 KV cache" in caplog.text
    gen.prefill_seconds = 1e-6
    for frame in range(40, 400, 20):
        gen.played("a", frame)
        if not model.coarse:
            break
        chunks = len(sink.pcm("a"))
        await sink.until(lambda n=chunks: len(sink.pcm("a")) > n or not model.coarse)
    await sink.until(lambda: gen.restart_level == 0)
    assert model.switches == [(True, True), (False, True)] and model.cache_switches == [True, False]


async def test_int4_weights_that_cannot_be_made_leave_int8_running(run, caplog):
    caplog.set_level(logging.INFO, logger="radio.generator")
    model = FakeModel()
    model.prepare_error = MemoryError("out of memory")
    gen, sink = await run(model, ("a",), buffer_ahead=1.0, window=COLD, coarse_when_behind=True)
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    gen.prefill_seconds = 1e6  # no restart keeps up with int8 weights
    for frame in range(20, 200, 20):
        gen.played("a", frame)
        chunks = len(sink.pcm("a"))
        await sink.until(lambda n=chunks: len(sink.pcm("a")) > n)
    assert "cannot prepare int4 weights, so generation will not fall back" in caplog.text
    assert "out of memory" in caplog.text
    assert not model.coarse and getattr(model, "switches", []) == []
    assert gen.restart_level == SHORTEST_RESTARTS and gen.coarse_speedup == 0  # last int8 level
    assert caplog.text.count("cannot prepare int4 weights") == 1


async def test_coarse_weights_are_on_by_default_where_the_model_can_and_refused_by_name(
    tiny_model_dir, caplog
):
    """ "auto" (the default): on for an int8 model on our CPU kernels, off for one that cannot
    (a GPU, a bfloat16 or dense decoder, no int4 kernel), said at start either way; true where
    the model cannot is refused by name; false is off."""
    from engine import LoadOptions, MusicModel
    from engine.loading import SettingError
    from radio.app import build_radio
    from radio.config import Config, ConfigError, GenerationConfig, parse_config

    def with_setting(value):
        g = dataclasses.replace(Config().generation, coarse_when_behind=value)
        return dataclasses.replace(Config(), generation=g)

    caplog.set_level(logging.INFO, logger="radio.app")
    assert GenerationConfig().coarse_when_behind == "auto"
    int8 = MusicModel.load(LoadOptions(model=tiny_model_dir, quantize="int8"))
    assert build_radio(Config(), int8).generator.coarse_speedup > 0
    assert (
        "it takes shorter window restarts and windows, then int4 weights "
        "(generation.coarse_when_behind), then guidance off "
        "(generation.drop_guidance_when_behind) until it can keep up"
    ) in caplog.text
    assert build_radio(Config(), int8).generator.guidance_speedup > 0
    assert GenerationConfig().drop_guidance_when_behind is True
    g = dataclasses.replace(Config().generation, drop_guidance_when_behind=False)
    assert (
        build_radio(dataclasses.replace(Config(), generation=g), int8).generator.guidance_speedup
        == 0
    )
    with pytest.raises(ConfigError, match="drop_guidance_when_behind"):
        parse_config({"generation": {"drop_guidance_when_behind": "yes"}})
    assert build_radio(with_setting(False), int8).generator.coarse_speedup == 0
    dense = MusicModel.load(LoadOptions(model=tiny_model_dir, quantize="none"))
    assert build_radio(Config(), dense).generator.coarse_speedup == 0
    assert "coarse_when_behind (auto) is off for this model: coarse weights" in caplog.text
    with pytest.raises(SettingError, match="generation.coarse_when_behind: coarse weights"):
        build_radio(with_setting(True), dense)
    with pytest.raises(ConfigError, match='coarse_when_behind: must be true, false or "auto"'):
        parse_config({"generation": {"coarse_when_behind": "yes"}})
    with pytest.raises(ConfigError, match="coarse_when_behind: must be"):
        parse_config({"generation": {"coarse_when_behind": 1}})


def test_the_cheaper_cache_is_a_rung_where_the_model_can(tiny_head64_dir, tiny_model_dir, caplog):
    """An int8 cache on our kernels in heads of 64 (every real MusicGen's): the rung is there and
    said at start with the int4 weights after it; not where the cache cannot be int4 (heads of
    16), nor without the ladder."""
    from engine import LoadOptions, MusicModel
    from radio.app import build_radio
    from radio.config import Config

    caplog.set_level(logging.INFO, logger="radio.app")
    model = MusicModel.load(LoadOptions(model=tiny_head64_dir, quantize="int8"))
    assert build_radio(Config(), model).generator.cache_speedup > 0
    assert (
        "under x1.3 of real time generation takes an int4 KV cache in place of the int8 one "
        "(within the precision budget); while it falls behind even so, shorter window restarts "
        "and windows, then int4 weights (generation.coarse_when_behind), then guidance off "
        "(generation.drop_guidance_when_behind) until it can keep up"
    ) in caplog.text
    g = dataclasses.replace(Config().generation, adaptive_restarts=False)
    assert (
        build_radio(dataclasses.replace(Config(), generation=g), model).generator.cache_speedup == 0
    )
    heads16 = MusicModel.load(LoadOptions(model=tiny_model_dir, quantize="int8"))
    assert build_radio(Config(), heads16).generator.cache_speedup == 0


async def test_the_ladder_can_be_turned_off(run):
    model = FakeModel()
    gen, sink = await run(model, ("a",), buffer_ahead=1.0, adaptive_restarts=False, window=COLD)
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    gen.prefill_seconds = 1e6
    gen.played("a", 30)
    await sink.until(lambda: len(sink.pcm("a")) >= 8)
    assert gen.restart_level == 0 and model.streams[0].restart_context is None


async def test_chunks_read_with_warm_rows_are_timed_apart(run):
    """While warm rows are fed (steps with more rows) the chunks' cost goes to `warm_cost` and
    to the thread tuner's costs of their own kind (rows, stations warming): with those of the
    plain chunks they would make the count in use look slow; on their own the tuner still sees
    a busy neighbour come during the third of the time they run."""
    model = FakeModel()
    gen, sink = await run(model, ("a",), buffer_ahead=1.0)
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    assert gen.warm_cost == 0.0
    tuner = gen.tuner
    costs = dict(tuner.cost)
    assert tuner.key == (2, 0, CHUNK) and costs
    model.streams[0].tokens.warming = True
    gen.played("a", 70)  # 1 s is buffered ahead: 12 chunks of 10 frames made in all
    await sink.until(lambda: len(sink.pcm("a")) >= 12)
    assert gen.warm_cost > 0.0 and tuner.key == (2, 1, CHUNK) and tuner.cost
    # the plain chunks' costs untouched (a count's may be dropped: a jump of its cost in the
    # warm kind, the fake's microseconds on a busy test machine, says the machine changed)
    plain = tuner.costs_of((2, 0, CHUNK))
    assert plain == {c: costs[c] for c in plain}


async def test_a_steady_rate_too_slow_for_any_restarts_moves_before_the_warm_cost_is_known(
    run, caplog
):
    """With warm restarts, what a restart costs is known only from the first window's last
    `context` frames (half a minute in): until then restarts count as free, so a machine whose
    steady generation alone is below real time goes to int4 weights at once, not after that."""
    caplog.set_level(logging.INFO, logger="radio.generator")
    model = FakeModel()
    gen, sink = await run(model, ("a",), coarse_when_behind=True)
    await sink.until(lambda: len(sink.pcm("a")) >= 1)
    model.streams[0].read_seconds = 0.3  # 0.2 s of audio a read: x0.67, whatever the restarts
    async with asyncio.timeout(20):
        while not model.coarse:  # the listeners' clock keeps up with what was made: behind
            gen.played("a", len(sink.pcm("a")) * CHUNK)
            await asyncio.sleep(0.05)
    assert gen.warm_cost == 0  # not measured (the fake's streams never warm a window)
    assert model.switches == [(True, True)]  # prepared first
    assert "preparing int4 weights between chunks" in caplog.text


async def test_a_little_behind_takes_int4_weights_in_half_of_the_layers(run, caplog):
    """x0.93 of real time on int8 weights: half of the layers on int4 (`COARSE`, predicted x1.24)
    keeps up with the margin `UP_ABOVE`, so the other half keeps its int8 weights (the music
    7.9% of the spread off float32 instead of 15.8%)."""
    caplog.set_level(logging.INFO, logger="radio.generator")
    model = FakeModel()
    gen, sink = await run(model, ("a",), coarse_when_behind=True)
    await sink.until(lambda: len(sink.pcm("a")) >= 1)
    gen.coarse_speedup = 2.0  # (guessed so: half the layers x1.33, all of them x2)
    model.streams[0].read_seconds = 0.215  # 0.2 s of audio a read: x0.93
    async with asyncio.timeout(20):
        while not model.coarse:
            gen.played("a", len(sink.pcm("a")) * CHUNK)
            await asyncio.sleep(0.05)
    assert model.switches == [(0.5, True)] and gen.restart_level == COARSE
    assert "decoding with int4 weights in the last 50% of the layers until it can" in caplog.text


async def test_the_half_is_judged_with_the_slopes_guess_too(run):
    """The same machine, where a step reads as much KV cache as weights halfway through a
    window (`read_per_step`): until the slope is measured, its guess from those bytes puts the
    half under x1.15 over the window, so every layer takes int4 weights at once."""
    model = FakeModel()
    model.step_read = (1000.0, 0.3)  # weights; per position and row: two rows, +60% at 1000
    gen, sink = await run(model, ("a",), coarse_when_behind=True)
    await sink.until(lambda: len(sink.pcm("a")) >= 1)
    gen.coarse_speedup = 2.0
    model.streams[0].read_seconds = 0.215
    async with asyncio.timeout(20):
        while not model.coarse:
            gen.played("a", len(sink.pcm("a")) * CHUNK)
            await asyncio.sleep(0.05)
    assert model.switches == [(1.0, True)] and gen.restart_level == COARSEST


@pytest.mark.parametrize("step_read", [(1000.0, 0.3), (0.0, 0.0)])
async def test_guidance_off_is_judged_with_the_slopes_guess_too(run, step_read):
    """Every layer's int4 weights measured at x1.1 at a window's first positions: where the
    slope's guess from the bytes a step reads (as above) puts them under real time over the
    window, guidance goes at once; where the model says nothing of its bytes, it stays."""
    model = FakeModel()
    model.step_read = step_read
    gen, sink = await run(model, ("a",), coarse_when_behind=True, drop_guidance_when_behind=True)
    await sink.until(lambda: len(sink.pcm("a")) >= 1)
    gen.coarse_speedup = 2.0
    model.streams[0].read_seconds = 0.36  # int8 x0.56: x1.1 on every layer's int4 weights
    async with asyncio.timeout(20):
        while not model.coarse:
            gen.played("a", len(sink.pcm("a")) * CHUNK)
            await asyncio.sleep(0.05)
    guessed = step_read[0] > 0
    assert gen.restart_level == (UNGUIDED if guessed else COARSEST)
    assert model.unguided == guessed


async def test_the_speed_is_judged_once_the_weights_are_chosen(run, monkeypatch):
    """`Generator.speed_judged` (the clocks go on air only then) turns true once the ladder has
    measured the steady rate and made its choice, a switch to int4 weights included: a station
    never goes on air just before that switch's stall. Without the coarse level it is true from
    the start: nothing would stall."""
    monkeypatch.setattr(FakeStream, "read_seconds", 0.3)  # x0.67 of real time from the first read
    model = FakeModel()
    gen, sink = await run(model, ("a",), coarse_when_behind=True)
    assert not gen.speed_judged
    async with asyncio.timeout(20):
        while not gen.speed_judged:
            gen.played("a", len(sink.pcm("a")) * CHUNK)
            await asyncio.sleep(0.01)
    assert model.coarse  # switched before it said so
    plain, _ = await run(FakeModel(), ("b",), coarse_when_behind=False)
    assert plain.speed_judged


async def test_a_rung_under_real_time_is_left_before_it_settles(run, monkeypatch):
    """A stream's first chunks at x1.1 (a window's first positions), put at x0.69 over the
    window by the slope's guess: the int4 cache is taken on that guess, and the speed is not
    judged (no station goes on air) while the level reached is predicted under real time with
    levels after it. On the cache the chunks run at x0.91, under real time where they run: the
    ladder goes on to int4 weights after the three chunks its rate is the median of, not after
    `SETTLE` (three stations waited those and bridged), and judges the speed there (the last
    level)."""
    monkeypatch.setattr(FakeStream, "read_seconds", 0.18)  # 10 frames (0.2 s) in 0.18 s: x1.11
    model = FakeModel()
    model.cheap_cache_reason = None
    model.step_read = (1000.0, 0.3)  # the guess: a frame costs x1.6 at the window's mean
    gen, sink = await run(model, ("a",), coarse_when_behind=True)
    on_cache = None
    async with asyncio.timeout(20):
        while not model.coarse:
            if model.cheap_cache and on_cache is None:
                on_cache = len(sink.pcm("a"))
                assert gen.restart_level == CHEAP_CACHE and not gen.speed_judged
                FakeStream.read_seconds = 0.22  # x0.91 on the cache
            gen.played("a", len(sink.pcm("a")) * CHUNK)
            await asyncio.sleep(0.01)
    assert on_cache is not None and len(sink.pcm("a")) - on_cache < ladder.SETTLE
    assert gen.restart_level == COARSEST and gen.speed_judged


async def test_one_slow_chunk_does_not_move_the_ladder(run, monkeypatch):
    """The ladder weighs the median cost of the last plain chunks: one chunk several times
    slower than the others (a listener connecting, a page fault) is not the machine's speed.
    Taken as the rate, it sent one int8 station at x1.25 to int4 weights a second after it
    went on air, for good."""
    reads = []
    plain = FakeStream.read

    def read(self, frames, interrupt=None):
        reads.append(frames)
        if len(reads) == 8:
            time.sleep(0.4)  # 0.04 s a frame: x0.5 of real time
        return plain(self, frames, interrupt)

    monkeypatch.setattr(FakeStream, "read", read)
    model = FakeModel()
    gen, sink = await run(model, ("a",), buffer_ahead=1.0, window=COLD, coarse_when_behind=True)
    gen.prefill_seconds = 1e-6
    for frame in range(0, 200, 10):
        gen.played("a", frame)
        chunks = len(sink.pcm("a"))
        await sink.until(lambda n=chunks: len(sink.pcm("a")) > n)
    assert len(reads) >= 16
    assert gen.restart_level == 0 and not model.coarse and model.prepared == 0


def test_the_station_health_says_the_ladders_restarts_and_windows():
    from types import SimpleNamespace

    from engine.options import SamplingOptions
    from radio.config import StationConfig
    from radio.service import StationSink
    from radio.station import Station

    st = Station(StationConfig(), 0, 1, SamplingOptions())
    sink = StationSink(
        SimpleNamespace(stations={"main": st}, hop=640, frame_rate=50, sample_rate=32000)
    )
    h = st.health_json()
    assert (h["restart_context_seconds"], h["window_seconds"]) == (None, None)
    sink.on_restart_context("main", 2.5, 15.0)
    h = st.health_json()
    assert (h["restart_context_seconds"], h["window_seconds"]) == (2.5, 15.0)
    sink.on_restart_context("main", None, None)
    assert st.health_json()["window_seconds"] is None
    assert st.health_json()["rungs"] == []
    sink.on_rungs("main", ("int4 KV cache", "int4 weights in every layer", "guidance off"))
    assert st.health_json()["rungs"] == [
        "int4 KV cache",
        "int4 weights in every layer",
        "guidance off",
    ]


def test_sustained_is_the_audio_per_second_of_generating_over_the_last_minute():
    sustained = Sustained()
    sustained.add(0.4, 0.3)
    assert sustained.rtf == 0.0  # under 10 s of generating: nothing said yet
    for _ in range(40):
        sustained.add(0.4, 0.3)  # x1.33 for 12.3 s
    assert sustained.rtf == pytest.approx(0.4 / 0.3)
    for _ in range(150):
        sustained.add(0.4, 0.5)  # then x0.8: after a minute of it, only that counts
    assert sustained.rtf == pytest.approx(0.8)
    sustained.add(0.4, 0.2)  # one fast read hardly moves a minute
    assert sustained.rtf == pytest.approx(0.8, abs=0.01)


async def test_a_prompt_changes_first_read_and_a_folds_read_are_not_plain(run, monkeypatch):
    """The ladder's steady rate (`Generator._recent`) leaves out a prompt change's first read
    (its codec restarts) and a read whose batch folded a new text into the cross-attention
    (`TokenStream.folds`: tens of ms once): with guidance back at a prompt change those were two
    of the three chunks its new rows were judged by (x0.54 and x0.85: x0.71, guidance off again
    at once). The reads after them count again."""
    reads: list[tuple[int, bool]] = []  # (frames, slow)
    plain = FakeStream.read

    def read(self, frames, interrupt=None):
        slow = self.prompt == "jazz" and sum(1 for _, s in reads if s) < 2
        if slow:  # the change's first read, then a read that folds its text
            if any(s for _, s in reads):
                self.tokens.folds += 1
            time.sleep(0.2)
        reads.append((frames, slow))
        return plain(self, frames, interrupt)

    monkeypatch.setattr(FakeStream, "read", read)
    model = FakeModel()
    gen, sink = await run(model, ("a",), buffer_ahead=1.0, window=COLD)
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    model.streams[0].tokens.folds = 0  # (an instance's own count)
    frame = await gen.set_prompt("a", PromptChange(Blend.of("jazz"), "admin", 30, 0.0))
    gen.played("a", frame)
    await sink.until(lambda: len(sink.pcm("a")) >= 9)
    slow = [frames for frames, s in reads if s]
    assert slow == [CHUNK // 2, CHUNK]  # the change's first read (half a chunk), the fold's
    assert len(gen._recent) >= 3
    assert max(cost for cost, _ in gen._recent) < 0.2 / CHUNK / 2  # neither is in it
