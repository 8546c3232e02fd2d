"""Several streams' decode calls in one: stations batched on one codec.

With several stations on one model, every station's chunk goes through the same codec weights.
`decode_together` runs the calls' LSTMs as one batch (the recurrent weights read once per frame
for all streams, not once per stream) and their upsampling stacks as one batch (one matmul or
conv per layer), between the per-stream stages of `StreamingDecoder`. Calls whose shapes differ
(a stream on a rewind or a prompt change runs more LSTM frames than its neighbours) go in
separate groups, so the result is always each call's own decode, equal to it decoding alone up
to float rounding (tests/engine/test_codec.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from engine.codec.streaming import StreamingDecoder, _Call

T = TypeVar("T")


@torch.inference_mode()
def decode_together(
    calls: list[tuple[StreamingDecoder, torch.Tensor, int, int, int]],
) -> list[np.ndarray]:
    """calls: (decoder, codes [K, T], offset, start, stop) per stream, as for
    `StreamingDecoder.decode`; each decoder at most once, all of the same codec and upsampling
    dtype ->
    the audio of each call, float32 [channels, (stop - start) * 640]."""
    decoders = [call[0] for call in calls]
    if len({id(d) for d in decoders}) != len(decoders):
        raise ValueError("decode_together: each decoder may appear once")
    if decoders and any(d._encoder is not decoders[0]._encoder for d in decoders):
        raise ValueError("decode_together: every decoder must decode with the same codec")
    if decoders and any(d.upsample_dtype != decoders[0].upsample_dtype for d in decoders):
        raise ValueError("decode_together: every decoder must upsample in the same dtype")
    begun = [dec._begin(codes, offset, start, stop) for dec, codes, offset, start, stop in calls]

    # The LSTM of every call that runs the same number of frames, as one batch of streams.
    lstm_out: list = [None] * len(calls)
    for group in _groups(begun, lambda c: c.x.shape[0]):
        lstm = decoders[group[0]]._lstm
        x = torch.cat([begun[i].x for i in group], dim=1)  # [frames, sum B, D]
        h0 = torch.cat([begun[i].h0 for i in group], dim=1)  # [layers, sum B, H]
        c0 = torch.cat([begun[i].c0 for i in group], dim=1)
        top, hs, cs = lstm.run(x, h0, c0)
        for i, (a, b) in zip(group, _spans([begun[i].x.shape[1] for i in group]), strict=True):
            lstm_out[i] = top[:, a:b], hs[:, :, a:b], cs[:, :, a:b]
    ups = [
        dec._after_lstm(call, *out)
        for dec, call, out in zip(decoders, begun, lstm_out, strict=True)
    ]

    # The upsampling stack of every call with the same input length and output range, batched.
    audio: list = [None] * len(calls)
    for group in _groups(ups, lambda u: (u[0].shape[1], u[1], u[2]), begun):
        upsample = decoders[group[0]]._upsample
        y = torch.cat([ups[i][0] for i in group])  # [sum B, n, D]
        _, lo, hi = ups[group[0]]
        out = upsample(y, lo, hi, at_zero=begun[group[0]].first == 0)
        for i, (a, b) in zip(group, _spans([ups[i][0].shape[0] for i in group]), strict=True):
            audio[i] = out[a:b]
    return [dec._finish(call, y) for dec, call, y in zip(decoders, begun, audio, strict=True)]


def _groups(
    items: Sequence[T], key: Callable[[T], Hashable], calls: list[_Call] | None = None
) -> list[list[int]]:
    """Indices of `items` grouped by `key(item)` (and, given `calls`, by whether the call
    starts at frame 0, where the upsampler pads instead of cropping)."""
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[(key(item), calls[i].first == 0 if calls else None)].append(i)
    return list(groups.values())


def _spans(sizes: list[int]) -> list[tuple[int, int]]:
    """[a, b) of each part of a concatenation of parts of these sizes."""
    ends = np.cumsum(sizes).tolist()
    return [(end - size, end) for size, end in zip(sizes, ends, strict=True)]
