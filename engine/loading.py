"""Loading a MusicGen checkpoint: device and dtype choice, weights, processor, clear errors.

Any checkpoint that `transformers` loads with `MusicgenForConditionalGeneration` works: a hub id
(`facebook/musicgen-small`, medium, large, the `-stereo-` variants) or a local folder (for
example one written by `radio tiny-model`). Downloads show the hub's progress bars. When the
weights cannot be had (offline, no cache), `ModelLoadError` says which model and the ways out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.options import LoadOptions

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do, in plain words."""


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bfloat16 matrix math (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {requested!r} was asked for, but no CUDA device is available")
    return device


def choose_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda" or cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def choose_quantize(options: LoadOptions, device: torch.device) -> str:
    """ "auto": int8 decoder weights on a CPU when no float dtype was asked for (see the README's
    precision table: 3x faster than bfloat16 for a logit error of a few percent), none on a GPU."""
    if options.quantize != "auto":
        return options.quantize
    return "int8" if device.type == "cpu" and options.dtype == "auto" else "none"


def choose_compile(options: LoadOptions, device: torch.device) -> str:
    """ "auto": the decoder step compiled with CUDA graphs on a GPU (where launching kernels
    bounds it), eager on a CPU (bound by reading weights; torch.compile does not trace the
    default int8 kernels there)."""
    if options.compile == "auto":
        return "graphs" if device.type == "cuda" else "none"
    if options.compile == "graphs" and device.type != "cuda":
        raise ModelLoadError(
            f"compile graphs needs a CUDA device, but the model would load on {device}"
        )
    return options.compile


@dataclass
class LoadedModel:
    model: object  # transformers MusicgenForConditionalGeneration, eval mode
    processor: object  # transformers MusicgenProcessor (tokenizer + feature extractor)
    device: torch.device
    dtype: torch.dtype
    name: str
    quantize: str = "none"
    compile: str = "none"  # the decoder step: "none", "compile" or "graphs" (`engine.static_step`)
    kv_cache: str = "auto"  # the KV cache dtype (`Decoder._choose_kv_cache`)


def _refuse_unsupported(name: str, config) -> None:
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


def load_model(options: LoadOptions) -> LoadedModel:
    """Load weights and processor, put them on the chosen device in the chosen dtype."""
    from transformers import AutoConfig, AutoProcessor, MusicgenForConditionalGeneration

    options.validate()
    device = choose_device(options.device)
    quantize = choose_quantize(options, device)
    compile_mode = choose_compile(options, device)
    quantized = quantize != "none"
    if quantized and device.type != "cpu":
        raise ModelLoadError(
            f"quantize {quantize} is a CPU mode, but the model would load on {device}"
        )
    if quantize.startswith("int4"):  # say it before loading the weights, not after
        from engine.kernels import int4

        if (reason := int4.unavailable_reason()) is not None:
            raise ModelLoadError(
                f"quantize {quantize} needs our int4 CPU kernel (AVX2, FMA, F16C and a C++ "
                f"compiler), which cannot run here: {reason}; use quantize int8"
            )
    dtype = torch.float32 if quantized else choose_dtype(options.dtype, device)
    name = options.model
    local = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not local.exists():
        raise ModelLoadError(f"model folder {name!r} does not exist")
    source = str(local) if local.exists() else name
    if "melody" in name.lower():
        _refuse_unsupported(name, None)
    precision = f"{quantize} weights" if quantized else str(dtype).removeprefix("torch.")
    log.info("loading MusicGen %s on %s in %s", name, device, precision)
    try:
        config = AutoConfig.from_pretrained(source)
        _refuse_unsupported(name, config)
        model = MusicgenForConditionalGeneration.from_pretrained(source, dtype=dtype)
        processor = AutoProcessor.from_pretrained(source)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as err:
        # transformers raises OSError (offline, missing files) or ValueError (wrong model type).
        if isinstance(err, ValueError) and "musicgen" not in str(err).lower():
            raise ModelLoadError(f"{name!r} is not a MusicGen checkpoint: {err}") from None
        raise ModelLoadError(_offline_message(name, err)) from None
    model = model.to(device).eval()
    # The codec stays in float32: it is cheap, and bf16 audio decoding costs quality for nothing.
    model.audio_encoder.to(torch.float32)
    log.info(
        "loaded %s: %d codebooks, %s, decoder %d layers x %d",
        name,
        model.decoder.config.num_codebooks,
        "stereo" if model.decoder.config.audio_channels == 2 else "mono",
        model.decoder.config.num_hidden_layers,
        model.decoder.config.hidden_size,
    )
    kv_cache = choose_kv_cache(options, compile_mode, device)
    return LoadedModel(model, processor, device, dtype, name, quantize, compile_mode, kv_cache)


def choose_kv_cache(options: LoadOptions, compile_mode: str, device: torch.device) -> str:
    """ "auto" under a compiled step, which reads the cache as a float tensor (no int8 cache under
    it): bfloat16 where our CPU kernels attend to it (or on a GPU), else float32, the cache
    PyTorch's CPU attention is fast on. Otherwise the decoder chooses (`_choose_kv_cache`)."""
    if options.kv_cache != "auto" or compile_mode == "none":
        return options.kv_cache
    if device.type == "cpu":
        from engine import kernels

        if kernels.get() is None:
            return "float32"
    return "bfloat16"
