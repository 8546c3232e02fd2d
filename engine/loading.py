"""Loading a MusicGen checkpoint: weights and tokenizer with the settings `engine.settings`
resolves for them, and clear errors.

Any checkpoint that transformers' `MusicgenForConditionalGeneration.from_pretrained` loads
works: a hub id (`facebook/musicgen-small`, medium, large, the `-stereo-` variants), fetched into
the Hugging Face cache with progress bars, or a local folder (for example one written by `radio
tiny-model`). The files are read by `engine.checkpoint` and built into modules by
`engine.musicgen`, without importing transformers (~3 s of a start on a 2-core CPU). When the
weights cannot be had (offline, no cache), `ModelLoadError` says which model and the ways out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.checkpoint import CheckpointError, Config, fetch, read_config
from engine.options import LoadOptions
from engine.settings import Machine, Resolved, resolve

if TYPE_CHECKING:
    from engine.musicgen import MusicGen
log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do, in plain words."""


class SettingError(ModelLoadError):
    """A setting this machine or model cannot run (`engine.settings.resolve`): "key: why"."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.key, _, self.reason = message.partition(": ")  # key: a LoadOptions field


@dataclass
class LoadedModel:
    model: MusicGen  # eval mode, with its tokenizer
    name: str
    settings: Resolved  # the concrete device, dtype, weights, cache and step (`engine.settings`)

    @property
    def device(self) -> torch.device:
        return torch.device(self.settings.device)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.settings.dtype)


def _refuse_unsupported(name: str, config: Config | None) -> None:
    archs = (getattr(config, "architectures", None) or []) + [getattr(config, "model_type", "")]
    if "melody" in name.lower() or any("melody" in a.lower() for a in archs):
        raise ModelLoadError(
            f"{name} is a musicgen-melody checkpoint (chroma-conditioned, its own class in "
            "transformers); Endless Radio supports the text-only MusicGen models: "
            "facebook/musicgen-small, -medium, -large and their -stereo- variants"
        )


def _offline_message(name: str, err: Exception) -> str:
    return (
        f"could not load the MusicGen model {name!r}: it is not a local folder, its weights are "
        "not in the Hugging Face cache, and the hub could not be reached "
        f"({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}). Ways out:\n"
        "  - go online once so that the weights download (they are then cached), or\n"
        "  - pass a folder that holds the weights: --model /path/to/musicgen-small, or\n"
        "  - if they are cached already, set HF_HUB_OFFLINE=1 to skip the network, or\n"
        "  - for a demo without weights: radio tiny-model ./models/tiny && --model ./models/tiny"
    )


def _fetch(name: str, weights: bool = True) -> Path:
    """`engine.checkpoint.fetch`, its failures (offline without a cache, no such repository)
    said with the ways out."""
    try:
        return fetch(name, weights)
    except CheckpointError:  # the files came, and are not what they should be
        raise
    except (OSError, ValueError) as err:
        raise ModelLoadError(_offline_message(name, err)) from None


def load_model(options: LoadOptions, machine: Machine | None = None) -> LoadedModel:
    """Load weights and tokenizer with the settings `engine.settings.resolve` chooses for them
    on `machine` (default: this one, `Machine.probe`), logged in one line."""
    options.validate()
    name = options.model
    local = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not local.exists():
        raise ModelLoadError(f"model folder {name!r} does not exist")
    _refuse_unsupported(name, None)
    try:
        config = read_config(_fetch(name, weights=False))
        _refuse_unsupported(name, config)
        decoder = config.decoder
        head_dim = decoder.hidden_size // decoder.num_attention_heads
        try:  # before the weights: a setting that cannot run here is said at once
            settings = resolve(options, machine or Machine.probe(options), head_dim)
        except ValueError as err:
            raise SettingError(str(err)) from None
        log.info("loading MusicGen %s; engine: %s", name, settings.describe())
        log.debug("engine settings, and why:\n%s", settings.explain())
        folder = _fetch(name)
        from engine.musicgen import MusicGen

        model = MusicGen.load(folder, getattr(torch, settings.dtype), settings.device, config)
    except CheckpointError as err:
        raise ModelLoadError(f"{name!r}: {err}") from None
    log.info(
        "loaded %s: %d codebooks, %s, decoder %d layers x %d",
        name,
        decoder.num_codebooks,
        "stereo" if decoder.audio_channels == 2 else "mono",
        decoder.num_hidden_layers,
        decoder.hidden_size,
    )
    return LoadedModel(model, name, settings)
