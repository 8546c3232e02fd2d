"""Test hooks: make the running radio fail on purpose, or move its programme's clock, from
Python only.

`FaultInjector` is handed to `radio.app.init_app(config, faults=...)` by a test; the config, the
CLI and the HTTP API cannot reach it, so a production radio never has one (the hooks are
skipped when there is none). The generator's worker thread calls its hooks at named points of
each step; a test arms a fault from any thread:

    faults = FaultInjector()
    app = init_app(config, model, faults=faults)
    faults.slow_down(0.6)                  # every chunk takes 0.6 s longer: the station falls behind
    faults.fail_next_step("main", times=3) # the station's next 3 steps raise
    faults.fail_next_reopen("main")        # ... and its next reopen too
    faults.kill_generator()                # the worker thread dies (an error outside any step)
    faults.hang_next_step("main")          # its next step blocks until `release()`
    faults.silence("main", 5 * 32000)      # its next 5 s of audio (model rate) are silent
    faults.loop_tokens("main", 50)         # its tokens repeat their last second, over and over
    faults.collapse_codebook("main", 0, 2) # its first codebook holds 2 tokens only

Hooks (worker thread), at named points of the generator: `in_worker()` at the top of each turn
of the worker's loop (raises an armed death), `before_step(station_id)` before a station's
stream is read (raises an armed failure, blocks an armed hang), `before_reopen(station_id)`
before a reopen (raises), `rewrite_tokens(station_id, stream, frames)` right before the read
(generates the chunk's tokens and rewrites them in the stream: the listeners hear the loop or
the collapse, and the watchdog sees it), `after_step(station_id, pcm) -> pcm` after it (sleeps
the slow-down, replaces audio), and `reanchored(station_id)`: the music watchdog re-anchored the
station, which ends its silence and token faults (the music is fresh again).

`ShiftedClock` is a programme clock for `init_app(config, programme_clock=...)`: wall time plus
an offset the test moves (`advance`), so a slot boundary or a rotation tick hours away comes
now, while the audio keeps real time.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np


class InjectedFault(RuntimeError):
    """The error a `fail_next_step` (or `kill_generator`, `fail_next_reopen`) fault raises."""


@dataclass
class _TokenFault:
    """Rewrite a station's tokens from the frame it was armed at: a loop of the `block` frames
    before it (`codebook` -1), or one codebook cycling through `values`."""

    codebook: int  # -1: every codebook loops
    size: int  # frames in the looped block, or tokens in the collapsed codebook
    start: int = -1  # the first rewritten frame (set at the first read)
    block: Any = None  # [K, size] the looped frames


class FaultInjector:
    """Faults armed by a test, applied by the generator's worker thread (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._delay = 0.0  # extra seconds slept after every chunk
        self._failures: dict[str, list[BaseException]] = defaultdict(list)
        self._reopen_failures: dict[str, list[BaseException]] = defaultdict(list)
        self._death: BaseException | None = None
        self._hangs: dict[str, threading.Event] = {}
        self._hang_seconds = 0.0
        self._silent: dict[str, int] = defaultdict(int)  # samples still to silence
        self._tokens: dict[str, _TokenFault] = {}
        self.injected = 0  # faults applied so far (failures raised, chunks silenced, ...)

    # ---- arming (any thread) ---------------------------------------------------------------

    def slow_down(self, seconds_per_chunk: float) -> None:
        """Sleep this long after every chunk of every station (0 = full speed again)."""
        with self._lock:
            self._delay = max(0.0, seconds_per_chunk)

    def fail_next_step(
        self, station_id: str, error: BaseException | None = None, times: int = 1
    ) -> None:
        """Make the station's next `times` steps raise `error` (default: `InjectedFault`)."""
        with self._lock:
            for _ in range(times):
                self._failures[station_id].append(error or InjectedFault("injected fault"))

    def fail_next_reopen(self, station_id: str, times: int = 1) -> None:
        """Make the station's next `times` reopens (after a failure) raise `InjectedFault`."""
        with self._lock:
            for _ in range(times):
                self._reopen_failures[station_id].append(InjectedFault("injected reopen fault"))

    def kill_generator(self, error: BaseException | None = None) -> None:
        """Make the generator's worker thread die at its next turn, outside any station's step,
        with `error` (default: `InjectedFault`)."""
        with self._lock:
            self._death = error or InjectedFault("injected death")

    def hang_next_step(self, station_id: str, seconds: float = 3600.0) -> None:
        """Make the station's next step block for `seconds` or until `release()`."""
        with self._lock:
            self._hangs[station_id] = threading.Event()
            self._hang_seconds = seconds

    def release(self) -> None:
        """End every hang now (also those not reached yet)."""
        with self._lock:
            hangs, self._hangs = list(self._hangs.values()), {}
        for event in hangs:
            event.set()

    def silence(self, station_id: str, samples: int) -> None:
        """Replace the station's next `samples` samples (model rate) with silence."""
        with self._lock:
            self._silent[station_id] += samples

    def loop_tokens(self, station_id: str, block_frames: int) -> None:
        """From the station's next chunk on, its tokens repeat the `block_frames` frames before
        it, over and over (a stuck loop), until a re-anchor."""
        if block_frames < 1:
            raise ValueError(f"block_frames must be >= 1, got {block_frames}")
        with self._lock:
            self._tokens[station_id] = _TokenFault(codebook=-1, size=block_frames)

    def collapse_codebook(self, station_id: str, codebook: int = 0, tokens: int = 2) -> None:
        """From the station's next chunk on, `codebook` cycles through `tokens` token values
        (a collapse), until a re-anchor."""
        if codebook < 0 or tokens < 1:
            raise ValueError(f"need codebook >= 0 and tokens >= 1, got {codebook}, {tokens}")
        with self._lock:
            self._tokens[station_id] = _TokenFault(codebook=codebook, size=tokens)

    # ---- hooks (the generator's worker thread) ---------------------------------------------

    def in_worker(self) -> None:
        with self._lock:
            death, self._death = self._death, None
            if death is not None:
                self.injected += 1
        if death is not None:
            raise death

    def _next_error(
        self, queued: dict[str, list[BaseException]], station_id: str
    ) -> BaseException | None:
        """The station's next armed error, if any, counted (call with the lock held)."""
        errors = queued.get(station_id)
        error = errors.pop(0) if errors else None
        self.injected += error is not None
        return error

    def before_step(self, station_id: str) -> None:
        with self._lock:
            error = self._next_error(self._failures, station_id)
            hang = self._hangs.get(station_id)
            if error is None and hang is not None:
                self.injected += 1
        if hang is not None:
            hang.wait(self._hang_seconds)
            with self._lock:
                if self._hangs.get(station_id) is hang:
                    del self._hangs[station_id]
        if error is not None:
            raise error

    def before_reopen(self, station_id: str) -> None:
        with self._lock:
            error = self._next_error(self._reopen_failures, station_id)
        if error is not None:
            raise error

    def rewrite_tokens(self, station_id: str, stream: Any, frames: int) -> None:
        """Before `stream.read(frames)` (an `engine.AudioStream`): make the tokens it will
        decode, and rewrite those from the stream's position on as an armed token fault says."""
        with self._lock:
            fault = self._tokens.get(station_id)
        if fault is None:
            return
        import torch  # the engine's tensors; only a test that arms a token fault gets here

        start = stream.frame
        stream.tokens.generate_until(start + frames + stream.codec.lookahead)
        codes, offset = stream.tokens.history()  # [K, T], frame `offset` first (rewritten in place)
        if fault.start < 0:
            fault.start = start
            fault.block = codes[:, start - fault.size - offset : start - offset].clone()
        end = offset + codes.shape[1]
        at = (np.arange(start, end) - fault.start) % fault.size  # place in the block or cycle
        with torch.inference_mode():
            if fault.codebook < 0:
                codes[:, start - offset :] = fault.block[:, torch.from_numpy(at)]
            else:
                values = (at * 97 + 11) % 2048
                codes[fault.codebook, start - offset :] = torch.from_numpy(values)
        with self._lock:
            self.injected += 1

    def after_step(self, station_id: str, pcm: np.ndarray) -> np.ndarray:
        """pcm [C, n], possibly silenced, after the slow-down's sleep."""
        with self._lock:
            delay = self._delay
            quiet = min(self._silent.get(station_id, 0), pcm.shape[1])
            if quiet:
                self._silent[station_id] -= quiet
                self.injected += 1
        if quiet:
            pcm = pcm.copy()
            pcm[:, :quiet] = 0.0
        if delay:
            time.sleep(delay)
        return pcm

    def reanchored(self, station_id: str) -> None:
        """The watchdog re-anchored the station: its silence and token faults end."""
        with self._lock:
            self._silent.pop(station_id, None)
            self._tokens.pop(station_id, None)


class ShiftedClock:
    """`time.time()` plus `offset` seconds, which the test moves (any thread)."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    @classmethod
    def at_utc(cls, hour: int) -> ShiftedClock:
        """A clock that reads today's `hour`:00:00 UTC now."""
        now = time.time()
        then = dt.datetime.fromtimestamp(now, dt.UTC).replace(hour=hour, minute=0, second=0)
        return cls(then.timestamp() - now)

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds
