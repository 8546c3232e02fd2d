"""Test hooks: make the running radio fail on purpose, or move its programme's clock, from
Python only.

`FaultInjector` is handed to `radio.app.init_app(config, faults=...)` by a test; the config, the
CLI and the HTTP API cannot reach it, so a production radio never has one (the hooks are
skipped when there is none). The generator's worker thread calls its hooks at named points of
each step; a test arms a fault from any thread:

    faults = FaultInjector()
    app = init_app(config, model, faults=faults)
    faults.slow_down(0.6)                  # every chunk takes 0.6 s longer: the station falls behind
    faults.fail_next_step("main")          # the station's next step raises
    faults.silence("main", 5 * 32000)      # its next 5 s of audio (model rate) are silent

Hooks (worker thread): `before_step(station_id)` before a station's stream is read (raises an
armed failure), `after_step(station_id, pcm) -> pcm` after it (sleeps the slow-down, replaces
audio). New faults (a step that hangs, a looped token block, a collapsed codebook) add an
`arm` method here and a hook where the generator can apply them.

`ShiftedClock` is a programme clock for `init_app(config, programme_clock=...)`: wall time plus
an offset the test moves (`advance`), so a slot boundary or a rotation tick hours away comes
now, while the audio keeps real time.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import numpy as np


class InjectedFault(RuntimeError):
    """The error a `fail_next_step` fault raises inside the generator."""


class FaultInjector:
    """Faults armed by a test, applied by the generator's worker thread (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._delay = 0.0  # extra seconds slept after every chunk
        self._failures: dict[str, list[BaseException]] = defaultdict(list)
        self._silent: dict[str, int] = defaultdict(int)  # samples still to silence
        self.injected = 0  # faults applied so far (failures raised, chunks silenced)

    # ---- arming (any thread) ---------------------------------------------------------------

    def slow_down(self, seconds_per_chunk: float) -> None:
        """Sleep this long after every chunk of every station (0 = full speed again)."""
        with self._lock:
            self._delay = max(0.0, seconds_per_chunk)

    def fail_next_step(self, station_id: str, error: BaseException | None = None) -> None:
        """Make the station's next step raise `error` (default: `InjectedFault`)."""
        with self._lock:
            self._failures[station_id].append(error or InjectedFault("injected fault"))

    def silence(self, station_id: str, samples: int) -> None:
        """Replace the station's next `samples` samples (model rate) with silence."""
        with self._lock:
            self._silent[station_id] += samples

    # ---- hooks (the generator's worker thread) ---------------------------------------------

    def before_step(self, station_id: str) -> None:
        with self._lock:
            failures = self._failures.get(station_id)
            error = failures.pop(0) if failures else None
            if error is not None:
                self.injected += 1
        if error is not None:
            raise error

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


class ShiftedClock:
    """`time.time()` plus `offset` seconds, which the test moves (any thread)."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds
