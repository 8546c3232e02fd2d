"""The loudness normalizer: quiet and loud music-like input both leave within 1 LU of the target
(pyloudnorm on the output), no sample and no 4x-oversampled peak over the ceiling, a smooth gain
that does not pump, silence that does not blow the gain up, and chunking that changes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
from scipy.signal import lfilter, resample_poly

from radio.loudness import LoudnessNormalizer

RATE = 32000
SETTLE = 6.0  # seconds after which the output is judged


def _music(seconds: float, channels: int, lufs: float, seed: int = 0) -> np.ndarray:
    """Music-like test signal [C, N]: brown-ish noise with a 2 Hz beat plus a tone, at `lufs`."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    x = lfilter([1.0], [1.0, -0.95], rng.standard_normal((channels, n)), axis=1)
    x = x * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t) ** 2) + 0.5 * np.std(x) * np.sin(
        2 * np.pi * 220 * t
    )
    measured = pyloudnorm.Meter(RATE).integrated_loudness(x.T)
    return (x * 10 ** ((lufs - measured) / 20)).astype(np.float32)


def _run(norm: LoudnessNormalizer, x: np.ndarray, chunks: list[int]) -> tuple[np.ndarray, list]:
    """Push x in the given chunk sizes (cycled); output [C, N] and the gain after each chunk."""
    out, gains, i, k = [], [], 0, 0
    while i < x.shape[1]:
        n = chunks[k % len(chunks)]
        out.append(norm.process(x[:, i : i + n]))
        gains.append((i + n, norm.gain_db))
        i, k = i + n, k + 1
    return np.concatenate(out, axis=1), gains


def _true_peak_db(y: np.ndarray) -> float:
    return float(20 * np.log10(np.abs(resample_poly(y, 4, 1, axis=1)).max()))


@pytest.mark.parametrize(("lufs", "channels"), [(-35.0, 1), (-5.0, 2), (-5.0, 1), (-35.0, 2)])
def test_quiet_and_loud_reach_target_under_the_ceiling(lufs, channels):
    x = _music(12.0, channels, lufs, seed=channels)
    norm = LoudnessNormalizer(RATE, channels, target_lufs=-14.0, true_peak_dbtp=-1.0)
    y, _ = _run(norm, x, [1000, 4410, 77])
    assert y.shape == x.shape and y.dtype == np.float32
    tail = y[:, int(SETTLE * RATE) :]
    assert abs(pyloudnorm.Meter(RATE).integrated_loudness(tail.T) - -14.0) <= 1.0
    assert 20 * np.log10(np.abs(y).max()) <= -1.0  # every sample
    assert _true_peak_db(y) <= -1.0  # inter-sample peaks, 4x oversampled


@pytest.mark.parametrize("kind", ["clipped noise", "fs/4 at 45 degrees", "noise bursts"])
def test_inter_sample_peaks_of_harsh_signals_stay_under_the_ceiling(kind):
    rng = np.random.default_rng(8)
    n = 6 * RATE
    t = np.arange(n)
    x = {
        "clipped noise": np.clip(rng.standard_normal(n) * 2, -1, 1),  # full band, at 0 dBFS
        "fs/4 at 45 degrees": np.sin(np.pi * t / 2 + np.pi / 4),  # +3 dB between samples
        "noise bursts": 0.5 * rng.standard_normal(n) * (t // 8000 % 2),  # sudden onsets
    }[kind]
    y, _ = _run(LoudnessNormalizer(RATE, 2), np.stack([x, -0.9 * x]).astype(np.float32), [1000])
    assert _true_peak_db(y) <= -1.0
    assert 20 * np.log10(np.abs(y).max()) <= -1.0


def test_gain_moves_smoothly_and_does_not_pump():
    x = _music(14.0, 1, -30.0, seed=3)
    norm = LoudnessNormalizer(RATE, 1)
    opt = norm.options
    y, gains = _run(norm, x, [RATE // 10])
    steps = np.abs(np.diff([g for _, g in gains]))
    assert steps.max() <= opt.acquire_db_per_s / 10 + 1e-9
    late = [g for (n, g) in gains if n > SETTLE * RATE]
    assert np.abs(np.diff(late)).max() <= max(opt.up_db_per_s, opt.down_db_per_s) / 10 + 1e-9
    assert max(late) - min(late) < 1.5  # a steady input gets a steady gain
    # The beat is not flattened: momentary loudness varies as much after as before.
    meter = pyloudnorm.Meter(RATE)

    def momentary(sig: np.ndarray) -> np.ndarray:
        blocks = range(int(SETTLE * RATE), sig.shape[1] - RATE, RATE // 10)
        return np.array([meter.integrated_loudness(sig[:, s : s + RATE // 2].T) for s in blocks])

    delay = norm.latency_samples
    shifted_in = x[:, : x.shape[1] - delay]
    assert abs(np.std(momentary(y[:, delay:])) - np.std(momentary(shifted_in))) < 0.3


def test_chunk_size_does_not_change_the_output():
    x = _music(5.0, 2, -20.0, seed=4)
    a, _ = _run(LoudnessNormalizer(RATE, 2), x, [x.shape[1]])
    b, _ = _run(LoudnessNormalizer(RATE, 2), x, [1, 333, 3200, 7919])
    c, _ = _run(LoudnessNormalizer(RATE, 2), x, [64])
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_latency_is_constant_and_reported():
    norm = LoudnessNormalizer(RATE, 1)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((1, 4 * RATE)) * 0.05).astype(np.float32)  # white: a sharp peak
    y, _ = _run(norm, x, [500])
    lat = norm.latency_samples
    assert lat == 640 + 64 + 16  # a 20 ms slice, the limiter's 2 ms and the FIR's context
    assert np.all(y[:, :lat] == 0.0)
    seg = slice(2 * RATE, 3 * RATE)
    corr = [float(np.dot(y[0, seg], x[0, 2 * RATE - d : 3 * RATE - d])) for d in range(0, 2 * lat)]
    assert int(np.argmax(corr)) == lat


def test_silence_holds_the_gain():
    music = _music(5.0, 1, -20.0, seed=6)
    rng = np.random.default_rng(0)
    hiss = (rng.standard_normal((1, 6 * RATE)) * 10 ** (-90 / 20)).astype(np.float32)
    norm = LoudnessNormalizer(RATE, 1)
    _run(norm, music, [3200])
    before = norm.gain_db
    assert 4.0 < before < 8.0
    y, gains = _run(norm, hiss, [3200])
    assert max(abs(g - before) for _, g in gains) < 0.5  # held through silence
    assert np.abs(y[:, norm.latency_samples :]).max() < 10 ** (-60 / 20)
    fresh = LoudnessNormalizer(RATE, 2)
    z, _ = _run(fresh, np.zeros((2, 3 * RATE), np.float32), [3200])
    assert fresh.gain_db == 0.0 and not np.any(z)


def test_window_measurement_matches_pyloudnorm():
    x = _music(3.0, 2, -23.0, seed=7)
    norm = LoudnessNormalizer(RATE, 2)
    norm.process(x)
    assert abs(norm.loudness_lufs - pyloudnorm.Meter(RATE).integrated_loudness(x.T)) < 0.1


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="channels"):
        LoudnessNormalizer(RATE, 3)
    with pytest.raises(ValueError, match="true_peak_dbtp"):
        LoudnessNormalizer(RATE, 1, true_peak_dbtp=1.0)
    with pytest.raises(ValueError, match="target_lufs"):
        LoudnessNormalizer(RATE, 1, target_lufs=3.0)
    with pytest.raises(ValueError, match="pcm"):
        LoudnessNormalizer(RATE, 2).process(np.zeros((1, 10), np.float32))


def test_importing_loads_neither_scipy_nor_pyloudnorm():
    # scipy.signal and scipy.ndimage cost ~0.8 s of `radio serve`'s start: radio.dsp replaces them
    code = (
        "import sys, radio.loudness; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('scipy', 'pyloudnorm')))"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
