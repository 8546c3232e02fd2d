"""MusicGen's delay pattern, in one place.

Codebook k of a frame is written `delay[k]` steps after codebook 0 (mono: delay = k; stereo: the
L/R pair 2j, 2j+1 shares delay j). At decoder position p, codebook k therefore holds frame
`p - 1 - delay[k]` (position 0 is BOS); a frame is complete once its most delayed codebook has
been written, `max(delay)` steps after its first.
"""

from __future__ import annotations

import torch

PAD = 2048  # MusicGen's pad id, which is also its BOS id


def codebook_delays(num_codebooks: int, audio_channels: int) -> torch.Tensor:
    """[K] delay of each codebook in steps."""
    if audio_channels == 2:
        return torch.arange(num_codebooks) // 2
    return torch.arange(num_codebooks)


def frames_at_position(position: int, delays: torch.Tensor) -> torch.Tensor:
    """[K] the frame index each codebook holds at decoder `position` (negative: BOS/pad)."""
    return position - 1 - delays


def delayed_layout(frames: torch.Tensor, delays: torch.Tensor, length: int) -> torch.Tensor:
    """Frame-aligned tokens [K, T] -> decoder input ids [K, length] in delayed layout.

    Entries whose frame is negative are PAD; entries whose frame is >= T are -1 (unknown).
    """
    num_codebooks, num_frames = frames.shape
    positions = torch.arange(length)
    index = positions[None, :] - 1 - delays[:, None]  # [K, length] frame index
    out = torch.full((num_codebooks, length), -1, dtype=torch.long)
    known = (index >= 0) & (index < num_frames)
    out[known] = (
        frames.gather(1, index.clamp(0, max(num_frames - 1, 0)))[known] if num_frames else 0
    )
    out[index < 0] = PAD
    return out
