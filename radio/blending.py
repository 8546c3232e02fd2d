"""Where the radio hands the engine a prompt: a `Blend` (and, for a clip, tokens) into a stream.

The radio thinks in blends (`engine.blend.Blend`: the config, the director, the API), and the
engine plays them: one decoder row per text, mixed by weight under classifier-free guidance,
and a transition glides the weights (`AudioStream.set_prompt(prompt: str | Blend,
from_frame=None, transition_seconds=0.0)`, `AudioStream.seed(tokens, prompt: str | Blend)`).
`set_blend` is the ONE place that hands them over, and it asks the stream itself: when the
stream's `set_prompt` accepts a `transition_seconds` parameter (the engine's blend-aware
signature), the blend and its transition go through whole; a stream without it (a test double,
an engine before blends) gets `set_prompt(blend.dominant, from_frame)`. `inspect.signature` is
read once per stream class.

`open_text` and `open_blend` do the same for a stream being opened (the radio opens streams on
texts, then gives a blend-aware stream its blend before the first frame), `seed_blend` for a
stream seeded from a clip. Everything here runs in the generator's worker thread.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Protocol

from engine.blend import Blend

if TYPE_CHECKING:
    import torch


class PromptStream(Protocol):
    """What the radio needs of an engine stream (`engine.AudioStream`)."""

    @property
    def frame(self) -> int: ...

    def set_prompt(self, prompt: str | Blend, from_frame: int | None = None, **kw: Any) -> int: ...

    def seed(
        self, tokens: torch.Tensor, prompt: str | Blend | None = None, from_frame: int | None = None
    ) -> int: ...


_SIGNATURES: dict[type, bool] = {}  # stream class -> its set_prompt takes blends


def takes_blends(stream: object) -> bool:
    """Does this stream's `set_prompt` take a blend and a transition? (read once per class)"""
    cls = type(stream)
    if cls not in _SIGNATURES:
        method = getattr(stream, "set_prompt", None)
        try:
            names = set(inspect.signature(method).parameters) if method is not None else set()
        except (TypeError, ValueError):  # no signature to read (a builtin)
            names = set()
        _SIGNATURES[cls] = "transition_seconds" in names
    return _SIGNATURES[cls]


def set_blend(
    stream: PromptStream, blend: Blend, from_frame: int, transition_seconds: float = 0.0
) -> int:
    """Hear `blend` from `from_frame`, gliding over `transition_seconds` where the engine can;
    returns the frame from which it is heard (the engine's ValueError when it cannot rewind)."""
    if takes_blends(stream):
        return stream.set_prompt(blend, from_frame, transition_seconds=transition_seconds)
    return stream.set_prompt(blend.dominant, from_frame=from_frame)


def seed_blend(stream: PromptStream, tokens: torch.Tensor, blend: Blend, from_frame: int) -> int:
    """Continue from `from_frame` as if the music before were `tokens` [K, T], with `blend`
    (a stream that does not take blends: its dominant text)."""
    prompt = blend if takes_blends(stream) else blend.dominant
    return stream.seed(tokens, prompt, from_frame=from_frame)


def open_text(blend: Blend) -> str:
    """The text a stream is opened with (`MusicModel.open_streams` takes texts)."""
    return blend.dominant


def open_blend(stream: PromptStream, blend: Blend) -> None:
    """Right after opening with `open_text(blend)`: give a blend-aware engine the whole blend
    (before the first frame, so nothing is heard of the text alone)."""
    if takes_blends(stream) and len(blend.parts) > 1:
        set_blend(stream, blend, 0)
