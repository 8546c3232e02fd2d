"""The long-lived encoders: MP3 bytes fed in odd chunk sizes decode with PyAV and with the ffmpeg
CLI, last as long as the input (plus the codec's priming, under two frames), and still carry the
input's sine; AAC packets come in 1024-sample frames with continuous timestamps."""

from __future__ import annotations

import io
import subprocess
import sys

import av
import numpy as np
import pytest

from radio.encoders import AacEncoder, Mp3Encoder
from tests.helpers import require_tool

RATE = 32000


def _sine(seconds: float, freq: float, channels: int) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return np.tile(0.4 * np.sin(2 * np.pi * freq * t), (channels, 1)).astype(np.float32)  # [C, N]


def _encode_in_random_chunks(enc: Mp3Encoder, pcm: np.ndarray, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    out, i = [], 0
    while i < pcm.shape[1]:
        n = int(rng.integers(1, 4000))
        out.append(enc.encode(pcm[:, i : i + n]))
        i += n
    out.append(enc.flush())
    return b"".join(out)


def _decode(data: bytes) -> tuple[np.ndarray, int]:
    """PyAV decode -> (pcm [C, N] float32, sample rate)."""
    with av.open(io.BytesIO(data)) as c:
        frames = [f.to_ndarray() for f in c.decode(audio=0)]
        rate = c.streams.audio[0].rate
    return np.concatenate(frames, axis=1).astype(np.float32), rate


def _peak_freq(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * rate / len(x))


@pytest.mark.parametrize(
    ("channels", "out_rate", "out_channels"),
    [(1, None, None), (1, 44100, 2), (2, 48000, None)],
)
def test_mp3_decodes_with_pyav_right_length_and_pitch(channels, out_rate, out_channels):
    pcm = _sine(3.0, 440.0, channels)
    enc = Mp3Encoder(RATE, channels, 128, output_sample_rate=out_rate, output_channels=out_channels)
    data = _encode_in_random_chunks(enc, pcm)
    assert data[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")  # an MPEG audio frame sync
    decoded, rate = _decode(data)
    assert rate == (out_rate or RATE)
    assert decoded.shape[0] == (out_channels or channels)
    pushed = 3.0 * rate
    # Priming (encoder + decoder delay, ~1105 samples) and the last frame's padding: < 2 frames.
    assert 0 <= decoded.shape[1] - pushed < 2 * 1152
    middle = decoded[0, rate : 2 * rate]
    assert abs(_peak_freq(middle, rate) - 440.0) < 2.0
    assert 0.2 < np.sqrt(np.mean(middle**2)) / (0.4 / np.sqrt(2)) < 1.2  # level survives


def test_mp3_decodes_with_ffmpeg_cli_without_errors(tmp_path):
    ffmpeg = require_tool("ffmpeg")
    enc = Mp3Encoder(RATE, 1, 128, output_sample_rate=44100, output_channels=2)
    path = tmp_path / "a.mp3"
    path.write_bytes(_encode_in_random_chunks(enc, _sine(4.0, 1000.0, 1), seed=1))
    run = subprocess.run(
        [ffmpeg, "-v", "error", "-i", str(path), "-f", "f32le", "-ac", "1", "-"],
        capture_output=True,
        timeout=30,
    )
    assert run.returncode == 0 and run.stderr == b"", run.stderr.decode()
    mono = np.frombuffer(run.stdout, dtype=np.float32)
    assert 0 <= len(mono) - 4 * 44100 < 2 * 1152
    assert abs(_peak_freq(mono[44100 : 3 * 44100], 44100) - 1000.0) < 2.0


def test_mp3_chunking_does_not_change_the_bytes():
    pcm = _sine(2.0, 300.0, 2)
    one = Mp3Encoder(RATE, 2, 96)
    whole = one.encode(pcm) + one.flush()
    assert whole == _encode_in_random_chunks(Mp3Encoder(RATE, 2, 96), pcm, seed=3)


def test_aac_packets_are_whole_frames_with_continuous_pts():
    enc = AacEncoder(RATE, 1, 96, output_sample_rate=48000, output_channels=2)
    pcm = _sine(2.0, 440.0, 1)
    packets = enc.encode(pcm[:, :777]) + enc.encode(pcm[:, 777:]) + enc.flush()
    assert enc.frame_size == 1024 and enc.extradata
    assert enc.initial_padding == -packets[0].pts >= 0
    pts = [p.pts for p in packets]
    assert pts == [pts[0] + 1024 * i for i in range(len(packets))]
    assert all(p.duration == 1024 for p in packets[:-1]) and 0 < packets[-1].duration <= 1024
    assert all(p.time_base == enc.time_base for p in packets)
    covered = sum(p.duration for p in packets) - enc.initial_padding
    assert 0 <= covered - 2.0 * 48000 < 1024


def test_bad_arguments_name_the_key():
    with pytest.raises(ValueError, match="channels"):
        Mp3Encoder(RATE, 3)
    with pytest.raises(ValueError, match="bitrate_kbps"):
        Mp3Encoder(RATE, 1, 0)
    enc = Mp3Encoder(RATE, 2)
    with pytest.raises(ValueError, match="pcm"):
        enc.encode(np.zeros((1, 100), np.float32))


_THREADS_CHECK = """
import os, sys
import numpy as np
from radio.encoders import AacEncoder, Mp3Encoder

def tasks():
    return len(os.listdir("/proc/self/task"))

pcm = np.zeros((1, 32000), np.float32)
before = tasks()
encoders = [Mp3Encoder(32000, 1, output_sample_rate=44100, output_channels=2),
            AacEncoder(32000, 1, output_sample_rate=48000, output_channels=2)]
for encoder in encoders:
    encoder.encode(pcm)
print(before, tasks())
"""


def test_the_encoders_run_on_the_thread_that_feeds_them():
    """Resampling encoders (32 kHz mono in, 44.1/48 kHz stereo out) start no threads: a station
    feeds them from the event loop, and a filter graph's thread per core (PyAV 18.1.1's default)
    would put more threads than cores beside the generator. In a process of its own: threads
    are counted process-wide."""
    done = subprocess.run(
        [sys.executable, "-c", _THREADS_CHECK], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = map(int, done.stdout.split())
    assert after == before
