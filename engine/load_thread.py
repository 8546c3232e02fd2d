"""A model loading in a short-lived thread of its own, while its caller goes on.

Why a thread of its own: every thread that runs a parallel torch op gets its own OpenMP team,
and once more OpenMP threads exist than cores, libgomp stops spinning between parallel regions
and wakes its threads through the kernel instead. A decode step has ~170 parallel regions: with
the main thread's team left over from loading, the radio's generator thread stepped at half
speed (musicgen-small, int8, 2 cores: real-time factor 0.51 against 1.25 on the same thread). A
thread that exits takes its team with it, so the caller never runs torch.

Why meanwhile: much of a load (reading the weights, packing them) runs without the GIL, so a
server that imports its web stack while the model loads starts sooner (`radio serve`).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from engine.options import LoadOptions

if TYPE_CHECKING:
    from engine.model import MusicModel


class Loading:
    """`MusicModel.load(options)` under way in a thread of its own, started at construction;
    `result()` waits for it and returns the model, or raises what the load raised."""

    def __init__(self, options: LoadOptions | None = None) -> None:
        self.began = time.monotonic()
        self._result: list[MusicModel | BaseException] = []  # filled by the thread
        self._thread = threading.Thread(target=self._run, args=(options,), name="model-load")
        self._thread.daemon = True  # Ctrl-C exits
        self._thread.start()

    def _run(self, options: LoadOptions | None) -> None:
        try:  # engine.model imports torch: here, in the loading thread
            from engine.model import MusicModel

            self._result.append(MusicModel.load(options))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            self._result.append(e)

    def result(self) -> MusicModel:
        self._thread.join()
        if isinstance(self._result[0], BaseException):
            raise self._result[0]
        return self._result[0]


def load_in_thread(options: LoadOptions | None = None) -> MusicModel:
    """`MusicModel.load(options)` in a short-lived thread (see above), waited for."""
    return Loading(options).result()
