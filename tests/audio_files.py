"""Real encoded audio files for the clip tests, written with PyAV, and a hand-made FLAC bomb."""

from __future__ import annotations

import io
import struct

import av
import numpy as np

LEFT_HZ, RIGHT_HZ = 440.0, 660.0  # the test signal: a tone per channel (mono files: the left)


def tones(rate: int, channels: int, seconds: float, amplitude: float = 0.3) -> np.ndarray:
    """float32 [channels, N]: LEFT_HZ on the left (and mono) channel, RIGHT_HZ on the right,
    a little tremolo so that the frames differ."""
    t = np.arange(round(rate * seconds)) / rate
    swell = 0.75 + 0.25 * np.sin(2 * np.pi * 1.5 * t)
    sides = [np.sin(2 * np.pi * hz * t) for hz in (LEFT_HZ, RIGHT_HZ)[:channels]]
    return (amplitude * swell * np.stack(sides)).astype(np.float32)


def encode_file(
    pcm: np.ndarray, rate: int, container: str, codec: str, layout: str | None = None
) -> bytes:
    """pcm float32 [C, N] at `rate` -> the bytes of a file (e.g. "wav"/"pcm_s16le",
    "mp3"/"libmp3lame", "ogg"/"libopus", "flac"/"flac")."""
    layout = layout or {1: "mono", 2: "stereo"}[pcm.shape[0]]
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        ctx = stream.codec_context
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm), format="fltp", layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        resampler = av.AudioResampler(
            format=ctx.codec.audio_formats[0].name,
            layout=layout,
            rate=ctx.sample_rate,
            frame_size=ctx.frame_size or None,
            threads=1,
        )
        for f in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(f):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def wav_bytes(pcm: np.ndarray, rate: int, *, float32: bool = False) -> bytes:
    """A plain WAV written by hand (any channel count or rate, float samples as they are)."""
    channels = pcm.shape[0]
    if float32:
        data, fmt, width = np.ascontiguousarray(pcm.T, dtype="<f4").tobytes(), 3, 4
    else:
        ints = np.clip(np.round(pcm.T * 32767), -32768, 32767).astype("<i2")
        data, fmt, width = ints.tobytes(), 1, 2
    header = struct.pack(
        "<HHIIHH", fmt, channels, rate, rate * channels * width, channels * width, 8 * width
    )
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + header
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def _utf8_number(n: int) -> bytes:
    """FLAC's UTF-8-like coding of a frame number (< 65536 here)."""
    if n < 0x80:
        return bytes([n])
    if n < 0x800:
        return bytes([0xC0 | n >> 6, 0x80 | n & 0x3F])
    return bytes([0xE0 | n >> 12, 0x80 | (n >> 6) & 0x3F, 0x80 | n & 0x3F])


def flac_bomb(seconds: float, value: int = 1000) -> bytes:
    """A valid FLAC file, 8 kHz mono 16-bit, whose every frame is one CONSTANT subframe of 65535
    samples: about 14 bytes per 8 s of audio (an hour fits in 6 KB)."""
    rate, block = 8000, 65535
    frames = -(-round(seconds * rate) // block)
    info = struct.pack(">HH", block, block) + bytes(6)  # block sizes, frame sizes unknown
    info += ((rate << 44) | (0 << 41) | (15 << 36) | (frames * block)).to_bytes(8, "big")
    out = [b"fLaC", bytes([0x80, 0, 0, 34]), info, bytes(16)]  # last block: STREAMINFO, no MD5
    for n in range(frames):
        # sync + fixed blocking; block size from the 16 bits after the number, 8 kHz;
        # mono, 16 bits per sample
        head = bytes([0xFF, 0xF8, 0x74, 0x08]) + _utf8_number(n) + struct.pack(">H", block - 1)
        head += bytes([_crc8(head)])
        body = head + b"\x00" + struct.pack(">h", value)  # CONSTANT subframe
        out.append(body + struct.pack(">H", _crc16(body)))
    return b"".join(out)
