"""EnCodec, MusicGen's audio codec, without `transformers`: transformers' `EncodecModel` in eval
mode, with the same module tree and parameter names, its weight-normalised convs read as plain
weights (`engine.checkpoint` folds them).

The engine's streaming decode (`engine.codec`) reads these modules' weights and shapes; the
one-shot `encode` (an uploaded clip) and `decode` (the reference the streaming decode is held
to) run them as transformers does: each conv padded to "same" length (reflect), the transposed
convs trimmed, the LSTM residual, the residual vector quantizer's codebooks by nearest
neighbour. `encode` and `decode` take and return transformers' layouts (`audio_codes` [1, B, K,
T], `audio_values` [B, C, N]), so either model serves the engine and the tests.
tests/engine/test_checkpoint.py holds both to transformers' own on the same weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoint import CheckpointError


class Conv1d(nn.Module):
    """`EncodecConv1d`: a conv padded so that its output has ceil(length / stride) frames."""

    def __init__(
        self,
        config: SimpleNamespace,
        channels_in: int,
        channels_out: int,
        kernel: int,
        stride: int = 1,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.causal = config.use_causal_conv
        self.pad_mode = config.pad_mode
        self.conv = nn.Conv1d(channels_in, channels_out, kernel, stride, dilation=dilation)
        self.padding_total = (kernel - 1) * dilation - (stride - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = (self.conv.kernel_size[0] - 1) * self.conv.dilation[0] + 1
        stride, length = self.conv.stride[0], x.shape[-1]
        frames = math.ceil((length - kernel + self.padding_total) / stride + 1) - 1
        extra = frames * stride + kernel - self.padding_total - length
        if self.causal:
            left, right = self.padding_total, extra
        else:
            right = self.padding_total // 2
            left, right = self.padding_total - right, right + extra
        return self.conv(_pad(x, left, right, self.pad_mode))


def _pad(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    """F.pad that also reflects an input shorter than the padding (zeros added first)."""
    if mode != "reflect":
        return F.pad(x, (left, right), mode)
    extra = max(0, max(left, right) - x.shape[-1] + 1)
    padded = F.pad(F.pad(x, (0, extra)), (left, right), "reflect")
    return padded[..., : padded.shape[-1] - extra]


class ConvTranspose1d(nn.Module):
    """`EncodecConvTranspose1d`: the upsampling conv, its output trimmed to stride x input."""

    def __init__(
        self, config: SimpleNamespace, channels_in: int, channels_out: int, kernel: int, stride: int
    ) -> None:
        super().__init__()
        self.causal = config.use_causal_conv
        self.trim_right_ratio = config.trim_right_ratio
        self.conv = nn.ConvTranspose1d(channels_in, channels_out, kernel, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trim = self.conv.kernel_size[0] - self.conv.stride[0]
        right = math.ceil(trim * self.trim_right_ratio) if self.causal else trim // 2
        y = self.conv(x)
        return y[..., trim - right : y.shape[-1] - right]


class LSTM(nn.Module):
    """`EncodecLSTM`: a unidirectional LSTM over time, added to its input."""

    def __init__(self, config: SimpleNamespace, width: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(width, width, config.num_lstm_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(2, 0, 1)  # [T, B, C]
        return (self.lstm(x)[0] + x).permute(1, 2, 0)


class ResnetBlock(nn.Module):
    """`EncodecResnetBlock`: ELU, conv (k 3, dilated), ELU, conv (k 1), plus the input."""

    def __init__(self, config: SimpleNamespace, width: int, dilations: tuple[int, int]) -> None:
        super().__init__()
        hidden = width // config.compress
        kernels = (config.residual_kernel_size, 1)
        block: list[nn.Module] = []
        for i, (kernel, dilation) in enumerate(zip(kernels, dilations, strict=True)):
            channels_in = width if i == 0 else hidden
            channels_out = width if i == len(kernels) - 1 else hidden
            block += [
                nn.ELU(),
                Conv1d(config, channels_in, channels_out, kernel, dilation=dilation),
            ]
        self.block = nn.ModuleList(block)
        self.shortcut = (
            Conv1d(config, width, width, 1) if config.use_conv_shortcut else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        for layer in self.block:
            x = layer(x)
        return self.shortcut(residual) + x


class Layers(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _encoder(config: SimpleNamespace) -> Layers:
    filters = config.num_filters
    layers: list[nn.Module] = [Conv1d(config, config.audio_channels, filters, config.kernel_size)]
    scale = 1
    for ratio in reversed(config.upsampling_ratios):
        width = scale * filters
        for j in range(config.num_residual_layers):
            layers.append(ResnetBlock(config, width, (config.dilation_growth_rate**j, 1)))
        layers += [nn.ELU(), Conv1d(config, width, width * 2, ratio * 2, stride=ratio)]
        scale *= 2
    layers += [LSTM(config, scale * filters), nn.ELU()]
    layers.append(Conv1d(config, scale * filters, config.hidden_size, config.last_kernel_size))
    return Layers(layers)


def _decoder(config: SimpleNamespace) -> Layers:
    filters = config.num_filters
    scale = 2 ** len(config.upsampling_ratios)
    layers: list[nn.Module] = [
        Conv1d(config, config.hidden_size, scale * filters, config.kernel_size),
        LSTM(config, scale * filters),
    ]
    for ratio in config.upsampling_ratios:
        width = scale * filters
        layers += [nn.ELU(), ConvTranspose1d(config, width, width // 2, ratio * 2, stride=ratio)]
        for j in range(config.num_residual_layers):
            layers.append(ResnetBlock(config, width // 2, (config.dilation_growth_rate**j, 1)))
        scale //= 2
    layers += [nn.ELU(), Conv1d(config, filters, config.audio_channels, config.last_kernel_size)]
    return Layers(layers)


class Codebook(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.register_buffer("embed", torch.zeros(config.codebook_size, config.codebook_dim))


class VectorQuantization(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.codebook = Codebook(config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D, T] -> the nearest codeword of each frame [B, T]."""
        flat = x.transpose(1, 2).reshape(-1, x.shape[1])
        embed = self.codebook.embed.t()
        distance = -(flat.pow(2).sum(1, keepdim=True) - 2 * flat @ embed + embed.pow(2).sum(0))
        return distance.max(dim=-1).indices.view(x.shape[0], x.shape[2])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, D, T]."""
        return F.embedding(codes, self.codebook.embed).transpose(1, 2)


class ResidualVectorQuantizer(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.bits_per_codebook = math.log2(config.codebook_size) * config.frame_rate
        self.layers = nn.ModuleList(
            [VectorQuantization(config) for _ in range(config.num_quantizers)]
        )

    def encode(self, x: torch.Tensor, bandwidth: float) -> torch.Tensor:
        """[B, D, T] -> codes [K, B, T] (K codebooks for `bandwidth` kbps)."""
        count = max(1, math.floor(bandwidth * 1000 / self.bits_per_codebook))
        codes = []
        for layer in self.layers[:count]:
            indices = layer.encode(x)
            x = x - layer.decode(indices)
            codes.append(indices)
        return torch.stack(codes)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [K, B, T] -> the sum of their codewords [B, D, T]."""
        out = self.layers[0].decode(codes[0])
        for layer, indices in zip(self.layers[1:], codes[1:], strict=False):
            out = out + layer.decode(indices)
        return out


@dataclass
class Encoded:
    audio_codes: torch.Tensor  # [1, B, K, T] (transformers' layout: one chunk)


@dataclass
class Decoded:
    audio_values: torch.Tensor  # [B, C, N]


class Encodec(nn.Module):
    """`EncodecModel` in eval mode, as MusicGen uses it (no chunking, no normalisation)."""

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        if config.chunk_length_s is not None or config.normalize:
            raise CheckpointError(
                "audio_encoder: a chunked or normalising EnCodec is not MusicGen's"
            )
        if config.norm_type != "weight_norm":
            raise CheckpointError(f"audio_encoder: norm_type {config.norm_type!r} is not supported")
        self.config = config
        self.encoder = _encoder(config)
        self.decoder = _decoder(config)
        self.quantizer = ResidualVectorQuantizer(config)

    def encode(self, x: torch.Tensor) -> Encoded:
        """audio [B, C, N] -> codes at the first target bandwidth (MusicGen's codebooks)."""
        codes = self.quantizer.encode(self.encoder(x), self.config.target_bandwidths[0])
        return Encoded(codes.transpose(0, 1)[None])

    def decode(self, codes: torch.Tensor, scales: object = None) -> Decoded:
        """codes [1, B, K, T] -> audio [B, C, T * hop]. `scales`: transformers' argument, unused
        (MusicGen's EnCodec does not normalise)."""
        return Decoded(self.decoder(self.quantizer.decode(codes[0].transpose(0, 1))))
