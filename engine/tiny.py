"""Random-weight MusicGen checkpoints that the project builds itself.

Weights cannot be downloaded everywhere (CI, offline demos), so tests and benchmarks use a
MusicGen written here: the same classes as the real model, saved with `save_pretrained` next to
a small T5 tokenizer and the EnCodec feature extractor, so that
`MusicgenForConditionalGeneration.from_pretrained(DIR)` and `AutoProcessor.from_pretrained(DIR)`
load it offline exactly like a hub checkpoint.

- `size="tiny"`: a few hundred thousand parameters, for fast CPU tests.
- `size="small"`: the exact musicgen-small shapes (decoder 24 x 1024, T5-base text encoder,
  EnCodec 32 kHz), for benchmarks that must cost what the real model costs.

Random weights make noise, not music.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import (
        EncodecConfig,
        EncodecModel,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        T5Config,
    )

SIZES = ("tiny", "small")

# 4 codebooks x 11 bits x 50 Hz = 2.2 kbps: the bandwidth that gives MusicGen's 4 codebooks.
_ENCODEC_32KHZ = dict(
    sampling_rate=32000,
    audio_channels=1,
    codebook_size=2048,
    target_bandwidths=[2.2],
    upsampling_ratios=[8, 5, 4, 4],
    use_causal_conv=False,
    use_conv_shortcut=False,
    normalize=False,
    pad_mode="reflect",
    num_lstm_layers=2,
)


def _tokenizer_vocab() -> list[tuple[str, float]]:
    """A small Unigram vocabulary: specials, then every lower-case letter, digit and punctuation
    mark with and without the word-start marker, then a few whole words."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    chars = string.ascii_lowercase + string.digits + string.punctuation
    pieces += [("\u2581" + c, -2.0) for c in chars]
    pieces += [(c, -3.0) for c in chars]
    pieces += [("\u2581", -4.0)]
    words = "jazz rock pop slow fast piano drums guitar bass synth ambient rain day night lofi beat"
    pieces += [("\u2581" + w, -1.0) for w in words.split()]
    return pieces


def _configs(
    size: str, stereo: bool, decoder_config: dict[str, Any] | None = None
) -> tuple[T5Config, EncodecConfig, MusicgenDecoderConfig]:
    from transformers import EncodecConfig, MusicgenDecoderConfig, T5Config

    codebooks = 8 if stereo else 4
    channels = 2 if stereo else 1
    vocab = len(_tokenizer_vocab()) + 100  # T5Tokenizer adds 100 sentinel ids
    if size == "small":
        decoder = MusicgenDecoderConfig(num_codebooks=codebooks, audio_channels=channels)
        text = T5Config(
            vocab_size=32128, d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64
        )
        codec = EncodecConfig(**_ENCODEC_32KHZ, codebook_dim=128, hidden_size=128, num_filters=64)
    elif size == "tiny":
        decoder = MusicgenDecoderConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=128,
            num_codebooks=codebooks,
            audio_channels=channels,
        )
        text = T5Config(vocab_size=vocab, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8)
        codec = EncodecConfig(**_ENCODEC_32KHZ, codebook_dim=16, hidden_size=16, num_filters=4)
    else:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    for key, value in (decoder_config or {}).items():
        setattr(decoder, key, value)
    return text, codec, decoder


@torch.no_grad()
def _randomize_codebooks(codec: EncodecModel) -> None:
    """EnCodec's codebooks are buffers that training fills (k-means, then EMA); a fresh model
    has them all zero, which would decode every token to the same sound. Draw them instead."""
    for layer in codec.quantizer.layers:
        book = layer.codebook
        book.embed.normal_()
        book.embed_avg.copy_(book.embed)
        book.cluster_size.fill_(1.0)


def build_tiny_model(
    out_dir: str | Path,
    *,
    size: str = "tiny",
    stereo: bool = False,
    seed: int = 0,
    decoder_config: dict[str, Any] | None = None,
) -> MusicgenForConditionalGeneration:
    """Write a random-weight MusicGen (weights, configs, tokenizer, processor) to `out_dir`.
    `decoder_config`: decoder settings over the size's (tests: e.g. heads of 64 at tiny cost).

    Returns the model, still in memory, for callers that want to use it at once.
    """
    from transformers import (
        EncodecFeatureExtractor,
        GenerationConfig,
        MusicgenConfig,
        MusicgenForConditionalGeneration,
        MusicgenProcessor,
        T5Tokenizer,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text, codec, decoder = _configs(size, stereo, decoder_config)
    torch.manual_seed(seed)
    config = MusicgenConfig(text_encoder=text, audio_encoder=codec, decoder=decoder)
    model = MusicgenForConditionalGeneration(config).eval()
    _randomize_codebooks(model.audio_encoder)
    # Same generation defaults as the published checkpoints.
    model.generation_config = GenerationConfig(
        do_sample=True,
        guidance_scale=3.0,
        max_length=1500,
        top_k=250,
        pad_token_id=2048,
        bos_token_id=2048,
        decoder_start_token_id=2048,
    )
    model.save_pretrained(out)

    tokenizer = T5Tokenizer(vocab=_tokenizer_vocab(), extra_ids=100)
    extractor = EncodecFeatureExtractor(feature_size=1, sampling_rate=32000, padding_value=0.0)
    MusicgenProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out)
    return model
