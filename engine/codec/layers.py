"""EnCodec's decoder layers in the form the streaming decode runs them: time-major ([B, L, C])
and unpadded, with the same sums as the modules in another order.

Time-major, no layer needs a layout change: the convs run through oneDNN on channels-last
views, a transposed conv is two shifted matmuls, and the layers skip the padding the modules do
(a streaming call crops every layer to what its output needs anyway; at the start of the audio
they pad as the modules do). PyTorch's kernels are also slow for some of the codec's shapes at
streaming sizes (a call decodes about ten frames): skinny matmuls (`dense` goes through
oneDNN), the conv with a single output channel (`TimeMajorOutputConv1d`), the ELU (ours).
Each layer equals its module up to float rounding (tests/engine/test_codec.py).
`freeze_weight_norm` turns the codec's weight-normalised convs into plain ones once at load.
None of this knows about streaming; `engine.codec.upsampler` puts the layers together.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from engine.codec import native


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
_ONEDNN_PACK = _ONEDNN_LINEAR and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [M, K], weight [N, K]: through oneDNN on a CPU that has it.

    The codec's matmuls are skinny (M = frames of one call, 1-30, against weights of up to
    1024 x 8192), where PyTorch's default float32 GEMM (MKL) is slower than oneDNN's. Same
    float32 sums, only the blocking (rounding order) differs."""
    if _ONEDNN_LINEAR and x.is_cpu and x.dtype == torch.float32 and torch.backends.mkldnn.enabled:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Dense:
    """`x [M, K] -> x @ weight.T (+ bias)` with `weight` [N, K] in `dtype`: the codec's bfloat16
    matmuls (`TimeMajorConvTranspose1d`, `TimeMajorOutputConv1d` in a bfloat16 stack). Where
    oneDNN runs it, the weight is laid out once in oneDNN's own blocked form instead of on every
    call (a cold call of the first transposed conv's 16 MB of bfloat16 weights: 0.72 ms against
    1.45 ms, Xeon with AMX, 2026-12-07), and only that form is kept; x must be `dtype` too."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        self.weight = weight.detach().to(dtype).contiguous()
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.packed = _ONEDNN_PACK and self.weight.is_cpu
        if self.packed:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(self.weight, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def elu(x: torch.Tensor) -> torch.Tensor:
    """EnCodec's ELU (alpha 1): one vectorised pass of our kernel where it runs (PyTorch's takes
    several times longer on this project's CPUs), else PyTorch's."""
    if not x.is_cpu or x.dtype not in (torch.float32, torch.bfloat16):
        return F.elu(x)  # (a GPU's codec: our CPU kernels are not even built for it)
    kernels = native.get()
    return F.elu(x) if kernels is None else kernels.elu(x)


class Elu:
    """EnCodec's `nn.ELU` (alpha 1) as a layer of the time-major stack: reads no neighbours."""

    left = right = 0

    def __call__(self, x: torch.Tensor, *, at_start: bool = False) -> torch.Tensor:
        return elu(x)


def _channels_last_view(x: torch.Tensor) -> torch.Tensor:
    """[B, L, C] time-major -> the same memory as a channels-last [B, C, 1, L] image (oneDNN's
    nhwc: no reorder before or after its convolution)."""
    return x.permute(0, 2, 1).unsqueeze(2)


def _time_major(y: torch.Tensor) -> torch.Tensor:
    """A conv2d output [B, C, 1, L] -> [B, L, C]: a view when the output is channels-last."""
    y = y.squeeze(2).permute(0, 2, 1)
    return y if y.is_contiguous() else y.contiguous()


def _pad_left(x: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """x [B, L, C] with n samples put before it as the module's own padding does at the start of
    the audio (reflect: x[n], ..., x[1]; otherwise zeros)."""
    if mode == "reflect":
        if x.shape[1] <= n:
            raise ValueError(f"reflect padding of {n} needs more than {x.shape[1]} samples")
        pad = x[:, 1 : n + 1].flip(1)
    else:
        pad = x.new_zeros(x.shape[0], n, x.shape[2])
    return torch.cat([pad, x], dim=1)


class TimeMajorConv1d:
    """EnCodec's same-rate conv (`EncodecConv1d`: stride 1, "same" padding) over time-major
    input, without padding: input [a, b) gives output [a + left, b - right) ("valid"), or, with
    `at_start`, output [a, b - right) padded on the left as the module pads at sample 0.
    Through oneDNN on channels-last views (no layout reorders)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype | None = None):
        conv = module.conv
        if conv.stride[0] != 1 or conv.groups != 1 or getattr(module, "causal", False):
            raise ValueError("expected EnCodec's non-causal stride-1 Conv1d")
        if hasattr(module, "norm"):
            raise ValueError("expected EnCodec's weight-norm Conv1d, not time_group_norm")
        total = (conv.kernel_size[0] - 1) * conv.dilation[0]
        self.right = total // 2
        self.left = total - self.right
        self.pad_mode = module.pad_mode
        self.dilation = conv.dilation[0]
        weight = conv.weight.detach().to(dtype)  # [Cout, Cin, k]
        self.weight = weight[:, :, None, :].contiguous(memory_format=torch.channels_last)
        self.bias = conv.bias.detach().to(dtype)

    def __call__(self, x: torch.Tensor, *, at_start: bool = False) -> torch.Tensor:
        """x [B, L, Cin] -> [B, L - left - right (+ left at_start), Cout]."""
        if at_start and self.left:
            x = _pad_left(x, self.left, self.pad_mode)
        y = F.conv2d(_channels_last_view(x), self.weight, self.bias, dilation=(1, self.dilation))
        return _time_major(y)


class TimeMajorResnetBlock:
    """EnCodec's residual block (`EncodecResnetBlock`: x + convs(ELU, conv k, ELU, conv 1)) over
    time-major input, valid like `TimeMajorConv1d`: its reach is the sum of its convs'."""

    def __init__(self, module: nn.Module, dtype: torch.dtype | None = None):
        self.block = [
            m if isinstance(m, nn.ELU) else TimeMajorConv1d(m, dtype) for m in module.block
        ]
        for m in module.block:
            if isinstance(m, nn.ELU) and m.alpha != 1.0:
                raise ValueError("expected EnCodec's ELU(alpha=1)")
        short = module.shortcut
        self.shortcut = None if isinstance(short, nn.Identity) else TimeMajorConv1d(short, dtype)
        convs = [m for m in self.block if isinstance(m, TimeMajorConv1d)]
        self.left = sum(c.left for c in convs)
        self.right = sum(c.right for c in convs)
        if self.shortcut is not None and (self.shortcut.left or self.shortcut.right):
            raise ValueError("expected a 1x1 conv shortcut")

    def __call__(self, x: torch.Tensor, *, at_start: bool = False) -> torch.Tensor:
        """x [B, L, C] -> [B, L - left - right (+ left at_start), C]."""
        y = x
        for layer in self.block:
            y = elu(y) if isinstance(layer, nn.ELU) else layer(y, at_start=at_start)
        first = 0 if at_start else self.left  # x's samples that line up with y's
        residual = x[:, first : first + y.shape[1]]
        if self.shortcut is not None:
            residual = self.shortcut(residual)
        return y.add_(residual)


# Transposed-conv weights in matmul layout, made once per codec (they are read, never changed, at
# inference; the largest is 32 MB): nn.ConvTranspose1d -> [m*s*Cout, Cin]; and in bfloat16, as
# `Dense` (laid out for oneDNN), for a bfloat16 stack.
_MATMUL_LAYOUT: weakref.WeakKeyDictionary[nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()
_DENSE_BF16: weakref.WeakKeyDictionary[nn.Module, Dense] = weakref.WeakKeyDictionary()


def is_conv_transpose(layer: nn.Module) -> bool:
    return isinstance(getattr(layer, "conv", None), nn.ConvTranspose1d)


class TimeMajorConvTranspose1d:
    """EnCodec's non-causal transposed conv (`EncodecConvTranspose1d`: `nn.ConvTranspose1d`, then
    `k - s` samples trimmed, the odd one on the left) over time-major input, as one matmul and
    an overlap-add.

    Output sample `s * t + j` of input frame `t` takes row `t` of x [T, Cin] times column `j` of
    the weight: a matmul [T, Cin] x [Cin, k*Cout] gives every tap; time-major, the `s` taps of a
    frame are `s` consecutive output samples, so the output is the sum of `m = k / s` shifted
    products (for EnCodec's k = 2s: two), with no transposes. The module's ATen kernel is
    slower for the short inputs of a streaming call.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype | None = None):
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
        # [s*Cout], (j, cout) as a block's taps
        self.block_bias = conv.bias.detach().repeat(s).to(dtype)
        self.weight = _MATMUL_LAYOUT.get(conv)  # [m*s*Cout, Cin], shared by a codec's decoders
        if self.weight is None:
            # row (j, cout) = tap j of output channel cout, taps padded to m*s with zeros
            w = conv.weight.detach().permute(2, 1, 0)  # [k, Cout, Cin]
            w = F.pad(w, (0, 0, 0, 0, 0, self.taps * s - k))
            self.weight = _MATMUL_LAYOUT[conv] = w.reshape(-1, cin).contiguous()
        block = self.weight.shape[0] // self.taps
        self.tap_weights = [self.weight[p * block : (p + 1) * block] for p in range(self.taps)]
        self.dense: Dense | None = None  # a bfloat16 stack's: every tap in one matmul
        if dtype == torch.bfloat16:
            self.dense = _DENSE_BF16.get(conv)
            if self.dense is None:
                self.dense = _DENSE_BF16[conv] = Dense(self.weight, None, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, Cin] -> [B, T*s + k - s - trim, Cout] (the module's output, time-major)."""
        b, t, cin = x.shape
        m, s = self.taps, self.stride
        y = x.new_empty(b, t + m - 1, self.block_bias.shape[0])  # output blocks of s samples
        if t >= _ADDMM_ROWS and self.dense is None:
            # each tap's product added into its place: no product buffer
            for i in range(b):
                torch.addmm(self.block_bias, x[i], self.tap_weights[0].t(), out=y[i, :t])
                y[i, t:] = self.block_bias
                for p in range(1, m):
                    y[i, p : p + t].addmm_(x[i], self.tap_weights[p].t())
        else:  # one matmul for all taps (oneDNN's), then the shifted adds
            flat = x.reshape(b * t, cin)
            z = self.dense(flat) if self.dense is not None else dense(flat, self.weight)
            z = z.view(b, t, m, -1)  # [B, T, m, s*Cout]
            torch.add(z[:, :, 0], self.block_bias, out=y[:, :t])
            y[:, t:] = self.block_bias
            for p in range(1, m):
                y[:, p : p + t] += z[:, :, p]
        n = (t - 1) * s + self.kernel  # the module's length before its trim
        y = y.view(b, (t + m - 1) * s, -1)[:, self.trim_left : n - self.trim_right]
        return y if b == 1 else y.contiguous()


# Above this many input steps a transposed conv's taps go through MKL's GEMM one by one, added in
# place; below (the first layer's ~12 frames against 32 MB of weights), oneDNN's skinny matmul
# of all taps at once is the faster (measured, bench/bench_codec.py table 5).
_ADDMM_ROWS = 64


class TimeMajorOutputConv1d:
    """EnCodec's last conv (64 channels -> 1 audio channel, k 7) over time-major input, valid
    like `TimeMajorConv1d`: one matmul [L, Cin] x [Cin, k*Cout] and k shifted adds. oneDNN's
    conv with a single output channel is several times slower."""

    def __init__(self, module: nn.Module, dtype: torch.dtype | None = None):
        self.conv = TimeMajorConv1d(module)  # checks, reach and padding
        weight = module.conv.weight.detach()  # [Cout, Cin, k]
        cout, cin, k = weight.shape
        self.left, self.right = self.conv.left, self.conv.right
        self.kernel = k
        self.weight = weight.permute(2, 0, 1).reshape(k * cout, cin).contiguous()  # (j, cout)
        self.bias = module.conv.bias.detach().to(dtype)
        self.dense = Dense(self.weight, None, dtype) if dtype == torch.bfloat16 else None

    def __call__(self, x: torch.Tensor, *, at_start: bool = False) -> torch.Tensor:
        """x [B, L, Cin] -> [B, L - left - right (+ left at_start), Cout]."""
        if at_start and self.left:
            x = _pad_left(x, self.left, self.conv.pad_mode)
        b, length, cin = x.shape
        d = self.conv.dilation
        n = length - (self.kernel - 1) * d
        flat = x.reshape(b * length, cin)
        z = self.dense(flat) if self.dense is not None else dense(flat, self.weight)
        z = z.view(b, length, self.kernel, -1)
        y = z[:, :n, 0] + self.bias
        for j in range(1, self.kernel):
            y += z[:, j * d : j * d + n, j]
        return y  # [B, n, Cout]
