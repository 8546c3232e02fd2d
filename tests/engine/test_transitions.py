"""Transitions in the engine: `set_prompt(..., transition_seconds=T)` prefills the new texts'
rows on the context, glides the weights from the blend before to the new one, one step at a
time, then drops the rows of weight 0 (engine/rows.py, engine/lane.py).

The glide's weights at its start, middle and end; the rows it holds and drops; the stream goes
on without a restart when they leave; and its logits at every step, through the middle and past
the end, are the formula with the interpolated weights over the reference's own forward.
"""

from __future__ import annotations

import pytest
import torch

from engine import Blend, SamplingOptions, WindowOptions
from engine.conditioning import TextCondition
from engine.rows import Change, Prompt, Rows
from tests.engine.guidance import assert_formula, capture_sampler
from tests.engine.reference import reference_rows

GUIDED = SamplingOptions(greedy=True, guidance_scale=3.0)


def _condition() -> TextCondition:
    return TextCondition(torch.zeros(1, 4), torch.ones(1, dtype=torch.bool))


def test_glide_weights_at_start_middle_and_end():
    a, b, c = _condition(), _condition(), _condition()
    old = Prompt(((a, 0.75), (b, 0.25)))
    new = Prompt(((b, 0.5), (c, 0.5)))
    rows = Rows.of(Change(100, new, old, frames=20), guided=True)
    assert rows.conditions == (a, b, c) and rows.count == 4  # both blends' texts, once each
    assert rows.weights(100) == [0.75, 0.25, 0.0]  # the start: the blend before
    assert rows.weights(90) == [0.75, 0.25, 0.0]  # (before it: the same)
    assert rows.weights(110) == pytest.approx([0.375, 0.375, 0.25])  # the middle
    assert rows.weights(115) == pytest.approx([0.1875, 0.4375, 0.375])
    assert rows.gliding(119) and not rows.gliding(120)
    assert rows.weights(120) == [0.0, 0.5, 0.5]  # the end: the new blend
    settled = rows.settled()
    assert settled.conditions == (b, c) and settled.weights(130) == [0.5, 0.5]
    assert settled.glide is None and settled.count == 3
    # the blend heard at a frame, for a transition that starts in the middle of this one
    half = Change(100, new, old, frames=20).at(110)
    assert half.conditions == (a, b, c) and half.weights == pytest.approx((0.375, 0.375, 0.25))
    # a switch is a change that is over at once
    switch = Rows.of(Change(100, new), guided=False)
    assert switch.conditions == (b, c) and switch.count == 2 and not switch.gliding(100)


def test_a_transition_glides_then_drops_rows_without_a_restart(tiny_float32, monkeypatch):
    """A plain prompt glides into a two-text blend that shares none of its texts: 4 rows during
    the glide, 3 after; one prefill (the transition's), none when the old row leaves; the frames
    before the change stay; the logits of every step are the formula with that step's
    interpolated weights, including after the old row has left (the rows that stay kept their
    caches)."""
    model = tiny_float32
    # the transition re-reads all 40 frames made: its window starts at BOS, as the reference does
    window = WindowOptions(window=200, context=60, prompt_context=60)
    stream = model.open_stream("heavy rock", GUIDED, window)
    stream.tokens.generate_until(50)
    before = stream.tokens.history()[0][:, :40].clone()
    seen = capture_sampler(monkeypatch)
    blend = Blend.parse([{"text": "slow jazz", "weight": 0.6}, {"text": "rain", "weight": 0.4}])
    glide = 20  # frames: 0.4 s at 50 Hz
    assert stream.set_prompt(blend, from_frame=40, transition_seconds=glide / 50) == 40
    assert stream.tokens.rows == 4 and stream.prompt == "slow jazz 60% + rain 40%"
    prefills = stream.tokens.prefills
    rows_seen = []
    while stream.tokens.complete < 40 + glide + 25:
        stream.tokens.generate_until(stream.tokens.complete + 1)
        rows_seen.append(stream.tokens.rows)
    assert stream.tokens.prefills == prefills, "the glide's end restarted the window"
    assert rows_seen[0] == 4 and rows_seen[-1] == 3 and sorted(rows_seen, reverse=True) == rows_seen
    assert stream.tokens._batch.cache.batch == 3
    tokens = stream.tokens.history()[0]
    assert torch.equal(tokens[:, :40], before)  # what was heard before the change
    frames = tokens[:, : 40 + glide + 25]
    ref = reference_rows(model, ["heavy rock", "slow jazz", "rain"], frames)
    # capture i samples frame 40 + i (position 41 + i) from the inputs up to position 40 + i
    checked = 0
    for i, logits in enumerate(seen):
        if 40 + i >= ref.shape[1]:
            break
        t = min(i / glide, 1.0)
        weights = [1 - t, 0.6 * t, 0.4 * t]
        assert_formula(logits, ref[:, 40 + i], weights, f"step {i} of the glide (t = {t:.2f})")
        checked += 1
    assert checked > glide + 10  # through the middle and past the end


def test_transition_zero_is_a_switch(tiny_float32):
    model = tiny_float32
    stream = model.open_stream("heavy rock", GUIDED, WindowOptions(window=200, context=60))
    stream.tokens.generate_until(30)
    stream.set_prompt(Blend.parse([{"text": "a"}, {"text": "b"}]), from_frame=20)
    assert stream.tokens.rows == 3
    switched = model.open_stream("heavy rock", GUIDED, WindowOptions(window=200, context=60))
    switched.tokens.generate_until(30)
    switched.set_prompt(
        Blend.parse([{"text": "a"}, {"text": "b"}]), from_frame=20, transition_seconds=0.0
    )
    for s in (stream, switched):
        s.tokens.generate_until(80)
    assert torch.equal(stream.tokens.history()[0][:, :80], switched.tokens.history()[0][:, :80])
    with pytest.raises(ValueError, match="transition_seconds must be >= 0"):
        stream.set_prompt("x", transition_seconds=-1.0)
    with pytest.raises(ValueError, match="transition_seconds must be >= 0"):
        stream.set_prompt("x", transition_seconds=float("nan"))


def test_a_change_during_a_glide_starts_from_the_blend_heard_then(tiny_float32):
    """A second transition from the middle of a first glides from the weights heard there; a
    rewind before the first one's end brings its dropped rows back."""
    stream = tiny_float32.open_stream("a", GUIDED, WindowOptions(window=200, context=60))
    stream.tokens.generate_until(20)
    stream.set_prompt("b", from_frame=10, transition_seconds=0.4)  # frames 10..30
    stream.tokens.generate_until(60)
    assert stream.tokens.rows == 2  # the glide is over: "a" left
    stream.set_prompt("c", from_frame=20, transition_seconds=0.2)  # a rewind into it
    assert stream.tokens.rows == 4  # a and b (half each at frame 19 ...), then c
    lane = stream.tokens._lane
    weights = lane.rows.weights(20)
    assert weights[:2] == pytest.approx([0.55, 0.45]) and weights[2] == 0.0
    stream.tokens.generate_until(40)
    assert stream.tokens.rows == 2 and lane.rows.weights(40) == [1.0]
