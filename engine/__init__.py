"""Endless MusicGen generation: everything that knows torch and MusicGen, and nothing of HTTP.

The radio reaches the model only through this small API (see `engine.model`).
"""

from typing import TYPE_CHECKING, Any

from engine.blend import Blend
from engine.loading import ModelLoadError
from engine.options import LoadOptions, SamplingOptions, WindowOptions

if TYPE_CHECKING:
    from engine.model import AudioStream, MusicModel, read_together


def __getattr__(name: str) -> Any:
    # MusicModel pulls in torch; import it when first asked for, so that
    # `from engine import LoadOptions` stays cheap (config parsing, CLI --help).
    if name in ("MusicModel", "AudioStream", "read_together"):
        from engine import model

        return getattr(model, name)
    raise AttributeError(name)


__all__ = [
    "AudioStream",
    "Blend",
    "LoadOptions",
    "ModelLoadError",
    "MusicModel",
    "SamplingOptions",
    "WindowOptions",
    "read_together",
]
