"""The generator: ONE worker thread that runs every station's engine stream ahead of the clock.

Torch is not asyncio, so all model work happens here, in one thread that owns every stream.
Stations share it round-robin, the one with the least audio ahead first, each kept at most
`buffer_ahead` seconds ahead of its clock (batching stations into one step will slot in at
`_step`). The bridge to the event loop is deliberately narrow:

- loop -> worker: `Generator` methods put commands on one `queue.Queue` (`set_prompt`,
  `set_sampling`, `played`, `stop`); the ones with an answer return an `asyncio.Future`.
- worker -> loop: `_to_loop`, i.e. `loop.call_soon_threadsafe`, calls a `GeneratorSink` method
  (new PCM, a prompt applied, an error) or resolves a future. Nothing else crosses.

Callbacks arrive in the order the worker made them, so a prompt change's cut always lands before
the first PCM of the new prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

RTF_SMOOTHING = 0.2  # weight of the newest chunk in the real-time factor's moving average


class GeneratorSink(Protocol):
    """Where the worker's results land (on the event loop)."""

    def on_pcm(self, station_id: str, start_frame: int, pcm: np.ndarray, rtf: float) -> None: ...

    def on_prompt_applied(
        self, station_id: str, prompt: str, frame: int, posted_at: float, source: str
    ) -> None: ...

    def on_error(self, station_id: str, message: str) -> None: ...


MIN_HORIZON = 0.5  # seconds: the auto prompt horizon never starts a prompt sooner
HORIZON_MARGIN = 1.5  # the auto horizon leaves this many prefill times for the prefill


def auto_horizon(prefill_seconds: float, chunk_seconds: float) -> float:
    """Seconds after the moment being played at which a new prompt can start without the
    stream falling behind: the prefill (with a margin) and two chunks of generation must fit
    into the audio still buffered before it."""
    return max(MIN_HORIZON, HORIZON_MARGIN * prefill_seconds + 2 * chunk_seconds)


@dataclass(frozen=True)
class StationSpec:
    id: str
    prompt: str
    sampling: Any  # engine SamplingOptions
    window: Any  # engine WindowOptions


@dataclass
class _Lane:
    """The worker's view of one station (worker thread only)."""

    spec: StationSpec
    stream: Any = None
    played_frame: int = 0  # the clock's head, as last reported
    rtf: float = 0.0
    failed: bool = False

    def ahead_frames(self) -> int:
        return self.stream.frame - self.played_frame


@dataclass(frozen=True)
class _SetPrompt:
    station_id: str
    prompt: str
    from_frame: int
    posted_at: float
    source: str
    future: asyncio.Future


@dataclass(frozen=True)
class _SetSampling:
    station_id: str
    sampling: Any
    future: asyncio.Future


@dataclass(frozen=True)
class _Played:
    station_id: str
    frame: int


@dataclass(frozen=True)
class _SlowDown:
    seconds_per_chunk: float


_STOP = object()


@dataclass
class Generator:
    """Owns the worker thread. Create on the loop, `start()`, and `stop()` when done."""

    model: Any  # engine MusicModel
    specs: Sequence[StationSpec]
    sink: GeneratorSink
    loop: asyncio.AbstractEventLoop
    buffer_ahead: float = 4.0  # seconds each station may be ahead of its clock
    chunk_frames: int = 10  # frames per read()
    # seconds one prefill of a whole context takes: measured when the streams open, then the
    # latest window restart's (read by the loop to place prompt changes; a float is atomic)
    prefill_seconds: float = 0.0
    _commands: queue.Queue = field(default_factory=queue.Queue)
    _thread: threading.Thread | None = None
    _slow_down: float = 0.0  # test hook: extra seconds slept per chunk (see `slow_down`)

    # ---- loop side ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="radio-generator", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to finish its current chunk and exit; wait up to `timeout` s."""
        self._commands.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the generator thread did not stop within %.0f s", timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def set_prompt(
        self, station_id: str, prompt: str, from_frame: int, posted_at: float, source: str
    ) -> asyncio.Future:
        """Future of the frame from which `prompt` is heard (at or after `from_frame` when the
        engine can, otherwise the earliest it can)."""
        fut = self.loop.create_future()
        self._commands.put(_SetPrompt(station_id, prompt, from_frame, posted_at, source, fut))
        return fut

    def set_sampling(self, station_id: str, sampling: Any) -> asyncio.Future:
        fut = self.loop.create_future()
        self._commands.put(_SetSampling(station_id, sampling, fut))
        return fut

    def played(self, station_id: str, frame: int) -> None:
        """The clock of `station_id` has taken audio up to `frame` (no answer)."""
        self._commands.put(_Played(station_id, frame))

    def slow_down(self, seconds_per_chunk: float) -> None:
        """TEST HOOK: sleep this long after each chunk, to make generation fall behind on
        purpose (underrun tests). Never set by the config or the CLI."""
        self._commands.put(_SlowDown(seconds_per_chunk))

    # ---- the bridge: the only way back to the loop -------------------------------------

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are shutting down
            self.loop.call_soon_threadsafe(fn, *args)

    def _resolve(self, fut: asyncio.Future, result: Any = None, error: BaseException | None = None):
        def settle() -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        self._to_loop(settle)

    # ---- worker side --------------------------------------------------------------------

    def _run(self) -> None:
        lanes = {s.id: _Lane(s) for s in self.specs}
        try:
            # One decoder step serves every station (engine batching): the weights are read
            # once per step for all of them.
            streams = self.model.open_streams(
                [lane.spec.prompt for lane in lanes.values()],
                [lane.spec.sampling for lane in lanes.values()],
                window=self.specs[0].window,
            )
            for lane, stream in zip(lanes.values(), streams, strict=True):
                lane.stream = stream
            self.prefill_seconds = self.model.measure_prefill(self.specs[0].window)
            self._say_prefill()
        except Exception as e:  # noqa: BLE001 - reported to every station, then we stop
            log.exception("the generator could not open the stations' streams")
            for sid in lanes:
                self._to_loop(self.sink.on_error, sid, f"cannot open stream: {e}")
            return
        ahead_limit = round(self.buffer_ahead * self.model.frame_rate)
        while True:
            if not self._drain(lanes, block=False):
                return
            lane = self._pick(lanes.values(), ahead_limit)
            if lane is None:  # everyone is far enough ahead: wait for the clocks to move
                if not self._drain(lanes, block=True):
                    return
                continue
            self._step(lane)

    def _say_prefill(self) -> None:
        chunk = self.chunk_frames / self.model.frame_rate
        log.info(
            "a prefill of the whole context takes %.2f s: prompt changes start at least %.1f s "
            "ahead (prompt_horizon auto)",
            self.prefill_seconds,
            auto_horizon(self.prefill_seconds, chunk),
        )
        if self.prefill_seconds + chunk > self.buffer_ahead:
            log.warning(
                "the %.1f s buffer is shorter than a prefill (%.2f s) plus a chunk: window "
                "restarts and prompt changes will make the stream fall behind; raise "
                "generation.buffer_ahead or run the model on a faster device",
                self.buffer_ahead,
                self.prefill_seconds,
            )

    def _pick(self, lanes: Any, ahead_limit: int) -> _Lane | None:
        ready = [ln for ln in lanes if not ln.failed and ln.ahead_frames() < ahead_limit]
        return min(ready, key=_Lane.ahead_frames, default=None)

    def _step(self, lane: _Lane) -> None:
        start = lane.stream.frame
        t = time.perf_counter()
        try:
            pcm = lane.stream.read(self.chunk_frames)  # [C, chunk_frames * hop]
        except Exception as e:  # noqa: BLE001 - one station's failure must not stop the others
            log.exception("station %s: generation failed", lane.spec.id)
            lane.failed = True
            self._to_loop(self.sink.on_error, lane.spec.id, f"generation failed: {e}")
            return
        if lane.stream.tokens.prefill_seconds:  # the latest window restart or prompt change
            self.prefill_seconds = lane.stream.tokens.prefill_seconds
        if self._slow_down:
            time.sleep(self._slow_down)
        spent = max(time.perf_counter() - t, 1e-6)
        rtf = self.chunk_frames / self.model.frame_rate / spent
        lane.rtf = rtf if lane.rtf == 0 else (1 - RTF_SMOOTHING) * lane.rtf + RTF_SMOOTHING * rtf
        self._to_loop(self.sink.on_pcm, lane.spec.id, start, pcm, lane.rtf)

    def _drain(self, lanes: dict[str, _Lane], block: bool) -> bool:
        """Handle queued commands (waiting briefly for one if `block`); False on stop."""
        while True:
            try:
                cmd = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
            except queue.Empty:
                return True
            block = False
            if cmd is _STOP:
                return False
            self._handle(lanes, cmd)

    def _handle(self, lanes: dict[str, _Lane], cmd: Any) -> None:
        if isinstance(cmd, _SlowDown):
            self._slow_down = cmd.seconds_per_chunk
            return
        lane = lanes.get(cmd.station_id)
        if lane is None or lane.stream is None:
            if hasattr(cmd, "future"):
                self._resolve(cmd.future, error=KeyError(cmd.station_id))
            return
        if isinstance(cmd, _Played):
            lane.played_frame = max(lane.played_frame, cmd.frame)
        elif isinstance(cmd, _SetPrompt):
            self._apply_prompt(lane, cmd)
        elif isinstance(cmd, _SetSampling):
            try:
                lane.stream.set_sampling(cmd.sampling)
            except Exception as e:  # noqa: BLE001 - the caller gets the reason
                self._resolve(cmd.future, error=e)
                return
            self._resolve(cmd.future, True)

    def _apply_prompt(self, lane: _Lane, cmd: _SetPrompt) -> None:
        stream = lane.stream
        frame = min(max(cmd.from_frame, 0), stream.frame)
        try:
            try:
                frame = stream.set_prompt(cmd.prompt, from_frame=frame)
            except ValueError:  # too far back for the engine: start where it is now
                frame = stream.set_prompt(cmd.prompt, from_frame=stream.frame)
        except Exception as e:  # noqa: BLE001 - the caller gets the reason
            log.exception("station %s: prompt change failed", lane.spec.id)
            self._resolve(cmd.future, error=e)
            return
        lane.failed = False
        self._to_loop(
            self.sink.on_prompt_applied, lane.spec.id, cmd.prompt, frame, cmd.posted_at, cmd.source
        )
        self._resolve(cmd.future, frame)
