"""A MusicGen checkpoint as modules, built without `transformers`.

`MusicGen.load(folder, dtype, device)` reads the folder (`engine.checkpoint`) into the module
tree of transformers' `MusicgenForConditionalGeneration`, same names and shapes:

    text_encoder    T5 encoder (`engine.t5`)          prompt ids -> text states
    enc_to_dec_proj Linear (when the widths differ)   text states -> the decoder's width
    decoder         .model.decoder (embeddings, layers, final norm), .lm_heads, .config
    audio_encoder   EnCodec (`engine.encodec`), float32

The decoder's modules hold weights only: `engine.decoder.Decoder` runs them (its step, our
kernels). The modules are made on the meta device and take the checkpoint's tensors as they are
(no random init, no copy), then the dtype and device chosen at load.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from engine.checkpoint import CONFIG, TOKENIZER, CheckpointError, Config, read_config, read_weights
from engine.encodec import Encodec
from engine.t5 import Linear as TextLinear
from engine.t5 import T5Encoder, Tokenizer, embedding


def sinusoids(positions: int, width: int) -> torch.Tensor:
    """MusicGen's position embeddings [positions, width]: cosines, then sines, of the position
    times geometric frequencies from 1 to 1/10000."""
    half = width // 2
    rates = torch.exp(torch.arange(half).float() * -(math.log(10000) / (half - 1)))
    angles = torch.arange(positions).float()[:, None] * rates[None]
    table = torch.cat([angles.cos(), angles.sin()], dim=1)
    if width % 2:
        table = torch.cat([table, torch.zeros(positions, 1)], dim=1)
    return table


class Attention(nn.Module):
    def __init__(self, width: int, width_in: int | None = None) -> None:
        super().__init__()
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width_in or width, width, bias=False)
        self.v_proj = nn.Linear(width_in or width, width, bias=False)
        self.out_proj = nn.Linear(width, width, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        width = config.hidden_size
        if config.activation_function != "gelu":
            raise CheckpointError(
                f"decoder: activation {config.activation_function!r}, expected MusicGen's gelu"
            )
        self.activation_fn = nn.GELU()
        self.self_attn = Attention(width)
        self.self_attn_layer_norm = nn.LayerNorm(width)
        self.encoder_attn = Attention(width)
        self.encoder_attn_layer_norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, config.ffn_dim, bias=False)
        self.fc2 = nn.Linear(config.ffn_dim, width, bias=False)
        self.final_layer_norm = nn.LayerNorm(width)


class Positions(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        # filled by `MusicGen.load` (`sinusoids`), outside the meta device: maths there runs
        # through PyTorch's reference ops, which import `torch._dynamo` (1.7 s of a start)
        table = torch.empty(config.max_position_embeddings, config.hidden_size)
        self.register_buffer("weights", table, persistent=False)


class DecoderStack(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        if config.scale_embedding:
            raise CheckpointError("decoder: scale_embedding is not MusicGen's")
        width = config.hidden_size
        self.embed_tokens = nn.ModuleList(
            [embedding(config.vocab_size + 1, width) for _ in range(config.num_codebooks)]
        )
        self.embed_positions = Positions(config)
        self.layers = nn.ModuleList([DecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.layer_norm = nn.LayerNorm(width)


class _Model(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.decoder = DecoderStack(config)


class MusicgenDecoder(nn.Module):
    """`MusicgenForCausalLM`'s weights: `.model.decoder`, `.lm_heads` (one per codebook)."""

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.config = config
        self.model = _Model(config)
        self.lm_heads = nn.ModuleList(
            [
                nn.Linear(config.hidden_size, config.vocab_size, bias=False)
                for _ in range(config.num_codebooks)
            ]
        )

    @property
    def device(self) -> torch.device:
        return self.lm_heads[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_heads[0].weight.dtype


class MusicGen(nn.Module):
    """A text-conditioned MusicGen's modules and tokenizer (see the module's docstring)."""

    def __init__(self, config: Config, tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.text_encoder = T5Encoder(config.text_encoder)
        self.decoder = MusicgenDecoder(config.decoder)
        self.audio_encoder = Encodec(config.audio_encoder)
        text, hidden = config.text_encoder.d_model, config.decoder.hidden_size
        self.enc_to_dec_proj = TextLinear(text, hidden) if text != hidden else None

    @classmethod
    def load(
        cls,
        folder: Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        config: Config | None = None,
    ) -> MusicGen:
        """The checkpoint in `folder` (`config`: its config, when read already), in eval mode:
        the text encoder and decoder in `dtype`, the codec in float32, all on `device`."""
        config = config or read_config(folder)
        tokenizer = Tokenizer(folder / TOKENIZER)
        state = read_weights(folder)
        with torch.device("meta"):
            model = cls(config, tokenizer)
        missing = [k for k in model.state_dict() if k not in state]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise CheckpointError(
                f"{folder}'s weights lack {', '.join(missing[:3])}{more}: not the model its "
                f"{CONFIG} describes"
            )
        try:
            model.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as err:  # a tensor of another shape than the config makes
            raise CheckpointError(f"{folder}'s weights do not fit its {CONFIG}: {err}") from None
        positions = model.decoder.model.decoder.embed_positions
        positions.weights = sinusoids(*positions.weights.shape)
        model.requires_grad_(False).eval()
        for part in (model.text_encoder, model.enc_to_dec_proj, model.decoder):
            if part is not None:
                part.to(device=device, dtype=dtype)
        if dtype == torch.float16:  # T5's feed-forward outputs overflow float16's range:
            for block in model.text_encoder.encoder.block:  # kept in float32, as transformers'
                block.layer[1].DenseReluDense.wo.float()  # T5 keeps them (_keep_in_fp32_modules)
        # the codec stays in float32: it is cheap, and bfloat16 decoding costs quality for nothing
        model.audio_encoder.to(device=device, dtype=torch.float32)
        return model
