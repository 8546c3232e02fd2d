"""Precision modes stay close to float32 (figures for the real shapes: bench/precision.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.precision import teacher_forced_logits
from engine import LoadOptions, MusicModel
from engine.decoder import Decoder
from engine.delay import codebook_delays, delayed_layout
from engine.musicgen import MusicGen


@pytest.mark.parametrize(
    ("dtype", "precision"), [(torch.float32, "int8"), (torch.bfloat16, "dense")]
)
def test_modes_stay_close_to_float32(tiny_model_dir, dtype, precision):
    ref_model = MusicGen.load(Path(tiny_model_dir))
    model = MusicGen.load(Path(tiny_model_dir), dtype)
    frames = torch.randint(0, 2048, (4, 64), generator=torch.Generator().manual_seed(0))
    ids = delayed_layout(frames, codebook_delays(4, 1), 61)
    ref = teacher_forced_logits(ref_model, Decoder(ref_model.decoder), ids)[:, 0]
    got = teacher_forced_logits(model, Decoder(model.decoder, precision), ids)[:, 0]
    diff = (got - ref).abs()
    assert diff.max() < 0.1 * ref.std(), (
        f"max abs diff {diff.max():.4f} vs logit std {ref.std():.4f}"
    )
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_int8_stream_reads_audio(tiny_model_dir):
    model = MusicModel.load(LoadOptions(model=tiny_model_dir, quantize="int8"))
    assert model.dtype == torch.float32 and model.decoder.precision == "int8"
    stream = model.open_stream("jazz")
    assert stream.read(20).shape == (1, 20 * 640)
    stream.set_prompt("rock", from_frame=10)  # a prefill
    assert stream.read(20).shape == (1, 20 * 640)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(quantize="int3"), "quantize: must be one of"),
        (dict(quantize="int8", dtype="bfloat16"), "activations in float32"),
        (dict(quantize="int8", device="cuda"), "CPU mode"),
    ],
)
def test_bad_precision_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        LoadOptions(**options).validate()
