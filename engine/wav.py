"""A minimal writer for 32-bit float WAV files (no dependency, exact sample counts)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


class FloatWavWriter:
    """Write float32 PCM [channels, N] chunks to a WAVE_FORMAT_IEEE_FLOAT file."""

    def __init__(self, path: str | Path, sample_rate: int, channels: int) -> None:
        self.path = Path(path)
        self.sample_rate = sample_rate
        self.channels = channels
        self.frames = 0
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(self._header())

    def _header(self) -> bytes:
        data_bytes = self.frames * self.channels * 4
        fmt = struct.pack(
            "<HHIIHH",
            3,
            self.channels,
            self.sample_rate,
            self.sample_rate * self.channels * 4,
            self.channels * 4,
            32,
        )
        return (
            b"RIFF"
            + struct.pack("<I", 4 + (8 + len(fmt)) + (8 + 4) + (8 + data_bytes))
            + b"WAVE"
            + b"fmt "
            + struct.pack("<I", len(fmt))
            + fmt
            + b"fact"
            + struct.pack("<II", 4, self.frames)
            + b"data"
            + struct.pack("<I", data_bytes)
        )

    def write(self, pcm: np.ndarray) -> None:
        """pcm: float32 [channels, N]."""
        assert pcm.shape[0] == self.channels, f"expected {self.channels} channels, got {pcm.shape}"
        self._file.write(np.ascontiguousarray(pcm.T, dtype="<f4").tobytes())
        self.frames += pcm.shape[1]

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(self._header())
        self._file.close()


def read_float_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a file written by FloatWavWriter: (float32 [channels, N], sample_rate)."""
    raw = Path(path).read_bytes()
    assert raw[:4] == b"RIFF" and raw[8:12] == b"WAVE", "not a WAV file"
    pos, fmt, data = 12, None, None
    while pos < len(raw):
        chunk, size = raw[pos : pos + 4], struct.unpack("<I", raw[pos + 4 : pos + 8])[0]
        body = raw[pos + 8 : pos + 8 + size]
        if chunk == b"fmt ":
            fmt = struct.unpack("<HHIIHH", body[:16])
        elif chunk == b"data":
            data = body
        pos += 8 + size + (size & 1)
    assert fmt is not None and data is not None and fmt[0] == 3 and fmt[5] == 32, "not float32 WAV"
    channels, rate = fmt[1], fmt[2]
    return np.frombuffer(data, dtype="<f4").reshape(-1, channels).T.copy(), rate
