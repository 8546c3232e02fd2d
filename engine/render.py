"""Offline rendering of the endless stream to a WAV file, through the server's engine path.

The same `AudioStream.read` the radio's worker calls, in the same chunk size, with prompt
changes at given times (`set_prompt(text, from_frame)`), so a render is what a station would
have played (before loudness and encoding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.model import AudioStream
from engine.wav import FloatWavWriter

CHUNK_FRAMES = 25  # the radio's worker reads half a second at a time


@dataclass(frozen=True)
class PromptChange:
    at_seconds: float  # when the new prompt is heard, from the start of the render
    prompt: str  # the new prompt ("" = unconditional)


@dataclass
class RenderResult:
    samples: int  # samples per channel written
    frames: int  # token frames rendered
    tokens: np.ndarray  # [frames, K] frame-aligned tokens
    heard_at: list[int] = field(default_factory=list)  # frame at which each change is heard


def render(
    stream: AudioStream,
    seconds: float,
    out: str | Path,
    *,
    changes: Sequence[PromptChange] = (),
    progress: Callable[[int], None] | None = None,
) -> RenderResult:
    """Render `seconds` of audio (exactly round(seconds * rate) samples) to a float WAV."""
    model = stream.model
    total_samples = round(seconds * model.sample_rate)
    if total_samples < 1:
        raise ValueError(f"seconds must give at least one sample, got {seconds}")
    total_frames = math.ceil(total_samples / model.hop)
    pending = sorted(changes, key=lambda c: c.at_seconds)
    change_frames = [round(c.at_seconds * model.frame_rate) for c in pending]
    for change, frame in zip(pending, change_frames, strict=True):
        if not 0 <= frame < total_frames:
            raise ValueError(
                f"change at {change.at_seconds} s lies outside the render (0..{seconds} s)"
            )
    writer = FloatWavWriter(out, model.sample_rate, model.channels)
    tokens: list[np.ndarray] = []
    heard: list[int] = []
    written = 0
    try:
        while stream.frame < total_frames:
            while pending and change_frames[0] <= stream.frame:
                heard.append(stream.set_prompt(pending.pop(0).prompt, change_frames.pop(0)))
            stop = min(stream.frame + CHUNK_FRAMES, total_frames, *change_frames[:1])
            start = stream.frame
            pcm = stream.read(stop - start)
            if not np.isfinite(pcm).all():
                raise RuntimeError(f"the model produced NaN or infinite audio at frame {start}")
            codes, offset = stream.tokens.history()
            tokens.append(codes[:, start - offset : stop - offset].T.numpy())
            keep = min(pcm.shape[1], total_samples - written)
            writer.write(pcm[:, :keep])
            written += keep
            if progress is not None:
                progress(stop - start)
    finally:
        writer.close()
    return RenderResult(written, total_frames, np.concatenate(tokens), heard)
