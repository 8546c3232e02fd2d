"""One station's HLS output: the clock's output that feeds the segmenter, and a head count.

The segmenter (`radio.hls.HlsSegmenter`) does the media work; `HlsOutput` feeds it and counts HLS
listeners: players reload the playlist every few seconds, so the number of distinct clients
(address + User-Agent) seen in the last `AUDIENCE_WINDOW` seconds is the audience. The HTTP side
(`GET /hls/{station}/...`) is in `radio.routes`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

import numpy as np

from radio.hls import HlsSegmenter

AUDIENCE_WINDOW = 30.0  # seconds a client counts as listening after its last request


class HlsOutput:
    """Feeds one station's segmenter from the clock and tracks who reloads its playlist."""

    def __init__(
        self,
        segmenter: HlsSegmenter,
        on_count: Callable[[int], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.segmenter = segmenter
        self._seen: dict[str, float] = {}  # client key -> clock() last seen
        self._on_count = on_count
        self._clock = clock

    def push(self, pcm: np.ndarray, wallclock: datetime) -> None:
        self.segmenter.push(pcm, wallclock)
        self._on_count(self.count())

    def saw(self, client: str) -> None:
        """A client (address and User-Agent, say) fetched the playlist or a segment."""
        self._seen[client] = self._clock()
        self._on_count(self.count())

    def count(self) -> int:
        cutoff = self._clock() - AUDIENCE_WINDOW
        for key in [k for k, t in self._seen.items() if t < cutoff]:
            del self._seen[key]
        return len(self._seen)
