"""The generator: ONE worker thread that runs every station's engine stream ahead of the clock.

Torch is not asyncio, so all model work happens here, in one thread that owns every stream. The
stations are opened together (`MusicModel.open_streams`): they share every decoder step, so
reading one station's stream advances all of them. The worker reads the station with the least
audio ahead first, `chunk_frames` at a time, and keeps each at most `buffer_ahead` seconds ahead
of its clock (the clock reports how far it played); when every station is that far ahead it
waits for the clocks. A station whose generation raises is marked failed and left alone; the
others go on (a prompt change revives it).

The bridge to the event loop is deliberately narrow:

- loop -> worker: `Generator` methods put commands on one `queue.Queue` (`set_prompt`,
  `set_sampling`, `played`, `stop`); the ones with an answer return an `asyncio.Future`.
- worker -> loop: `_to_loop`, i.e. `loop.call_soon_threadsafe`, calls a `GeneratorSink` method
  (new PCM, a prompt applied, an error) or resolves a future. Nothing else crosses.

Callbacks arrive in the order the worker made them, so a prompt change's cut always lands before
the first PCM of the new prompt. Where a prompt change starts and when it is heard is
`radio.timing`'s business; the worker only applies it (`timing.start_prompt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from engine.threads import ThreadTuner
from radio.blending import open_blend, open_text
from radio.timing import PromptChange, auto_horizon, start_prompt

if TYPE_CHECKING:
    from engine.blend import Blend
    from engine.model import AudioStream, MusicModel
    from engine.options import SamplingOptions, WindowOptions
    from radio.testing import FaultInjector

log = logging.getLogger(__name__)

RTF_SMOOTHING = 0.2  # weight of the newest chunk in the real-time factor's moving average
WAIT_SECONDS = 0.05  # how long an idle worker waits for a command before looking again


class GeneratorSink(Protocol):
    """Where the worker's results land (on the event loop)."""

    def on_pcm(self, station_id: str, start_frame: int, pcm: np.ndarray, rtf: float) -> None: ...

    def on_prompt_applied(self, station_id: str, change: PromptChange, frame: int) -> None: ...

    def on_error(self, station_id: str, message: str) -> None: ...


@dataclass(frozen=True)
class StationSpec:
    id: str
    prompt: Blend  # what the station opens with (radio.blending hands it to the engine)
    sampling: SamplingOptions
    window: WindowOptions


@dataclass
class _Lane:
    """The worker's view of one station (worker thread only)."""

    spec: StationSpec
    stream: AudioStream
    played_frame: int = 0  # the clock's head, as last reported
    rtf: float = 0.0
    failed: bool = False

    def ahead_frames(self) -> int:
        return self.stream.frame - self.played_frame


@dataclass(frozen=True)
class _SetPrompt:
    station_id: str
    change: PromptChange
    future: asyncio.Future[int]


@dataclass(frozen=True)
class _SetSampling:
    station_id: str
    sampling: SamplingOptions
    future: asyncio.Future[bool]


@dataclass(frozen=True)
class _Played:
    station_id: str
    frame: int


_Command = _SetPrompt | _SetSampling | _Played
_STOP = None  # the command that ends the worker


class Generator:
    """Owns the worker thread. Create it, `start(loop, sink)` on the loop, `stop()` when done."""

    def __init__(
        self,
        model: MusicModel,
        specs: Sequence[StationSpec],
        *,
        buffer_ahead: float = 4.0,  # seconds each station may be ahead of its clock
        chunk_frames: int = 10,  # frames per read()
        faults: FaultInjector | None = None,  # tests only (radio.testing)
    ) -> None:
        self.model = model
        self.specs = list(specs)
        self.buffer_ahead = buffer_ahead
        self.chunk_frames = chunk_frames
        self.faults = faults
        # seconds one prefill of a whole context takes: measured when the streams open, then the
        # latest window restart's (read by the loop to place prompt changes; a float is atomic)
        self.prefill_seconds = 0.0
        self.tuner: ThreadTuner | None = None  # made by the worker thread, for its own threads
        self._commands: queue.Queue[_Command | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: GeneratorSink | None = None

    # ---- loop side ----------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, sink: GeneratorSink) -> None:
        self._loop, self._sink = loop, sink
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

    def set_prompt(self, station_id: str, change: PromptChange) -> asyncio.Future[int]:
        """Future of the frame from which `change` is heard (`timing.start_prompt`)."""
        fut: asyncio.Future[int] = self._future()
        self._commands.put(_SetPrompt(station_id, change, fut))
        return fut

    def set_sampling(self, station_id: str, sampling: SamplingOptions) -> asyncio.Future[bool]:
        fut: asyncio.Future[bool] = self._future()
        self._commands.put(_SetSampling(station_id, sampling, fut))
        return fut

    def played(self, station_id: str, frame: int) -> None:
        """The clock of `station_id` has taken audio up to `frame` (no answer)."""
        self._commands.put(_Played(station_id, frame))

    def _future(self) -> asyncio.Future[Any]:
        assert self._loop is not None, "the generator was not started"
        return self._loop.create_future()

    # ---- the bridge: the only way back to the loop -------------------------------------

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None, "the generator was not started"
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are shutting down
            self._loop.call_soon_threadsafe(fn, *args)

    def _resolve(
        self, fut: asyncio.Future[Any], result: Any = None, error: BaseException | None = None
    ) -> None:
        def settle() -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        self._to_loop(settle)

    @property
    def sink(self) -> GeneratorSink:
        assert self._sink is not None, "the generator was not started"
        return self._sink

    # ---- worker side --------------------------------------------------------------------

    def _run(self) -> None:
        self.tuner = ThreadTuner()
        lanes = self._open()
        if lanes is None:
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

    def _open(self) -> dict[str, _Lane] | None:
        """Every station's stream, opened together, and the prefill measured; None (and an
        error on every station) when that fails."""
        try:
            # One decoder step serves every station (engine batching): the weights are read
            # once per step for all of them.
            streams = self.model.open_streams(
                [open_text(s.prompt) for s in self.specs],
                [s.sampling for s in self.specs],
                window=self.specs[0].window,
            )
            for spec, stream in zip(self.specs, streams, strict=True):
                open_blend(stream, spec.prompt)
            self.prefill_seconds = self.model.measure_prefill(self.specs[0].window)
        except Exception as e:  # noqa: BLE001 - reported to every station, then we stop
            log.exception("the generator could not open the stations' streams")
            for spec in self.specs:
                self._to_loop(self.sink.on_error, spec.id, f"cannot open stream: {e}")
            return None
        self._say_prefill()
        return {s.id: _Lane(s, stream) for s, stream in zip(self.specs, streams, strict=True)}

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

    @staticmethod
    def _pick(lanes: Iterable[_Lane], ahead_limit: int) -> _Lane | None:
        """The working station with the least audio ahead, if any is below the limit."""
        ready = [ln for ln in lanes if not ln.failed and ln.ahead_frames() < ahead_limit]
        return min(ready, key=_Lane.ahead_frames, default=None)

    def _step(self, lane: _Lane) -> None:
        sid = lane.spec.id
        start = lane.stream.frame
        t = time.perf_counter()
        try:
            if self.faults is not None:
                self.faults.before_step(sid)
            pcm = self._read(lane)  # [C, chunk_frames * hop]
        except Exception as e:  # noqa: BLE001 - one station's failure must not stop the others
            log.exception("station %s: generation failed", sid)
            lane.failed = True
            self._to_loop(self.sink.on_error, sid, f"generation failed: {e}")
            return
        if lane.stream.tokens.prefill_seconds:  # the latest window restart or prompt change
            self.prefill_seconds = lane.stream.tokens.prefill_seconds
        if self.faults is not None:
            pcm = self.faults.after_step(sid, pcm)
        spent = max(time.perf_counter() - t, 1e-6)
        rtf = self.chunk_frames / self.model.frame_rate / spent
        lane.rtf = rtf if lane.rtf == 0 else (1 - RTF_SMOOTHING) * lane.rtf + RTF_SMOOTHING * rtf
        self._to_loop(self.sink.on_pcm, sid, start, pcm, lane.rtf)

    def _read(self, lane: _Lane) -> np.ndarray:
        """The lane's next chunk, with the thread count that has been fastest lately (a busy
        neighbour can make two threads slower than one); a change is logged once."""
        tuner = self.tuner
        assert tuner is not None
        before = tuner.current
        pcm = tuner.run(lambda: lane.stream.read(self.chunk_frames), units=self.chunk_frames)
        if tuner.current != before:
            log.info(
                "generation now runs on %d thread(s), measured faster on this machine now: %s",
                tuner.current,
                tuner.describe(),
            )
        return pcm

    def _drain(self, lanes: dict[str, _Lane], block: bool) -> bool:
        """Handle queued commands (waiting briefly for one if `block`); False on stop."""
        while True:
            try:
                if block:
                    cmd = self._commands.get(timeout=WAIT_SECONDS)
                else:
                    cmd = self._commands.get_nowait()
            except queue.Empty:
                return True
            block = False
            if cmd is _STOP:
                return False
            self._handle(lanes, cmd)

    def _handle(self, lanes: dict[str, _Lane], cmd: _Command) -> None:
        lane = lanes.get(cmd.station_id)
        if lane is None:
            if not isinstance(cmd, _Played):
                self._resolve(cmd.future, error=KeyError(cmd.station_id))
            return
        if isinstance(cmd, _Played):
            lane.played_frame = max(lane.played_frame, cmd.frame)
        elif isinstance(cmd, _SetPrompt):
            self._apply_prompt(lane, cmd)
        else:
            try:
                lane.stream.set_sampling(cmd.sampling)
            except Exception as e:  # noqa: BLE001 - the caller gets the reason
                self._resolve(cmd.future, error=e)
                return
            self._resolve(cmd.future, True)

    def _apply_prompt(self, lane: _Lane, cmd: _SetPrompt) -> None:
        try:
            frame = start_prompt(lane.stream, cmd.change)
        except Exception as e:  # noqa: BLE001 - the caller gets the reason
            log.exception("station %s: prompt change failed", lane.spec.id)
            self._resolve(cmd.future, error=e)
            return
        lane.failed = False
        self._to_loop(self.sink.on_prompt_applied, lane.spec.id, cmd.change, frame)
        self._resolve(cmd.future, frame)
