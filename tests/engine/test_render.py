"""`radio render`: exact length, several windows, prompt changes, tokens out, clear errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from engine import LoadOptions, MusicModel, SamplingOptions, WindowOptions
from engine.render import PromptChange, render
from engine.wav import read_float_wav


def _radio(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "radio.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_render_cli_writes_exact_length_across_windows(tiny_model_dir, tmp_path):
    out, tokens = tmp_path / "out.wav", tmp_path / "tokens.npy"
    seconds = 7.3  # 365 frames: more than three 120-frame windows; not a whole frame count
    result = _radio(
        "render",
        "--model",
        tiny_model_dir,
        "--prompt",
        "slow jazz",
        "--seconds",
        str(seconds),
        "--out",
        str(out),
        "--seed",
        "3",
        "--window",
        "120",
        "--context",
        "60",
        "--tokens-out",
        str(tokens),
        "--change",
        "3.5:fast drums",
    )
    assert result.returncode == 0, result.stderr
    pcm, rate = read_float_wav(out)
    assert rate == 32000
    assert pcm.shape == (1, round(seconds * 32000))
    assert np.isfinite(pcm).all()
    assert float(np.abs(pcm).max()) > 0  # not silence
    codes = np.load(tokens)
    assert codes.shape == (365, 4)
    assert codes.min() >= 0 and codes.max() < 2048
    assert "prefills" in result.stdout and "rendering" in result.stderr  # tqdm progress bar


def test_render_matches_the_stream_tokens_greedy(tiny_model_dir, tmp_path):
    """Rendering goes through AudioStream.read: its tokens are the token stream's."""
    model = MusicModel.load(LoadOptions(model=tiny_model_dir, device="cpu", dtype="float32"))
    window = WindowOptions(window=120, context=60)
    sampling = SamplingOptions(greedy=True)
    result = render(model.open_stream("jazz", sampling, window), 4.0, tmp_path / "a.wav")
    again = model.open_stream("jazz", sampling, window)
    again.tokens.generate_until(200)
    assert np.array_equal(result.tokens, again.tokens.history()[0][:, :200].T.numpy())
    pcm, _ = read_float_wav(tmp_path / "a.wav")
    assert pcm.shape == (1, 4 * 32000)


def test_prompt_change_is_heard_from_the_asked_frame(tiny_model_dir, tmp_path):
    model = MusicModel.load(LoadOptions(model=tiny_model_dir, device="cpu", dtype="float32"))
    sampling = SamplingOptions(greedy=True)
    changed = render(
        model.open_stream("jazz", sampling),
        3.0,
        tmp_path / "b.wav",
        changes=[PromptChange(1.0, "heavy rock guitar")],
    )
    plain = render(model.open_stream("jazz", sampling), 3.0, tmp_path / "c.wav")
    assert changed.heard_at == [50]
    assert np.array_equal(changed.tokens[:50], plain.tokens[:50])  # before: untouched
    assert not np.array_equal(changed.tokens[50:], plain.tokens[50:])  # after: the new prompt


def test_stereo_render(tiny_stereo_dir, tmp_path):
    model = MusicModel.load(LoadOptions(model=tiny_stereo_dir, device="cpu", dtype="float32"))
    result = render(model.open_stream("jazz", SamplingOptions(seed=1)), 1.5, tmp_path / "s.wav")
    pcm, _ = read_float_wav(tmp_path / "s.wav")
    assert pcm.shape == (2, 48000) and result.tokens.shape == (75, 8)
    assert not np.allclose(pcm[0], pcm[1])  # two different channels


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seconds", "-1"], "--seconds"),
        (["--seconds", "2", "--change", "nonsense"], "AT_SECONDS:PROMPT"),
        (["--seconds", "2", "--change", "5:late"], "outside the render"),
        (["--seconds", "2", "--window", "100", "--context", "80"], "window"),
        (["--seconds", "2", "--guidance", "0.5"], "guidance_scale"),
        (["--seconds", "2", "--compile", "fast"], "compile: must be one of"),
    ],
)
def test_bad_render_flags_are_named(tiny_model_dir, tmp_path, args, message):
    result = _radio(
        "render",
        "--model",
        tiny_model_dir,
        "--prompt",
        "x",
        "--out",
        str(tmp_path / "x.wav"),
        *args,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_set_prompt_rewind_and_limits(tiny_model_dir):
    model = MusicModel.load(LoadOptions(model=tiny_model_dir, device="cpu", dtype="float32"))
    stream = model.open_stream("jazz", SamplingOptions(seed=0))
    stream.read(100)
    assert stream.set_prompt("rock", from_frame=80) == 80
    assert stream.frame == 80 and stream.prompt == "rock"
    assert stream.read(10).shape == (1, 6400)
    with pytest.raises(ValueError, match="frames before"):
        stream.set_prompt("x", from_frame=stream.frame - 600)
    with torch.inference_mode():
        stream.set_prompt("", from_frame=stream.frame)  # unconditional
    assert stream.read(5).shape == (1, 3200)
