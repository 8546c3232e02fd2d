"""EnCodec's upsampling stack run over a call's LSTM output, computing only the samples the
wanted audio depends on, time-major.

The stack (ELUs, transposed convs x8 x5 x4 x4, residual blocks, last conv: x640 in all) reads
less than a frame each side of an output sample, so a streaming call hands it its frames plus
`UPSAMPLE_MARGIN` each side; past the first transposed conv, each layer's input is cropped to
the receptive field of the wanted output (a 10-frame call: 12 frames in, 11 frames' worth at
the upper rates), and the same-rate convs run without padding ("valid": input [a, b) gives
output [a + reach left, b - reach right)). What is cropped is exactly what the wanted output
does not read, so the result is the same as running every layer over everything. Activations
are time-major [B, L, C] throughout: the layers of `engine.codec.layers` then need no layout
changes between them.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.codec.layers import (
    Elu,
    TimeMajorConv1d,
    TimeMajorConvTranspose1d,
    TimeMajorOutputConv1d,
    TimeMajorResnetBlock,
    is_conv_transpose,
)

UPSAMPLE_MARGIN = 1  # LSTM frames each side the upsampling stack needs (measured: exact at 1)


def same_rate_reach(layer: nn.Module) -> tuple[int, int]:
    """Input samples left and right of an output sample that a same-rate layer reads."""
    if isinstance(layer, nn.ELU):
        return 0, 0
    if isinstance(getattr(layer, "conv", None), nn.Conv1d):  # EncodecConv1d, "same" padding
        conv = layer.conv
        if conv.stride[0] != 1 or getattr(layer, "causal", False) or hasattr(layer, "norm"):
            raise ValueError("expected EnCodec's non-causal stride-1 weight-norm Conv1d")
        total = (conv.kernel_size[0] - 1) * conv.dilation[0]
        return total - total // 2, total // 2
    if hasattr(layer, "block") and hasattr(layer, "shortcut"):  # EncodecResnetBlock
        block = [same_rate_reach(m) for m in layer.block]
        short = (
            (0, 0) if isinstance(layer.shortcut, nn.Identity) else same_rate_reach(layer.shortcut)
        )
        return max(sum(r[0] for r in block), short[0]), max(sum(r[1] for r in block), short[1])
    raise ValueError(f"unexpected layer in EnCodec's upsampling stack: {type(layer).__name__}")


class CroppedUpsampler:
    """The stack of `audio_encoder.decoder.layers[2:]` over [B, n, D] LSTM frames, cropped per
    layer to what the samples [lo, hi) need; at frame 0 nothing is cropped on the left, and the
    convs pad there as the one-shot decode's layers do."""

    def __init__(self, layers: list[nn.Module], dtype: torch.dtype | None = None):
        self.dtype = dtype  # the stack's weights and activations; None: the modules' own
        self.layers: list = []
        self.shapes: list[tuple] = []  # ("same", reach left, reach right) / ("up", s, k, trim)
        for layer in layers:
            if is_conv_transpose(layer):
                up = TimeMajorConvTranspose1d(layer, dtype)
                self.layers.append(up)
                self.shapes.append(("up", up.stride, up.kernel, up.trim_left))
                continue
            if isinstance(layer, nn.ELU):
                if layer.alpha != 1.0:
                    raise ValueError("expected EnCodec's ELU(alpha=1)")
                self.layers.append(Elu())
            elif hasattr(layer, "block"):
                self.layers.append(TimeMajorResnetBlock(layer, dtype))
            elif layer is layers[-1] and layer.conv.out_channels <= 2:  # the audio output conv
                self.layers.append(TimeMajorOutputConv1d(layer, dtype))
            else:
                self.layers.append(TimeMajorConv1d(layer, dtype))
            self.shapes.append(("same", *same_rate_reach(layer)))
        self._plans: dict[tuple[int, int, int], list[tuple[int, int]]] = {}

    def plan(self, frames: int, lo: int, hi: int) -> list[tuple[int, int]]:
        """Input range [a, b) each layer must see for output samples [lo, hi): positions in its
        own rate, 0 = the first LSTM frame given. Backwards from the output, once per shape."""
        key = (frames, lo, hi)
        if key not in self._plans:
            if len(self._plans) > 256:  # call shapes are few; never grow without bound
                self._plans.clear()
            needs = []
            for shape in reversed(self.shapes):
                if shape[0] == "same":
                    lo, hi = lo - shape[1], hi + shape[2]
                else:  # output p = input frame t's tap p + trim - s*t, for taps 0..k-1
                    s, k, trim = shape[1:]
                    lo, hi = -((k - 1 - lo - trim) // s), (hi - 1 + trim) // s + 1
                needs.append((lo, hi))
            self._plans[key] = needs[::-1]
        return self._plans[key]

    def __call__(self, y: torch.Tensor, lo: int, hi: int, *, at_zero: bool) -> torch.Tensor:
        """y [B, n, D]: LSTM block output of n frames, time-major -> audio [B, hi - lo, 1],
        samples [lo, hi) counted from the first of those frames; `at_zero`: the first of them
        is frame 0."""
        at = 0  # position of y[:, 0] in the current layer's rate
        plan = self.plan(y.shape[1], lo, hi)
        given = y.dtype
        if self.dtype is not None:
            y = y.to(self.dtype)
        for layer, shape, (a, b) in zip(self.layers, self.shapes, plan, strict=True):
            assert at <= a or at_zero, "upsampling margin too small before the wanted output"
            assert b <= at + y.shape[1], "upsampling margin too small after the wanted output"
            a = max(a, at)  # at frame 0 the layers pad as the one-shot decode does
            x = y[:, a - at : b - at]
            if shape[0] == "up":
                y, at = layer(x), a * shape[1]  # a transposed conv maps t to s*t
            else:
                start = at_zero and a == 0
                y = layer(x, at_start=start)
                at = a if start else a + shape[1]
        return y[:, lo - at : hi - at].to(given)
