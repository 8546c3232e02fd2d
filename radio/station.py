"""One station's live state on the event loop: prompt and history, buffered audio, health.

`PcmBuffer` holds the audio the generator made ahead of the clock, numbered by model sample
(sample s belongs to engine frame s // hop); the clock takes from its head, the generator appends
at its tail, and a prompt change cuts it where the new prompt begins (`radio.timing`), keeping
the old prompt's audio past the cut as a reserve that the clock plays on should the new prompt's
first audio be late (`PcmBuffer.reserve_here`, `radio.clock`). `Station`
gathers what the API, the events, the metrics and the outputs read about one station.
Everything here is touched only from the event loop; the worker thread reaches it through
`radio.generator`'s bridge (`radio.service.StationSink`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from engine.blend import Blend
from radio.config import StationConfig
from radio.events import EventHub
from radio.history import PromptRecord, iso

if TYPE_CHECKING:
    from engine.options import SamplingOptions

log = logging.getLogger(__name__)

HISTORY_LENGTH = 20  # prompt changes kept per station (most recent first in the API)


class PcmBuffer:
    """Contiguous model-rate PCM [C, N] from sample `head` to sample `tail` (exclusive)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.head = 0  # next sample the clock takes
        self._chunks: deque[np.ndarray] = deque()  # each [C, n], contiguous from head
        self._size = 0
        self._reserve: np.ndarray | None = None  # [C, n]: what played on past the last cut
        self._reserve_start = 0  # its first sample (the cut)

    @property
    def tail(self) -> int:
        return self.head + self._size

    def __len__(self) -> int:
        return self._size

    def append(self, start: int, pcm: np.ndarray) -> None:
        """Add pcm [C, n] that begins at sample `start`; what lies before `head` is dropped.

        The generator always continues at the tail (a prompt change cuts the tail first), so
        anything else means it is out of step: the newest audio wins, with a log line."""
        if start < self.head:  # the clock has moved past the beginning: keep the rest
            pcm = pcm[:, self.head - start :]
            start = self.head
        if pcm.shape[1] == 0:
            return
        if start != self.tail:
            log.warning(
                "audio at sample %d does not follow the buffer (%d); resyncing", start, self.tail
            )
            if start < self.tail:
                self.truncate(start)
            else:  # a gap: drop what is buffered and go on from the new audio
                self._chunks.clear()
                self._size = 0
                self.head = start
        self._chunks.append(pcm)
        self._size += pcm.shape[1]

    def take(self, n: int) -> np.ndarray:
        """Up to n samples from the head: [C, <= n]."""
        out = []
        need = n
        while need > 0 and self._chunks:
            chunk = self._chunks[0]
            if chunk.shape[1] <= need:
                out.append(self._chunks.popleft())
                need -= chunk.shape[1]
            else:
                out.append(chunk[:, :need])
                self._chunks[0] = chunk[:, need:]
                need = 0
        got = n - need
        self.head += got
        self._size -= got
        if self._reserve is not None and self.head > self._reserve_start:
            self._reserve = None  # the new prompt plays: the old one's audio is no longer due
        if not out:
            return np.zeros((self.channels, 0), np.float32)
        return out[0] if len(out) == 1 else np.concatenate(out, axis=1)

    def skip_to(self, sample: int) -> None:
        """The audio goes on at `sample`, past the tail (a stream reopened later than it
        stopped): the buffer starts again there; what it held would not follow and is dropped
        (after a long failure it is empty: the bridge has been playing)."""
        assert sample >= self.tail, f"skip_to({sample}) before the tail ({self.tail})"
        self._chunks.clear()
        self._size = 0
        self.head = sample

    def truncate(self, sample: int, keep_reserve: bool = False) -> np.ndarray:
        """Drop everything from `sample` on; returns the dropped PCM [C, n].

        If the clock already played past `sample`, everything goes and the new audio is cut to
        follow what was played (see `append`). With `keep_reserve` (a prompt change) the dropped
        audio stays as the reserve: what would have played from the cut on (with the previous
        reserve after it when no new audio followed that cut yet), for `reserve_here`."""
        keep = min(max(sample - self.head, 0), self._size)
        if self._chunks:
            pcm = np.concatenate(list(self._chunks), axis=1)
        else:
            pcm = np.zeros((self.channels, 0), np.float32)
        tail = self.tail
        self._chunks.clear()
        if keep:
            self._chunks.append(pcm[:, :keep])
        self._size = keep
        dropped = pcm[:, keep:]
        if not keep_reserve:
            self._reserve = None
            return dropped
        reserve = dropped
        if self._reserve is not None and self._reserve_start == tail:  # the old one goes on
            reserve = np.concatenate([dropped, self._reserve], axis=1)
        self._reserve, self._reserve_start = reserve, self.tail
        return dropped

    def reserve_here(self) -> np.ndarray | None:
        """The reserve [C, n] when the buffer ran dry exactly at the last cut (the new prompt's
        first audio is late): the old prompt's audio that follows what was played seamlessly.
        Taking it is the caller's: the reserve is handed out once."""
        if self._reserve is None or self._size or self.head != self._reserve_start:
            return None
        reserve, self._reserve = self._reserve, None
        return reserve if reserve.shape[1] else None


@dataclass
class Health:
    buffer_seconds: float = 0.0  # audio generated ahead of the clock
    realtime_factor: float = 0.0  # seconds of audio generated per second of work (smoothed)
    underruns: int = 0  # times the buffer ran dry and the bridge played
    bridge_seconds: float = 0.0  # total time the bridge played
    bridging: bool = False  # the bridge plays now
    holds: int = 0  # times a new prompt's audio was late and the old prompt's played on
    held_seconds: float = 0.0  # total time the old prompt's audio played on so
    holding: bool = False  # the old prompt's audio plays on now
    prompt_latency_seconds: float | None = None  # last POST -> first new-prompt sample out
    schedule_lag_seconds: float | None = None  # last programme change: due -> first sample out
    prompt_changes: int = 0  # prompt changes applied
    prompts_heard: int = 0  # prompt changes asked for now whose first sample was heard
    started: bool = False  # the clock is releasing audio
    last_tick: float = 0.0  # time.monotonic() of the clock's last tick
    error: str = ""  # why the generator stopped, if it did (cleared by the next audio)
    failures: int = 0  # times generation raised (each one healed by a reopen)
    reopens: int = 0  # times the stream was reopened after a failure
    down: bool = False  # generation failed and the reopen is pending (the bridge plays)
    retry_at: float | None = None  # time.monotonic() of the pending reopen
    reanchors: dict[str, int] = field(default_factory=dict)  # music watchdog: problem -> count
    last_reanchor: dict[str, object] | None = None  # the latest one: problem, detail, when
    restart_context_seconds: float | None = None  # window restarts shortened to this (ladder)
    window_seconds: float | None = None  # windows shortened to this (the ladder's last levels)
    rungs: tuple[str, ...] = ()  # the ladder's rungs in use that cost exactness (int4, guidance)
    last_prefill: dict[str, float] | None = None  # the latest prefill: seconds, rows, frames

    def retry_in(self, now: float) -> float | None:
        """Seconds until the pending reopen (None when the station is not down)."""
        return None if self.retry_at is None else max(self.retry_at - now, 0.0)


@dataclass
class Station:
    """What one station is now; owned by the event loop."""

    config: StationConfig
    index: int  # position in the config (seeds, ordering)
    channels: int
    sampling: SamplingOptions  # in use; the admin changes it live
    prompt: str = ""  # `blend` in words (Blend.describe): a plain prompt is its text
    blend: Blend = field(default_factory=lambda: Blend.of(""))  # what the engine was given
    prompt_since: float = field(default_factory=time.time)
    history: deque[PromptRecord] = field(default_factory=lambda: deque(maxlen=HISTORY_LENGTH))
    health: Health = field(default_factory=Health)
    events: EventHub = field(default_factory=EventHub)
    buffer: PcmBuffer = field(init=False)
    mp3_listeners: int = 0
    hls_listeners: int = 0

    def __post_init__(self) -> None:
        self.buffer = PcmBuffer(self.channels)

    @property
    def id(self) -> str:
        return self.config.id

    def record_prompt(self, prompt: str | Blend, source: str, at: float | None = None) -> None:
        """The current prompt became `prompt` (a text or a blend), chosen by `source`; tell
        the event subscribers."""
        self.blend = prompt if isinstance(prompt, Blend) else Blend.of(prompt)
        self.prompt = self.blend.describe()
        self.prompt_since = time.time() if at is None else at
        self.history.appendleft(PromptRecord(self.prompt, self.prompt_since, source))
        self.events.publish("prompt", self.prompt_json())

    def prompt_json(self) -> dict[str, object]:
        last = self.history[0] if self.history else None
        return {
            "prompt": self.prompt,
            "blend": self.blend.to_json(),
            "prompt_since": iso(self.prompt_since),
            "source": last.source if last else "config",
            "history": self.history_json(),
        }

    def set_listeners(self, mp3: int | None = None, hls: int | None = None) -> None:
        before = (self.mp3_listeners, self.hls_listeners)
        if mp3 is not None:
            self.mp3_listeners = mp3
        if hls is not None:
            self.hls_listeners = hls
        if (self.mp3_listeners, self.hls_listeners) != before:
            self.events.publish("listeners", self.listeners_json())

    def listeners_json(self) -> dict[str, int]:
        return {
            "mp3": self.mp3_listeners,
            "hls": self.hls_listeners,
            "total": self.mp3_listeners + self.hls_listeners,
        }

    def health_json(self) -> dict[str, object]:
        h = self.health
        return {
            "buffer_seconds": round(h.buffer_seconds, 3),
            "realtime_factor": round(h.realtime_factor, 3),
            "underruns": h.underruns,
            "bridging": h.bridging,
            "holds": h.holds,
            "held_seconds": round(h.held_seconds, 3),
            "holding": h.holding,
            "prompt_latency_seconds": _rounded(h.prompt_latency_seconds),
            "prompts_heard": h.prompts_heard,
            "schedule_lag_seconds": _rounded(h.schedule_lag_seconds),
            "playing": h.started,
            "error": h.error or None,
            "failures": h.failures,
            "reopens": h.reopens,
            "retry_in_seconds": _rounded(h.retry_in(time.monotonic())),
            "reanchors": sum(h.reanchors.values()),
            "last_reanchor": h.last_reanchor,
            "last_prefill": h.last_prefill,
            "restart_context_seconds": h.restart_context_seconds,
            "window_seconds": h.window_seconds,
            "rungs": list(h.rungs),
        }

    def history_json(self) -> list[dict[str, object]]:
        return [r.to_json() for r in self.history]


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 3)
