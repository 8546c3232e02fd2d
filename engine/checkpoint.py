"""A MusicGen checkpoint's files, read without `transformers`: its config and its weights.

A checkpoint is a folder as `save_pretrained` writes it (`config.json`, `model.safetensors` or
its shards with `model.safetensors.index.json`, or `pytorch_model.bin`, and `tokenizer.json`),
given as a local path or as a hub id, which `huggingface_hub` fetches into the same cache
`transformers` uses (progress bars while it downloads; `HF_HUB_OFFLINE=1` reads the cache only).

Why not `from_pretrained`: importing transformers' MusicGen code takes ~3 s (its model base class
pulls in `torch._dynamo`, distributed tensors and every loss function) before a byte is read,
more than half the start of `radio serve` on a 2-core CPU. The files are plain: this module
reads them in a few dozen lines, and `engine.musicgen` builds the modules.

Names are transformers': a checkpoint saved by any version loads, the weight-normalised convs of
EnCodec either as `weight_g`/`weight_v` (older saves) or as `parametrizations.weight.original0`
/`original1` (newer), folded here into plain weights (the codec never trains).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
# what a hub download fetches: the config, the tokenizer and one form of the weights
HUB_FILES = [CONFIG, TOKENIZER, "*.safetensors", SAFETENSORS_INDEX]
HUB_FILES_BIN = [CONFIG, TOKENIZER, "pytorch_model*.bin", PYTORCH_INDEX]

# Weight norm, as either version of transformers saves it: (gain suffix, direction suffix).
_WEIGHT_NORM = (
    (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
    (".weight_g", ".weight_v"),
)
# Saved but not read: the T5 embedding tied to `shared`, the decoder's sinusoidal positions
# (computed), and the EnCodec codebooks' training statistics.
_UNUSED = (
    "text_encoder.encoder.embed_tokens.weight",
    "decoder.model.decoder.embed_positions.weights",
    ".codebook.inited",
    ".codebook.cluster_size",
    ".codebook.embed_avg",
)


# transformers' defaults of the config keys the engine reads: a config.json saved as a diff
# against them leaves them out
DEFAULTS: dict[str, dict[str, Any]] = {
    "text_encoder": dict(
        vocab_size=32128,
        d_model=512,
        d_kv=64,
        d_ff=2048,
        num_layers=6,
        num_heads=8,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="relu",
    ),
    "audio_encoder": dict(
        target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0],
        sampling_rate=24000,
        audio_channels=1,
        normalize=False,
        chunk_length_s=None,
        hidden_size=128,
        num_filters=32,
        num_residual_layers=1,
        upsampling_ratios=[8, 5, 4, 2],
        norm_type="weight_norm",
        kernel_size=7,
        last_kernel_size=7,
        residual_kernel_size=3,
        dilation_growth_rate=2,
        use_causal_conv=True,
        pad_mode="reflect",
        compress=2,
        num_lstm_layers=2,
        trim_right_ratio=1.0,
        codebook_size=1024,
        codebook_dim=None,
        use_conv_shortcut=True,
    ),
    "decoder": dict(
        vocab_size=2048,
        max_position_embeddings=2048,
        num_hidden_layers=24,
        ffn_dim=4096,
        num_attention_heads=16,
        activation_function="gelu",
        hidden_size=1024,
        num_codebooks=4,
        audio_channels=1,
        scale_embedding=False,
    ),
}


class CheckpointError(ValueError):
    """The folder is not a MusicGen checkpoint this engine reads; the message says why."""


class Config(SimpleNamespace):
    """A config.json as attributes (`config.decoder.hidden_size`), its sections nested, with the
    values transformers derives from the saved ones (EnCodec's frame rate and codebook count)."""

    @classmethod
    def of(cls, values: dict[str, Any]) -> Config:
        return cls(**{k: cls.of(v) if isinstance(v, dict) else v for k, v in values.items()})


def read_config(folder: Path) -> Config:
    """The checkpoint's config, checked to be a text-conditioned MusicGen."""
    path = folder / CONFIG
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no {CONFIG}: not a saved model folder") from None
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read as JSON: {err}") from None
    kind = values.get("model_type")
    if kind != "musicgen":
        raise CheckpointError(
            f"{folder}'s model_type is {kind!r}: Endless Radio reads the text-only MusicGen "
            "models (facebook/musicgen-small, -medium, -large and their -stereo- variants)"
        )
    for section in ("text_encoder", "audio_encoder", "decoder"):
        if not isinstance(values.get(section), dict):
            raise CheckpointError(f"{path} has no {section!r} section")
    for section, defaults in DEFAULTS.items():
        values[section] = defaults | values[section]
    config = Config.of(values)
    text = config.text_encoder
    if not hasattr(text, "dense_act_fn"):  # as T5Config derives it
        kind = text.feed_forward_proj.split("-")[-1]
        text.dense_act_fn = "gelu_new" if text.feed_forward_proj == "gated-gelu" else kind
    codec = config.audio_encoder
    if codec.codebook_dim is None:
        codec.codebook_dim = codec.hidden_size
    hop = math.prod(codec.upsampling_ratios)
    codec.hop_length = hop
    codec.frame_rate = math.ceil(codec.sampling_rate / hop)
    # transformers' EncodecConfig.num_quantizers: the codebooks the largest bandwidth needs
    codec.num_quantizers = int(1000 * codec.target_bandwidths[-1] // (codec.frame_rate * 10))
    return config


def fetch(name: str, weights: bool = True) -> Path:
    """A local folder as it is, or a hub id's snapshot: from the cache, else downloaded (with
    progress bars); the safetensors weights when the repository has them, else its
    `pytorch_model.bin`. `weights=False`: the config alone (to check it before gigabytes come).
    Raises what `huggingface_hub` raises when it cannot (offline, no cache): an `OSError` or a
    `ValueError`."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    if not weights:
        return Path(snapshot_download(name, allow_patterns=[CONFIG]))
    folder = Path(snapshot_download(name, allow_patterns=HUB_FILES))
    if not _weight_files(folder):
        folder = Path(snapshot_download(name, allow_patterns=HUB_FILES_BIN))
    return folder


def _weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: one safetensors file or its shards, else one pickle or
    its shards (each form's index names its shards)."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (PYTORCH_BIN, PYTORCH_INDEX)):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            try:
                shards = json.loads((folder / index).read_text())["weight_map"].values()
            except (OSError, ValueError, KeyError, AttributeError) as err:
                raise CheckpointError(f"{folder / index} cannot be read: {err!r}") from None
            return [folder / name for name in sorted(set(shards))]
    return []


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint by its transformers name, on the CPU in its saved dtype,
    weight norm folded and the unused ones left out."""
    files = _weight_files(folder)
    if not files:
        raise CheckpointError(
            f"{folder} has no weights ({SAFETENSORS} or {PYTORCH_BIN}, or their shards' index)"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                state.update(load_file(path))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except (OSError, RuntimeError, ValueError, SafetensorError) as err:
            # a truncated download, a shard the index names but the folder lacks, a pickle
            # that is not plain tensors
            raise CheckpointError(f"{path} cannot be read: {err}") from None
    return _fold_weight_norm({k: v for k, v in state.items() if not k.endswith(_UNUSED)})


def _fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`g * v / |v|` (the norm over all but the first dim, as `weight_norm(dim=0)`) in place of
    each (g, v) pair, named `<module>.weight`."""
    for gain_suffix, direction_suffix in _WEIGHT_NORM:
        for key in [k for k in state if k.endswith(gain_suffix)]:
            module = key.removesuffix(gain_suffix)
            g = state.pop(key).float()
            v = state.pop(module + direction_suffix).float()
            norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
            state[module + ".weight"] = g * v / norm
    return state
