"""Stations read together (`engine.model.read_together`: one batched codec decode per chunk)
hear what they hear read one by one."""

from __future__ import annotations

import numpy as np
import pytest

from engine import LoadOptions, MusicModel, SamplingOptions, WindowOptions, read_together

PROMPTS = ["slow jazz", "fast drum and bass", "rain"]


def _snr_db(ref: np.ndarray, x: np.ndarray) -> float:
    noise = float(((ref - x) ** 2).sum())
    return 10 * np.log10(float((ref**2).sum()) / max(noise, 1e-30))


def test_read_together_equals_reading_one_by_one(tiny_model_dir):
    model = MusicModel.load(
        LoadOptions(model=tiny_model_dir, device="cpu", dtype="float32", quantize="none")
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
        assert _snr_db(want, got) >= 120, i
    assert all(s.frame == 60 and s.decode_seconds > 0 for s in together)
    with pytest.raises(ValueError, match="frames"):
        read_together(together, 0)
