"""Warm restarts: the next window built a step at a time beside the current one.

A window restart with `warm_restarts` prefills nothing: the warm rows were fed the next
window's positions in the last `context` steps of the window. What the stream writes is what
it writes with a prefill at every restart: token for token under greedy decoding (float32 on
the tiny model), through prompt changes, transitions and shortened restarts that fall back to a
prefill; the warm rows' cache holds what the prefill's holds. On the int8 kernels (the CPU default), batched streams with warm rows at
different points of their windows write what they write alone.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine import SamplingOptions, WindowOptions
from engine.blend import Blend

# start of the warm rows: window - max_delay (3) - context = 107 > context: every window is warm
WINDOW = WindowOptions(window=150, context=40)
COLD = dataclasses.replace(WINDOW, warm_restarts=False)
GREEDY = SamplingOptions(greedy=True, guidance_scale=3.0)


def history(stream, frames: int) -> torch.Tensor:
    stream.tokens.generate_until(frames)
    return stream.tokens.history()[0][:, :frames]


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    mismatch = (got != want).nonzero()
    assert mismatch.numel() == 0, f"first mismatch (codebook, frame): {mismatch[0].tolist()}"


# Greedy: sampled draws would part at a near-tie of the cumulative probabilities, which the
# rounding differences between a prefill and single steps can move (float32, ~1e-6).
@pytest.mark.parametrize("sampling", [GREEDY, SamplingOptions(greedy=True, guidance_scale=1.0)])
@torch.inference_mode()
def test_a_warm_restart_writes_what_a_prefill_writes(tiny_float32, sampling):
    warm = tiny_float32.open_stream("slow rainy day jazz", sampling, WINDOW)
    cold = tiny_float32.open_stream("slow rainy day jazz", sampling, COLD)
    assert_same(history(warm, 560), history(cold, 560))
    # the first window is prefilled (from the text alone); every restart after it was warm
    assert warm.tokens.prefills == 1 and warm.tokens.warm_restarts >= 4
    assert cold.tokens.prefills == 1 + warm.tokens.warm_restarts
    assert cold.tokens.warm_restarts == 0


@torch.inference_mode()
def test_the_warm_rows_cache_is_the_prefills_cache(tiny_float32):
    """After the step that restarted the first window (and then fed position context + 1)
    both caches hold the same keys and values for positions [0, context + 1]."""
    warm = tiny_float32.open_stream("harp", GREEDY, WINDOW)
    cold = tiny_float32.open_stream("harp", GREEDY, COLD)
    for stream in (warm, cold):
        while stream.tokens.prefills + stream.tokens.warm_restarts < 2:
            stream.tokens._batch.step()
        assert stream.tokens.position == WINDOW.context + 2
    assert warm.tokens.warm_restarts == 1 and cold.tokens.prefills == 2
    a, b = warm.tokens._batch.cache, cold.tokens._batch.cache
    for layer in range(len(tiny_float32.decoder.layers)):
        (wk, wv), (ck, cv) = a.view(layer, WINDOW.context + 2), b.view(layer, WINDOW.context + 2)
        torch.testing.assert_close(wk, ck, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(wv, cv, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_changes_during_the_warm_rows_prefill_as_before(tiny_float32):
    """A prompt change, a transition and a shortened restart while the warm rows are being
    fed: the warm rows are dropped (or, for a restart whose context changed, not taken) and
    the stream writes what it writes without them."""
    streams = []
    for window in (WINDOW, COLD):
        stream = tiny_float32.open_stream("heavy rock", GREEDY, window)
        stream.tokens.generate_until(110)  # window 1's warm rows began at frame ~104
        stream.set_prompt("a quiet harp", from_frame=108)
        stream.tokens.generate_until(300)  # the change's window starts at frame 108
        blend = Blend.parse([{"text": "flute", "weight": 0.6}, {"text": "drums", "weight": 0.4}])
        stream.set_prompt(blend, from_frame=290, transition_seconds=0.8)  # 40 frames of glide
        stream.tokens.generate_until(400)
        stream.tokens.shorten_restarts(30)  # during the warm rows of that window
        streams.append((stream, history(stream, 640)))
    (warm, got), (cold, want) = streams
    assert_same(got, want)
    assert warm.tokens.warm_restarts >= 2
    assert warm.tokens.prefills < cold.tokens.prefills


@torch.inference_mode()
def test_shortened_windows_write_what_shorter_windows_write(tiny_float32):
    """Windows shortened to 100 positions (the radio's ladder, when even the shortest restarts
    cannot keep up) write what a stream with `window=100` writes, their restarts still warm;
    asked back, the next window spans the whole 150 again."""
    short = tiny_float32.open_stream("harp", GREEDY, WINDOW)
    short.tokens.shorten_windows(100)  # before the first window: from it on
    plain = tiny_float32.open_stream("harp", GREEDY, dataclasses.replace(WINDOW, window=100))
    assert_same(history(short, 400), history(plain, 400))
    assert short.tokens.prefills == 1 and short.tokens.warm_restarts >= 5
    assert short.tokens.window_frames == 100
    short.tokens.shorten_windows(None)
    furthest = 0
    while short.tokens.warm_restarts < plain.tokens.warm_restarts + 2:
        short.tokens._batch.step()
        furthest = max(furthest, short.tokens.position)
    assert furthest == WINDOW.window
    assert short.tokens.prefills == 1
    with pytest.raises(ValueError, match=r"frames must be in \[1, 150\]"):
        short.tokens.shorten_windows(151)


@torch.inference_mode()
def test_restarts_shortened_during_the_warm_rows_start_them_again(tiny_float32):
    """The radio's ladder shortening restarts while warm rows are fed (in the first window,
    before their cost was measured): they stop at the next step instead of running on for a
    restart that would not take them, begin again where the shorter context starts, and the
    restart is still warm."""
    stream = tiny_float32.open_stream("harp", GREEDY, WINDOW)
    batch = stream.tokens._batch
    while not stream.tokens.warming:
        batch.step()
    assert stream.tokens.position == WINDOW.window - 3 - WINDOW.context  # 107
    batch.step()
    stream.tokens.shorten_restarts(10)
    batch.step()
    assert not stream.tokens.warming
    while not stream.tokens.warming:
        batch.step()
    assert stream.tokens.position == WINDOW.window - 3 - 10
    warm, prefills = stream.tokens.warm_restarts, stream.tokens.prefills
    while stream.tokens.position > 20:
        batch.step()
    assert stream.tokens.warm_restarts == warm + 1 and stream.tokens.prefills == prefills
    assert stream.tokens.position == 12  # a window from 10 frames of context


@torch.inference_mode()
def test_restarts_lengthened_during_the_warm_rows_keep_them(tiny_float32):
    """The ladder climbing back (restarts re-read the whole context again) while warm rows for
    a shorter one are fed: this restart still takes them, warm, from their shorter context;
    the next window's re-reads the whole context."""
    stream = tiny_float32.open_stream("harp", GREEDY, WINDOW)
    batch = stream.tokens._batch
    stream.tokens.shorten_restarts(10)
    while not stream.tokens.warming:
        batch.step()
    assert stream.tokens.position == WINDOW.window - 3 - 10
    batch.step()
    stream.tokens.shorten_restarts(None)  # the whole context (40) again, from now on
    batch.step()
    assert stream.tokens.warming  # kept: their start for 40 frames is behind
    warm, prefills = stream.tokens.warm_restarts, stream.tokens.prefills
    while stream.tokens.position > 20:
        batch.step()
    assert stream.tokens.warm_restarts == warm + 1 and stream.tokens.prefills == prefills
    assert stream.tokens.position == 12  # a window from the warm rows' 10 frames
    while not stream.tokens.warming:
        batch.step()
    assert stream.tokens.position == WINDOW.window - 3 - WINDOW.context  # the whole 40 again
    while stream.tokens.position > 50:
        batch.step()
    assert stream.tokens.warm_restarts == warm + 2 and stream.tokens.prefills == prefills
    assert stream.tokens.position == 42  # a window from 40 frames of context


@torch.inference_mode()
def test_batched_warm_rows_leave_the_other_rows_alone(int8_model):
    """int8 on our kernels: a row's logits do not depend on the rows batched with it, so
    streams whose warm rows come and go at different steps write what they write alone."""
    prompts = ["jazz", Blend.parse([{"text": "rain"}, {"text": "piano", "weight": 3}]), "rock"]
    samplings = [GREEDY, SamplingOptions(seed=3), SamplingOptions(greedy=True, guidance_scale=1.0)]
    batched = int8_model.open_streams(prompts, samplings, WINDOW)
    alone = [int8_model.open_stream(p, s, WINDOW) for p, s in zip(prompts, samplings, strict=True)]
    for streams in (batched, alone):
        streams[2].tokens.generate_until(30)
        streams[2].set_prompt("heavy rock", from_frame=20)  # its windows restart elsewhere
        for s in streams:
            s.tokens.generate_until(400)
    for b, a in zip(batched, alone, strict=True):
        assert_same(history(b, 400), history(a, 400))
        assert b.tokens.warm_restarts >= 2 and b.tokens.prefills <= 2


@torch.inference_mode()
def test_warm_rows_take_turns_in_two_buffers(tiny_float32, monkeypatch):
    """Warm rows come and go twice a window: the layouts take turns in two cache buffers made
    when the stream opened (fresh memory costs its page faults: up to a second on a small VM
    for two stations), and the texts' cross-attention inputs are computed once, not again at
    every restart."""
    decoder = tiny_float32.decoder
    calls = []
    cross_kv = decoder.cross_kv
    monkeypatch.setattr(decoder, "cross_kv", lambda *a, **k: calls.append(1) or cross_kv(*a, **k))
    stream = tiny_float32.open_stream("harp", GREEDY, WINDOW)
    batch = stream.tokens._batch
    buffers, rows = set(), set()
    while stream.tokens.warm_restarts < 3:
        batch.step()
        buffers.add(tuple(t.data_ptr() for t in batch.cache._buffers.values()))
        rows.add(batch.cache.batch)
    assert rows == {2, 4}  # the stream's rows, and its warm copies beside them
    assert len(buffers) == 2
    assert len(calls) == 1  # the prompt's, when the stream opened
