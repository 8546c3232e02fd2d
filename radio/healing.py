"""Failures that heal themselves: a station whose generation raises is reopened from its recent
tokens after a backoff, a generator thread that dies is restarted, and a generation step that
makes no progress is reported so that a supervisor (Docker, systemd) restarts the process.

- `Backoff`: the waits before a retry, 1 s, 2 s, 4 s ... capped at 60 s; `reset()` after a
  success. Station reopens and thread restarts each keep their own.
- `LaneHealing` (the generator's worker thread, one per station): a failure takes the station
  off the air until the next delay has passed (`due`); then `radio.generator` reopens it from its
  recent tokens with its current prompt (`engine.AudioStream.restart`), and the first chunk made
  after that resets the backoff. Listeners hear the clock's bridge meanwhile.
- `Supervisor` (the event loop): looks at the generator every `WATCH_SECONDS`. A thread that
  died is restarted after its backoff's next delay (reset once the new thread made audio); a
  step in progress for `stall_seconds` or more is a stall: `problems()` (and so `/healthz`)
  names it until the step ends, because no thread can be killed from outside: only a restart of
  the whole process (state file, HLS numbering) brings the radio back.

Every event is one plain log line; the counts are in `/metrics` and each station's health.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)

FIRST_DELAY = 1.0  # seconds before the first retry
MAX_DELAY = 60.0  # the longest wait between retries
WATCH_SECONDS = 0.5  # how often the supervisor looks at the generator
MAX_REASON = 300  # characters of an error message kept in logs and health


def describe(error: BaseException) -> str:
    """`RuntimeError: out of memory`: an error in one line, for logs and health."""
    text = " ".join(str(error).split())
    if len(text) > MAX_REASON:
        text = text[: MAX_REASON - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def seconds(value: float) -> str:
    """`1 s`, `0.5 s`, `60 s`: a duration as the log lines say it."""
    return f"{value:.0f} s" if value == round(value) else f"{value:.1f} s"


@dataclass
class Backoff:
    """Delays before retries: first, 2 x first, 4 x first ... at most `cap` (1, 2, 4 ... 60 s)."""

    first: float = FIRST_DELAY
    cap: float = MAX_DELAY
    in_a_row: int = 0  # failures since the last success

    def next_delay(self) -> float:
        """Count a failure; the wait before the retry it calls for."""
        self.in_a_row += 1
        return min(self.cap, self.first * 2.0 ** min(self.in_a_row - 1, 60))

    def reset(self) -> None:
        """A success: the next failure waits `first` again."""
        self.in_a_row = 0


@dataclass(frozen=True)
class Failure:
    """A station's generation raised (what the worker tells the loop)."""

    reason: str  # "generation failed (RuntimeError: ...)"
    in_a_row: int  # failures since the station last made audio
    retry_in: float  # seconds until it is reopened


@dataclass
class LaneHealing:
    """One station's failures, in the generator's worker thread."""

    backoff: Backoff = field(default_factory=Backoff)
    retry_at: float | None = None  # while the station is down: when to reopen it (worker clock)
    failures: int = 0  # failures so far
    reopens: int = 0  # reopens so far

    @property
    def down(self) -> bool:
        return self.retry_at is not None

    def failed(self, now: float) -> float:
        """A step (or a reopen) raised at `now`: the station is down; seconds until the reopen."""
        delay = self.backoff.next_delay()
        self.failures += 1
        self.retry_at = now + delay
        return delay

    def due(self, now: float) -> bool:
        """Is the station down and its reopen due?"""
        return self.retry_at is not None and now >= self.retry_at

    def reopened(self) -> None:
        """The stream was reopened: the station is up (the backoff resets at its next chunk)."""
        self.retry_at = None
        self.reopens += 1

    def succeeded(self) -> None:
        """A chunk was made: failures in a row start again from the first delay."""
        self.backoff.reset()


class Supervised(Protocol):
    """What the supervisor reads of the generator (`radio.generator.Generator`)."""

    started: bool  # start() was called
    stopping: bool  # stop() was called: a thread that ends is not restarted
    death: str  # why the last thread ended, if it died
    chunks: int  # chunks of audio made so far (every thread)
    busy: tuple[float, str] | None  # (clock time, what) of the engine call in progress

    @property
    def alive(self) -> bool: ...

    def restart(self) -> None: ...


class Supervisor:
    """Restarts a generator thread that died; reports a step that makes no progress."""

    def __init__(
        self,
        generator: Supervised,
        stall_seconds: float,
        *,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,  # the generator's `busy` clock
    ) -> None:
        self.generator = generator
        self.stall_seconds = stall_seconds
        self.backoff = backoff or Backoff()
        self.clock = clock
        self.restarts = 0  # threads restarted
        self.stalls = 0  # steps seen stalled
        self._restart_at: float | None = None  # a dead thread is restarted then
        self._chunks_at_restart: int | None = None  # to see the restarted thread make audio
        self._stalled: float | None = None  # `busy` start of the step reported stalled

    async def run(self) -> None:
        """`check()` every WATCH_SECONDS, until cancelled."""
        while True:
            self.check()
            await asyncio.sleep(WATCH_SECONDS)

    def check(self) -> None:
        """One look: restart a dead thread when its delay has passed; log a stall once."""
        now = self.clock()
        self._watch_thread(now)
        self._watch_progress(now)

    def problems(self) -> list[str]:
        """What makes the generator unhealthy now (for /healthz), in words; [] when nothing."""
        g, now = self.generator, self.clock()
        out = []
        if not g.alive:
            if self._restart_at is not None:
                out.append(
                    f"the generator thread died ({g.death}); restarting it in "
                    f"{seconds(max(self._restart_at - now, 0.0))}"
                )
            else:
                out.append("the generator thread is not running")
        stall = self._stall(now)
        if stall:
            out.append(stall)
        return out

    def _stall(self, now: float) -> str:
        busy = self.generator.busy
        if busy is None or now - busy[0] < self.stall_seconds:
            return ""
        return f"a generation step has made no progress for {now - busy[0]:.0f} s ({busy[1]})"

    def _watch_thread(self, now: float) -> None:
        g = self.generator
        if self._chunks_at_restart is not None and g.chunks > self._chunks_at_restart:
            self.backoff.reset()  # the restarted thread made audio
            self._chunks_at_restart = None
        if not g.started or g.stopping or g.alive:
            return
        if self._restart_at is None:
            delay = self.backoff.next_delay()
            self._restart_at = now + delay
            log.error(
                "the generator thread died (%s); restarting it in %s", g.death, seconds(delay)
            )
        elif now >= self._restart_at:
            self._restart_at = None
            self.restarts += 1
            self._chunks_at_restart = g.chunks
            g.restart()
            log.info("the generator thread was restarted (restart %d)", self.restarts)

    def _watch_progress(self, now: float) -> None:
        busy = self.generator.busy
        stalled = busy is not None and now - busy[0] >= self.stall_seconds
        if stalled and busy is not None and self._stalled != busy[0]:
            self._stalled = busy[0]
            self.stalls += 1
            log.error(
                "a generation step has made no progress for %.0f s (%s); /healthz answers 503 "
                "so a supervisor restarts the radio",
                now - busy[0],
                busy[1],
            )
        elif self._stalled is not None and (busy is None or busy[0] != self._stalled):
            log.warning(
                "the stalled generation step ended after %.0f s; /healthz no longer reports it",
                now - self._stalled,
            )
            self._stalled = None
