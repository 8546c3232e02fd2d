"""MusicGen's text side without `transformers`: the T5 tokenizer and the T5 encoder.

`Tokenizer` reads the checkpoint's `tokenizer.json` with the `tokenizers` library (the same
file and library transformers' fast T5 tokenizer uses: its normaliser, Unigram model and the
`</s>` it appends). `T5Encoder` is transformers' `T5EncoderModel` in eval mode, its parameters
under the same names: a shared embedding, blocks of self-attention with relative position
buckets (the first block's bias table serves every block, scores unscaled) and a ReLU or gated
feed-forward, each behind an RMS norm. tests/engine/test_checkpoint.py holds both to
transformers' own on the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoint import CheckpointError


class Tokenizer:
    """A prompt -> T5 token ids, as `MusicgenProcessor(text=[prompt])` gives them."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as Fast

        if not path.is_file():
            raise CheckpointError(f"{path.parent} has no {path.name} (the T5 tokenizer)")
        try:
            self._fast = Fast.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - the Rust library raises plain Exception
            raise CheckpointError(f"{path} cannot be read as a tokenizer: {err}") from None
        self._fast.no_padding()
        self._fast.no_truncation()

    def ids(self, text: str) -> list[int]:
        return self._fast.encode(text).ids


class Linear(nn.Linear):
    """`nn.Linear` whose product a `route` may take over (`engine.conditioning.Bf16Products`:
    bfloat16 weights through our kernel while a prompt is encoded); the same parameters."""

    route: Callable[[nn.Linear, torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if self.route is None else self.route(self, x)


def embedding(count: int, width: int) -> nn.Embedding:
    """An `nn.Embedding` without its random init (the checkpoint's weights replace it; on the
    meta device, `normal_` alone would import `torch._dynamo`: 1.7 s of a start)."""
    return nn.Embedding(count, width, _weight=torch.empty(count, width))


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtracted, the variance in float32."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    activations: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "relu": F.relu,
        "gelu": F.gelu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    }
    if name not in activations:
        raise CheckpointError(f"text_encoder: T5 activation {name!r} is not supported")
    return activations[name]


class SelfAttention(nn.Module):
    def __init__(self, config: SimpleNamespace, relative_bias: bool) -> None:
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.heads, self.head_dim = config.num_heads, config.d_kv
        self.q = Linear(config.d_model, inner, bias=False)
        self.k = Linear(config.d_model, inner, bias=False)
        self.v = Linear(config.d_model, inner, bias=False)
        self.o = Linear(inner, config.d_model, bias=False)
        self.buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        if relative_bias:
            self.relative_attention_bias = embedding(self.buckets, self.heads)

    def position_bias(self, length: int) -> torch.Tensor:
        """[1, H, S, S]: the learned bias of each key's bucket of distance from each query."""
        positions = torch.arange(length, device=self.relative_attention_bias.weight.device)
        relative = positions[None, :] - positions[:, None]  # key - query
        half = self.buckets // 2  # one half for keys after the query, one for before
        buckets = (relative > 0).long() * half
        distance = relative.abs()
        exact = half // 2  # distances below this have a bucket each, the rest log-spaced
        far = (
            exact
            + (
                torch.log(distance.float().clamp(min=1) / exact)
                / math.log(self.max_distance / exact)
                * (half - exact)
            ).long()
        )
        far = far.clamp(max=half - 1)
        buckets += torch.where(distance < exact, distance, far)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-1, -2) + bias  # T5 does not scale by 1/sqrt(d)
        weights = scores.float().softmax(-1).type_as(scores)
        out = (weights @ v).transpose(1, 2).reshape(b, s, -1)
        return self.o(out)


class SelfAttentionLayer(nn.Module):
    def __init__(self, config: SimpleNamespace, relative_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = SelfAttention(config, relative_bias)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class DenseReluDense(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.wi = Linear(config.d_model, config.d_ff, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)
        self.act = _activation(config.dense_act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.act(self.wi(x)).to(self.wo.weight.dtype))


class DenseGatedActDense(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.wi_0 = Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = Linear(config.d_model, config.d_ff, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)
        self.act = _activation(config.dense_act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x)
        return self.wo(h.to(self.wo.weight.dtype))


class FeedForwardLayer(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        gated = config.feed_forward_proj.startswith("gated-")
        self.DenseReluDense = DenseGatedActDense(config) if gated else DenseReluDense(config)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class Block(nn.Module):
    def __init__(self, config: SimpleNamespace, relative_bias: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            [SelfAttentionLayer(config, relative_bias), FeedForwardLayer(config)]
        )

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return _finite(self.layer[1](_finite(self.layer[0](x, bias))))


def _finite(x: torch.Tensor) -> torch.Tensor:
    """A float16 residual stream past float16's largest value, clamped as transformers' T5Block
    clamps it (to that value, or 1000 under it where one already overflowed). A float16 model
    keeps its feed-forward outputs (`wo`) in float32 (`MusicGen.load`), so the stream is float16
    only until the first of them."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return torch.clamp(x, min=-limit, max=limit)


class Stack(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.block = nn.ModuleList([Block(config, i == 0) for i in range(config.num_layers)])
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """`T5EncoderModel` in eval mode: ids [B, S] and mask [B, S] -> states [B, S, d_model]."""

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.config = config
        self.shared = embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.shared(ids)
        first = self.encoder.block[0].layer[0].SelfAttention
        bias = first.position_bias(ids.shape[1]).to(x.dtype)
        # padded keys get the lowest score (transformers' extended attention mask)
        bias = bias + (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)
