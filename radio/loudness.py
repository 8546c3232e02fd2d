"""Streaming loudness normalization: BS.1770 loudness toward a target, and a true-peak ceiling.

Loudness is measured in fixed 100 ms blocks and audio leaves in fixed 20 ms slices of them,
whatever chunk sizes the caller pushes (so chunking never changes the result), with a constant
delay of `latency_samples`: a slice and the limiter's lookahead (with the interpolator's
context), 22.5 ms at 32 kHz. A slice leaves as soon as that much of the next one has arrived: its
gain is known before its block is complete, because a block's gain ramps toward what the blocks
before it measured (a 100 ms later reaction of a gain that moves a few dB per second). Whole
blocks out, the stage delayed every sample by 102.5 ms, and every prompt change's first sample
with them; 10 ms slices cost twice the CPU of whole blocks (25 against 12 ms a second of mono
audio, `python bench/audio_cost.py`), 20 ms slices ~1.4x.

1. **Measure.** Each input block is K-weighted (BS.1770's two biquads, run as one stream with
   carried state) and its mean square kept; the last `window_seconds` form 400 ms gating blocks
   with 75 % overlap, gated at -70 LUFS and -10 LU as in BS.1770-4: the window's integrated
   loudness.
2. **Gain.** The gain moves toward `target - loudness` (measured up to the block before) at a
   bounded dB/s (fast while acquiring
   the first lock, then slowly: no pumping), ramped sample by sample, never above `max_gain_db`.
   A window, or a last 400 ms, quieter than `gate_lufs` (silence, a fade-out) holds the gain.
3. **True-peak limit.** The gained signal is oversampled 4x with a polyphase FIR to estimate
   inter-sample peaks; a lookahead limiter (forward minimum over `lookahead_ms`, dB-linear
   release, moving-average smoothing) keeps every sample and every 4x peak at or below the
   ceiling (less a small safety margin), and a final clip guards sample peaks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from radio import dsp

_OVERSAMPLE = 4
_FIR_TAPS = 81  # ~20 per phase: the same interpolator as scipy's resample_poly(x, 4, 1)
_PAD = 16  # input samples of context on each side of a slice for the FIR
SLICES = 5  # a 100 ms block leaves in this many slices (20 ms each)


@dataclass(frozen=True)
class LoudnessOptions:
    """Tuning of the normalizer; the defaults suit music for streaming."""

    window_seconds: float = 3.0  # loudness is measured over this much recent audio
    max_gain_db: float = 24.0  # never boost more than this (quiet input, near-silence)
    min_gain_db: float = -40.0  # never cut more than this
    gate_lufs: float = -50.0  # a window quieter than this holds the gain (silence, fades)
    acquire_db_per_s: float = 24.0  # slew until the gain first reaches its target
    up_db_per_s: float = 3.0  # slew afterwards when the gain rises
    down_db_per_s: float = 6.0  # slew afterwards when the gain falls (louder input)
    lookahead_ms: float = 2.0  # true-peak limiter attack/lookahead
    release_db_per_s: float = 40.0  # limiter recovery speed
    margin_db: float = 0.2  # the limiter aims this far below the ceiling


class LoudnessNormalizer:
    """pcm [C, N] float32 in, [C, N] out, `latency_samples` later, at the target loudness."""

    def __init__(
        self,
        sample_rate: int,
        channels: int,
        target_lufs: float = -14.0,
        true_peak_dbtp: float = -1.0,
        options: LoudnessOptions | None = None,
    ) -> None:
        if sample_rate < 8000:
            raise ValueError(f"sample_rate must be at least 8000, got {sample_rate}")
        if channels not in (1, 2):
            raise ValueError(f"channels must be 1 or 2, got {channels}")
        if not -70.0 < target_lufs < 0.0:
            raise ValueError(f"target_lufs must be in (-70, 0), got {target_lufs}")
        if true_peak_dbtp > 0.0:
            raise ValueError(f"true_peak_dbtp must be <= 0, got {true_peak_dbtp}")
        self.options = opt = options or LoudnessOptions()
        if opt.window_seconds < 0.4:
            raise ValueError(f"window_seconds must be at least 0.4, got {opt.window_seconds}")
        self.sample_rate = sample_rate
        self.channels = channels
        self.target_lufs = target_lufs
        self.true_peak_dbtp = true_peak_dbtp
        self.block = round(sample_rate / 10)  # 100 ms: the BS.1770 gating step
        # where each slice of a block ends (sizes differ by at most one sample)
        self._ends = [round(self.block * (i + 1) / SLICES) for i in range(SLICES)]
        self._lookahead = max(1, round(opt.lookahead_ms * sample_rate / 1000))
        slice_min = self.block // SLICES
        assert self._lookahead + 2 * _PAD < slice_min, "lookahead must fit in one slice"
        self._ahead = self._lookahead + _PAD  # samples of the next slice a slice's limiter reads
        self.latency_samples = -(-self.block // SLICES) + self._ahead
        self._ceiling = 10 ** ((true_peak_dbtp - opt.margin_db) / 20)
        self._hard_ceiling = 10 ** (true_peak_dbtp / 20)
        self._release = opt.release_db_per_s / sample_rate  # dB per sample
        self._fir = dsp.lowpass_fir(_FIR_TAPS, 1.0 / _OVERSAMPLE, beta=5.0) * _OVERSAMPLE
        k_weighting = dsp.impulse_response(dsp.k_weighting(sample_rate))  # [L] as a long FIR
        self._k_weighting = dsp.StreamFilter(k_weighting, channels)
        self._window_blocks = round(opt.window_seconds * 10)
        self.reset()

    def reset(self) -> None:
        """Forget all state: as if just constructed (the next output starts with the latency)."""
        c, b = self.channels, self.block
        # [C, < slice + ahead] input from the next slice to hand out on
        self._in = np.zeros((c, 0), np.float32)
        # [C, n] ready to hand out: the latency's zeros first
        self._out = np.zeros((c, self.latency_samples), np.float32)
        self._k_weighting.reset()
        self._ms = np.zeros(0)  # [<= window] channel-summed K-weighted mean square per block
        self._slice = 0  # the next slice's index in its block
        self._block_in: list[np.ndarray] = []  # the block's slices so far, as they came in
        self._prev = np.zeros((c, b), np.float32)  # the last slice handed out, gained
        self._gtail = np.ones(self._lookahead - 1)  # last limiter gains before smoothing
        self._release_db = 0.0  # limiter gain (dB, <= 0) at the end of the last slice
        self._gain_from = 0.0  # the loudness gain at the start of the next block (dB)
        self._started = False  # a block was handed out since the reset
        self.gain_db = 0.0  # where the loudness gain ramps to over the next block
        self.loudness_lufs = float("-inf")  # the last window measurement (before gain)
        self.limiter_db = 0.0  # deepest limiter gain in the last block (<= 0)
        self._locked = False

    def process(self, pcm: np.ndarray) -> np.ndarray:
        """Push pcm [C, N]; return the next N output samples [C, N] (float32)."""
        if pcm.ndim != 2 or pcm.shape[0] != self.channels:
            raise ValueError(f"pcm must be [{self.channels}, N], got {pcm.shape}")
        n = pcm.shape[1]
        buf = np.concatenate([self._in, pcm.astype(np.float32, copy=False)], axis=1)
        start, outs = 0, [self._out]
        while True:
            m = self._ends[self._slice] - self._slice_start()
            if buf.shape[1] - start < m + self._ahead:  # a slice and the next one's start
                break
            piece = buf[:, start : start + m]
            outs.append(self._process_slice(piece, buf[:, start + m : start + m + self._ahead]))
            start += m
        self._in = buf[:, start:].copy()
        ready = np.concatenate(outs, axis=1)
        self._out = ready[:, n:]
        return ready[:, :n]

    # -- one slice -------------------------------------------------------------------------
    def _slice_start(self) -> int:
        """Where the next slice begins in its block."""
        return self._ends[self._slice - 1] if self._slice else 0

    def _gained(self, x: np.ndarray, g0: float, g1: float, at: int) -> np.ndarray:
        """x [C, m] (samples `at` to `at + m` of a block) times the gain ramping from g0 to g1
        dB over the whole block."""
        ramp = g0 + (g1 - g0) * np.arange(at + 1, at + x.shape[1] + 1) / self.block  # [m] dB
        return (x * 10 ** (ramp / 20)).astype(np.float32)

    def _process_slice(self, x: np.ndarray, ahead: np.ndarray) -> np.ndarray:
        """Gain the next slice of block k (x [C, m]) with the gain the blocks before it chose;
        after its last slice, measure block k and choose block k+1's; return the slice limited,
        with the start of the next slice (`ahead`, gained with its own block's gain) as the
        limiter's lookahead."""
        y = self._gained(x, self._gain_from, self.gain_db, self._slice_start())
        if not self._started:  # the silence before the first slice: its limiter gains must
            self._started = True  # already respect the first slice's opening peaks
            silence = np.zeros_like(y)
            self._limit(silence, silence, y)
        self._block_in.append(x)
        self._slice += 1
        if self._slice == SLICES:
            self._measure(np.concatenate(self._block_in, axis=1))
            self._block_in, self._slice = [], 0
            self._gain_from, self.gain_db = self.gain_db, self._next_gain(self.gain_db)
        after = self._gained(ahead, self._gain_from, self.gain_db, self._slice_start())
        out = self._limit(self._prev, y, after)
        self._prev = y
        return out

    def _measure(self, x: np.ndarray) -> None:
        w = self._k_weighting(x)  # [C, B] float64
        ms = float(np.sum(np.mean(w * w, axis=1)))  # channel gains are 1 for L, R (and mono)
        self._ms = np.append(self._ms, ms)[-self._window_blocks :]

    def _window_loudness(self) -> float:
        """BS.1770-4 gated loudness of the window (400 ms blocks, 75 % overlap)."""
        if len(self._ms) < 4:
            return float("-inf")
        z = np.convolve(self._ms, np.full(4, 0.25), mode="valid")  # [J] 400 ms mean squares
        with np.errstate(divide="ignore"):
            lj = -0.691 + 10 * np.log10(z)
        z = z[lj >= -70.0]
        if len(z) == 0:
            return float("-inf")
        rel = -0.691 + 10 * np.log10(np.mean(z)) - 10.0
        z = z[-0.691 + 10 * np.log10(z) > rel]
        return float(-0.691 + 10 * np.log10(np.mean(z)))

    def _recent_loudness(self) -> float:
        """Loudness of the last 400 ms (-inf before there is that much)."""
        if len(self._ms) < 4:
            return float("-inf")
        with np.errstate(divide="ignore"):
            return float(-0.691 + 10 * np.log10(np.mean(self._ms[-4:])))

    def _next_gain(self, g: float) -> float:
        opt = self.options
        self.loudness_lufs = loud = self._window_loudness()
        if loud < opt.gate_lufs or self._recent_loudness() < opt.gate_lufs:
            return g  # silence (in the window or just starting) or a fade: hold
        want = min(opt.max_gain_db, max(opt.min_gain_db, self.target_lufs - loud))
        if not self._locked:
            step = opt.acquire_db_per_s / 10
            self._locked = abs(want - g) <= step
        elif want > g:
            step = opt.up_db_per_s / 10
        else:
            step = opt.down_db_per_s / 10
        return g + float(np.clip(want - g, -step, step))

    # -- true-peak limiter -----------------------------------------------------------------
    def _true_peak(self, ext: np.ndarray) -> np.ndarray:
        """ext [C, M] -> [M-1]: the largest |value| over each sample interval [n, n+1], 4x."""
        up = dsp.upsample(self._fir, ext, _OVERSAMPLE)  # [C, 4 (M - 1) + taps]
        delay = (_FIR_TAPS - 1) / 2  # upsampled samples
        first = int(np.ceil(delay))  # up[first + 4n + j] lies inside [n, n+1] for j in 0..3
        m = ext.shape[1] - 1
        inter = np.abs(up[:, first : first + _OVERSAMPLE * m]).reshape(ext.shape[0], m, 4)
        a = np.abs(ext)
        peak = np.maximum(np.maximum(a[:, :-1], a[:, 1:]), inter.max(axis=2))  # [C, M-1]
        return peak.max(axis=0)

    def _limit(self, before: np.ndarray, y: np.ndarray, after: np.ndarray) -> np.ndarray:
        """Limit y [C, m] using context from the slices before and after it."""
        b, la = y.shape[1], self._lookahead
        ext = np.concatenate([before[:, -_PAD:], y, after[:, : la + _PAD]], axis=1)
        peak = self._true_peak(ext)  # [PAD + m + la + PAD - 1], index i = ext sample i
        lim = self._hard_ceiling
        if peak.max() <= self._ceiling and self._release_db == 0.0 and self._gtail.min() == 1.0:
            self.limiter_db = 0.0
            return np.clip(y, -lim, lim)  # nothing to limit: the common case, fast
        need = np.minimum(1.0, self._ceiling / np.maximum(peak, 1e-12))
        # Forward minimum: gain at n must respect every interval in [n - 1, n + la + 1].
        size = la + 3
        fwd = dsp.forward_min(need, size)  # min of need[i : i + size]
        fwd = fwd[_PAD - 1 : _PAD - 1 + b]  # [m]
        # dB-linear release: g[n] = min(fwd[n], g[n-1] + r), as a running minimum.
        fwd_db = 20 * np.log10(fwd)
        ramp = self._release * np.arange(b)
        held = np.minimum.accumulate(fwd_db - ramp) + ramp
        held = np.minimum(held, self._release_db + self._release * np.arange(1, b + 1))
        self._release_db = float(held[-1])
        # Moving average over the lookahead: every term respects the peaks at n.
        g = np.concatenate([self._gtail, 10 ** (held / 20)])
        c = np.concatenate([[0.0], np.cumsum(g)])
        smooth = (c[la:] - c[:-la]) / la  # [m]
        self._gtail = g[len(g) - (la - 1) :] if la > 1 else g[:0]
        self.limiter_db = float(20 * np.log10(smooth.min()))
        return np.clip(y * smooth.astype(np.float32), -lim, lim)
