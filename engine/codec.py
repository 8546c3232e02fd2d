"""Streaming EnCodec decode: MusicGen tokens become 32 kHz PCM chunk by chunk, at a constant
cost per second of audio, equal to the one-shot `audio_encoder.decode` of the same tokens.

MusicGen's EnCodec decoder is `conv(k=7) -> LSTM(2 layers) -> upsampling convs (x640)`. The convs
are non-causal but short: the first looks 3 frames each way, the upsampling stack less than one.
The LSTM is causal but remembers the whole past, so re-decoding a few frames of left context
only approximates it. `StreamingDecoder` therefore splits the decoder in three stages:

1. codebook embeddings + first conv over the codes of the new frames plus 3 frames each side;
2. the LSTM, run by hand one frame at a time from an exact saved state. A plain continuation
   (no token changed since the previous call) goes on from the state and outputs the previous
   call computed in its lookahead, so each frame runs once. Otherwise (a prompt change, a
   rewind) it re-runs the 3 frames before `start` too (through the first conv they read tokens
   from `start` on) from the state saved before them: the state before every frame of the last
   `history` frames is kept in a ring, so a rewind `k` frames back restarts exactly too;
3. the upsampling stack over the LSTM output of the chunk plus at most one frame each side,
   each layer cropped to the samples the wanted audio depends on (`_Upsampler`).

Each call thus decodes `stop - start` frames plus a fixed margin, never the history; the audio
equals the one-shot decode up to float rounding (measured > 120 dB SNR, see the tests and
`bench/bench_codec.py`). Each call also decodes the first `crossfade` samples after `stop`
(the tail). The first `crossfade` samples of the next call are blended from what was decoded
for them before (the tail on a continuation, the audio emitted on a rewind), so joins and
prompt changes never click; on a carried continuation the tail was decoded from the same
tokens, so it is used as it is. A call that can not resume from a saved state
(the first call of a stream that does not start at frame 0, or a rewind beyond `history`)
warms the LSTM up from zeros over the `context` frames before `start`: approximate, since
nothing before it was decoded.

Where the time goes (musicgen-small codec, 10-frame calls, one CPU thread): about a third in
the LSTM, whose per-frame `h @ W_hh` reads 2 x 16 MB of weights per frame (memory-bound), the
rest in the upsampling convs. PyTorch's default kernels were slow for three of the codec's
shapes on this project's CPU; `_dense` (skinny matmuls through oneDNN), `_ConvTranspose1d`
(short transposed convs) and `_NarrowConv1d` (the 1-channel output conv) replace them with the
same sums. `python bench/bench_codec.py --tables 45` prints the cost and where it goes.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HOP = 640  # samples per token frame at 32 kHz
_UPSAMPLE_MARGIN = 1  # LSTM frames each side the upsampling stack needs (measured: exact at 1)
_MATMUL_CONV_TRANSPOSES = 2  # the first transposed convs run as `_ConvTranspose1d` (short input)


def _split_channels(codes: torch.Tensor, audio_channels: int) -> torch.Tensor:
    """[K, T] frame-aligned tokens -> [B=channels, K/channels, T] (stereo: even left, odd right)."""
    if audio_channels == 1:
        return codes[None]
    return torch.stack([codes[0::2], codes[1::2]])


def decode_full(
    audio_encoder: nn.Module, codes: torch.LongTensor, audio_channels: int
) -> np.ndarray:
    """One-shot reference decode of all frames, as `MusicgenForConditionalGeneration.generate`
    does it: codes [K, T] -> float32 [channels, T * 640]."""
    if audio_channels not in (1, 2):
        raise ValueError(f"audio_channels must be 1 or 2, got {audio_channels!r}")
    device = next(audio_encoder.parameters()).device
    with torch.inference_mode():
        codes = codes.to(device)
        halves = [codes] if audio_channels == 1 else [codes[0::2], codes[1::2]]
        audio = [audio_encoder.decode(h[None, None], [None]).audio_values[0] for h in halves]
        return torch.cat(audio).float().cpu().numpy()  # [channels, T * 640]


def freeze_weight_norm(audio_encoder: nn.Module) -> None:
    """Replace EnCodec's weight-normalised conv weights by their values, once.

    `weight_norm` recomputes each weight from (g, v) on every forward: about 20 ms per decode call
    for musicgen's codec, for weights that never change at inference. Same values, in place.
    """
    from torch.nn.utils import parametrize

    for module in audio_encoder.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def _dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [M, K], weight [N, K]: through oneDNN on a CPU that has it.

    The codec's matmuls are skinny (M = frames of one call, 1-30, against 1024 x 8192 weights);
    there PyTorch's default float32 GEMM (MKL) took 1.3-1.8x oneDNN's time on this project's
    CPU (AMD, AVX-512). Same float32 sums, only the blocking (rounding order) differs."""
    if _ONEDNN_LINEAR and x.is_cpu and x.dtype == torch.float32 and torch.backends.mkldnn.enabled:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


# The op Inductor lowers CPU linears to; absent from builds without oneDNN.
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise"
)


class _ConvTranspose1d:
    """EnCodec's non-causal transposed conv (`EncodecConvTranspose1d`: `nn.ConvTranspose1d`, then
    `k - s` samples trimmed, the odd one on the left) as one matmul and an overlap-add.

    Why not the module: for a float32 input of batch 1 and at most 20480 values, ATen sends a 1-D
    transposed conv to its reference kernel `slow_conv_transpose2d` rather than oneDNN (heuristic
    `ConvParams::use_mkldnn`: kernel height 1, batch 1, small input; dtype, padding, groups and
    contiguity play no part). The first upsampling layer of a 10-frame mono call (1024 channels x
    13 frames, k 16, s 8) hits it: ~13 ms a call. oneDNN's deconvolution, which ATen picks for a
    batch of 2 or a longer input, is no faster at that shape (measured). Here output sample
    `s * t + j` of input frame `t` takes row `t` of x [T, Cin] times column `j` of the weight: one
    matmul [B*T, Cin] x [Cin, k*Cout] (~4.5 ms) gives every tap, then the `k / s` taps that land
    on each block of `s` output samples are summed. Same sums as the module in another order:
    equal up to float rounding (tests/engine/test_codec.py). The decoder uses it for the first
    two transposed convs, whose inputs have 1 and 8 steps per frame (~13 and ~90 per 10-frame
    call): 13 -> 4.5 ms and 4.1 -> 3.3 ms a call. The last two see 40 and 160 steps per frame,
    where the module (oneDNN) is as fast or faster (measured on this project's CPU).
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
        self.weight = _PREPARED.get(conv)  # [m*s*Cout, Cin], shared by every decoder of a codec
        if self.weight is None:
            # row (j, cout) = tap j of output channel cout, taps padded to m*s with zeros
            w = conv.weight.detach().permute(2, 1, 0)  # [k, Cout, Cin]
            w = F.pad(w, (0, 0, 0, 0, 0, self.taps * s - k))
            self.weight = _PREPARED[conv] = w.reshape(-1, cin).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, Cin, T] -> [B, Cout, T*s + k - s - trim] (the module's output; T*s for k = 2s)."""
        b, cin, t = x.shape
        m, s = self.taps, self.stride
        z = _dense(x.transpose(1, 2).reshape(b * t, cin), self.weight)
        z = z.view(b, t, m, s, -1)  # [B, T, taps, s, Cout]
        y = z.new_empty(b, t + m - 1, s, z.shape[-1])  # output blocks of s samples, time-major
        torch.add(z[:, :, 0], self.bias, out=y[:, :t])
        y[:, t:] = self.bias
        for p in range(1, m):
            y[:, p : p + t] += z[:, :, p]
        n = (t - 1) * s + self.kernel  # the module's length before its trim
        y = y.view(b, (t + m - 1) * s, -1)[:, self.trim_left : n - self.trim_right]
        return y.transpose(1, 2).contiguous()  # channels first, as the next convs want it


# Transposed-conv weights in matmul layout, made once per codec (they are read, never changed, at
# inference; the largest is 32 MB): nn.ConvTranspose1d -> [m*s*Cout, Cin].
_PREPARED: weakref.WeakKeyDictionary[nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()


def _is_conv_transpose(layer: nn.Module) -> bool:
    return isinstance(getattr(layer, "conv", None), nn.ConvTranspose1d)


class _NarrowConv1d:
    """EnCodec's last conv (64 channels -> 1 audio channel, k 7, reflect padding) as one matmul
    and k shifted adds. oneDNN's conv with a single output channel ran at ~5 GFLOP/s here (1.7 ms
    for a 10-frame call); [k*Cout, Cin] x [Cin, L], then summing row j shifted by j, does the
    same sums in ~0.5 ms. Equal up to float rounding."""

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


def _reach(layer: nn.Module) -> tuple[int, int]:
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
        block = [_reach(m) for m in layer.block]
        short = (0, 0) if isinstance(layer.shortcut, nn.Identity) else _reach(layer.shortcut)
        return max(sum(r[0] for r in block), short[0]), max(sum(r[1] for r in block), short[1])
    raise ValueError(f"unexpected layer in EnCodec's upsampling stack: {type(layer).__name__}")


class _Upsampler:
    """EnCodec's upsampling stack (ELUs, transposed convs x8 x5 x4 x4, residual blocks, last
    conv) over the LSTM output of a call, computing only the samples the wanted audio depends on.

    The stack reads less than a frame each side of an output sample, so a call hands it its
    frames plus one each side; but past the first transposed conv, each layer's input is cropped
    to the receptive field of the wanted output (a 10-frame call: 13 frames in, 11.0 frames'
    worth at the upper rates, 15% less work). What is cropped is exactly what the wanted output
    does not read, so the result is the same as running every layer over everything. At frame 0
    nothing is cropped on the left: the layers' own padding there is the one-shot decode's.
    """

    def __init__(self, layers: list[nn.Module]):
        self.layers: list = []
        self.shapes: list[tuple] = []  # ("same", reach left, reach right) / ("up", s, k, trim)
        for layer in layers:
            if _is_conv_transpose(layer):
                up = _ConvTranspose1d(layer)
                rank = sum(kind == "up" for kind, *_ in self.shapes)
                self.layers.append(up if rank < _MATMUL_CONV_TRANSPOSES else layer)
                self.shapes.append(("up", up.stride, up.kernel, up.trim_left))
            else:
                narrow = layer is layers[-1] and getattr(layer, "conv", None) is not None
                narrow = narrow and layer.conv.out_channels <= 2  # the audio output conv
                self.layers.append(_NarrowConv1d(layer) if narrow else layer)
                self.shapes.append(("same", *_reach(layer)))
        self._plans: dict[tuple[int, int, int], list[tuple[int, int]]] = {}

    def _plan(self, frames: int, lo: int, hi: int) -> list[tuple[int, int]]:
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
        plan = self._plan(y.shape[-1], lo, hi)
        for layer, shape, (a, b) in zip(self.layers, self.shapes, plan, strict=True):
            assert at <= a or at_zero, "upsampling margin too small before the wanted output"
            assert b <= at + y.shape[-1], "upsampling margin too small after the wanted output"
            a = max(a, at)  # at frame 0 the layers pad as the one-shot decode does
            y = layer(y[..., a - at : b - at])
            at = a * shape[1] if shape[0] == "up" else a  # a transposed conv maps t to s*t
        return y[..., lo - at : hi - at]


class _ManualLSTM:
    """`nn.LSTM` (no projection, not bidirectional) run step by step so that the state after
    every frame is available; same weights, same gate order (i, f, g, o).

    Per layer, the input projection of all frames of a call is one matmul; only `h @ W_hh` runs
    per frame. That per-frame product reads the whole 16 MB W_hh (musicgen) for one row of h, so
    it is bound by memory bandwidth (~0.7 ms per frame and layer here): the frames a call runs
    are what the LSTM costs. Both go through `_dense` (oneDNN), ~40% faster than MKL here."""

    def __init__(self, lstm: nn.LSTM):
        if lstm.bidirectional or lstm.proj_size or lstm.batch_first or not lstm.bias:
            raise ValueError("audio_encoder LSTM must be a plain unidirectional nn.LSTM with bias")
        self.layers = lstm.num_layers
        self.hidden = lstm.hidden_size
        with torch.no_grad():  # plain tensors: no autograd history kept alive by the decoder
            self.w_ih = [getattr(lstm, f"weight_ih_l{i}").detach() for i in range(self.layers)]
            self.w_hh = [getattr(lstm, f"weight_hh_l{i}").detach() for i in range(self.layers)]
            self.bias = [
                getattr(lstm, f"bias_ih_l{i}") + getattr(lstm, f"bias_hh_l{i}")
                for i in range(self.layers)
            ]

    def run(
        self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [n, B, D], h0/c0 [layers, B, H] -> (top-layer outputs [n, B, H],
        h and c after every frame [n, layers, B, H])."""
        n, b, H = x.shape[0], x.shape[1], self.hidden
        hs = x.new_empty(n, self.layers, b, H)
        cs = x.new_empty(n, self.layers, b, H)
        inp = x
        for layer in range(self.layers):
            pre = _dense(inp.reshape(n * b, -1), self.w_ih[layer], self.bias[layer])
            pre = pre.view(n, b, 4 * H)
            h, c = h0[layer], c0[layer]
            for t in range(n):
                gates = _dense(h, self.w_hh[layer]).add_(pre[t])  # [B, 4H]
                s = gates.sigmoid()
                c = s[:, H : 2 * H] * c + s[:, :H] * gates[:, 2 * H : 3 * H].tanh()
                h = s[:, 3 * H :] * c.tanh()
                hs[t, layer] = h
                cs[t, layer] = c
            inp = hs[:, layer]
        return hs[:, -1], hs, cs


@dataclass(frozen=True)
class _Carry:
    """What a call computed beyond its stop from lookahead codes, for the next call to go on from
    if those codes did not change (no prompt change): then every frame runs the LSTM once."""

    frame: int  # the call's stop: only a call starting there may use this
    codes: torch.Tensor  # [K, n] codes of frames [frame, frame + n), all the rest depends on
    y: torch.Tensor  # [m, B, D] LSTM block outputs of frames [frame - margin, frame + m - margin)
    h: torch.Tensor  # [e, layers, B, H] LSTM state after each frame of [frame, frame + e)
    c: torch.Tensor  # [e, layers, B, H]


class StreamingDecoder:
    """Tokens -> float32 PCM in chunks, each decoded with left context and lookahead, trimmed,
    joins crossfaded. One instance per stream; not thread-safe.

    Contract of `decode(codes, offset, start, stop)`: `codes[:, i]` is absolute frame `offset + i`;
    `offset <= max(0, start - context)` and `stop + lookahead <= offset + T`. A call with
    `start == previous stop` continues the stream; `start < previous stop` is a rewind. In both
    cases the codes before `start` must be the ones decoded before; codes from `start` on may
    differ from what earlier calls saw (a prompt change): the first `crossfade` samples then fade
    from the old audio to the new. A call with `start > previous stop` starts fresh.
    Memory: `history` x (LSTM state 2 x 2 x 1024 floats) per channel, about 10 MB mono for
    musicgen's codec, plus `history` frames of emitted audio; and once per codec, shared by its
    decoders, two transposed-conv weights in matmul layout (~39 MB for musicgen).
    """

    hop: int = HOP

    def __init__(
        self,
        audio_encoder: nn.Module,
        *,
        audio_channels: int,
        context: int = 25,
        lookahead: int | None = None,
        crossfade: int = 640,
        history: int = 640,
    ):
        """context: frames the caller supplies before `start` (up to 6 are read on a continuation
        or rewind, all of them warm the LSTM up on a fresh start); lookahead: frames needed beyond `stop`
        (default and minimum: what the convs and the crossfade need, 5); crossfade: samples,
        0..640; history: frames of LSTM states and emitted audio kept for exact rewinds."""
        if audio_channels not in (1, 2):
            raise ValueError(f"audio_channels must be 1 or 2, got {audio_channels!r}")
        if not 0 <= crossfade <= HOP:
            raise ValueError(f"crossfade must be in [0, {HOP}] samples, got {crossfade!r}")
        layers = audio_encoder.decoder.layers
        if len(layers) < 3 or not hasattr(layers[1], "lstm"):
            raise ValueError("audio_encoder.decoder must be EnCodec's conv -> LSTM -> upsampling")
        self._encoder = audio_encoder
        self._conv0 = layers[0]
        self._upsample = _Upsampler(list(layers[2:]))
        self._lstm = _ManualLSTM(layers[1].lstm)
        conv = self._conv0.conv
        self._half0 = (conv.kernel_size[0] - 1) * conv.dilation[0] // 2  # 3 for EnCodec 32 kHz
        self._rollback = max(self._half0, _UPSAMPLE_MARGIN)  # states re-run before `start`
        min_lookahead = self._half0 + _UPSAMPLE_MARGIN + (1 if crossfade else 0)
        min_context = self._rollback + self._half0
        if lookahead is None:
            lookahead = min_lookahead
        if lookahead < min_lookahead:
            raise ValueError(f"lookahead must be >= {min_lookahead} frames, got {lookahead!r}")
        if context < min_context:
            raise ValueError(f"context must be >= {min_context} frames, got {context!r}")
        if history <= self._rollback:
            raise ValueError(f"history must be > {self._rollback} frames, got {history!r}")
        self.channels = audio_channels
        self.context = context
        self.lookahead = lookahead
        self.crossfade = crossfade
        self.history = history
        param = next(audio_encoder.parameters())
        self._device, self._dtype = param.device, param.dtype
        fade = np.arange(crossfade, dtype=np.float64) + 0.5
        self._fade_in = (0.5 - 0.5 * np.cos(np.pi * fade / max(crossfade, 1))).astype(np.float32)
        state_shape = (history, self._lstm.layers, audio_channels, self._lstm.hidden)
        self._h = torch.zeros(state_shape, device=self._device, dtype=self._dtype)
        self._c = torch.zeros(state_shape, device=self._device, dtype=self._dtype)
        self._audio = np.zeros((audio_channels, history * HOP), dtype=np.float32)  # emitted ring
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next call starts fresh."""
        self._stop: int | None = None  # previous call's stop
        self._state_lo = 0  # states S[f] (before frame f) are valid for f in [lo, stop]
        self._audio_lo = 0  # emitted audio is kept for frames [lo, stop)
        self._tail: np.ndarray | None = None  # [C, crossfade] decoded just beyond stop
        self._carry: _Carry | None = None  # what the previous call computed beyond its stop

    @torch.inference_mode()
    def decode(self, codes: torch.LongTensor, offset: int, start: int, stop: int) -> np.ndarray:
        """codes [K, T] (K = 4 mono, 8 stereo interleaved) -> float32 [channels, (stop-start)*640],
        the audio of frames [start, stop)."""
        self._check(codes, offset, start, stop)
        rewind = self._stop is not None and start < self._stop
        end = stop + (1 if self.crossfade else 0) + _UPSAMPLE_MARGIN  # LSTM frames up to end
        first = max(0, start - _UPSAMPLE_MARGIN)  # the upsampling stack reads [first, end)
        carried = self._carry_fits(codes, offset, start)
        if carried:
            y, frame0, hs, cs = self._lstm_carried_on(codes, offset, end)
        else:
            y, frame0, hs, cs = self._lstm_from_state(codes, offset, start, end)
        # y: LSTM block output of frames [first, end) [n, B, D]; hs/cs: after frames [frame0, end)
        self._save_states(frame0, stop, hs, cs)
        self._carry = _Carry(
            frame=stop,
            codes=codes[:, stop - offset : end + self._half0 - offset].clone(),
            y=y[stop - _UPSAMPLE_MARGIN - first :],
            h=hs[stop - frame0 :],
            c=cs[stop - frame0 :],
        )

        n = (stop - start) * HOP
        lo = (start - first) * HOP  # the audio of [start, stop) and the crossfade tail after it
        # Carried on, the previous call's tail is already this call's first `crossfade` samples,
        # decoded from the same tokens: reuse it (no blend needed) rather than decode it again.
        done = self.crossfade if carried else 0
        y = self._upsample(
            y.permute(1, 2, 0), lo + done, lo + n + self.crossfade, at_zero=first == 0
        )
        audio = y[:, 0].float().cpu().numpy()  # [C, n + crossfade - done]
        if done:
            audio = np.concatenate([self._tail, audio], axis=1)
        out = np.ascontiguousarray(audio[:, :n])
        if not done:
            self._blend_join(out, start, rewind)
        self._tail = audio[:, n : n + self.crossfade].copy() if self.crossfade else None
        self._save_audio(out, start, stop, keep_old=self._stop is not None and start <= self._stop)
        self._stop = stop
        return out

    def _carry_fits(self, codes: torch.Tensor, offset: int, start: int) -> bool:
        """A continuation (start == previous stop) whose lookahead codes are the ones the previous
        call saw: what it computed beyond its stop is exact, no prompt change came in between."""
        carry = self._carry
        if carry is None or start != carry.frame:
            return False
        seen = codes[:, start - offset : start - offset + carry.codes.shape[1]]
        return torch.equal(seen, carry.codes.to(seen.device))

    def _lstm_carried_on(self, codes: torch.Tensor, offset: int, end: int):
        """Run only the new frames, from the state the previous call reached at its end."""
        carry = self._carry
        resume = carry.frame + carry.h.shape[0]  # the previous call's end
        x = self._first_conv(codes, offset, resume, end)  # [end - resume, B, D]
        top, hs, cs = self._lstm.run(x, carry.h[-1], carry.c[-1])  # frames [resume, end)
        y = torch.cat([carry.y, top + x])  # frames [start - margin, end)
        return y, carry.frame, torch.cat([carry.h, hs]), torch.cat([carry.c, cs])

    def _lstm_from_state(self, codes: torch.Tensor, offset: int, start: int, end: int):
        """Re-run the LSTM from the ring state `rollback` frames before `start` (the frames whose
        conv input reaches codes from `start` on, which may have changed), or warm it up."""
        resume = max(0, start - self._rollback)  # first LSTM frame run in this call
        exact = resume == 0 or (
            self._stop is not None and self._state_lo <= resume and start <= self._stop
        )
        warm = resume if exact else max(start - self.context, offset + self._half0 if offset else 0)
        x = self._first_conv(codes, offset, warm, end)  # [end - warm, B, D]
        h0, c0 = self._initial_state(resume if exact else None, x.shape[1])
        if not exact and resume > warm:  # fresh start: warm the LSTM up, keep only its last state
            _, hs, cs = self._lstm.run(x[: resume - warm], h0, c0)
            h0, c0 = hs[-1], cs[-1]
        x = x[resume - warm :]
        top, hs, cs = self._lstm.run(x, h0, c0)  # frames [resume, end)
        self._h[resume % self.history] = h0
        self._c[resume % self.history] = c0
        if not exact:
            self._state_lo = resume
        first = max(0, start - _UPSAMPLE_MARGIN)
        return (top + x)[first - resume :], resume, hs, cs

    def _check(self, codes: torch.Tensor, offset: int, start: int, stop: int) -> None:
        if codes.dim() != 2 or codes.shape[0] % self.channels:
            raise ValueError(
                f"codes must be [K, T] with K a multiple of {self.channels}, got {tuple(codes.shape)}"
            )
        if not 0 <= offset <= start < stop:
            raise ValueError(
                f"need 0 <= offset <= start < stop, got offset={offset} start={start} stop={stop}"
            )
        if offset > max(0, start - self.context):
            raise ValueError(
                f"start={start} needs context: codes from frame {max(0, start - self.context)}, "
                f"but offset={offset}"
            )
        have = offset + codes.shape[1]
        if stop + self.lookahead > have:
            raise ValueError(
                f"stop={stop} needs lookahead: codes up to frame {stop + self.lookahead}, "
                f"but they end at {have}"
            )

    def _first_conv(self, codes: torch.Tensor, offset: int, lo: int, hi: int) -> torch.Tensor:
        """LSTM inputs of frames [lo, hi): [hi - lo, B, D], exact (convs see 3 frames each side)."""
        c0 = max(0, lo - self._half0)  # at frame 0 the conv pads like the one-shot decode does
        c1 = hi + self._half0
        chunk = _split_channels(codes[:, c0 - offset : c1 - offset], self.channels)  # [B, Kc, n]
        chunk = chunk.to(self._device)
        emb = self._encoder.quantizer.decode(chunk.transpose(0, 1)).to(self._dtype)  # [B, D, n]
        x = self._conv0(emb)[..., lo - c0 : hi - c0]  # [B, D, hi - lo]
        return x.permute(2, 0, 1)

    def _initial_state(self, frame: int | None, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """State before `frame` from the ring (zeros at frame 0 or when None): [layers, B, H] x2."""
        if frame is None or frame == 0:
            shape = (self._lstm.layers, batch, self._lstm.hidden)
            zeros = torch.zeros(shape, device=self._device, dtype=self._dtype)
            return zeros, zeros.clone()
        i = frame % self.history
        return self._h[i].clone(), self._c[i].clone()

    def _save_states(self, frame0: int, stop: int, hs: torch.Tensor, cs: torch.Tensor) -> None:
        """Ring slots of S[f] for f in (frame0, stop]; hs[t] is the state after frame frame0+t."""
        first = max(frame0 + 1, stop - self.history + 1)
        slots = torch.arange(first, stop + 1, device=self._device) % self.history
        self._h.index_copy_(0, slots, hs[first - 1 - frame0 : stop - frame0])
        self._c.index_copy_(0, slots, cs[first - 1 - frame0 : stop - frame0])
        self._state_lo = max(self._state_lo, stop - self.history + 1)

    def _blend_join(self, out: np.ndarray, start: int, rewind: bool) -> None:
        """Crossfade the first samples of `out` from what was decoded for them before."""
        if not self.crossfade or self._stop is None:
            return
        if start == self._stop and self._tail is not None:
            old = self._tail
        elif rewind and start >= self._audio_lo:
            i = (start % self.history) * HOP
            old = self._audio[:, i : i + self.crossfade]
        else:
            return
        out[:, : self.crossfade] = old + (out[:, : self.crossfade] - old) * self._fade_in

    def _save_audio(self, out: np.ndarray, start: int, stop: int, *, keep_old: bool) -> None:
        for f in range(max(start, stop - self.history), stop):
            i = (f % self.history) * HOP
            self._audio[:, i : i + HOP] = out[:, (f - start) * HOP : (f - start + 1) * HOP]
        lo = self._audio_lo if keep_old else start
        self._audio_lo = max(lo, stop - self.history)
