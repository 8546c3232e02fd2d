"""radio.dsp computes what scipy and pyloudnorm compute: the K-weighting coefficients, the
K-weighting run as a stream (against `lfilter` with carried state, any chunk sizes, any rate),
the Kaiser FIR, the polyphase upsampler and the forward minimum, each against its original."""

from __future__ import annotations

import numpy as np
import pyloudnorm
import pytest
from scipy.ndimage import minimum_filter1d
from scipy.signal import firwin, lfilter, upfirdn

from radio import dsp


@pytest.mark.parametrize("rate", [8000, 22050, 32000, 44100, 48000, 96000, 192000])
def test_k_weighting_coefficients_equal_pyloudnorm(rate):
    ours = dsp.k_weighting(rate)
    theirs = list(pyloudnorm.Meter(rate)._filters.values())  # high shelf, then high pass
    assert len(ours) == len(theirs) == 2
    for (b, a), f in zip(ours, theirs, strict=True):
        assert f.passband_gain == 1.0
        np.testing.assert_allclose(b, f.b, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(a, f.a, rtol=1e-12, atol=1e-14)


def _lfilter_cascade(biquads: list[dsp.Biquad], x: np.ndarray) -> np.ndarray:
    """The reference: scipy's recursion over the whole signal at once, stage after stage."""
    for b, a in biquads:
        x = lfilter(b, a, x, axis=1)
    return x


def _stream(f: dsp.StreamFilter, x: np.ndarray, chunks: list[int]) -> np.ndarray:
    """Push x [C, N] through f in the given chunk sizes (cycled); the outputs joined."""
    out, i, k = [], 0, 0
    while i < x.shape[1]:
        out.append(f(x[:, i : i + chunks[k % len(chunks)]]))
        i, k = i + chunks[k % len(chunks)], k + 1
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("rate", [8000, 32000, 44100, 48000, 192000])
def test_stream_filter_equals_lfilter_with_carried_state(rate):
    rng = np.random.default_rng(rate)
    seconds = 3.0 if rate > 48000 else 6.0
    x = rng.standard_normal((2, int(seconds * rate))).astype(np.float32)
    x[1] *= np.linspace(0.0, 2.0, x.shape[1], dtype=np.float32)  # a channel that grows
    biquads = dsp.k_weighting(rate)
    want = _lfilter_cascade(biquads, x.astype(np.float64))
    f = dsp.StreamFilter(dsp.impulse_response(biquads), channels=2)
    scale = np.abs(want).max()
    for chunks in ([rate // 10], [1, 7, 333, 4097, 12345]):  # the normalizer's blocks, odd ones
        f.reset()
        got = _stream(f, x, chunks)
        assert got.shape == x.shape and got.dtype == np.float64
        assert np.abs(got - want).max() < 1e-9 * scale, chunks


def test_impulse_response_ends_where_it_has_decayed():
    biquads = dsp.k_weighting(48000)
    h = dsp.impulse_response(biquads)
    impulse = np.zeros((1, 2 * len(h)))
    impulse[0, 0] = 1.0
    full = _lfilter_cascade(biquads, impulse)[0]
    np.testing.assert_allclose(h, full[: len(h)], rtol=0, atol=1e-13)
    assert np.abs(full[len(h) :]).max() < 1e-15 * np.abs(h).max()
    assert abs(h[-1]) >= 1e-15 * np.abs(h).max()  # cut at the end, not before
    assert 0.1 < len(h) / 48000 < 0.2  # the 38 Hz double pole rings for ~0.14 s


@pytest.mark.parametrize(
    ("taps", "cutoff", "beta"), [(81, 0.25, 5.0), (80, 0.5, 8.6), (31, 0.1, 0.0)]
)
def test_lowpass_fir_equals_firwin(taps, cutoff, beta):
    want = firwin(taps, cutoff, window=("kaiser", beta))
    np.testing.assert_allclose(dsp.lowpass_fir(taps, cutoff, beta), want, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    ("channels", "samples", "taps", "factor"), [(2, 3296, 81, 4), (1, 5, 80, 4), (2, 100, 31, 3)]
)
def test_upsample_equals_upfirdn(channels, samples, taps, factor):
    rng = np.random.default_rng(taps)
    fir = firwin(taps, 1 / factor, window=("kaiser", 5.0)) * factor
    x = rng.standard_normal((channels, samples)).astype(np.float32)
    want = upfirdn(fir, x, up=factor, axis=1)
    got = dsp.upsample(fir, x, factor)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("samples", "size"), [(3296, 67), (3296, 66), (1000, 1), (7, 10), (50, 2)])
def test_forward_min_equals_minimum_filter1d(samples, size):
    rng = np.random.default_rng(size)
    x = rng.random(samples)
    x[-3:] = [0.9, 0.95, 0.99]  # the end rises: the padding by the last value shows
    want = minimum_filter1d(x, size, origin=-(size // 2), mode="nearest")
    assert np.array_equal(dsp.forward_min(x, size), want)
