"""The signal-processing pieces of the loudness normalizer, in numpy alone.

They replace scipy and pyloudnorm at run time (importing scipy.signal and scipy.ndimage cost
~0.8 s of `radio serve`'s start) and compute the same numbers; tests/radio/test_dsp.py checks
each one against its scipy or pyloudnorm original.

- `k_weighting(rate)`: the BS.1770 K-weighting biquads (a high shelf, then a high pass), from the
  same cookbook formulas pyloudnorm uses, for any sample rate.
- `impulse_response(biquads)` and `StreamFilter`: a cascade of biquads run on consecutive chunks
  as one stream (what `lfilter` with carried state does): its impulse response, truncated where it
  has decayed below 1e-15 of its peak, applied by FFT convolution with overlap-add.
- `lowpass_fir` (scipy's `firwin` with a Kaiser window), `upsample` (`upfirdn` with `up`), and
  `forward_min` (`minimum_filter1d` looking ahead, with the end padded by its last value).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

Biquad = tuple[np.ndarray, np.ndarray]  # (b [3], a [3]) with a[0] == 1

_TRUNCATE = 1e-15  # the impulse response ends where it stays below this fraction of its peak


# -- K-weighting ----------------------------------------------------------------------------
def k_weighting(sample_rate: float) -> list[Biquad]:
    """BS.1770's two K-weighting stages at `sample_rate`: a +4 dB high shelf, a 38 Hz high pass."""
    return [
        _high_shelf(gain_db=4.0, q=1 / math.sqrt(2), fc=1500.0, sample_rate=sample_rate),
        _high_pass(q=0.5, fc=38.0, sample_rate=sample_rate),
    ]


def _high_shelf(gain_db: float, q: float, fc: float, sample_rate: float) -> Biquad:
    """RBJ cookbook high shelf (the design pyloudnorm uses for BS.1770's first stage)."""
    amp = 10 ** (gain_db / 40)
    w0 = 2 * math.pi * fc / sample_rate
    cos, slope = math.cos(w0), 2 * math.sqrt(amp) * math.sin(w0) / (2 * q)
    b = amp * np.array(
        [(amp + 1) + (amp - 1) * cos + slope, -2 * ((amp - 1) + (amp + 1) * cos),
         (amp + 1) + (amp - 1) * cos - slope]
    )  # fmt: skip
    a = np.array(
        [(amp + 1) - (amp - 1) * cos + slope, 2 * ((amp - 1) - (amp + 1) * cos),
         (amp + 1) - (amp - 1) * cos - slope]
    )  # fmt: skip
    return b / a[0], a / a[0]


def _high_pass(q: float, fc: float, sample_rate: float) -> Biquad:
    """RBJ cookbook high pass (BS.1770's second stage, the "RLB" curve)."""
    w0 = 2 * math.pi * fc / sample_rate
    cos, alpha = math.cos(w0), math.sin(w0) / (2 * q)
    b = np.array([(1 + cos) / 2, -(1 + cos), (1 + cos) / 2])
    a = np.array([1 + alpha, -2 * cos, 1 - alpha])
    return b / a[0], a / a[0]


# -- a cascade of biquads as a long FIR -----------------------------------------------------
def impulse_response(biquads: list[Biquad]) -> np.ndarray:
    """[L] response of the cascade, cut where it has decayed below `_TRUNCATE` of its peak."""
    # The slowest pole sets the length: |h| ~ n r^n (the 38 Hz high pass has a double pole), so
    # twice the n where r^n reaches the threshold is ample; the cut below then finds the end.
    radius = max(float(np.abs(np.roots(a)).max()) for _, a in biquads)
    n = 2 * math.ceil(math.log(_TRUNCATE) / math.log(radius)) + 16
    h = np.zeros(n)
    h[0] = 1.0  # a unit impulse, through each stage in turn
    for b, a in biquads:
        h = _run_biquad(b, a, h)
    above = np.flatnonzero(np.abs(h) >= _TRUNCATE * np.abs(h).max())
    assert above[-1] < n - 16, "the impulse response was cut before it decayed"
    return h[: above[-1] + 1]


def _run_biquad(b: np.ndarray, a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[n] -> [n]: one biquad, sample by sample (transposed direct form II, as lfilter).

    A Python loop, run once per station for the impulse response (~4 ms at 32 kHz): vectorised
    shortcuts (powers of the state matrix) lose digits on the high pass's double pole.
    """
    b0, b1, b2 = (float(v) for v in b)
    _, a1, a2 = (float(v) for v in a)
    y, s1, s2 = [], 0.0, 0.0
    for v in x.tolist():
        out = b0 * v + s1
        s1 = b1 * v - a1 * out + s2
        s2 = b2 * v - a2 * out
        y.append(out)
    return np.array(y)


def _fft_size(n: int) -> int:
    """Smallest 2^i 3^j 5^k >= n: numpy's FFT is fast on those lengths, slow on large primes."""
    best = 1 << (n - 1).bit_length()
    odd5 = 1
    while odd5 < best:
        odd = odd5
        while odd < best:
            best = min(best, odd << (-(-n // odd) - 1).bit_length())  # odd * 2^i >= n
            odd *= 3
        odd5 *= 5
    return best


class StreamFilter:
    """A long FIR h [L] run on consecutive chunks x [C, n] as one stream, any chunk sizes.

    Each chunk is convolved in full by FFT; the last L - 1 outputs (the response still ringing
    past the chunk) are carried and added to the next chunk's start: they are the filter's state.
    """

    def __init__(self, response: np.ndarray, channels: int) -> None:
        self.response = response  # [L]
        self.channels = channels
        self._spectra: dict[int, np.ndarray] = {}  # rfft of the response by FFT size
        self.reset()

    def reset(self) -> None:
        """Forget the stream: as if only zeros had come in."""
        self._tail = np.zeros((self.channels, len(self.response) - 1))  # [C, L-1]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x [C, n] -> [C, n] float64: the next n filtered samples."""
        n, ring = x.shape[1], len(self.response) - 1
        size = _fft_size(n + ring)
        if size not in self._spectra:
            self._spectra[size] = np.fft.rfft(self.response, size)
        # float64 before the FFT: numpy >= 2 transforms float32 in single precision
        spectrum = np.fft.rfft(x.astype(np.float64), size, axis=1) * self._spectra[size]
        y = np.fft.irfft(spectrum, size, axis=1)[:, : n + ring]
        y[:, :ring] += self._tail
        self._tail = y[:, n:].copy()
        return y[:, :n]


# -- 4x oversampling and the limiter's lookahead --------------------------------------------
def lowpass_fir(taps: int, cutoff: float, beta: float) -> np.ndarray:
    """[taps] Kaiser-windowed sinc, `cutoff` a fraction of Nyquist, DC gain 1 (scipy's firwin)."""
    m = np.arange(taps) - (taps - 1) / 2
    h = cutoff * np.sinc(cutoff * m) * np.kaiser(taps, beta)
    return h / h.sum()


def upsample(fir: np.ndarray, x: np.ndarray, factor: int) -> np.ndarray:
    """x [C, M] -> [C, factor (M - 1) + K]: zero-stuffed by `factor`, then filtered by fir [K].

    Polyphase, as scipy's upfirdn: output sample factor * q + p is the convolution of x with the
    phase fir[p::factor], so no multiplication touches a stuffed zero. All phases at once: one
    matrix product of x's sliding windows [C, M + k - 1, k] with the phases [k, factor].
    """
    c, m = x.shape
    k = -(-len(fir) // factor)  # taps per phase
    taps = np.zeros(k * factor)
    taps[: len(fir)] = fir
    phases = taps.reshape(k, factor)[::-1]  # [k, factor]: row j = tap k-1-j of each phase
    padded = np.zeros((c, m + 2 * (k - 1)))
    padded[:, k - 1 : k - 1 + m] = x
    windows = sliding_window_view(padded, k, axis=1)  # [C, M + k - 1, k]
    return (windows @ phases).reshape(c, -1)[:, : factor * (m - 1) + len(fir)]


def forward_min(x: np.ndarray, size: int) -> np.ndarray:
    """[N] -> [N]: out[i] = min(x[i : i + size]), x padded past its end with its last value.

    van Herk / Gil-Werman: cut the padded signal into pieces of `size`; each window spans the
    end of one piece and the start of the next, so it is the minimum of a suffix minimum and a
    prefix minimum: O(N) whatever the size.
    """
    n = len(x)
    padded = np.full(-(-(n + size - 1) // size) * size, x[-1], x.dtype)
    padded[:n] = x
    pieces = padded.reshape(-1, size)
    prefix = np.minimum.accumulate(pieces, axis=1).ravel()
    suffix = np.minimum.accumulate(pieces[:, ::-1], axis=1)[:, ::-1].ravel()
    return np.minimum(suffix[:n], prefix[size - 1 : size - 1 + n])
