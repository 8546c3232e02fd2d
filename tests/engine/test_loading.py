"""Loading: device and dtype choice, local folders, and clear refusals instead of tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from engine import LoadOptions, ModelLoadError, MusicModel
from engine.load_thread import Loading, load_in_thread
from engine.settings import Machine, cpu_has_fast_bf16, resolve


def test_auto_device_and_dtype_on_this_machine():
    options = LoadOptions(quantize="none")
    settings = resolve(options, Machine.probe(options), head_dim=64)
    cuda = torch.cuda.is_available()
    assert settings.device == ("cuda" if cuda else "cpu")
    assert settings.dtype == ("bfloat16" if cuda or cpu_has_fast_bf16() else "float32")
    options = LoadOptions(quantize="none", dtype="float32")
    assert resolve(options, Machine.probe(options), head_dim=64).dtype == "float32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="device: cuda was asked for, but no CUDA device"):
        MusicModel.load(LoadOptions(model=tiny_model_dir, device="cuda", dtype="float32"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("device", "tpu", "device:"),
        ("dtype", "float8", "dtype:"),
        ("model", "", "model:"),
        ("codec", "int8", "codec: must be one of"),
    ],
)
def test_bad_load_options_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        LoadOptions(**{field: value}).validate()


def test_local_folder_loads_with_the_chosen_dtype(tiny_model_dir):
    model = MusicModel.load(LoadOptions(model=tiny_model_dir, device="cpu", dtype="bfloat16"))
    assert model.dtype == torch.bfloat16
    assert model.decoder.dtype == torch.bfloat16
    codec = model.musicgen.audio_encoder
    assert {p.dtype for p in codec.parameters()} == {torch.float32}  # the codec stays float32
    assert (model.sample_rate, model.channels, model.frame_rate, model.hop) == (32000, 1, 50, 640)
    pcm = model.open_stream("jazz").read(10)
    assert pcm.shape == (1, 6400) and pcm.dtype.name == "float32"


@pytest.mark.parametrize(
    ("codec", "dtype"), [("float32", torch.float32), ("bfloat16", torch.bfloat16)]
)
def test_the_streams_codec_upsamples_in_the_chosen_dtype(tiny_model_dir, codec, dtype):
    """model.codec reaches every stream's codec decoder (its upsampling stack), and the audio
    is float32 either way."""
    model = MusicModel.load(LoadOptions(model=tiny_model_dir, device="cpu", codec=codec))
    assert model.loaded.settings.codec == codec
    stream = model.open_stream("jazz")
    assert stream.codec.upsample_dtype == dtype
    assert model.new_codec("float32").upsample_dtype == torch.float32
    pcm = stream.read(10)
    assert pcm.shape == (1, 6400) and pcm.dtype.name == "float32"


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        MusicModel.load(LoadOptions(model=str(tmp_path / "nope")))


def test_melody_is_refused_clearly():
    with pytest.raises(ModelLoadError, match="musicgen-melody"):
        MusicModel.load(LoadOptions(model="facebook/musicgen-melody"))


def test_offline_without_weights_says_the_ways_out(tmp_path):
    """No network, no cache: one message naming the model and the ways out, no traceback."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "radio.cli", "render", "--prompt", "x", "--seconds", "1"]
    cmd += ["--out", str(tmp_path / "x.wav"), "--model", "facebook/musicgen-small"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "facebook/musicgen-small" in result.stderr
    for way_out in ("--model", "HF_HUB_OFFLINE", "radio tiny-model"):
        assert way_out in result.stderr


def test_load_in_thread_leaves_the_calling_thread_without_torch_work(tiny_model_dir, tmp_path):
    """`radio serve` loads this way: the model comes back ready, a failure is raised here, and
    the loading thread (with its OpenMP team) is gone."""
    import threading

    loading = Loading(LoadOptions(model=tiny_model_dir, device="cpu"))  # the caller goes on
    model = loading.result()
    assert loading.result() is model
    assert model.open_stream("jazz").read(5).shape == (1, 5 * 640)
    assert not any(t.name == "model-load" for t in threading.enumerate())
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_in_thread(LoadOptions(model=str(tmp_path / "nowhere")))
