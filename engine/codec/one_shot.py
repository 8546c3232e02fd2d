"""The one-shot EnCodec decode of all frames at once, as `MusicgenForConditionalGeneration.generate`
does it: the reference the streaming decode is measured against."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def split_channels(codes: torch.Tensor, audio_channels: int) -> torch.Tensor:
    """[K, T] frame-aligned tokens -> [B=channels, K/channels, T] (stereo: even left, odd right)."""
    if audio_channels == 1:
        return codes[None]
    return torch.stack([codes[0::2], codes[1::2]])


def decode_full(
    audio_encoder: nn.Module, codes: torch.LongTensor, audio_channels: int
) -> np.ndarray:
    """codes [K, T] -> float32 [channels, T * 640], every frame decoded in one call."""
    if audio_channels not in (1, 2):
        raise ValueError(f"audio_channels must be 1 or 2, got {audio_channels!r}")
    device = next(audio_encoder.parameters()).device
    with torch.inference_mode():
        codes = codes.to(device)
        halves = [codes] if audio_channels == 1 else [codes[0::2], codes[1::2]]
        audio = [audio_encoder.decode(h[None, None], [None]).audio_values[0] for h in halves]
        return torch.cat(audio).float().cpu().numpy()  # [channels, T * 640]
