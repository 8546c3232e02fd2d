"""Guidance dropped while a radio cannot keep up (`MusicModel.drop_guidance`): no null rows, a
step's rows halved; each stream is sampled from its conditional rows alone, which keep their
cache, and takes its null row back at its next warm window restart, prefilling nothing.

On the int8 kernels a row's logits do not depend on the rows batched with it, so the music is
compared token for token with the same streams that kept their null rows and were sampled at
guidance 1 meanwhile (which reads the conditional row alone).
"""

from __future__ import annotations

import dataclasses

import torch

from engine import LoadOptions, MusicModel, SamplingOptions, WindowOptions
from engine.blend import Blend, prefill_rows
from tests.engine.test_warm_restarts import assert_same, history

WINDOW = WindowOptions(window=150, context=40)  # every restart after the first window warm
SAMPLINGS = [SamplingOptions(greedy=True, guidance_scale=3.0), SamplingOptions(seed=3)]


def pair(model: MusicModel) -> list:
    """Two stations in one batch, their windows at different points (the second's prompt
    changed at frame 20: it restarts elsewhere)."""
    streams = model.open_streams(["jazz", "rock"], SAMPLINGS, WINDOW)
    streams[1].tokens.generate_until(30)
    streams[1].set_prompt("heavy rock", from_frame=20)
    return streams


def at_guidance(stream, scale: float) -> None:
    """Sample `stream` at this guidance scale from its next step (its rows stay as they are)."""
    stream.tokens.set_sampling(dataclasses.replace(stream.sampling, guidance_scale=scale))


@torch.inference_mode()
def test_dropped_guidance_samples_the_conditional_rows_alone(int8_model):
    dropped, kept = pair(int8_model), pair(int8_model)
    for streams in (dropped, kept):
        streams[0].tokens.generate_until(60)
    batch = dropped[0].tokens._batch
    prefills = [s.tokens.prefills for s in dropped]
    batch.drop_guidance(True)
    assert [lane.rows.count for lane in batch.lanes] == [1, 1]  # no null rows, laid out now
    assert [s.tokens.prefills for s in dropped] == prefills  # nothing re-read
    for stream in kept:
        at_guidance(stream, 1.0)
    for d, k in zip(dropped, kept, strict=True):
        assert_same(history(d, 400), history(k, 400))
        assert d.tokens.prefills == k.tokens.prefills and d.tokens.warm_restarts >= 2
    # every window since was built without them
    assert [lane.rows.count for lane in batch.lanes] == [1, 1]
    assert batch.cache.tensors()[0].shape[1] >= 2


@torch.inference_mode()
def test_guidance_comes_back_at_each_streams_next_warm_restart(int8_model):
    dropped, kept = pair(int8_model), pair(int8_model)
    batches = [dropped[0].tokens._batch, kept[0].tokens._batch]
    for streams in (dropped, kept):
        streams[0].tokens.generate_until(60)
    batches[0].drop_guidance(True)
    for stream in kept:
        at_guidance(stream, 1.0)
    lanes = batches[0].lanes
    while lanes[0].warm is None:  # into the first station's warm rows, built without it
        for batch in batches:
            batch.step()
    assert lanes[1].warm is None
    batches[0].drop_guidance(False)
    assert [lane.rows.guided for lane in lanes] == [False, False]  # until their next windows
    prefills = [s.tokens.prefills for s in dropped]
    restarts = dropped[0].tokens.warm_restarts
    came_back: list[int] = []  # the step at which each lane took its null row back
    for step in range(400):
        for i, lane in enumerate(lanes):
            # the next step restarts the lane's window from warm rows built with the null row
            warm = lane.warm
            if lane.needs_window and warm is not None and warm.guided and not lane.rows.guided:
                at_guidance(kept[i], 3.0)
                came_back.append(step)
        for batch in batches:
            batch.step()
        if dropped[0].tokens.warm_restarts == restarts + 1:
            # the window whose warm rows were begun without the null row goes on without it
            assert not lanes[0].rows.guided
    # (at different steps: a lane with its null row and one without were sampled side by side)
    assert len(came_back) == 2 and came_back[0] != came_back[1]
    assert [lane.rows.guided for lane in lanes] == [True, True]
    assert [s.tokens.prefills for s in dropped] == prefills  # both came back warm
    frames = min(s.tokens.complete for s in dropped + kept)
    for d, k in zip(dropped, kept, strict=True):
        assert_same(history(d, frames), history(k, frames))


@torch.inference_mode()
def test_streams_opened_while_guidance_is_dropped_start_without_null_rows(tiny_model_dir, k):
    model = MusicModel.load(LoadOptions(model=tiny_model_dir, device="cpu", quantize="int8"))
    before = model.open_stream("harp", SAMPLINGS[0], WINDOW)
    model.drop_guidance(True)
    assert model.unguided
    lone = model.open_stream("harp", SAMPLINGS[0], WINDOW)
    two = model.open_streams(["jazz", "rock"], SAMPLINGS, WINDOW)
    for stream in (before, lone, *two):
        stream.tokens.generate_until(20)
        assert stream.tokens._lane.rows.count == 1
    model.drop_guidance(False)
    for stream in (before, lone, *two):
        stream.tokens.generate_until(200)  # past a window restart
        assert stream.tokens._lane.rows.count == 2


@torch.inference_mode()
def test_a_prompt_change_prefills_the_null_row_only_while_the_stream_is_guided(tiny_model_dir):
    """`TokenStream.guided_next` says what a change prefills (the radio places changes by it):
    the null row while guided, none while guidance is dropped or off for a lone stream, and the
    null row again as soon as guidance is wanted back, before the rows take it back."""
    model = MusicModel.load(LoadOptions(model=tiny_model_dir, device="cpu", quantize="int8"))
    stream = model.open_stream("harp", SAMPLINGS[0], WINDOW)
    lone_unguided = model.open_stream("harp", SamplingOptions(guidance_scale=1.0), WINDOW)
    assert stream.tokens.guided_next and not lone_unguided.tokens.guided_next
    stream.tokens.generate_until(30)
    model.drop_guidance(True)
    assert not stream.tokens.guided_next
    stream.set_prompt("cello", from_frame=25)
    rows = stream.tokens.last_prefill.rows
    assert rows == prefill_rows(Blend.of("cello"), guided=False) == stream.tokens.rows == 1
    stream.tokens.generate_until(40)
    model.drop_guidance(False)
    assert stream.tokens.guided_next and stream.tokens.rows == 1  # (until its next window)
    stream.set_prompt("oboe", from_frame=35)
    assert stream.tokens.last_prefill.rows == prefill_rows(Blend.of("oboe")) == 2
    lone_unguided.tokens.generate_until(10)
    lone_unguided.set_prompt("cello", from_frame=5)
    assert lone_unguided.tokens.last_prefill.rows == 1
