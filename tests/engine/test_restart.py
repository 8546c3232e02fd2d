"""`AudioStream.restart`: a stream re-prefilled from its own recent tokens.

On the tiny model under greedy decoding: from `from_frame` on, the stream writes exactly what
transformers' `generate` writes given the stream's own last `context_frames` frames as
`decoder_input_ids` (and, with none, what a fresh stream writes); alone and as a station of a
batch. A stream whose decoder step raised goes on after a restart as if nothing had happened
(greedy: the tokens and the audio of a stream that never failed). A stream of a
batch whose frames before the restart are gone goes on from the earliest frame it can."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine import LoadOptions, MusicModel, SamplingOptions, WindowOptions
from tests.engine.reference import reference_tokens, transformers_model

PROMPT = "slow rainy day jazz"
GREEDY = SamplingOptions(greedy=True, guidance_scale=3.0)


@pytest.fixture(scope="module")
def mono(tiny_model_dir):
    """(our MusicModel, transformers' model, processor) of the same float32 weights."""
    ours = MusicModel.load(LoadOptions(model=tiny_model_dir, device="cpu", dtype="float32"))
    return (ours, *transformers_model(tiny_model_dir))


def comparable_frames(steps: int, hf) -> int:
    """Frames of a reference run of `steps` steps untouched by its end-of-sequence padding
    (see tests/engine/test_equivalence.py)."""
    config = hf.decoder.config
    channel_codebooks = config.num_codebooks // config.audio_channels
    return steps + 2 - channel_codebooks - (channel_codebooks - 1)


def open_stream(ours, batched: bool):
    if batched:
        return ours.open_streams([PROMPT, "harp"], [GREEDY] * 2)[0]
    return ours.open_stream(PROMPT, GREEDY)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("context", [20, 0])
@torch.inference_mode()
def test_a_restart_continues_like_generate_from_the_streams_own_frames(mono, batched, context):
    ours, hf, processor = mono
    stream = open_stream(ours, batched)
    stream.read(40)
    before = stream.tokens.history()[0][:, :30].clone()
    assert stream.restart(30, context_frames=context) == 30  # a rewind of 10 frames
    assert stream.frame == 30 and stream.prompt == PROMPT
    steps = 60
    own = before[:, 30 - context :] if context else None
    reference = reference_tokens(hf, processor, PROMPT, steps, 3.0, prompt_frames=own)
    made = comparable_frames(steps, hf) - 1
    stream.read(made)
    tokens, offset = stream.tokens.history()
    assert offset == 0 and torch.equal(tokens[:, :30], before)  # what was heard stays
    continued = tokens[:, 30 : 30 + made]
    expected = reference[:, context : context + made]
    mismatch = (continued != expected).nonzero()
    assert mismatch.numel() == 0, f"first mismatch (codebook, frame): {mismatch[0].tolist()}"
    with pytest.raises(ValueError, match="seeded at frame 30"):
        stream.set_prompt("anything", from_frame=29)  # no rewind before a restart


@torch.inference_mode()
def test_a_stream_whose_step_raised_goes_on_after_a_restart(mono):
    ours, hf, processor = mono
    stream = ours.open_stream(PROMPT, GREEDY)
    first = stream.read(30)
    decoder = ours.decoder
    original = decoder.decode_one_step
    calls = {"n": 0}

    def fail_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # in the middle of the next read
            raise RuntimeError("out of memory")
        return original(*args, **kwargs)

    decoder.decode_one_step = fail_once
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            stream.read(10)
    finally:
        decoder.decode_one_step = original
    assert stream.frame == 30  # nothing was returned
    assert stream.restart() == 30  # from its recent tokens: all of them (the window's context)
    steps = 60
    history = stream.tokens.history()[0][:, :30].clone()
    reference = reference_tokens(hf, processor, PROMPT, steps, 3.0, prompt_frames=history)
    made = comparable_frames(steps, hf) - 1
    second = stream.read(made)
    tokens = stream.tokens.history()[0]
    mismatch = (tokens[:, 30 : 30 + made] != reference[:, 30 : 30 + made]).nonzero()
    assert mismatch.numel() == 0, f"first mismatch (codebook, frame): {mismatch[0].tolist()}"
    # greedy, with all of its frames as the context: the audio is the one of a stream that
    # never failed (no jump, no click at the join)
    steady = ours.open_stream(PROMPT, GREEDY).read(30 + made)
    audio = np.concatenate([first, second], axis=1)
    assert np.allclose(audio, steady, atol=1e-5), np.abs(audio - steady).max()


@torch.inference_mode()
def test_a_batched_stream_whose_frames_are_gone_goes_on_from_the_earliest_it_can(mono):
    """Its neighbour went on generating while it was down: it resumes later than it stopped."""
    ours = mono[0]
    window = WindowOptions(window=100, context=20)
    a, b = ours.open_streams([PROMPT, "harp"], [SamplingOptions(seed=1)] * 2, window)
    a.read(10)
    for _ in range(14):
        b.read(100)  # the batch steps both: a's frames before ~850 are no longer kept
    offset = a.tokens.history()[1]
    assert offset > 10
    frame = a.restart(context_frames=10)
    assert frame == offset + a.codec.context and a.frame == frame
    pcm = a.read(20)
    assert pcm.shape == (1, 20 * ours.hop) and np.isfinite(pcm).all()
    with pytest.raises(ValueError, match=r"context_frames must be in \[0, 20\]"):
        a.restart(context_frames=21)


@torch.inference_mode()
def test_token_frames_are_the_streams_frames(mono):
    ours = mono[0]
    stream = ours.open_stream(PROMPT, SamplingOptions(seed=2))
    stream.read(20)
    frames = stream.token_frames(5, 20)
    assert frames.dtype == np.int64 and frames.shape == (4, 15)
    assert (frames == stream.tokens.history()[0][:, 5:20].numpy()).all()
    with pytest.raises(ValueError, match=r"frames \[20, 99\) are not kept"):
        stream.token_frames(20, 99)


@pytest.mark.parametrize("batched", [False, True])
@torch.inference_mode()
def test_a_prompt_change_with_a_short_context_continues_like_generate(mono, batched):
    """`prompt_context` frames re-read at a prompt change: from the change on, the stream writes
    what `generate` writes for the new text given those last frames; its next window restart
    re-reads the whole context again (a prefill: warm restarts off, they re-read nothing)."""
    ours, hf, processor = mono
    window = WindowOptions(window=120, context=60, prompt_context=15, warm_restarts=False)
    if batched:
        stream = ours.open_streams([PROMPT, "harp"], [GREEDY] * 2, window=window)[0]
    else:
        stream = ours.open_stream(PROMPT, GREEDY, window=window)
    stream.read(40)
    before = stream.tokens.history()[0][:, :30].clone()
    assert stream.set_prompt("fast drum and bass", from_frame=30) == 30
    assert stream.tokens.last_prefill.frames == 15
    steps = 40
    reference = reference_tokens(
        hf, processor, "fast drum and bass", steps, 3.0, prompt_frames=before[:, 15:]
    )
    made = comparable_frames(steps, hf) - 1
    stream.read(made)
    continued = stream.tokens.history()[0][:, 30 : 30 + made]
    mismatch = (continued != reference[:, 15 : 15 + made]).nonzero()
    assert mismatch.numel() == 0, f"first mismatch (codebook, frame): {mismatch[0].tolist()}"
    stream.read(120)  # past the window's end: the next window re-reads 60 frames
    assert stream.tokens.last_prefill.frames == 60


def test_prompt_context_is_checked():
    with pytest.raises(ValueError, match="prompt_context: must be >= 0"):
        WindowOptions(window=120, context=60, prompt_context=-1).validate()
    assert WindowOptions(context=60, prompt_context=0).change_context == 60
    assert WindowOptions(context=60, prompt_context=100).change_context == 60
    assert WindowOptions(context=500).change_context == 25


@torch.inference_mode()
def test_shortened_window_restarts_equal_a_stream_with_that_context(mono):
    """A stream whose window restarts are shortened to 30 frames writes exactly what a stream
    with `context=30` writes (greedy), and goes back to the whole context when asked (restarts
    that prefill, what the radio's ladder shortens)."""
    ours, _, _ = mono
    cold = WindowOptions(window=120, context=60, warm_restarts=False)
    short = ours.open_stream(PROMPT, GREEDY, window=cold)
    short.shorten_restarts(30)
    plain = ours.open_stream(PROMPT, GREEDY, window=dataclasses.replace(cold, context=30))
    short.read(300)
    plain.read(300)
    assert short.tokens.last_prefill.frames == 30 and short.tokens.prefills >= 3
    assert torch.equal(short.tokens.history()[0], plain.tokens.history()[0])
    short.shorten_restarts(None)
    short.read(120)
    assert short.tokens.last_prefill.frames == 60
    with pytest.raises(ValueError, match=r"frames must be in \[1, 60\]"):
        short.shorten_restarts(61)


def test_a_short_prefill_measure_is_scaled_to_the_whole_context(mono, monkeypatch):
    """`measure_prefill(window, frames)` times a prefill of `frames` and scales it to the
    context: a radio starts up without a whole context's prefill (4.5 s on a 2-core CPU)."""
    import engine.model

    ours, _, _ = mono
    lengths = []
    prefill = ours.decoder.prefill

    now = [10.0]  # a clock that only the prefill moves: it "takes" 0.5 s

    def counted(ids, cache, cross):
        lengths.append(ids.shape[-1])
        now[0] += 0.5
        return prefill(ids, cache, cross)

    monkeypatch.setattr(ours.decoder, "prefill", counted)
    monkeypatch.setattr(engine.model.time, "perf_counter", lambda: now[0])
    window = WindowOptions(window=120, context=60)
    assert ours.measure_prefill(window, frames=15) == pytest.approx(0.5 * 60 / 15)
    assert lengths == [16]  # BOS and 15 frames


def test_a_prefills_cost_is_scaled_by_rows_times_frames_and_a_part_that_does_not_grow():
    """`Prefill.at_rows`: what a prefill would take with other rows (a change with guidance
    dropped prefills 1, a blend of 3 texts 4): on 2 Zen 3 cores 25 frames of 1, 2 and 4 rows
    took 103, 188 and 354 ms (`python bench/prompt_change.py`), where in proportion to the
    rows 1 row would be 94 and 4 rows 376. `plain_seconds` scales it to a plain prompt's whole
    context."""
    from engine.lane import FIXED_ROW_FRAMES, Prefill

    two = Prefill(0.188, 2, 25)
    assert two.at_rows(2) == pytest.approx(0.188)
    assert abs(two.at_rows(1) - 0.103) < 0.005 and abs(two.at_rows(4) - 0.354) < 0.005
    fixed = FIXED_ROW_FRAMES
    assert Prefill(0.103, 1, 25).at_rows(2) == pytest.approx(0.103 * (50 + fixed) / (25 + fixed))
    assert two.plain_seconds(500) == pytest.approx(0.188 * 500 / 25)
    four = Prefill(0.354, 4, 25)
    assert four.plain_seconds(500) == pytest.approx(0.354 * (50 + fixed) / (100 + fixed) * 20)


def test_a_prompt_change_says_where_its_time_went(mono, caplog):
    """At debug level a prompt change is told part by part, the cross-attention on its own, and
    where the engine thread's time went (on a core, waiting for one, blocked: the GIL or a
    lock) with its page faults: what found the slow changes of `radio serve`."""
    import logging
    import re

    ours, _, _ = mono
    stream = ours.open_stream(PROMPT, GREEDY)
    stream.read(10)
    before = ours.decoder.cross_seconds
    with caplog.at_level(logging.DEBUG, logger="engine.model"):
        stream.set_prompt("bright marimba")
    assert ours.decoder.cross_seconds > before  # the new text's keys and values
    line = next(r.getMessage() for r in caplog.records if "a prompt change took" in r.getMessage())
    numbers = r"([0-9.]+) s: its texts' encoding ([0-9.]+) s, its prefill ([0-9.]+) s, the "
    numbers += r"cross-attention ([0-9.]+) s, the rest (-?[0-9.]+) s \(([0-9.]+) s on a core"
    found = re.search(numbers, line)
    assert found, line
    whole, *parts, cpu = (float(x) for x in found.groups())
    assert whole == pytest.approx(sum(parts), abs=0.003)  # (printed to the millisecond)
    assert 0 <= cpu <= whole + 0.01 and "waiting for one" in line and "page faults" in line
