"""The streaming EnCodec decoder: MusicGen tokens become 32 kHz PCM chunk by chunk, at a constant
cost per second of audio, equal to the one-shot decode (`engine.codec.one_shot`) of the same
tokens. This module holds the stream's state: the LSTM states of the last frames, what a call
computed beyond its stop, the audio emitted, and the crossfades of the joins.

MusicGen's EnCodec decoder is `conv(k=7) -> LSTM(2 layers) -> upsampling convs (x640)`. The convs
are non-causal but short: the first looks 3 frames each way, the upsampling stack less than one.
The LSTM is causal but remembers the whole past, so re-decoding a few frames of left context
only approximates it. `StreamingDecoder` therefore splits the decoder in three stages:

1. codebook embeddings + first conv over the codes of the new frames plus 3 frames each side;
2. the LSTM, run one frame at a time from an exact saved state (`engine.codec.lstm`). A plain
   continuation (no token changed since the previous call) goes on from the state and outputs
   the previous call computed in its lookahead, so each frame runs once. Otherwise (a prompt
   change, a rewind) it re-runs the 3 frames before `start` too (through the first conv they
   read tokens from `start` on) from the state saved before them: the state before every frame
   of the last `history` frames is kept in a ring, so a rewind `k` frames back restarts exactly;
3. the upsampling stack over the LSTM output of the chunk plus at most one frame each side,
   each layer cropped to the samples the wanted audio depends on (`engine.codec.upsampler`).

Each call thus decodes `stop - start` frames plus a fixed margin, never the history; the audio
equals the one-shot decode of the same weights up to float rounding (> 120 dB SNR, see the tests
and `bench/bench_codec.py`). Each call also decodes the first `crossfade` samples after `stop`
(the tail). The first `crossfade` samples of the next call are blended from what was decoded
for them before (the tail on a continuation, the audio emitted on a rewind), so joins and
prompt changes never click; on a carried continuation the tail was decoded from the same
tokens, so it is used as it is. A call that can not resume from a saved state
(the first call of a stream that does not start at frame 0, or a rewind beyond `history`)
warms the LSTM up from zeros over the `context` frames before `start`: approximate, since
nothing before it was decoded. docs/codec.md has the costs and where they go.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engine.codec.layers import TimeMajorConv1d
from engine.codec.lstm import FrameLSTM
from engine.codec.one_shot import split_channels
from engine.codec.upsampler import UPSAMPLE_MARGIN, CroppedUpsampler

HOP = 640  # samples per token frame at 32 kHz


@dataclass(frozen=True)
class _Carry:
    """What a call computed beyond its stop from lookahead codes, for the next call to go on from
    if those codes did not change (no prompt change): then every frame runs the LSTM once."""

    frame: int  # the call's stop: only a call starting there may use this
    codes: torch.Tensor  # [K, n] codes of frames [frame, frame + n), all the rest depends on
    y: torch.Tensor  # [m, B, D] LSTM block outputs of frames [frame - margin, frame + m - margin)
    h: torch.Tensor  # [e, layers, B, H] LSTM state after each frame of [frame, frame + e)
    c: torch.Tensor  # [e, layers, B, H]


@dataclass
class _Call:
    """One `decode` call on its way through the stages (see `StreamingDecoder._begin`)."""

    codes: torch.Tensor  # [K, T], frame `offset` first
    offset: int
    start: int
    stop: int
    end: int  # the LSTM runs up to here: stop + crossfade tail frame + upsampling margin
    first: int  # the upsampler reads LSTM frames [first, end)
    x: torch.Tensor  # [frames, B, D] the LSTM's input of the frames it runs
    h0: torch.Tensor  # [layers, B, H] the state it starts from
    c0: torch.Tensor
    rewind: bool = False  # start before the previous call's stop
    carry: _Carry | None = None  # what the previous call computed beyond its stop, gone on from
    resume: int = 0  # first frame the LSTM runs (not carried)

    @property
    def carried(self) -> bool:
        return self.carry is not None


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
    decoders, the transposed convs' weights in matmul layout (~39 MB for musicgen; in bfloat16
    too, ~20 MB, where the stack runs in it) and the float16 copy of the LSTM's recurrent
    weights (16 MB).
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
        upsample_dtype: torch.dtype | None = None,
    ):
        """context: frames the caller supplies before `start` (up to 6 are read on a continuation
        or rewind, all of them warm the LSTM up on a fresh start); lookahead: frames needed beyond `stop`
        (default and minimum: what the convs and the crossfade need, 5); crossfade: samples,
        0..640; history: frames of LSTM states and emitted audio kept for exact rewinds;
        upsample_dtype: the upsampling stack's weights and activations (None: the codec's own;
        `torch.bfloat16` on a CPU with AMX: docs/codec.md)."""
        if audio_channels not in (1, 2):
            raise ValueError(f"audio_channels must be 1 or 2, got {audio_channels!r}")
        if not 0 <= crossfade <= HOP:
            raise ValueError(f"crossfade must be in [0, {HOP}] samples, got {crossfade!r}")
        layers = audio_encoder.decoder.layers
        if len(layers) < 3 or not hasattr(layers[1], "lstm"):
            raise ValueError("audio_encoder.decoder must be EnCodec's conv -> LSTM -> upsampling")
        self._encoder = audio_encoder
        self._conv0 = TimeMajorConv1d(layers[0])
        self._upsample = CroppedUpsampler(list(layers[2:]), upsample_dtype)
        self.upsample_dtype = upsample_dtype
        self._lstm = FrameLSTM(layers[1].lstm)
        if self._conv0.left != self._conv0.right:
            raise ValueError("expected EnCodec's first conv to look as far back as ahead")
        self._half0 = self._conv0.left  # frames the first conv reads each side: 3 (k 7)
        self._rollback = max(self._half0, UPSAMPLE_MARGIN)  # states re-run before `start`
        min_lookahead = self._half0 + UPSAMPLE_MARGIN + (1 if crossfade else 0)
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

    @property
    def lstm_float16(self) -> bool:
        """Whether the LSTM's recurrence runs the float16 kernel (weights rounded, CPU able)."""
        return self._lstm.float16

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
        call = self._begin(codes, offset, start, stop)
        top, hs, cs = self._lstm.run(call.x, call.h0, call.c0)
        y, lo, hi = self._after_lstm(call, top, hs, cs)
        return self._finish(call, self._upsample(y, lo, hi, at_zero=call.first == 0))

    # The stages of a call: `_begin` (checks, first conv, the state the LSTM starts from), the
    # LSTM run, `_after_lstm` (states saved, lookahead carried, the upsampler's input), the
    # upsampler, `_finish` (crossfade, audio kept). `engine.codec.batched` runs the LSTM and the
    # upsampler of several streams' calls together between the same stages.

    def _begin(self, codes: torch.Tensor, offset: int, start: int, stop: int) -> _Call:
        self._check(codes, offset, start, stop)
        end = stop + (1 if self.crossfade else 0) + UPSAMPLE_MARGIN  # LSTM frames up to end
        first = max(0, start - UPSAMPLE_MARGIN)
        rewind = self._stop is not None and start < self._stop
        carry = self._carry_for(codes, offset, start)
        if carry is not None:  # run only the new frames, from the state the previous call reached
            resume = carry.frame + carry.h.shape[0]  # the previous call's end
            x = self._first_conv(codes, offset, resume, end)  # [end - resume, B, D]
            h0, c0 = carry.h[-1], carry.c[-1]
            return _Call(codes, offset, start, stop, end, first, x, h0, c0, rewind, carry)
        x, h0, c0, resume = self._from_saved_state(codes, offset, start, end)
        return _Call(codes, offset, start, stop, end, first, x, h0, c0, rewind, resume=resume)

    def _from_saved_state(
        self, codes: torch.Tensor, offset: int, start: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Re-run the LSTM from the ring state `rollback` frames before `start` (the frames whose
        conv input reaches codes from `start` on, which may have changed), or warm it up ->
        the LSTM's input from the first frame it runs, its state there, and that frame."""
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
        self._h[resume % self.history] = h0
        self._c[resume % self.history] = c0
        if not exact:
            self._state_lo = resume
        return x[resume - warm :], h0, c0, resume

    def _after_lstm(
        self, call: _Call, top: torch.Tensor, hs: torch.Tensor, cs: torch.Tensor
    ) -> tuple[torch.Tensor, int, int]:
        """Save the states, carry the lookahead; -> (the upsampler's input [B, end - first, D]
        and the samples [lo, hi) it must produce, counted from frame `first`)."""
        y = top + call.x  # the LSTM block's output (its skip connection) of the frames run
        if call.carry is not None:
            carry = call.carry
            y = torch.cat([carry.y, y])  # frames [start - margin, end)
            frame0, hs, cs = carry.frame, torch.cat([carry.h, hs]), torch.cat([carry.c, cs])
        else:
            y, frame0 = y[call.first - call.resume :], call.resume
        # y: frames [first, end) [n, B, D]; hs/cs: states after frames [frame0, end)
        stop, end = call.stop, call.end
        self._save_states(frame0, stop, hs, cs)
        self._carry = _Carry(
            frame=stop,
            codes=call.codes[:, stop - call.offset : end + self._half0 - call.offset].clone(),
            y=y[stop - UPSAMPLE_MARGIN - call.first :],
            h=hs[stop - frame0 :],
            c=cs[stop - frame0 :],
        )
        n = (stop - call.start) * HOP
        lo = (call.start - call.first) * HOP  # the audio of [start, stop) and the tail after it
        # Carried on, the previous call's tail is already this call's first `crossfade` samples,
        # decoded from the same tokens: reuse it (no blend needed) rather than decode it again.
        done = self.crossfade if call.carried else 0
        return y.transpose(0, 1), lo + done, lo + n + self.crossfade

    def _finish(self, call: _Call, y: torch.Tensor) -> np.ndarray:
        """y [B, samples, 1]: the upsampler's output -> the call's audio, joins crossfaded."""
        start, stop = call.start, call.stop
        n = (stop - start) * HOP
        audio = y[..., 0].float().cpu().numpy()  # [C, n + crossfade - done]
        if call.carried:
            audio = np.concatenate([self._tail, audio], axis=1)
        out = np.ascontiguousarray(audio[:, :n])
        if not call.carried:
            self._blend_join(out, start, call.rewind)
        self._tail = audio[:, n : n + self.crossfade].copy() if self.crossfade else None
        self._save_audio(out, start, stop, keep_old=self._stop is not None and start <= self._stop)
        self._stop = stop
        return out

    def _carry_for(self, codes: torch.Tensor, offset: int, start: int) -> _Carry | None:
        """The previous call's carry when this one continues it (start == previous stop) with the
        lookahead codes it saw: what it computed beyond its stop is exact, no prompt change came
        in between; else None."""
        carry = self._carry
        if carry is None or start != carry.frame:
            return None
        seen = codes[:, start - offset : start - offset + carry.codes.shape[1]]
        return carry if torch.equal(seen, carry.codes.to(seen.device)) else None

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
        chunk = split_channels(codes[:, c0 - offset : c1 - offset], self.channels)  # [B, Kc, n]
        chunk = chunk.to(self._device)
        emb = self._encoder.quantizer.decode(chunk.transpose(0, 1)).to(self._dtype)  # [B, D, n]
        x = self._conv0(emb.transpose(1, 2), at_start=c0 == 0)  # frames [c0 + 3 or 0, c1 - 3)
        first = c0 if c0 == 0 else c0 + self._half0
        return x[:, lo - first : hi - first].transpose(0, 1)  # [hi - lo, B, D]

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
