"""EnCodec's upsampling stack run over a call's LSTM output, computing only the samples the
wanted audio depends on.

The stack (ELUs, transposed convs x8 x5 x4 x4, residual blocks, last conv: x640 in all) reads
less than a frame each side of an output sample, so a streaming call hands it its frames plus
`UPSAMPLE_MARGIN` each side; past the first transposed conv, each layer's input is cropped to
the receptive field of the wanted output (a 10-frame call: 13 frames in, 11 frames' worth at
the upper rates). What is cropped is exactly what the wanted output does not read, so the
result is the same as running every layer over everything.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.codec.layers import MatmulConvTranspose1d, MatmulOutputConv1d, is_conv_transpose

UPSAMPLE_MARGIN = 1  # LSTM frames each side the upsampling stack needs (measured: exact at 1)
MATMUL_CONV_TRANSPOSES = 2  # the first transposed convs run as matmuls (short inputs)


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
    """The stack of `audio_encoder.decoder.layers[2:]` over [B, D, n] LSTM frames, cropped per
    layer to what the samples [lo, hi) need. The first transposed convs run as
    `MatmulConvTranspose1d` (short inputs), the last conv as `MatmulOutputConv1d`; at frame 0
    nothing is cropped on the left, where the layers' own padding is the one-shot decode's."""

    def __init__(self, layers: list[nn.Module]):
        self.layers: list = []
        self.shapes: list[tuple] = []  # ("same", reach left, reach right) / ("up", s, k, trim)
        for layer in layers:
            if is_conv_transpose(layer):
                up = MatmulConvTranspose1d(layer)
                rank = sum(kind == "up" for kind, *_ in self.shapes)
                self.layers.append(up if rank < MATMUL_CONV_TRANSPOSES else layer)
                self.shapes.append(("up", up.stride, up.kernel, up.trim_left))
            else:
                last = layer is layers[-1] and getattr(layer, "conv", None) is not None
                last = last and layer.conv.out_channels <= 2  # the audio output conv
                self.layers.append(MatmulOutputConv1d(layer) if last else layer)
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
        """y [B, D, n]: LSTM block output of n frames -> audio [B, 1, hi - lo], samples [lo, hi)
        counted from the first of those frames; `at_zero`: the first of them is frame 0."""
        at = 0  # position of y[..., 0] in the current layer's rate
        plan = self.plan(y.shape[-1], lo, hi)
        for layer, shape, (a, b) in zip(self.layers, self.shapes, plan, strict=True):
            assert at <= a or at_zero, "upsampling margin too small before the wanted output"
            assert b <= at + y.shape[-1], "upsampling margin too small after the wanted output"
            a = max(a, at)  # at frame 0 the layers pad as the one-shot decode does
            y = layer(y[..., a - at : b - at])
            at = a * shape[1] if shape[0] == "up" else a  # a transposed conv maps t to s*t
        return y[..., lo - at : hi - at]
