"""Our own checkpoint reading (`engine.checkpoint`, `engine.musicgen`, `engine.t5`,
`engine.encodec`) against transformers' `from_pretrained` of the same folder: the same token
ids, text states, codec codes and audio, and decoder weights; older weight-norm names; clear
errors for folders that are not a MusicGen; and no transformers import on the way."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint import CheckpointError, read_config, read_weights
from engine.musicgen import MusicGen, sinusoids
from tests.engine.reference import transformers_model

PROMPTS = ["slow rainy-day jazz", "Fast DRUMS & bass, 120 bpm!", "é ü 漢字", "a"]


@pytest.fixture(scope="module", params=["mono", "stereo"])
def both(request, tiny_model_dir, tiny_stereo_dir):
    folder = tiny_model_dir if request.param == "mono" else tiny_stereo_dir
    hf, processor = transformers_model(folder)
    return hf, processor, MusicGen.load(Path(folder))


@torch.inference_mode()
def test_tokens_and_text_states_equal_transformers(both):
    hf, processor, ours = both
    assert ours.tokenizer is not None
    for text in PROMPTS:
        inputs = processor(text=[text], return_tensors="pt", padding=True)
        assert ours.tokenizer.ids(text) == inputs["input_ids"][0].tolist(), text
        want = hf.text_encoder(**inputs).last_hidden_state
        got = ours.text_encoder(inputs["input_ids"], inputs["attention_mask"])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # a padded batch: the mask keeps the padding out of the shorter row
    inputs = processor(text=["jazz", "slow rainy day piano"], return_tensors="pt", padding=True)
    assert not bool(inputs["attention_mask"].all())
    want = hf.text_encoder(**inputs).last_hidden_state
    got = ours.text_encoder(inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.enc_to_dec_proj.weight, hf.enc_to_dec_proj.weight)


@torch.inference_mode()
def test_float16_text_states_stay_finite_as_transformers_do(tiny_model_dir):
    """A float16 model (a GPU's option): where T5's residual stream passes float16's range
    (here forced, its feed-forward outputs scaled up), the states are clamped as transformers'
    T5 clamps them: finite, and equal to its own."""
    from transformers import AutoProcessor, MusicgenForConditionalGeneration

    hf = MusicgenForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float16)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    ours = MusicGen.load(Path(tiny_model_dir), dtype=torch.float16)
    for encoder in (hf.text_encoder.encoder, ours.text_encoder.encoder):
        for block in encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(1e5)
    inputs = processor(text=["slow rainy-day jazz"], return_tensors="pt", padding=True)
    want = hf.eval().text_encoder(**inputs).last_hidden_state
    got = ours.text_encoder(inputs["input_ids"], inputs["attention_mask"])
    assert got.dtype == torch.float16 and bool(torch.isfinite(want).all())
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-2)


@torch.inference_mode()
def test_codec_codes_and_audio_equal_transformers(both):
    hf, _, ours = both
    audio = torch.randn(1, 1, 32000, generator=torch.Generator().manual_seed(0)) * 0.3
    want = hf.audio_encoder.encode(audio).audio_codes
    got = ours.audio_encoder.encode(audio).audio_codes
    assert got.shape == want.shape == (1, 1, 4, 50)
    assert torch.equal(got, want)
    want_audio = hf.audio_encoder.decode(want, [None]).audio_values
    got_audio = ours.audio_encoder.decode(want).audio_values
    assert got_audio.shape == want_audio.shape == (1, 1, 32000)
    torch.testing.assert_close(got_audio, want_audio, rtol=0, atol=1e-6)


def test_decoder_weights_and_positions_equal_transformers(both):
    hf, _, ours = both
    want, got = hf.decoder.state_dict(), ours.decoder.state_dict()
    assert set(got) == set(want) - {"model.decoder.embed_positions.weights"}
    for name, tensor in got.items():
        assert torch.equal(tensor, want[name]), name
    positions = hf.decoder.model.decoder.embed_positions.weights
    assert torch.equal(ours.decoder.model.decoder.embed_positions.weights, positions)
    assert torch.equal(sinusoids(*positions.shape), positions)


def test_dtype_applies_to_text_and_decoder_not_the_codec(tiny_model_dir):
    model = MusicGen.load(Path(tiny_model_dir), torch.bfloat16)
    assert model.decoder.dtype == torch.bfloat16
    assert model.text_encoder.shared.weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.audio_encoder.parameters()} == {torch.float32}
    assert all(not p.requires_grad for p in model.parameters())


def test_older_weight_norm_names_fold_to_the_same_weights(tiny_model_dir, tmp_path):
    """transformers before 4.4x saved EnCodec's weight norm as weight_g / weight_v."""
    folder = tmp_path / "old"
    shutil.copytree(tiny_model_dir, folder)
    state = load_file(folder / "model.safetensors")
    renamed = {}
    for key, tensor in state.items():
        key = key.replace(".parametrizations.weight.original0", ".weight_g")
        renamed[key.replace(".parametrizations.weight.original1", ".weight_v")] = tensor
    assert any(k.endswith(".weight_g") for k in renamed)
    save_file(renamed, folder / "model.safetensors")
    new, old = read_weights(Path(tiny_model_dir)), read_weights(folder)
    assert new.keys() == old.keys()
    assert all(torch.equal(new[k], old[k]) for k in new)


def test_a_folder_that_is_not_musicgen_is_named(tiny_model_dir, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type is 'bert'"):
        read_config(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        MusicGen.load(folder)
    state = load_file(Path(tiny_model_dir) / "model.safetensors")
    save_file(
        {k: v for k, v in state.items() if "lm_heads.3" not in k}, folder / "model.safetensors"
    )
    with pytest.raises(CheckpointError, match=r"lack decoder\.lm_heads\.3\.weight"):
        MusicGen.load(folder)
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json cannot be read as a tokenizer"):
        MusicGen.load(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        MusicGen.load(folder)
    whole = (Path(tiny_model_dir) / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(whole[: len(whole) // 2])  # a cut download
    with pytest.raises(CheckpointError, match="model.safetensors cannot be read"):
        read_weights(folder)


def test_the_engine_loads_without_importing_transformers_or_dynamo(tiny_model_dir):
    """What a radio's start does not spend: transformers' import (~3 s on a 2-core CPU) and
    `torch._dynamo`'s (~1.7 s; PyTorch imports it for maths on the meta device)."""
    code = (
        "import sys; from engine import LoadOptions, MusicModel; "
        f"m = MusicModel.load(LoadOptions(model={tiny_model_dir!r}, device='cpu')); "
        "m.open_stream('jazz').read(5); "
        "print(sorted({n.split('.')[0] for n in sys.modules if n.startswith('transformers')} | "
        "{'torch._dynamo' for n in sys.modules if n.startswith('torch._dynamo')}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _hub_cache(tiny_model_dir: str, home: Path, repo_id: str) -> Path:
    """`tiny_model_dir` as a hub repo's snapshot in huggingface_hub's cache layout under `home`
    (as transformers or an earlier run leaves it); returns the snapshot folder."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(tiny_model_dir, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return repo / "snapshots" / "0123abcd"


def _offline(code: str, home: Path) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )


def test_a_hub_id_loads_from_the_hugging_face_cache_offline(tiny_model_dir, tmp_path):
    """A hub id whose files are in the cache (as transformers or an earlier run left them) loads
    with HF_HUB_OFFLINE=1: the cache layout is huggingface_hub's, shared with transformers."""
    _hub_cache(tiny_model_dir, tmp_path / "hf", "someone/musicgen-tiny")
    code = (
        "from engine import LoadOptions, MusicModel; "
        "m = MusicModel.load(LoadOptions(model='someone/musicgen-tiny', device='cpu')); "
        "print(m.name, m.open_stream('jazz').read(5).shape)"
    )
    out = _offline(code, tmp_path / "hf")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "someone/musicgen-tiny (1, 3200)"


def test_a_hub_repo_that_is_not_musicgen_is_named_not_called_offline(tiny_model_dir, tmp_path):
    snapshot = _hub_cache(tiny_model_dir, tmp_path / "hf", "someone/bert-tiny")
    config = json.loads((snapshot / "config.json").read_text())
    (snapshot / "config.json").write_text(json.dumps(config | {"model_type": "bert"}))
    code = (
        "from engine import LoadOptions, MusicModel, ModelLoadError\n"
        "try:\n"
        "    MusicModel.load(LoadOptions(model='someone/bert-tiny', device='cpu'))\n"
        "except ModelLoadError as err:\n"
        "    print(err)"
    )
    out = _offline(code, tmp_path / "hf")
    assert out.returncode == 0, out.stderr
    assert "model_type is 'bert'" in out.stdout and "could not load" not in out.stdout


@pytest.mark.parametrize("form", ["shards", "pytorch_model.bin", "pickled shards"])
def test_sharded_and_pickled_weights_read_the_same(tiny_model_dir, tmp_path, form):
    """The larger checkpoints come in safetensors shards with an index; older ones as a pickle."""
    folder = tmp_path / form
    shutil.copytree(tiny_model_dir, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    if form == "pytorch_model.bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        prefix, suffix = ("model", "safetensors") if form == "shards" else ("pytorch_model", "bin")
        names = sorted(state)
        halves = {f"{prefix}-00001-of-00002.{suffix}": names[::2]}
        halves[f"{prefix}-00002-of-00002.{suffix}"] = names[1::2]
        for file, keys in halves.items():
            part = {k: state[k] for k in keys}
            if suffix == "safetensors":
                save_file(part, folder / file)
            else:
                torch.save(part, folder / file)
        weight_map = {k: file for file, keys in halves.items() for k in keys}
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / f"{prefix}.{suffix}.index.json").write_text(json.dumps(index))
    want, got = read_weights(Path(tiny_model_dir)), read_weights(folder)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert MusicGen.load(folder).decoder.lm_heads[0].weight.shape == (2048, 64)


def test_the_cli_names_a_folder_that_is_not_musicgen(tiny_model_dir, tmp_path):
    folder = tmp_path / "bert"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "bert"}))
    cmd = [sys.executable, "-m", "radio.cli", "render", "--prompt", "x", "--seconds", "1"]
    cmd += ["--out", str(tmp_path / "x.wav"), "--model", str(folder)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "model_type is 'bert'" in result.stderr and str(folder) in result.stderr
