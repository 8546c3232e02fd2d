"""Faster stand-ins for three of EnCodec's layers, same sums in another order.

PyTorch's default CPU kernels are slow for a few of the codec's shapes at streaming sizes (a
call decodes about ten frames): skinny matmuls, short transposed convs, and the conv with a
single output channel. The stand-ins here compute what the modules compute, equal up to float
rounding (tests/engine/test_codec.py): `dense` (oneDNN matmuls), `MatmulConvTranspose1d` and
`MatmulOutputConv1d`. `freeze_weight_norm` turns the codec's weight-normalised convs into plain
ones once at load. None of this knows about streaming; `engine.codec.upsampler` puts the layers
together.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn


def freeze_weight_norm(audio_encoder: nn.Module) -> None:
    """Replace EnCodec's weight-normalised conv weights by their values, once.

    `weight_norm` recomputes each weight from (g, v) on every forward: about 20 ms per decode call
    for musicgen's codec, for weights that never change at inference. Same values, in place.
    """
    from torch.nn.utils import parametrize

    for module in audio_encoder.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


# The op Inductor lowers CPU linears to; absent from builds without oneDNN.
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise"
)


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [M, K], weight [N, K]: through oneDNN on a CPU that has it.

    The codec's matmuls are skinny (M = frames of one call, 1-30, against weights of up to
    1024 x 8192), where PyTorch's default float32 GEMM (MKL) is slower than oneDNN's. Same
    float32 sums, only the blocking (rounding order) differs."""
    if _ONEDNN_LINEAR and x.is_cpu and x.dtype == torch.float32 and torch.backends.mkldnn.enabled:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


# Transposed-conv weights in matmul layout, made once per codec (they are read, never changed, at
# inference; the largest is 32 MB): nn.ConvTranspose1d -> [m*s*Cout, Cin].
_MATMUL_LAYOUT: weakref.WeakKeyDictionary[nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()


def is_conv_transpose(layer: nn.Module) -> bool:
    return isinstance(getattr(layer, "conv", None), nn.ConvTranspose1d)


class MatmulConvTranspose1d:
    """EnCodec's non-causal transposed conv (`EncodecConvTranspose1d`: `nn.ConvTranspose1d`, then
    `k - s` samples trimmed, the odd one on the left) as one matmul and an overlap-add.

    Why not the module: for a float32 input of batch 1 and at most 20480 values, ATen sends a 1-D
    transposed conv to its reference kernel `slow_conv_transpose2d` rather than oneDNN (heuristic
    `ConvParams::use_mkldnn`: kernel height 1, batch 1, small input), and that is several times
    slower at the first upsampling layer of a 10-frame call (1024 channels x 13 frames, k 16,
    s 8). Here output sample `s * t + j` of input frame `t` takes row `t` of x [T, Cin] times
    column `j` of the weight: one matmul [B*T, Cin] x [Cin, k*Cout] gives every tap, then the
    `k / s` taps that land on each block of `s` output samples are summed.
    """

    def __init__(self, module: nn.Module):
        conv = module.conv
        if (
            getattr(module, "causal", False)
            or hasattr(module, "norm")  # time_group_norm: not a per-sample layer
            or conv.groups != 1
            or conv.dilation[0] != 1
            or conv.padding[0] != 0
            or conv.output_padding[0] != 0
        ):
            raise ValueError("expected EnCodec's non-causal ConvTranspose1d (no groups/padding)")
        cin, cout, k = conv.weight.shape
        self.stride = s = conv.stride[0]
        self.kernel = k
        self.taps = -(-k // s)  # m: input frames that overlap one output block of s samples
        trim = k - s
        self.trim_right = trim // 2
        self.trim_left = trim - self.trim_right
        self.bias = conv.bias.detach()
        self.weight = _MATMUL_LAYOUT.get(conv)  # [m*s*Cout, Cin], shared by a codec's decoders
        if self.weight is None:
            # row (j, cout) = tap j of output channel cout, taps padded to m*s with zeros
            w = conv.weight.detach().permute(2, 1, 0)  # [k, Cout, Cin]
            w = F.pad(w, (0, 0, 0, 0, 0, self.taps * s - k))
            self.weight = _MATMUL_LAYOUT[conv] = w.reshape(-1, cin).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, Cin, T] -> [B, Cout, T*s + k - s - trim] (the module's output; T*s for k = 2s)."""
        b, cin, t = x.shape
        m, s = self.taps, self.stride
        z = dense(x.transpose(1, 2).reshape(b * t, cin), self.weight)
        z = z.view(b, t, m, s, -1)  # [B, T, taps, s, Cout]
        y = z.new_empty(b, t + m - 1, s, z.shape[-1])  # output blocks of s samples, time-major
        torch.add(z[:, :, 0], self.bias, out=y[:, :t])
        y[:, t:] = self.bias
        for p in range(1, m):
            y[:, p : p + t] += z[:, :, p]
        n = (t - 1) * s + self.kernel  # the module's length before its trim
        y = y.view(b, (t + m - 1) * s, -1)[:, self.trim_left : n - self.trim_right]
        return y.transpose(1, 2).contiguous()  # channels first, as the next convs want it


class MatmulOutputConv1d:
    """EnCodec's last conv (64 channels -> 1 audio channel, k 7, reflect padding) as one matmul
    and k shifted adds. oneDNN's conv with a single output channel is several times slower than
    [k*Cout, Cin] x [Cin, L] followed by summing row j shifted by j, the same sums."""

    def __init__(self, module: nn.Module):
        conv = module.conv
        if conv.stride[0] != 1 or conv.groups != 1 or getattr(module, "causal", False):
            raise ValueError("expected EnCodec's non-causal stride-1 Conv1d")
        if hasattr(module, "norm"):
            raise ValueError("expected EnCodec's weight-norm Conv1d, not time_group_norm")
        self._module = module
        cout, cin, k = conv.weight.shape
        self.dilation = conv.dilation[0]
        total = (k - 1) * self.dilation
        self.pad = (total - total // 2, total // 2)
        self.weight = conv.weight.detach().permute(2, 0, 1).reshape(k * cout, cin).contiguous()
        self.bias = conv.bias.detach()[:, None]  # [Cout, 1]
        self.kernel = k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, Cin, L] -> [B, Cout, L], the module's output."""
        x = self._module._pad1d(x, self.pad, mode=self._module.pad_mode)  # [B, Cin, L + k - 1]
        n = x.shape[-1] - (self.kernel - 1) * self.dilation
        z = torch.matmul(self.weight, x)  # [B, k*Cout, L + k - 1], row (j, cout)
        z = z.view(x.shape[0], self.kernel, -1, x.shape[-1])
        y = z[:, 0, :, :n] + self.bias
        for j in range(1, self.kernel):
            y += z[:, j, :, j * self.dilation : j * self.dilation + n]
        return y
