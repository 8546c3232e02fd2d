"""Seeding from a clip: the bytes of an uploaded audio file become MusicGen tokens [K, T].

    clip = encode_clip(data, model.audio_encoder, sample_rate=32000, channels=1,
                       limits=ClipLimits(max_seconds=30))
    clip.tokens                                  # [K, T] frame-aligned, what `open_stream`'s
                                                 # `prompt_frames` continues from

The steps, each bounded because the bytes come from an upload:

1. `check_size`: at most `limits.max_bytes`, at least one byte.
2. `open_container`: PyAV (FFmpeg) opens the bytes from memory, as one of `AUDIO_FORMATS` only
   (no playlists, image sequences or other demuxers that reach for other files or URLs), and
   takes the first audio stream; any audio codec FFmpeg decodes works inside.
3. `decode_audio`: packets are decoded and resampled to the model's rate (FFmpeg's swresample)
   one by one. Decoding stops as soon as the decoded length passes the limit, so a tiny file
   that decodes to hours (a decompression bomb) is refused after `max_seconds`, holding at most
   that much audio; a budget of the decoding thread's CPU time (`max_decode_seconds`) bounds
   the decoder's work (CPU, not wall time: a clip decoded at a low priority beside a busy
   generator may wait for the CPU without being refused).
4. `to_model_audio`: to the model's channels and a whole number of frames. A mono model gets
   the mean of a stereo clip's channels; a stereo model keeps a stereo clip's channels and
   hears a mono clip on both sides (its L and R codes are then equal, what transformers' forward
   makes of mono codes for a stereo decoder with `repeat_interleave(2)`). Audiocraft's
   `convert_audio` converts channels the same way. Levels are not changed (EnCodec hears the
   clip as it is; the radio's loudness stage levels the output), except that samples are
   clamped to [-1, 1] after resampling. The end is trimmed to a whole frame (640 samples), so
   every token frame encodes clip audio.
5. `encode_pcm`: the model's EnCodec, as `MusicgenForConditionalGeneration.generate` encodes an
   audio prompt: each channel alone, stereo codebooks interleaved L, R, L, R (codebook 2j is
   the left channel's j-th, 2j+1 the right's).

Anything an upload can do wrong ends in a `ClipError` (a ValueError) whose message names the
problem and whose `code` says which kind it is (the radio maps codes to HTTP statuses).
`one_thread()` runs the encode on its caller's thread alone, for a worker beside the generator.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import io
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import av
import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

MAX_CLIP_SECONDS = 30.0  # MusicGen's training clips were 30 s; a longer prompt is not its use
LENGTH_SLACK = 0.5  # seconds a clip may exceed max_seconds (codec padding); trimmed away
MIN_SOURCE_RATE = 4000  # Hz: below this a file has no music left to continue
MAX_SOURCE_RATE = 768000  # Hz: the highest rate FFmpeg's audio formats carry
# FFmpeg demuxer names accepted (each audio-only or audio-capable, none opens other files).
AUDIO_FORMATS = (
    "wav,w64,aiff,caf,au,mp3,flac,ogg,matroska,webm,mov,mp4,m4a,aac,ac3,eac3,wv,ape,tta,asf,"
    "amr,dts,mpc,mpc8,tak"
)
ACCEPTED = "WAV, AIFF, MP3, FLAC, Ogg (Vorbis, Opus), MP4/M4A, Matroska/WebM, AAC, WMA, ..."
CODES = (
    "too_big",  # more bytes than max_bytes
    "empty",  # no bytes, or no audio samples
    "not_audio",  # not a file FFmpeg reads as audio in an accepted format, or corrupt
    "channels",  # more than 2 channels
    "sample_rate",  # a sample rate outside [MIN_SOURCE_RATE, MAX_SOURCE_RATE]
    "too_long",  # decodes to more than max_seconds (a decompression bomb ends here too)
    "too_short",  # less than min_seconds
    "silent",  # peak below silence_dbfs
    "too_slow",  # decoding took more CPU time than max_decode_seconds
)


class ClipError(ValueError):
    """An uploaded clip that cannot seed a station; the message says why, for the uploader."""

    def __init__(self, code: str, message: str) -> None:
        assert code in CODES, f"unknown clip error code {code!r}"
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ClipLimits:
    max_bytes: int = 20_000_000  # size of the uploaded file (30 s of 48 kHz stereo float: 11.5 MB)
    max_seconds: float = 30.0  # decoded length, at most 30 s; up to 0.5 s more is trimmed away
    min_seconds: float = 1.0  # shortest clip accepted (50 frames)
    max_decode_seconds: float = 10.0  # CPU time decoding may take (30 s of MP3: ~0.1 s)
    silence_dbfs: float = -60.0  # a clip whose peak is below this level is refused as silent

    def validate(self) -> ClipLimits:
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes: must be >= 1, got {self.max_bytes}")
        if not 0 < self.max_seconds <= MAX_CLIP_SECONDS:
            raise ValueError(
                f"max_seconds: must be in (0, {MAX_CLIP_SECONDS:g}], got {self.max_seconds}"
            )
        if not 0.1 <= self.min_seconds <= self.max_seconds:
            raise ValueError(
                f"min_seconds: must be in [0.1, max_seconds ({self.max_seconds})], "
                f"got {self.min_seconds}"
            )
        if not self.max_decode_seconds > 0:
            raise ValueError(f"max_decode_seconds: must be > 0, got {self.max_decode_seconds}")
        if not -150 <= self.silence_dbfs <= 0:
            raise ValueError(f"silence_dbfs: must be in [-150, 0] dBFS, got {self.silence_dbfs}")
        return self


@dataclass(frozen=True)
class ClipSource:
    """What the uploaded file was, for messages and the API's answer."""

    format: str  # FFmpeg demuxer, e.g. "mp3" or "mov,mp4,m4a,3gp,3g2,mj2"
    codec: str  # FFmpeg decoder, e.g. "mp3float"
    sample_rate: int  # Hz, of the first decoded frame
    channels: int  # 1 or 2
    seconds: float  # decoded length before trimming


@dataclass(frozen=True)
class ClipAudio:
    pcm: np.ndarray  # float32 [channels, T * hop] at the model's rate: the audio encoded
    sample_rate: int  # the model's rate
    source: ClipSource


@dataclass(frozen=True)
class Clip:
    tokens: torch.Tensor  # [K, T] long, CPU, frame-aligned (stereo: codebooks interleaved L/R)
    audio: ClipAudio  # the audio the tokens encode

    @property
    def frames(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def seconds(self) -> float:
        return self.audio.pcm.shape[1] / self.audio.sample_rate


def encode_clip(
    data: bytes,
    audio_encoder: nn.Module,
    *,
    sample_rate: int,
    channels: int,
    limits: ClipLimits | None = None,
) -> Clip:
    """The bytes of an audio file -> tokens [K, T] of the model whose EnCodec is `audio_encoder`
    (`sample_rate` and `channels` are the model's). Raises ClipError for any bad upload."""
    frame_rate = float(audio_encoder.config.frame_rate)
    hop = round(sample_rate / frame_rate)
    audio = decode_clip(data, sample_rate=sample_rate, channels=channels, hop=hop, limits=limits)
    return Clip(encode_pcm(audio_encoder, audio.pcm), audio)


def decode_clip(
    data: bytes, *, sample_rate: int, channels: int, hop: int, limits: ClipLimits | None = None
) -> ClipAudio:
    """Steps 1-4: bytes -> float32 [channels, T * hop] at `sample_rate`, checked and bounded."""
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 or 2 (the model's), got {channels!r}")
    limits = (limits or ClipLimits()).validate()
    check_size(data, limits)
    deadline = time.thread_time() + limits.max_decode_seconds  # this thread's CPU time
    with open_container(data) as container:
        pcm, source = decode_audio(container, sample_rate, limits, deadline)
    pcm = to_model_audio(pcm, channels, sample_rate, hop, limits)
    return ClipAudio(pcm, sample_rate, source)


def check_size(data: bytes, limits: ClipLimits) -> None:
    if len(data) > limits.max_bytes:
        raise ClipError(
            "too_big", f"the file is {len(data)} bytes, more than the limit of {limits.max_bytes}"
        )
    if not data:
        raise ClipError("empty", "the file is empty (0 bytes)")


def open_container(data: bytes) -> av.container.InputContainer:
    """PyAV input container over the bytes, accepted formats only (ClipError otherwise)."""
    try:
        return av.open(
            io.BytesIO(data),
            mode="r",
            container_options={"format_whitelist": AUDIO_FORMATS},
            metadata_errors="ignore",
        )
    except Exception as err:  # noqa: BLE001 - any failure to open hostile bytes is "not audio"
        raise ClipError(
            "not_audio", f"not an audio file in a format taken here ({_why(err)}); use {ACCEPTED}"
        ) from None


def decode_audio(
    container: av.container.InputContainer, sample_rate: int, limits: ClipLimits, deadline: float
) -> tuple[np.ndarray, ClipSource]:
    """The first audio stream decoded and resampled to `sample_rate`: float32 [C, N] (C = the
    file's channels, 1 or 2). Stops at the first frame past the length limit or the deadline
    (`time.thread_time`: the decoder runs on this thread alone)."""
    if not container.streams.audio:
        raise ClipError("not_audio", f"the {container.format.name} file has no audio stream")
    stream = container.streams.audio[0]
    stream.codec_context.thread_count = 1  # decode on this thread: its CPU time is the budget
    budget = limits.max_seconds + LENGTH_SLACK  # seconds of input decoded at most
    chunks: list[np.ndarray] = []  # [C, n] resampled pieces
    resampler = None
    first = None  # (rate, channels, layout name) of the first frame
    seconds = 0.0
    try:
        for packet in container.demux(stream):
            _check_deadline(deadline, limits)
            for frame in packet.decode():
                _check_deadline(deadline, limits)
                if first is None or resampler is None:  # (both set at the first frame)
                    first = _check_frame(frame)
                    # on this thread too (PyAV 18.1.1 gives a filter graph a thread per
                    # core, kept until the next garbage collection)
                    resampler = av.AudioResampler(
                        format="fltp", layout=first[2], rate=sample_rate, threads=1
                    )
                elif (frame.sample_rate, frame.layout.nb_channels) != first[:2]:
                    raise ClipError(
                        "channels" if frame.layout.nb_channels != first[1] else "sample_rate",
                        "the audio changes its sample rate or channels midway "
                        f"({first[0]} Hz x {first[1]} -> "
                        f"{frame.sample_rate} Hz x {frame.layout.nb_channels})",
                    )
                seconds += frame.samples / frame.sample_rate
                if seconds > budget:
                    raise ClipError(
                        "too_long",
                        f"the clip is longer than the limit of {limits.max_seconds:g} s",
                    )
                chunks.extend(f.to_ndarray() for f in resampler.resample(frame))
        if resampler is not None:
            chunks.extend(f.to_ndarray() for f in resampler.resample(None))
    except ClipError:
        raise
    except Exception as err:  # noqa: BLE001 - FFmpeg's errors on corrupt data, whatever their class
        raise ClipError("not_audio", f"the audio could not be decoded ({_why(err)})") from None
    if first is None or seconds == 0 or not chunks:
        raise ClipError("empty", "the file holds no audio samples")
    source = ClipSource(
        format=container.format.name,
        codec=stream.codec_context.name,
        sample_rate=first[0],
        channels=first[1],
        seconds=seconds,
    )
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), source


def to_model_audio(
    pcm: np.ndarray, channels: int, sample_rate: int, hop: int, limits: ClipLimits
) -> np.ndarray:
    """[C_file, N] -> [channels, T * hop]: channels converted, clamped, trimmed to whole frames
    (and to max_seconds); too short or silent clips refused."""
    if not np.isfinite(pcm).all():
        raise ClipError("not_audio", "the audio holds samples that are not finite numbers")
    if channels == 1:
        pcm = pcm.mean(axis=0, keepdims=True, dtype=np.float32)
    elif pcm.shape[0] == 1:
        pcm = np.repeat(pcm, 2, axis=0)
    np.clip(pcm, -1.0, 1.0, out=pcm)
    frames = min(pcm.shape[1], int(limits.max_seconds * sample_rate)) // hop
    if frames * hop < limits.min_seconds * sample_rate:
        raise ClipError(
            "too_short",
            f"the clip is {pcm.shape[1] / sample_rate:.2f} s long, shorter than the minimum of "
            f"{limits.min_seconds:g} s",
        )
    pcm = np.ascontiguousarray(pcm[:, : frames * hop])
    peak = float(np.abs(pcm).max())
    if peak < 10 ** (limits.silence_dbfs / 20):
        level = f"{20 * math.log10(peak):.0f} dBFS" if peak > 0 else "digital silence"
        raise ClipError(
            "silent", f"the clip is silent (peak {level}, below {limits.silence_dbfs:g} dBFS)"
        )
    return pcm


def encode_pcm(audio_encoder: nn.Module, pcm: np.ndarray) -> torch.Tensor:
    """Step 5: float32 [C, N] at the codec's rate -> tokens [K, T] (T = ceil(N / hop)) on the CPU,
    as transformers' `generate` encodes an audio prompt: each channel alone, then (stereo) the
    codebooks interleaved L/R. Equal channels (a mono clip on a stereo model) encode once."""
    import torch

    if audio_encoder.config.normalize:
        raise ValueError("an EnCodec with normalize=True returns scales MusicGen does not use")
    device = next(audio_encoder.parameters()).device
    codes: list[torch.Tensor] = []
    with torch.inference_mode():
        for c, channel in enumerate(pcm):
            if c and np.array_equal(channel, pcm[0]):
                codes.append(codes[0])
                continue
            x = torch.from_numpy(np.ascontiguousarray(channel)).to(device)[None, None]  # [1, 1, N]
            out = audio_encoder.encode(x)
            codes.append(out.audio_codes[0, 0].cpu())  # [K_channel, T]
    if len(codes) == 1:
        return codes[0]
    left, right = codes
    tokens = torch.empty(2 * left.shape[0], left.shape[1], dtype=left.dtype)
    tokens[0::2], tokens[1::2] = left, right
    return tokens


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Inside, the calling thread's torch ops run on that thread alone: no OpenMP team of its own.

    For a worker thread beside the generator (a clip's encode): its own team would put more
    OpenMP threads than cores in the process, and libgomp then stops spinning between parallel
    regions, which halved the generator's speed (`engine.load_thread`). OpenMP's thread
    count is per thread (`omp_set_num_threads` sets the calling thread's), so the generator
    keeps its team. A no-op where torch does not run on libgomp."""
    import torch

    gomp = _libgomp()
    if gomp is None:
        yield
        return
    torch.get_num_threads()  # torch sets a thread's OpenMP count on its first use: now, not later
    before = gomp.omp_get_max_threads()
    gomp.omp_set_num_threads(1)
    try:
        yield
    finally:
        gomp.omp_set_num_threads(before)


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The libgomp torch runs on (the copy in torch/lib, already loaded), or None."""
    import torch

    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    for path in sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*"))):
        with contextlib.suppress(OSError):
            return ctypes.CDLL(path)
    return None


def _check_frame(frame: av.AudioFrame) -> tuple[int, int, str]:
    """(rate, channels, layout name) of the first decoded frame, or ClipError."""
    rate, count = frame.sample_rate, frame.layout.nb_channels
    if count > 2:
        raise ClipError("channels", f"the clip has {count} channels; at most 2 (stereo) are taken")
    if count < 1:
        raise ClipError("not_audio", "the audio has no channels")
    if not MIN_SOURCE_RATE <= rate <= MAX_SOURCE_RATE:
        raise ClipError(
            "sample_rate",
            f"the clip's sample rate is {rate} Hz; it must be in "
            f"[{MIN_SOURCE_RATE}, {MAX_SOURCE_RATE}] Hz",
        )
    return rate, count, frame.layout.name


def _check_deadline(deadline: float, limits: ClipLimits) -> None:
    if time.thread_time() > deadline:
        raise ClipError(
            "too_slow",
            f"decoding the clip took longer than the limit of {limits.max_decode_seconds:g} s "
            "of CPU time",
        )


def _why(err: Exception) -> str:
    """A short reason from an exception PyAV raised: FFmpeg's own words where it has them."""
    if isinstance(err, av.error.FFmpegError) and err.strerror:
        return f"FFmpeg: {err.strerror}"
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}"[:200] if text else type(err).__name__
