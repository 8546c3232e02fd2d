"""Stations read together (`engine.model.read_together`: one batched codec decode per chunk)
hear what they hear read one by one."""

from __future__ import annotations

import numpy as np
import pytest

from engine import LoadOptions, MusicModel, SamplingOptions, WindowOptions, read_together
from engine.token_stream import Interrupted

PROMPTS = ["slow jazz", "fast drum and bass", "rain"]


def _snr_db(ref: np.ndarray, x: np.ndarray) -> float:
    noise = float(((ref - x) ** 2).sum())
    return 10 * np.log10(float((ref**2).sum()) / max(noise, 1e-30))


@pytest.mark.parametrize(("codec", "least_db"), [("float32", 120.0), ("bfloat16", 35.0)])
def test_read_together_equals_reading_one_by_one(tiny_model_dir, codec, least_db):
    """Equal up to float rounding; with the codec's stack in bfloat16 (`model.codec`), up to
    its rounding (a batch may round otherwise than one stream; another stream's audio, or
    none, would be under 20 dB)."""
    model = MusicModel.load(
        LoadOptions(
            model=tiny_model_dir, device="cpu", dtype="float32", quantize="none", codec=codec
        )
    )
    window = WindowOptions(window=110, context=55)
    samplings = [SamplingOptions(greedy=True)] * len(PROMPTS)
    together = model.open_streams(PROMPTS, samplings, window)
    one_by_one = model.open_streams(PROMPTS, samplings, window)
    heard: list[list[np.ndarray]] = [[] for _ in PROMPTS]
    alone: list[list[np.ndarray]] = [[] for _ in PROMPTS]
    for _ in range(6):
        for i, pcm in enumerate(read_together(together, 10)):
            heard[i].append(pcm)
        for i, stream in enumerate(one_by_one):
            alone[i].append(stream.read(10))
    for i in range(len(PROMPTS)):
        got, want = np.concatenate(heard[i], axis=1), np.concatenate(alone[i], axis=1)
        assert got.shape == want.shape == (model.channels, 60 * model.hop)
        assert _snr_db(want, got) >= least_db, i
    assert all(s.frame == 60 and s.decode_seconds > 0 for s in together)
    with pytest.raises(ValueError, match="frames"):
        read_together(together, 0)


def test_an_interrupted_read_reads_nothing_and_the_next_goes_on(tiny_model_dir):
    """`interrupt` is asked before each decoder step; True stops the read (`Interrupted`)
    with no audio and the streams where they were; the steps made serve the next read, and the
    audio equals streams never interrupted (greedy), a lone stream and streams read together."""
    model = MusicModel.load(
        LoadOptions(model=tiny_model_dir, device="cpu", dtype="float32", quantize="none")
    )
    window = WindowOptions(window=110, context=55)
    greedy = SamplingOptions(greedy=True)
    asked = 0

    def after_four() -> bool:
        nonlocal asked
        asked += 1
        return asked > 4

    plain = model.open_stream(PROMPTS[0], greedy, window)
    want = np.concatenate([plain.read(10), plain.read(10)], axis=1)
    lone = model.open_stream(PROMPTS[0], greedy, window)
    first = lone.read(10)
    with pytest.raises(Interrupted):
        lone.read(10, after_four)
    assert lone.frame == 10 and asked == 5 and lone.tokens.complete > 10 + lone.codec.lookahead
    got = np.concatenate([first, lone.read(10, lambda: False)], axis=1)
    assert _snr_db(want, got) >= 120

    plain_pair = model.open_streams(PROMPTS[:2], [greedy] * 2, window)
    want_pair = read_together(plain_pair, 10)
    pair = model.open_streams(PROMPTS[:2], [greedy] * 2, window)
    asked = 0
    with pytest.raises(Interrupted):
        read_together(pair, 10, after_four)
    assert [s.frame for s in pair] == [0, 0] and asked == 5
    for w, g in zip(want_pair, read_together(pair, 10), strict=True):
        assert _snr_db(w, g) >= 120
