"""The generator: ONE worker thread that runs every station's engine stream ahead of the clock.

Torch is not asyncio, so all model work happens here, in one thread that owns every stream. The
stations are opened together (`MusicModel.open_streams`): they share every decoder step, so
reading one station's stream advances all of them. When a station is due (less than
`buffer_ahead` seconds ahead of its clock; the clock reports how far it played), the worker
reads it together with every station that is due or within a chunk of it, `chunk_frames` each
(`MusicModel.read_together`: their codec decodes are one batched call, the codec's weights read
once for all of them), or `steady_frames` each once every one of them has two of those ahead:
longer reads cost less per second of audio (the codec's margin per call, the step's fixed
costs), short ones make a prompt change's first audio, the first sound and a station low on
audio soon; the first read after a prompt change is shorter still (`change_frames`, half a
chunk): the new prompt's first audio needs that many frames plus the codec's lookahead made
after the change's prefill, so it comes 5 decoder steps sooner within the same horizon
(`radio.timing`), and a change whose cost spikes is less often late. The clocks
make stations due at slightly different moments: without the chunk of slack each would be read
alone. When no station is due the worker waits for the clocks.

Failures heal (`radio.healing`): a station whose step raises is down (the others go on, its
listeners hear the clock's bridge) until its backoff's delay has passed, then its stream is
reopened from its recent tokens with its current prompt (`AudioStream.restart`); a prompt change
reopens it at once. When reading the stations together raises, each is read alone, so that a
failure is the failing station's only. The thread's lanes outlive the thread: when it dies, the
supervisor starts a new one (`restart`) that goes on with the same streams. `busy` says what
engine call is in progress since when, so that the supervisor can see a step that makes no
progress.

The music watchdog (`radio.watchdog`, one per station) reads each chunk's tokens and audio; when
it finds silence, a loop or a collapse, the worker re-anchors the station: the stream restarts
a little ahead of what is heard from a short, fresh context, the old audio fading into the new.

The bridge to the event loop is deliberately narrow:

- loop -> worker: `Generator` methods put commands on one `queue.Queue` (`set_prompt`,
  `set_sampling`, `played`, `stop`); the ones with an answer return an `asyncio.Future`.
- worker -> loop: `_to_loop`, i.e. `loop.call_soon_threadsafe`, calls a `GeneratorSink` method
  (new PCM, a prompt applied, an error, a failure, a reopen, a re-anchor) or resolves a future.
  Nothing else crosses, but for the plain counters the supervisor reads (`chunks`, `busy`,
  `death`: each one assignment, atomic).

Callbacks arrive in the order the worker made them, so a prompt change's cut (and a
re-anchor's) always lands before the first PCM after it. Where a prompt change starts and when it is heard is
`radio.timing`'s business; the worker only applies it (`timing.start_prompt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from engine.blend import PLAIN_ROWS
from engine.lane import Prefill, prefill_since
from engine.memory import WARM_BYTES, page_faults, warm_heap
from engine.threads import LOSES, ThreadTuner, smooth
from engine.token_stream import Interrupted
from radio import ladder
from radio.blending import open_blend, open_text
from radio.healing import Failure, LaneHealing, describe, seconds
from radio.timing import ChangeCost, PromptChange, auto_horizon, start_prompt
from radio.watchdog import Problem, Watchdog

if TYPE_CHECKING:
    from engine.blend import Blend
    from engine.model import AudioStream, MusicModel
    from engine.options import SamplingOptions, WindowOptions
    from radio.config import WatchdogConfig
    from radio.testing import FaultInjector

log = logging.getLogger(__name__)

RTF_SMOOTHING = 0.2  # weight of the newest chunk in the real-time factor's moving average
WAIT_SECONDS = 0.05  # how long an idle worker waits for a command before looking again
GUARD_SECONDS = 0.5  # a re-anchor starts at least this far ahead of what the clock played
# another thread count is tried only with this much audio ahead, or when the count in use falls
# behind real time anyway: beside a busy process a trial can run ten times slower than the count
# in use (right after a prompt change little is ahead)
TRIAL_AHEAD_SECONDS = 2.0
# nor in a station's first seconds of audio: its first listeners wait for them (it goes on air
# with a second buffered), unless the count in use makes them at under FIRST_TRIAL_RTF of real
# time: two threads beside a busy process on a KVM Xeon made them at x0.04 (35 s to make 1.5 s),
# where a stream's cold first chunk runs at x0.41-0.53
NO_TRIAL_FIRST_SECONDS = 1.5
FIRST_TRIAL_RTF = 0.25
# a trial predicted to lose clearly (`engine.threads.LOSES`) runs only when it leaves this much
# audio buffered: beside a busy process two threads cost x15 one thread's on that Xeon (a
# 25-frame chunk 12 s), and a trial of them with 2 s ahead bridged for 10 s
TRIAL_LEFT_SECONDS = 1.0
# At start the prefill is timed on this many frames and scaled to a whole context (and to a
# prompt change's): a second less before the first sound than timing a prompt change's 100, at
# most a few percent off (musicgen-small here: 4.26 s scaled from 50 frames, 4.30 s from 100,
# 4.61 s measured on 500); the first real prompt change or window restart replaces the figure.
TIMED_PREFILL_FRAMES = 50
# What is prepared ahead of need between chunks (an int4 cache's buffers, int4 weights: a layer
# a part, 15-25 ms from the disk cache, ~0.13 s when the VM has paged its files out) takes at
# most this share of the chunks' time, less where generation has little to spare (`_pace`)
PREPARE_SHARE = 0.25
# The ladder weighs the median cost of the plain chunks that made the last `buffer_ahead`
# seconds of audio (at least RECENT_CHUNKS, judged from 3 on): a slow moment that the buffer
# rides out (a listener connecting, a page fault, a neighbour's second) is not the machine's
# speed. The thread tuner's smoothed cost starts afresh at a 2x jump, and so took one int8
# station at x1.25 for x0.45 a second after it went on air; a median of five chunks took three
# at x0.97 (0.6 s): to int4 weights both times, for good (their speedup measured against it).
RECENT_CHUNKS = 5
# a prompt change is expected to cost what this many changes did (`Generator.change_cost`)
CHANGES_WEIGHED = 5
# ... and before any did, this many times its prefill at the speed measured: the first change of
# eight `radio serve` runs on 2 Zen 3 cores cost 1.0-1.7x the prefill timed at the start (the
# change encodes its text and folds its cross-attention too); counted at x1.0, one run's first
# change got its first audio in time and the read after it 60 ms late (a bridge)
FIRST_CHANGE_SHARE = 1.7
# a read is `steady_frames` long when each of its stations has this many times that ahead: the
# read cannot let them run out unless generation runs at under 1/STEADY_AHEAD of real time
STEADY_AHEAD = 2


def change_frames_for(chunk_frames: int) -> int:
    """The frames of the first read after a prompt change: half a chunk (5 frames of 10 for one
    station). The new prompt's first audio waits for them and the codec's lookahead (5 frames),
    all made after the change's prefill: 10 decoder steps instead of 15 for a whole chunk. The
    auto horizon still counts a whole chunk: counting half (0.15 s sooner for one station) made
    changes whose cost spiked late (holds) in 2 of 2 `radio serve` runs on 2 Zen 3 cores."""
    return max(1, chunk_frames // 2)


def next_rtf(average: float, rtf: float, chunks: int) -> float:
    """A station's smoothed real-time factor after its `chunks`-th chunk, made at `rtf`. The
    first chunk is left out (0.0 until the second): it runs cold (the stream's opening prefill,
    the caches' first touches, the codec's first call; x0.53 where the next ones ran at
    x1.1-1.5 on musicgen-small), and seeding the average with it kept a station that keeps up
    off the air (`StationClock.primed` wants x1.05) for ten chunks more, 2 s."""
    if chunks <= 1:
        return 0.0
    if average == 0.0:
        return rtf
    return (1 - RTF_SMOOTHING) * average + RTF_SMOOTHING * rtf


def trial_allowed(
    cost: float,
    stations: int,
    frame_rate: float,
    ahead_frames: int,
    made_frames: int,
    warm: bool = False,
    trial_cost: float | None = None,
    frames: int = 0,
) -> bool:
    """May the next read (`frames` long) try another thread count? `cost`: the count in use's
    seconds per frame of audio; `trial_cost`: the count to try's, as predicted (None: not
    known); `ahead_frames`: the least any of the `stations` has buffered; `made_frames`: the
    least any has made. Not in the first NO_TRIAL_FIRST_SECONDS unless the count in use runs
    under FIRST_TRIAL_RTF of real time; then yes with TRIAL_AHEAD_SECONDS ahead, or when the
    count in use is slower than real time (then a slow trial costs little, and staying would
    never refill the buffer), unless the read carries warm rows (`warm`): they end within
    `context` frames, so being behind with them says nothing of staying (one station's trial of
    one thread there ran x0.43 against x0.80 on two, with 0.7 s buffered, and bridged). And a
    trial predicted to lose clearly only where it leaves TRIAL_LEFT_SECONDS buffered."""
    speed = 1.0 / (cost * stations * frame_rate) if cost > 0 else float("inf")
    if made_frames < NO_TRIAL_FIRST_SECONDS * frame_rate and speed >= FIRST_TRIAL_RTF:
        return False
    if trial_cost is not None and trial_cost > LOSES * cost:
        spent = trial_cost * frames * stations  # seconds the trial's read is predicted to take
        if ahead_frames / frame_rate - spent < TRIAL_LEFT_SECONDS:
            return False
    behind = speed < 1.0 and not warm
    return behind or ahead_frames >= TRIAL_AHEAD_SECONDS * frame_rate


class GeneratorSink(Protocol):
    """Where the worker's results land (on the event loop)."""

    def on_pcm(self, station_id: str, start_frame: int, pcm: np.ndarray, rtf: float) -> None: ...

    def on_prompt_applied(self, station_id: str, change: PromptChange, frame: int) -> None: ...

    def on_error(self, station_id: str, message: str) -> None: ...

    def on_failure(self, station_id: str, failure: Failure) -> None: ...

    def on_reopened(self, station_id: str, frame: int) -> None: ...

    def on_reanchored(self, station_id: str, reanchor: Reanchor) -> None: ...

    def on_prefill(self, station_id: str, prefill: Prefill) -> None: ...

    def on_restart_context(
        self, station_id: str, seconds: float | None, window_seconds: float | None
    ) -> None: ...

    def on_rungs(self, station_id: str, rungs: tuple[str, ...]) -> None: ...


@dataclass(frozen=True)
class Reanchor:
    """The watchdog's recovery, done (what the worker tells the loop)."""

    problem: Problem
    frame: int  # the re-anchored music is heard from this frame
    context_seconds: float  # of recent music it went on from


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
    healing: LaneHealing
    watchdog: Watchdog | None = None  # when the music watchdog is on
    played_frame: int = 0  # the clock's head, as last reported
    on_air: bool = False  # whether the clock has played any of it yet
    cut_frame: int = 0  # the latest prompt change is heard from here: no re-anchor before it
    rtf: float = 0.0  # smoothed (`next_rtf`)
    chunks: int = 0  # made since the lane opened
    reported_prefill: Prefill | None = None  # the latest prefill the loop was told of
    changed: bool = False  # a prompt change was applied: its first read is `change_frames` long

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
    """Owns the worker thread. Create it, `start(loop, sink)` on the loop, `stop()` when done;
    `restart()` starts a new thread after the last one died (the supervisor's call)."""

    def __init__(
        self,
        model: MusicModel,
        specs: Sequence[StationSpec],
        *,
        buffer_ahead: float = 4.0,  # seconds each station may be ahead (a chunk more: `_due`)
        chunk_frames: int = 10,  # frames per read()
        steady_frames: int | None = None,  # frames per read() well ahead (None: chunk_frames)
        watchdog: WatchdogConfig | None = None,  # the music watchdog's settings; None = off
        adaptive_restarts: bool = True,  # shorten window restarts while falling behind (ladder)
        coarse_when_behind: bool = False,  # and then decode with int4 weights (the ladder's last)
        drop_guidance_when_behind: bool = False,  # and after them without null rows
        faults: FaultInjector | None = None,  # tests only (radio.testing)
        clock: Callable[[], float] = time.monotonic,  # reopen times and `busy` (tests: fake)
    ) -> None:
        self.model = model
        self.specs = list(specs)
        self.buffer_ahead = buffer_ahead
        self.chunk_frames = chunk_frames
        self.steady_frames = max(steady_frames or chunk_frames, chunk_frames)
        self.change_frames = change_frames_for(chunk_frames)
        self.watchdog = watchdog if watchdog is not None and watchdog.enabled else None
        self.faults = faults
        self.clock = clock
        # seconds one prefill of a whole context takes: measured when the streams open, then
        # from the latest prefill (`_learn_prefill`; read by the loop to place prompt changes; a
        # float is atomic)
        self.prefill_seconds = 0.0
        # the last CHANGES_WEIGHED prompt changes as they ran (`change_cost`; a tuple
        # replaced whole by the worker, read by the loop)
        self._changes: tuple[_ChangeCost, ...] = ()
        # audio per station per second of generating over the last minute of it, and the
        # working stations generated together: what prompt changes weigh (`radio.timing`, rule
        # 1; read from the loop)
        self._sustained_reads = ladder.Sustained()
        self.together = 0
        # smoothed seconds per frame of audio of the chunks read while a station's warm rows
        # were fed (the next window built beside this one): what a warm restart costs, beside
        # the tuner's cost of the other chunks; 0 until measured
        self.warm_cost = 0.0
        self.tuner: ThreadTuner | None = None  # made by the worker thread, for its own threads
        self._resumed = False  # the next read goes on from a stalled one's frames
        # the tuner's kind of the chunks without warm rows: (rows, 0)
        self._plain_kind: tuple[int, int] = (0, 0)
        self.adaptive_restarts = adaptive_restarts
        self.warned_behind = False  # said that even the ladder's last level cannot keep up
        # the ladder has judged the speed: measured the steady generation rate and chosen the
        # weights for it, predicted to keep up or the last there are (read by the clocks: a
        # station goes on air only then, or with its buffer full, so that the switch to int4
        # weights, a stall of a second or so, never comes right after)
        self.speed_judged = not (adaptive_restarts and coarse_when_behind)
        # the ladder's rungs: the int4 KV cache for the int8 one (where the model can; its
        # first level after the top) and int4 weights (its last): each one's speedup, a guess
        # until measured on it (0: no such rung)
        cheap = adaptive_restarts and model.cheap_cache_available() is None
        self.cache_speedup = ladder.CACHE_SPEEDUP if cheap else 0.0
        self.coarse_speedup = ladder.COARSE_SPEEDUP if coarse_when_behind else 0.0
        unguided = coarse_when_behind and drop_guidance_when_behind
        self.guidance_speedup = ladder.GUIDANCE_SPEEDUP if unguided else 0.0
        # when a rung was switched to: the cost per frame, where it was measured and the rungs
        # in use before it (cache, weights, guidance), and the chunks made since (its speedup
        # is measured after `ladder.SETTLE` of them)
        self._before: tuple[float, float, bool, float, bool] | None = None
        self._told_rungs: tuple[str, ...] = ()  # what the stations' health says (`_tell_rungs`)
        self._settling = 0
        self._rung_until = 0.0  # (clock) before this the ladder does not climb off a rung
        # the int4 cache's buffers, touched a slice at a time between chunks
        # (`_prepare_cache`) from the moment the whole context is predicted near the edge:
        # fresh memory is what its switch costs
        self._cache_parts: Iterator[None] | None = None
        self._cache_prepared = False
        # their quantization, a layer at a time between chunks (`_prepare_coarse`), ahead of
        # need from the moment the ladder first leaves its top level
        self._coarse_parts: Iterator[None] | None = None
        # seconds of preparation the chunks so far have paid for (`_run_parts`; negative: a
        # part that ran over, paid back by the next chunks)
        self._prepare_credit = 0.0
        # a reserve of heap memory touched a slice at a time in the idle time, which comes
        # only once the stations are open (`engine.memory.warm_heap`, which allocates at its
        # first step, where freed memory is kept, as in `radio serve`), so that prompt changes
        # do not fault fresh pages in as the heap grows; touched again after whatever takes
        # its pages (`_renew_heap_reserve`)
        self._heap_bytes = min(WARM_BYTES * len(specs), 4 * WARM_BYTES)
        self._spare_parts: Iterator[None] | None = None  # (`_prepare`)
        self._spares_failed = False
        self._heap_parts: Iterator[None] | None = warm_heap(self._heap_bytes)
        # the ladder's level (radio.ladder: 0 = window restarts re-read the whole context), and
        # the window span the stations run with (frames; None: the whole window)
        self.restart_level = 0
        self._span: int | None = None
        # the last plain chunks' (cost, mean position) (RECENT_CHUNKS: a buffer's worth) and what
        # they ran with
        span = round(buffer_ahead * model.frame_rate / self.steady_frames)
        self._recent: deque[tuple[float, float]] = deque(maxlen=max(RECENT_CHUNKS, span))
        self._recent_key: tuple[int, tuple[int, int], float, bool, bool] | None = None
        # how the steady chunks' cost grows with the positions they attend over (the ladder's
        # window levels), fitted by the worker
        self.position_cost = ladder.PositionCost()
        # read by the supervisor (`radio.healing.Supervised`), written by the worker
        self.started = False
        self.stopping = False
        self.death = ""  # why the last worker thread ended, when it died
        self.chunks = 0  # chunks of audio made, by every thread
        self.busy: tuple[float, str] | None = None  # (clock time, what): engine call under way
        self._lanes: dict[str, _Lane] | None = None  # the stations' streams, made once
        self._commands: queue.Queue[_Command | None] = queue.Queue()
        # set with each prompt change queued, cleared when the worker takes its commands: a
        # chunk being read then stops at its next decoder step (its audio would come after the
        # cut, thrown away), so that the change's prefill starts within a step of the POST
        self._prompt_waiting = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: GeneratorSink | None = None

    # ---- loop side ----------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, sink: GeneratorSink) -> None:
        self._loop, self._sink = loop, sink
        self.started = True
        self._start_thread()

    def restart(self) -> None:
        """A new worker thread, going on with the stations' streams (the last thread died)."""
        assert self.started and not self.alive, "restart() is for a generator whose thread died"
        self.death = ""
        self._start_thread()

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._run, name="radio-generator", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to finish its current chunk and exit; wait up to `timeout` s."""
        self.stopping = True
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
        self._prompt_waiting.set()
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
        """The thread: work until stopped; a death is recorded for the supervisor."""
        try:
            self._work()
        except _OpenFailed as e:
            self.death = str(e)
        except BaseException as e:  # noqa: BLE001 - the supervisor restarts the thread
            self.death = describe(e)
            log.debug("the generator thread died", exc_info=True)
        finally:
            self.busy = None

    def _work(self) -> None:
        self.tuner = ThreadTuner()
        if self._lanes is None:
            self._lanes = self._open()
        lanes = self._lanes
        ahead_limit = round(self.buffer_ahead * self.model.frame_rate)
        while True:
            if self.faults is not None:
                self.faults.in_worker()
            if not self._drain(lanes, block=False):
                return
            self._reopen_due(lanes.values())
            due = self._due(lanes.values(), ahead_limit)
            if not due and self._prepare(0.0):  # a part of what is prepared ahead, idle
                continue
            if not due:  # everyone is far enough ahead: wait for the clocks to move
                if not self._drain(lanes, block=True):
                    return
                continue
            self._step(due)

    @contextlib.contextmanager
    def _engine_call(self, what: str, prefill: bool = False) -> Iterator[None]:
        """Mark an engine call as under way (`busy`), for the supervisor's stall watch. The
        first chunk is not watched: it may compile the step (minutes on a GPU). It runs on the
        tuner's current thread count (a chunk's read then sets its own: `ThreadTuner.run`), or
        with `prefill` (bound by the maths, not by memory) on all of them."""
        if self.tuner is not None:
            if prefill:
                self.tuner.use_most()
            else:
                self.tuner.use_current()
        self.busy = (self.clock(), what) if self.chunks else None
        try:
            yield
        finally:
            self.busy = None

    def _open(self) -> dict[str, _Lane]:
        """Every station's stream, opened together, and the prefill measured; _OpenFailed (and
        an error on every station) when that fails."""
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
            window = self.specs[0].window  # a short prefill, scaled: seconds less at start
            timed = min(TIMED_PREFILL_FRAMES, window.change_context)
            self.prefill_seconds = self.model.measure_prefill(window, timed)
        except Exception as e:  # noqa: BLE001 - reported to every station, then the thread ends
            log.debug("the stations' streams did not open", exc_info=True)
            for spec in self.specs:
                self._to_loop(self.sink.on_error, spec.id, f"cannot open stream: {e}")
            raise _OpenFailed(f"cannot open the stations' streams: {describe(e)}") from e
        self._say_prefill()
        return {s.id: self._lane(s, stream) for s, stream in zip(self.specs, streams, strict=True)}

    def _lane(self, spec: StationSpec, stream: AudioStream) -> _Lane:
        lane = _Lane(spec, stream, LaneHealing())
        if self.watchdog is not None:
            lane.watchdog = Watchdog(self.watchdog, self.model.frame_rate, self.model.hop)
        return lane

    def _say_prefill(self) -> None:
        chunk = self.chunk_frames / self.model.frame_rate
        window = self.specs[0].window
        change = self.prefill_seconds * window.change_context / window.context
        log.info(
            "a prefill of the whole context (%d frames) takes %.2f s, a prompt change's (%d "
            "frames) about %.2f s: prompt changes start at least %.1f s ahead (prompt_horizon auto)",
            window.context,
            self.prefill_seconds,
            window.change_context,
            change,
            auto_horizon(self.change_cost()),
        )
        # what stalls the stream at once: a window restart's prefill (none when warm) and a
        # prompt change's
        stall = change if window.warm_restarts else self.prefill_seconds
        if stall + chunk > self.buffer_ahead:
            log.warning(
                "the %.1f s buffer is shorter than a prefill (%.2f s) plus a chunk: %s will make "
                "the stream fall behind; raise generation.buffer_ahead or run the model on a "
                "faster device",
                self.buffer_ahead,
                stall,
                "prompt changes" if window.warm_restarts else "window restarts and prompt changes",
            )

    def _due(self, lanes: Iterable[_Lane], ahead_limit: int) -> list[_Lane]:
        """The working stations below the limit, with those within a chunk of it (they would be
        due a moment later, alone: read now, they share this read's codec decode), the one
        with the least audio ahead first; none when no station is below the limit."""
        working = sorted((ln for ln in lanes if not ln.healing.down), key=_Lane.ahead_frames)
        if not working or working[0].ahead_frames() >= ahead_limit:
            return []
        return [ln for ln in working if ln.ahead_frames() < ahead_limit + self.chunk_frames]

    def frames_for(self, lanes: Iterable[_Lane]) -> int:
        """The frames of the next read of `lanes`: `change_frames` when one of them has a prompt
        change to make heard, `steady_frames` when each has STEADY_AHEAD times that ahead, else
        `chunk_frames`."""
        lanes = list(lanes)
        if any(ln.changed for ln in lanes):
            return self.change_frames
        least = min(ln.ahead_frames() for ln in lanes)
        steady = least >= STEADY_AHEAD * self.steady_frames
        return self.steady_frames if steady else self.chunk_frames

    def _step(self, lanes: list[_Lane]) -> None:
        """One chunk for each of `lanes`, read together; a station whose chunk failed is down
        alone, the others go on."""
        frames = self.frames_for(lanes)
        t = time.perf_counter()
        with self._engine_call(_what(lanes)):
            try:
                made = self._chunks(lanes, frames)
            except Interrupted:  # a prompt change is waiting (it goes first), or a stall
                tuner = self.tuner
                self._resumed = tuner is not None and tuner.stopped
                if self._resumed:
                    assert tuner is not None
                    log.info(
                        "station(s) %s: a chunk stopped after %.1f s, its threads waiting for "
                        "cores (another process is busy); generation now runs on %s",
                        ", ".join(ln.spec.id for ln in lanes),
                        time.perf_counter() - t,
                        tuner.describe(),
                    )
                else:
                    log.debug("a chunk of %s gave way to a prompt change", _what(lanes))
                return
        spent = max(time.perf_counter() - t, 1e-6)  # every station's chunk took all of it
        if any(lane.changed for lane in lanes):
            self._learn_first_read(spent)
        for lane in lanes:
            lane.changed = False
        self._sustained(lanes, spent, frames)
        self._climb()
        self._prepare(spent, frames / self.model.frame_rate / spent)
        for lane, chunk in zip(lanes, made, strict=True):
            if isinstance(chunk, Exception):
                self._failed(lane, chunk, "generation failed")
            else:
                self._made(lane, chunk, spent)

    @property
    def sustained_rtf(self) -> float:
        return self._sustained_reads.rtf

    def _sustained(self, lanes: list[_Lane], spent: float, frames: int) -> None:
        """`sustained_rtf` and `together` after a read of `frames` of `lanes` that took `spent`
        s."""
        assert self._lanes is not None
        self.together = sum(not ln.healing.down for ln in self._lanes.values())
        # the audio a station got: a read of some of them gave the others none
        audio = frames / self.model.frame_rate * len(lanes) / max(self.together, 1)
        self._sustained_reads.add(audio, spent)

    def _climb(self) -> None:
        """Move on the ladder (`radio.ladder`) when the measurements say so: every station's
        window restarts re-read a shorter context while generation cannot keep up, the whole
        context again once it could; one log line per move; then the stations' health the
        rungs in use."""
        self._move()
        self._tell_rungs()

    def _move(self) -> None:
        """`_climb`'s move, if any."""
        tuner = self.tuner
        if not self.adaptive_restarts or self._lanes is None or tuner is None:
            return
        # the steady generation rate: the median seconds per frame of audio of the last plain
        # chunks (no warm rows, no prefill, no trial) with the count, rows and weights in use
        recent = self._recent if self._recent_key == self._plain_key() else ()
        if len(recent) < 3:
            return  # not measured enough with these rows (a glide's first chunks)
        cost = statistics.median(c for c, _ in recent)
        position = statistics.median(p for _, p in recent)  # where that cost was measured
        window = self.specs[0].window
        stations = max(1, self.together)  # (counted by `_sustained`, just before)
        # a window restart's cost for a whole context: its prefill, or with warm restarts the
        # extra its warm rows cost over the `context` frames they are fed
        restart = self.prefill_seconds
        if window.warm_restarts:
            # not measured before the first window's last `context` frames: until then restarts
            # count as free, so only a steady rate too slow for any restarts moves the ladder
            # (at once, rather than after half a minute of bridges). A guess of 1.5x a plain
            # chunk (two int4 stations' figure) took one int8 station, which keeps up, to int4
            # weights within seconds; when the measured cost moves the ladder during the warm
            # rows, they start again with the shorter context (`engine.lane`)
            restart = max(self.warm_cost - cost, 1e-9) * window.context if self.warm_cost else 1e-9
        if self._before is not None:  # a rung switched to: its speed is being measured
            self._settling += 1
            # its speed is taken after `SETTLE` chunks (the tuner's costs started afresh), or
            # after the three `cost` is the median of when they run under real time where they
            # ran: the window's later positions only cost more. Three stations took the int4
            # cache at a stream's start on a guess of x0.72, ran at x0.89-0.93 on it and
            # waited out the ten chunks: a bridge
            under = 1.0 / (cost * stations * self.model.frame_rate) < ladder.DOWN_BELOW
            if self._settling < ladder.SETTLE and not under:
                return
            self._measure_rung(cost, position)
        # in int8's terms (weights and cache): the rate over the rungs' speedup, the restarts'
        # cost times it
        scale = self._speedup()
        rates = ladder.Rates(
            1.0 / (cost * stations * scale),
            restart * scale,
            stations,
            self.coarse_speedup,
            slope=self.position_cost.slope,  # (fitted in int8's terms too)
            position=position,
            cache_speedup=self.cache_speedup,
            prior_slope=self._prior_slope(cost * scale, position),
            guidance_speedup=self.guidance_speedup,
            short_windows=self._span is not None,
        )
        rate = self.model.frame_rate
        measured = dataclasses.replace(rates, prior_slope=0.0)
        level = ladder.choose_level(
            self.restart_level, measured, window.window, window.context, rate
        )
        if self.cache_speedup and rates.slope <= 0:
            # until the slope is measured, its guess from the bytes may take the int4 cache (the
            # first rung, within the precision budget, left as cheaply), nothing coarser: the
            # first chunks cost more than later ones (start-up; the cause is not measured), and
            # the guess would stretch that over the window (two stations went to int4 weights
            # before on air)
            guessed = ladder.choose_level(
                self.restart_level, rates, window.window, window.context, rate
            )
            level = max(level, min(guessed, ladder.CHEAP_CACHE))
        # the coarse rungs judged with the slope's guess too, where it is not measured, each
        # left for the next under its bar: the half under x1.15 (at a stream's start two
        # stations took it at x0.98 predicted on the steps so far, x0.69 with the guess, ran at
        # x0.71 and switched again 10 s later); every layer's int4 weights under real time, or
        # under x1.15 on the way back from guidance off (two stations took them before on air
        # at x1.1, ran at x0.62 over their first window and bridged before guidance went)
        for rung, below in ((ladder.COARSE, ladder.COARSEST), (ladder.COARSEST, ladder.UNGUIDED)):
            kept = rung == ladder.COARSE or self.restart_level == below
            bar = ladder.UP_ABOVE if kept else ladder.DOWN_BELOW
            if (
                level == rung
                and below in rates.levels
                and ladder.predicted_rtf(rates, window.window, window.context, rung, rate) < bar
            ):
                level = below
        if level < self.restart_level and self.clock() < self._rung_until:
            level = self.restart_level  # a rung taken is kept a while (`ladder.RUNG_SECONDS`)
        # the int4 cache's buffers from the moment the whole context with the int8 cache is
        # predicted near the margin (the rung is the first one taken)
        near = (
            ladder.predicted_rtf(rates, window.window, window.context, 0, rate) < ladder.MARGIN_BACK
        )
        if self.cache_speedup and (level > 0 or near) and not self._cache_prepared:
            self._cache_prepared = True
            self._cache_parts = self.model.prepare_cheap_cache()
        prepared = self.model.coarse_ready or self._coarse_parts is not None
        # behind, or near it on the int4 cache (taken for a margin, it is not behind)
        behind = level > ladder.CHEAP_CACHE or (
            level > 0
            and ladder.predicted_rtf(rates, window.window, window.context, level, rate)
            < ladder.UP_ABOVE
        )
        # ... or on the int4 cache before any station is on air, where they are made at once
        # and cost only the first sound a second: on air, a slower minute (a busy neighbour)
        # made them at the switch instead, a stall of 0.85 s with 0.7 s buffered
        early = level > 0 and not self._on_air
        if self.coarse_speedup and (behind or early) and not prepared:
            self._coarse_parts = self.model.prepare_coarse()
            log.info(
                "generation is %s: preparing int4 weights between chunks, in case even the "
                "shortest window restarts cannot keep up (generation.coarse_when_behind)",
                "behind real time" if behind else "under the margin before going on air",
            )
        self._say_if_still_behind(rates, level)
        if level != self.restart_level:
            level = self._switch_rungs(level, rates, cost, position)
        # judged once the level reached is predicted to keep up (with the slope's guess), or
        # there is no level after it: until then the ladder is still on its way down (a rung
        # taken on a guess, measured in the chunks after it), and a station on air would bridge
        # (three stations went on air on the int4 cache predicted at x0.72 with their first
        # chunks at x1.15, the window's first positions, and bridged 2.6 s later)
        self.speed_judged = level == rates.top or (
            ladder.predicted_rtf(rates, window.window, window.context, level, rate)
            >= ladder.DOWN_BELOW
        )
        was, self.restart_level = self.restart_level, level
        frames, old_frames = (ladder.context_frames(window.context, at) for at in (level, was))
        # a coarse rung's windows are the last window level's once a measured slope makes them
        # pay (`ladder.windows_pay`), so they can change on the same level: compared with the
        # span the stations run with
        windows = ladder.windows_pay(rates, window.window, window.context)
        span = ladder.window_frames(window.window, window.context, level, windows)
        old_span = self._span or window.window
        if frames == old_frames and span == old_span:
            return  # the weights or the cache changed, not the restarts nor the windows
        after = ladder.predicted_rtf(rates, window.window, window.context, level, rate)
        # (on the same level: as it ran, whole windows with the slope as a guess)
        if was == level:
            rates_before = dataclasses.replace(rates, slope=0.0, prior_slope=rates.slope)
        else:
            rates_before = rates
        before = ladder.predicted_rtf(rates_before, window.window, window.context, was, rate)
        if frames != old_frames:
            log.info(
                "window restarts now re-read %.1f s of music%s: with %.1f s generation would "
                "run at x%.2f of real time, with %.1f s at x%.2f",
                frames / rate,
                " (the whole context)" if level == 0 else ", generation cannot keep up otherwise",
                old_frames / rate,
                before,
                frames / rate,
                after,
            )
        if span != old_span:
            log.info(
                "windows now span %.1f s%s: with %.1f s generation would run at x%.2f of real "
                "time, with %.1f s at x%.2f (a step costs %.0f%% more per 10 s into a window)",
                span / rate,
                " (the whole window)"
                if span == window.window
                else ", generation cannot keep up otherwise (the music remembers less)",
                old_span / rate,
                before,
                span / rate,
                after,
                100 * rates.slope * 10 * rate / cost,
            )
        self._span = span if span < window.window else None
        for lane in self._lanes.values():
            lane.stream.shorten_restarts(frames if frames < window.context else None)
            lane.stream.shorten_windows(span if span < window.window else None)
            seconds = frames / rate if frames < window.context else None
            spans = span / rate if span < window.window else None
            self._to_loop(self.sink.on_restart_context, lane.spec.id, seconds, spans)

    def rungs(self) -> tuple[str, ...]:
        """The ladder's rungs that cost the music some exactness, as in use now (none at full
        quality): what each station's health says."""
        model, rungs = self.model, []
        if model.cheap_cache:
            rungs.append("int4 KV cache")
        if model.coarse >= 1.0:
            rungs.append("int4 weights in every layer")
        elif model.coarse > 0:
            rungs.append(f"int4 weights in the last {model.coarse:.0%} of the layers")
        if model.unguided:
            rungs.append("guidance off")
        return tuple(rungs)

    def _tell_rungs(self) -> None:
        """Each station's health the rungs in use, when they changed."""
        rungs = self.rungs()
        if rungs == self._told_rungs or self._lanes is None:
            return
        self._told_rungs = rungs
        for lane in self._lanes.values():
            self._to_loop(self.sink.on_rungs, lane.spec.id, rungs)

    def _prior_slope(self, cost: float, position: float) -> float:
        """The slope `PositionCost` would measure, guessed from the bytes a step reads: a
        frame's cost `cost` at mean position `position` grows as the rows' KV cache does, the
        weights staying. Until the slope is measured (positions spread over most of a window),
        the ladder's first judgements, made on a window's first (cheap) positions, then see its
        later ones: three stations went on air at x1.2 and bridged at x0.9 half a window on."""
        weights, per_position = self.model.read_per_step()
        rows = self._plain_kind[0]
        growth = rows * per_position
        return cost * growth / (weights + growth * position) if weights > 0 else 0.0

    def _plain_key(self) -> tuple[int, tuple[int, int], float, bool, bool]:
        """What a plain chunk's cost depends on: threads, rows, the share of coarse weights, the
        cheaper cache or not, guidance dropped or not."""
        assert self.tuner is not None
        model = self.model
        return self.tuner.current, self._plain_kind, model.coarse, model.cheap_cache, model.unguided

    def _speedup(
        self, cheap: bool | None = None, coarse: float | None = None, unguided: bool | None = None
    ) -> float:
        """Steps per second with these rungs (default: those in use; `coarse` the share of
        layers on int4 weights) over int8 weights and cache with guidance, as measured or
        guessed."""
        cheap = self.model.cheap_cache if cheap is None else cheap
        coarse = self.model.coarse if coarse is None else coarse
        unguided = self.model.unguided if unguided is None else unguided
        weights = ladder.share_speedup(self.coarse_speedup, coarse)
        guidance = self.guidance_speedup if unguided else 1.0
        return (self.cache_speedup if cheap else 1.0) * weights * guidance

    def _measure_rung(self, cost: float, position: float) -> None:
        """Once settled on the rung(s) last switched to: their speedup, from the cost per
        frame before the switch, moved to the positions measured now along the measured slope
        (a step's cost grows with them: a switch often comes with shorter windows), over the
        cost now; a rung switched to with another at once (int4 weights straight from int8's
        cache) takes what the other's guess leaves. Not before the slope is measured: three
        int8 stations' first switch, 10 s into a stream, measured the int4 cache at x1.0 (its
        chunks later in the window than int8's), climbed back and bridged 6 s later."""
        assert self._before is not None
        before, at, cheap_before, coarse_before, unguided_before = self._before
        self._before = None
        if self.position_cost.slope <= 0:
            return  # the positions moved and nothing says what that did: the guess stays
        # the slope on the rungs before (it is fitted in int8's terms)
        rungs_before = self._speedup(cheap_before, coarse_before, unguided_before)
        slope = self.position_cost.slope / rungs_before
        before = max(before + slope * (position - at), 0.5 * before)
        ratio = before / cost * rungs_before  # over int8's
        if self.model.unguided and not unguided_before:
            guided = self._speedup(unguided=False)
            self.guidance_speedup = min(max(ratio / guided, 1.0), 3.0)
        elif self.model.coarse > coarse_before:  # (all layers' speedup, from this share's)
            share = ratio / self._speedup(coarse=0.0)
            self.coarse_speedup = min(max(ladder.full_speedup(share, self.model.coarse), 1.0), 3.0)
        elif self.model.cheap_cache and not cheap_before:
            self.cache_speedup = min(max(ratio / self._speedup(cheap=False), 1.0), 2.0)
        elif cheap_before and not self.model.cheap_cache and coarse_before == self.model.coarse:
            # left the int4 cache: the int8 one's cost now over the int4 one's. The guess had
            # one int8 station climb back at a predicted x1.45, run at x1.29 and take the int4
            # cache again within 6 s
            self.cache_speedup = min(max(cost / before, 1.0), 2.0)

    def _switch_rungs(self, level: int, rates: ladder.Rates, cost: float, position: float) -> int:
        """Weights and cache as `level` has them (from `_climb`): int4 weights at the coarse
        level, an int4 KV cache from the cheaper-cache level on (where the model has one).
        Returns the level reached (int4 weights that could not be made: the level before them;
        an int4 cache that could not be made: the whole context on int8's, or the level asked
        for without it). A rung newly taken has its speed measured (`_measure_rung`), and so
        has the int4 cache when it is left."""
        model = self.model
        before = (cost, position, model.cheap_cache, model.coarse, model.unguided)
        coarse = ladder.coarse_share(level)
        if coarse != model.coarse and not self._switch_weights(coarse, rates, level):
            level, coarse = rates.shortest, 0.0  # (the last level on int8 weights)
        unguided = level >= ladder.UNGUIDED
        if unguided != model.unguided:
            self._switch_guidance(unguided, rates, level)
        cheap = level >= ladder.CHEAP_CACHE and self.cache_speedup > 0
        if cheap != self.model.cheap_cache and not self._switch_cache(cheap, rates, level):
            cheap = self.model.cheap_cache
            level = 0 if level == ladder.CHEAP_CACHE else level
        taken = (cheap and not before[2]) or coarse > before[3] or (unguided and not before[4])
        left = before[2] and not cheap and coarse == before[3]  # (the int4 cache alone)
        if taken or left:
            self._before, self._settling = before, 0
        if taken:
            self._rung_until = self.clock() + ladder.RUNG_SECONDS
        return level

    def _switch_cache(self, cheap: bool, rates: ladder.Rates, level: int) -> bool:
        """To an int4 KV cache while the whole context cannot keep up on the int8 one, or back
        once it can (`MusicModel.use_cheap_cache`: every batch converts its cache now, tens of
        milliseconds); the ThreadTuner's costs start afresh. False when the conversion failed
        (said; the rung is dropped and the batches converted already go back to int8)."""
        assert self.tuner is not None
        window = self.specs[0].window
        rate = self.model.frame_rate
        if cheap:
            log.warning(
                "generation runs at x%.2f of real time with the int8 KV cache, under the x%.1f "
                "margin: an int4 one in its place until the int8 one has it again (half the "
                "bytes a step's attention reads, 2.9%% of the logit spread against 2.2%%, within "
                "the precision budget; predicted x%.2f with the whole context)",
                ladder.predicted_rtf(rates, window.window, window.context, 0, rate),
                ladder.MARGIN,
                ladder.predicted_rtf(
                    rates, window.window, window.context, ladder.CHEAP_CACHE, rate
                ),
            )
        else:
            log.info(
                "an int8 KV cache again: predicted x%.2f of real time with it",
                ladder.predicted_rtf(rates, window.window, window.context, level, rate),
            )
        # needed now: what was not prepared is touched only where the conversion writes
        self._cache_parts = None
        try:
            self.model.use_cheap_cache(cheap)
        except Exception as e:  # noqa: BLE001 - the music goes on without the rung
            log.warning(
                "cannot convert the KV cache, so generation goes on without an int4 one: %s",
                describe(e),
            )
            self.cache_speedup = 0.0
            if cheap:  # (into the int8 buffers they left: no new memory)
                self.model.use_cheap_cache(False)
            return False
        self.tuner.forget()
        return True

    def _prepare(self, spent: float | None, rtf: float = 0.0) -> bool:
        """The next part of what is made ahead of need: the int4 cache's buffers (the rung
        taken first), the int4 weights, the spare cache buffer the next window restart lays
        the rows out into (`MusicModel.prepare_spares`: after a change of cache kind, or rows
        that grew), each after a chunk for the share of its time `_pace` gives, or in the idle
        time; then (only in the idle time, `spent` 0: nothing needs it soon) the heap's
        reserve. (The reserve's slices after each chunk too did not spare two stations' first
        window restart its 18,000-50,000 fresh pages: its buffers need more.) `rtf`: the chunk's
        real-time factor (`_pace`). Before any station is on air, after a chunk, all of it at
        once: nobody listens yet, so it delays the first sound only (int4 weights ~1 s from the
        disk cache on 2 Zen 3 cores: first sound 6.4-6.7 s against 5.0), where on air it would
        slow the stream or stall it at the switch (one station went on air at x1.07, ran at
        x0.76-1.0, and its switch to int4 weights four seconds later read them all at once: a
        bridge). False when there was nothing to do now."""
        if spent and not self._on_air:
            spent = None
        share = self._pace(rtf)
        if self._cache_parts is not None:
            self._prepare_cache(spent, share)
        elif self._coarse_parts is not None:
            self._prepare_coarse(spent, share)
        elif (self._spare_parts is not None or self._spares_wanted()) and (
            spent is None or spent == 0.0 or share > 0
        ):
            if self._spare_parts is None:
                self._spare_parts = self.model.prepare_spares()
            done = self._run_parts(
                self._spare_parts, spent, "room for a window restart", _never, share
            )
            if isinstance(done, Exception):
                log.warning(
                    "cannot make room ahead for the next window restarts, so they may pause "
                    "the stream for their memory: %s",
                    describe(done),
                )
                self._spares_failed = True
            if done:
                self._spare_parts = None
        elif self._heap_parts is not None and spent == 0.0:
            done = self._run_parts(self._heap_parts, spent, "memory", _never)
            if done:  # (or what it raised: the music goes on, changes may fault as before)
                self._heap_parts = None
        else:
            return False
        return True

    @property
    def _on_air(self) -> bool:
        """Whether any station's clock has played some of its audio."""
        return any(ln.on_air for ln in (self._lanes or {}).values())

    def _pace(self, rtf: float) -> float:
        """The share of a chunk's time that preparing ahead may take after it: PREPARE_SHARE
        while every station has `TRIAL_AHEAD_SECONDS` buffered, else half of what the chunk
        made beyond real time (at x1.1, 4.5%), so the buffer still grows: one station on air
        at x1.05-1.1 with 1 s buffered, its int4 weights prepared at a part (0.13 s) after each
        0.18 s chunk, ran at x0.62 and bridged; another at x1.05 never had 2 s to spare, and
        its first window restart faulted its 24,000 pages in at once. Behind, nothing: what is
        needed then is made at once, at the switch (or the restart)."""
        if self._ahead_enough():
            return PREPARE_SHARE
        return min(PREPARE_SHARE, max(0.0, (1.0 - 1.0 / rtf) / 2)) if rtf > 0 else 0.0

    def _spares_wanted(self) -> bool:
        """Whether a batch's spare cache buffer is to be made ahead (`_prepare`)."""
        return not self._spares_failed and self.model.spares_missing

    def _ahead_enough(self) -> bool:
        """Whether every working station has `TRIAL_AHEAD_SECONDS` buffered: enough to afford
        the whole PREPARE_SHARE for work that can wait (a spare made at a part after each chunk
        right after on-air, with ~1 s buffered, drained two stations that ran at x1.2-1.3 into
        a bridge; `_pace` gives less until then)."""
        lanes = [ln for ln in (self._lanes or {}).values() if not ln.healing.down]
        least = TRIAL_AHEAD_SECONDS * self.model.frame_rate
        return bool(lanes) and all(ln.ahead_frames() >= least for ln in lanes)

    def _prepare_cache(self, spent: float | None, share: float = PREPARE_SHARE) -> None:
        """The next slices of the int4 cache's buffers (`MusicModel.prepare_cheap_cache`)."""
        assert self._cache_parts is not None
        done = self._run_parts(self._cache_parts, spent, "an int4 KV cache", lambda: False, share)
        if isinstance(done, Exception):
            log.warning(
                "cannot prepare an int4 KV cache, so generation will not take one when behind: %s",
                describe(done),
            )
            self._cache_parts, self.cache_speedup = None, 0.0
        elif done:
            self._cache_parts = None
            self._renew_heap_reserve()
            log.info("int4 KV cache ready for when generation cannot keep up otherwise")

    def _prepare_coarse(self, spent: float | None, share: float = PREPARE_SHARE) -> None:
        """The next layers of the int4 set being prepared (`MusicModel.prepare_coarse`)."""
        if self._coarse_parts is None:
            return
        # (done once the model has the set: the iterator yields once more after its last layer)
        done = self._run_parts(
            self._coarse_parts, spent, "int4 weights", lambda: self.model.coarse_ready, share
        )
        if isinstance(done, Exception):
            log.warning(
                "cannot prepare int4 weights, so generation will not fall back to them when "
                "behind: %s",
                describe(done),
            )
            self._coarse_parts, self.coarse_speedup = None, 0.0
        elif done:
            self._coarse_parts = None
            self._renew_heap_reserve()
            log.info("int4 weights ready for when generation cannot keep up otherwise")

    def _renew_heap_reserve(self) -> None:
        """A new heap reserve, touched in the idle time: what was just made (a prompt's texts and
        cross-attention, kept while a rewind can reach them; int4 weights prepared ahead, ~200
        MB for musicgen-small) took some of the last one's pages. With one reserve at start-up,
        two prompt changes in ten still faulted ~3,000 fresh pages each (0.12-0.19 s of their
        0.23 s), one of them right after int4 weights were prepared."""
        self._heap_parts = warm_heap(self._heap_bytes)

    def _run_parts(
        self,
        parts: Iterator[None],
        spent: float | None,
        what: str,
        ready: Callable[[], bool],
        share: float = PREPARE_SHARE,
    ) -> bool | Exception:
        """Run a preparation (`parts`, a step of work per item) ahead of need: a slower stream
        for some chunks (or the time the worker would wait) instead of seconds of stall at a
        switch that may never come. After a chunk of `spent` seconds, for `share` of that time
        (an account kept across chunks: a part that runs over is paid back by the next chunks,
        which run none until then); in the idle time (`spent` 0) one part; all that is left
        when `spent` is None. True once it is done (`parts` ended or `ready()`), False while
        more is left, or what it raised (the music goes on without that rung)."""
        idle = spent == 0.0
        if idle:
            self._prepare_credit = max(self._prepare_credit, 0.0)  # the idle time paid for it
        elif spent is not None:
            self._prepare_credit = min(self._prepare_credit + share * spent, share * spent)
            if self._prepare_credit <= 0:
                return False
        with self._engine_call(f"preparing {what}"):
            while True:
                began = time.perf_counter()
                try:
                    next(parts)
                except StopIteration:
                    return True
                except Exception as e:  # noqa: BLE001 - returned: the caller drops the rung
                    return e
                if ready():
                    return True
                if idle:
                    return False
                if spent is not None:
                    self._prepare_credit -= time.perf_counter() - began
                    if self._prepare_credit <= 0:
                        return False

    def _switch_guidance(self, unguided: bool, rates: ladder.Rates, level: int) -> None:
        """Guidance off while even every layer's int4 weights cannot keep up
        (`MusicModel.drop_guidance`: every station's null rows go now, half the rows a step),
        or back (each station's null row at its next window restart); the ThreadTuner's costs
        start afresh (other rows)."""
        assert self.tuner is not None
        window = self.specs[0].window
        rate = self.model.frame_rate

        def predicted(at: int, judged: ladder.Rates = rates) -> float:
            return ladder.predicted_rtf(judged, window.window, window.context, at, rate)

        if unguided:
            # the figure that moved the ladder: `_move` judges the rungs both on the cost measured
            # where the steps are now and with the slope's guess from the bytes (a log line once
            # gave the guess's x1.06 where the measured cost, x1.016, had taken guidance off)
            behind = min(
                predicted(ladder.COARSEST),
                predicted(ladder.COARSEST, dataclasses.replace(rates, prior_slope=0.0)),
            )
            log.warning(
                "generation cannot keep up even with int4 weights in every layer (x%.2f of real "
                "time): guidance off until it can (each station sampled from its prompt's rows "
                "alone, half the rows a step: music that follows its prompt less closely, "
                "predicted x%.2f; generation.drop_guidance_when_behind)",
                behind,
                predicted(level),
            )
        else:
            log.info(
                "guidance on again from each station's next window restart: predicted x%.2f of "
                "real time with it",
                predicted(level),
            )
        self.model.drop_guidance(unguided)
        self.tuner.forget()

    def _switch_weights(self, coarse: float, rates: ladder.Rates, level: int) -> bool:
        """To coarse (int4) weights in the last `coarse` share of the layers while even the
        shortest restarts cannot keep up (more of them while that cannot either), or back
        towards int8 ones (at `level`) once they can: the ThreadTuner's costs start afresh
        (other weights, other speed). What is left of their preparation runs first, at once:
        they are needed now, and every chunk until they are ready is a slower one. False when
        they cannot be made (said; int8 goes on)."""
        assert self.tuner is not None
        window = self.specs[0].window
        rate = self.model.frame_rate

        def predicted(at: int) -> float:
            return ladder.predicted_rtf(rates, window.window, window.context, at, rate)

        where = "every layer" if coarse >= 1.0 else f"the last {coarse:.0%} of the layers"
        if coarse > self.model.coarse:
            cheap = ladder.CHEAP_CACHE in rates.levels
            if self.model.coarse == 0:
                why = (
                    "cannot keep up even with the shortest window restarts"
                    + (" and an int4 KV cache" if cheap else "")
                    + f" (x{predicted(rates.shortest):.2f} of real time)"
                )
            else:  # (half the layers int4 is kept only with a margin: `ladder.choose_level`)
                why = (
                    f"runs at x{predicted(self.restart_level):.2f} of real time with int4 weights "
                    f"in the last {self.model.coarse:.0%} of the layers, under the "
                    f"x{ladder.UP_ABOVE:.2f} a prompt change needs"
                )
            log.warning(
                "generation %s: decoding with int4 weights in %s until it can (coarser music, "
                "predicted x%.2f; generation.coarse_when_behind)%s",
                why,
                where,
                predicted(level),
                "" if self.model.coarse_ready else ": quantizing them first (a second or two)",
            )
            if not self.model.coarse_ready:  # `_climb` started them when it left level 0
                self._prepare_coarse(None)
                if not self.model.coarse_ready:
                    return False
        else:  # (the ladder leaves every layer's int4 weights for int8's, never for half)
            log.info(
                "decoding with int8 weights again: predicted x%.2f of real time with them",
                predicted(level),
            )
        self.model.use_coarse(coarse)
        self.tuner.forget()
        return True

    def _say_if_still_behind(self, rates: ladder.Rates, level: int) -> None:
        """Warn once when even the ladder's last level is predicted slower than real time: the
        listeners will hear the bridge now and then, and only the operator can change that."""
        window = self.specs[0].window
        rate = self.model.frame_rate
        last = rates.top
        if level < last:
            self.warned_behind = False
            return
        # a rung's speed is a guess until measured on it (`ladder.SETTLE` chunks)
        if last >= ladder.COARSE:
            measured = self.model.coarse == ladder.coarse_share(last)
            measured = measured and self.model.unguided == (last >= ladder.UNGUIDED)
        else:  # (the int4 cache, where there is one, from `CHEAP_CACHE` on)
            measured = self.model.cheap_cache or not self.cache_speedup
        if not measured or self._before is not None:
            return
        rtf = ladder.predicted_rtf(rates, window.window, window.context, level, rate)
        if rtf >= 1.0 or self.warned_behind:
            return
        self.warned_behind = True
        # int4 weights are a way out only where they are not in use already (the ladder's last
        # level, or loaded so) and can run
        int4 = last < ladder.COARSE and self.model.coarse_available() is None
        log.warning(
            "generation cannot keep up even with the shortest window restarts%s%s: x%.2f of "
            "real time for %d station(s), so listeners will hear the bridge now and then; fewer "
            "stations%s make it keep up",
            " and windows"
            if (last < ladder.COARSE and rates.slope > 0)
            or ladder.windows_pay(rates, window.window, window.context)
            else "",
            (" and int4 weights" if last >= ladder.COARSE else "")
            + (" without guidance" if last >= ladder.UNGUIDED else ""),
            rtf,
            rates.stations,
            ', a faster device, or int4 weights (model.quantize = "int4": coarser, see README)'
            if int4
            else " or a faster device",
        )

    def _chunks(self, lanes: list[_Lane], frames: int) -> list[_Chunk | Exception]:
        """Each lane's next chunk, or the error that stopped it: the fault hooks apply per
        station, around one read of all of them (`_read`)."""
        starts = [lane.stream.frame for lane in lanes]
        errors: dict[int, Exception] = {}
        for i, lane in enumerate(lanes):
            try:
                if self.faults is not None:
                    self.faults.before_step(lane.spec.id)
                    self.faults.rewrite_tokens(lane.spec.id, lane.stream, frames)
            except Exception as e:  # noqa: BLE001 - this station's failure, not the others'
                errors[i] = e
        ready = [i for i in range(len(lanes)) if i not in errors]
        pcms = dict(zip(ready, self._read([lanes[i] for i in ready], frames), strict=True))
        return [
            errors[i] if i in errors else self._chunk(lane, starts[i], pcms[i])
            for i, lane in enumerate(lanes)
        ]

    def _chunk(self, lane: _Lane, start: int, pcm: np.ndarray | Exception) -> _Chunk | Exception:
        """A station's chunk read from `start` (pcm [C, frames * hop], or why not) after
        the fault hook, with its tokens for the watchdog."""
        if isinstance(pcm, Exception):
            return pcm
        try:
            if self.faults is not None:
                pcm = self.faults.after_step(lane.spec.id, pcm)
            tokens = lane.stream.token_frames(start, lane.stream.frame) if lane.watchdog else None
        except Exception as e:  # noqa: BLE001 - this station's failure, not the others'
            return e
        return _Chunk(start, pcm, tokens)

    def _made(self, lane: _Lane, chunk: _Chunk, spent: float) -> None:
        """A station's chunk is made (in `spent` s): to the watchdog, then to the loop."""
        sid = lane.spec.id
        if (last := lane.stream.tokens.last_prefill) is not lane.reported_prefill:
            lane.reported_prefill = last
            if last is not None:
                self._learn_prefill(last)
                self._to_loop(self.sink.on_prefill, sid, last)
        lane.healing.succeeded()
        self.chunks += 1
        pcm, problem = chunk.pcm, None
        if lane.watchdog is not None and chunk.tokens is not None:
            pcm, problem = lane.watchdog.chunk(chunk.start, chunk.tokens, pcm)
        lane.chunks += 1
        seconds = chunk.pcm.shape[-1] / self.model.hop / self.model.frame_rate
        lane.rtf = next_rtf(lane.rtf, seconds / spent, lane.chunks)
        self._to_loop(self.sink.on_pcm, sid, chunk.start, pcm, lane.rtf)
        if problem is not None:
            self._reanchor(lane, problem)

    def change_cost(self, rows: int = PLAIN_ROWS) -> ChangeCost:
        """What a prompt change that prefills `rows` decoder rows is expected to cost, from its
        turn until its first audio is made (what the auto horizon covers): the median and the
        most of what the last CHANGES_WEIGHED changes took, each one's prefill scaled to
        `rows`, at least a prefill at the latest measured speed (`prefill_seconds`; before any
        change ran, FIRST_CHANGE_SHARE times that); and a chunk.

        Whole changes, not the most of each part: the latest prefill (0.27 s) with another
        change's text and cross-attention (0.15 s) came to 0.41 s on 2 Zen 3 cores, where no
        change had cost over 0.35 s. A whole chunk, though the first read is half of one and
        the codec's lookahead (`change_frames`, 0.13-0.21 s there): it brings 0.1 s of audio,
        and the next read must come before that is played; counted as measured, after a change
        that cost 1.5x the one before the first read came in time and the next 19 ms late (a
        0.7 s bridge)."""
        window = self.specs[0].window
        chunk = self.chunk_frames / self.model.frame_rate
        share = self.prefill_seconds * window.change_context / window.context  # (plain rows)
        least = Prefill(share, PLAIN_ROWS, window.change_context).at_rows(rows)
        costs = [max(c.seconds(rows), least) for c in self._changes]
        costs = costs or [FIRST_CHANGE_SHARE * least]
        return ChangeCost(statistics.median(costs) + chunk, max(costs) + chunk)

    def guided_next(self, station_id: str) -> bool:
        """Whether a prompt change of `station_id` prefills its null row now
        (`TokenStream.guided_next`: its guidance on and not dropped by the ladder); True before
        its stream is open. Read from the event loop: a flag the worker thread sets."""
        lane = (self._lanes or {}).get(station_id)
        return True if lane is None else lane.stream.tokens.guided_next

    def first_read_seconds(self) -> float:
        """The most that the read making a change's first audio took, over the last
        CHANGES_WEIGHED changes (0 before one was made)."""
        return max((c.first_read for c in self._changes if c.first_read is not None), default=0.0)

    def _learn_change(self, spent: float, prefill: Prefill | None, before: Prefill | None) -> None:
        """`change_cost` after a prompt change that took `spent` s, with `prefill` the
        stream's last prefill after it (`before`: the one before it; the same when the change
        prefilled nothing, a seed from the stream's own frames)."""
        ran = _ChangeCost(spent, prefill_since(prefill, before))
        self._changes = (*self._changes[1 - CHANGES_WEIGHED :], ran)

    def _learn_first_read(self, spent: float) -> None:
        """The read that made the first audio of the changes before it took `spent` s."""
        self._changes = tuple(
            dataclasses.replace(c, first_read=spent) if c.first_read is None else c
            for c in self._changes
        )

    def _learn_prefill(self, prefill: Prefill) -> None:
        """`prefill_seconds` from a prefill that ran (a prompt change's, a cold window
        restart's), in a whole context's terms for a plain prompt: its seconds scaled by the
        frames and the rows. The start-up figure is timed cold; the changes placed after this
        one are placed by what a change really costs. Prefills shorter than a prompt change's
        (a restart from a few frames) are left out: their fixed costs would scale up."""
        window = self.specs[0].window
        if prefill.frames >= window.change_context and prefill.rows >= 1:
            self.prefill_seconds = prefill.plain_seconds(window.context)

    def _read(self, lanes: list[_Lane], frames: int) -> list[np.ndarray | Exception]:
        """The lanes' next chunks, read together (`MusicModel.read_together`: one decoder step
        and one codec decode for all of them) with the thread count that has been fastest
        lately (a busy neighbour can make two threads slower than one; a change is logged
        once). When reading them together raises, each is read alone, so that a failure is
        the failing station's only: its error comes back in its place."""
        if not lanes:
            return []
        tuner = self.tuner
        assert tuner is not None
        # a glide (both blends' rows for seconds), a blend or warm rows (the next window built
        # beside this one, for the last `context` frames of each) make every step dearer
        # whatever the thread count: costs measured with other rows would compare counts
        # unfairly (a glide's two-thread cost against a one-thread trial after it once switched
        # to the slower count, and bridged). Kinds: (rows, stations feeding warm rows).
        rows = sum(ln.stream.tokens.rows for ln in lanes)
        warm_lanes = [ln.stream.tokens.warming for ln in lanes]
        self._plain_kind = (rows, 0)
        # (and a short read costs more per frame than a steady one: its counts apart too)
        tuner.measure_for((rows, sum(warm_lanes), frames))
        before, faults = tuner.current, page_faults()
        trial = tuner.next_trial()
        trial_cost = None if trial is None else tuner.trial_cost(trial)
        ahead = min(ln.ahead_frames() for ln in lanes)
        current = tuner.current_cost()
        explore = trial_allowed(
            current or 0.0,
            len(lanes),
            self.model.frame_rate,
            ahead,
            min(ln.stream.frame for ln in lanes),
            warm=any(warm_lanes),
            trial_cost=trial_cost,
            frames=frames,
        )
        if trial is not None and log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s %d thread(s) for a chunk (predicted %s a frame, %d thread(s) %s; %.1f s ahead)",
                "trying" if explore else "not trying",
                trial,
                "unknown" if trial_cost is None else f"{trial_cost * 1000:.0f} ms",
                tuner.current,
                "not measured" if current is None else f"{current * 1000:.0f} ms",
                ahead / self.model.frame_rate,
            )
        streams = [ln.stream for ln in lanes]
        prefills = [s.tokens.prefills for s in streams]
        folds = [s.tokens.folds for s in streams]
        positions = [s.tokens.position for s in streams]
        warming = any(warm_lanes)
        changed = any(ln.changed for ln in lanes)

        resumed, self._resumed = self._resumed, False

        def undisturbed() -> bool:
            """Whether no window restart's prefill (seconds of work), no prompt's fold (tens of
            ms) ran in the read, no warm rows began or ended in it, and it did not go on from a
            stalled read's frames (`ThreadTuner.stalling`: its cost per frame would be a few)."""
            return (
                not resumed
                and [s.tokens.warming for s in streams] == warm_lanes
                and [s.tokens.prefills for s in streams] == prefills
                and [s.tokens.folds for s in streams] == folds
            )

        try:
            pcms: list[np.ndarray | Exception] = list(
                tuner.run(
                    # a prompt change waiting goes first; a stall of the count in use stops
                    # (another process took a core: the next read goes on with fewer threads)
                    lambda: self._read_together(
                        streams, frames, lambda: self._prompt_waiting.is_set() or tuner.stalling()
                    ),
                    units=frames * len(lanes),  # cost per frame of audio made
                    explore=explore,
                    # a disturbed chunk is not like the others of its kind: it would make the
                    # count that ran it look slow
                    typical=undisturbed,
                )
            )
        except Interrupted:
            raise
        except Exception as e:  # noqa: BLE001 - told to the station(s) it belongs to
            if len(lanes) == 1:
                return [e]
            log.warning(
                "stations %s: reading their chunks together failed (%s); reading each alone",
                ", ".join(ln.spec.id for ln in lanes),
                describe(e),
            )
            pcms = [self._read_alone(ln, frames) for ln in lanes]
        ends = [s.tokens.position for s in streams]
        mean = (sum(positions) + sum(ends)) / (2 * len(streams))  # the positions attended over
        if tuner.last_cost and log.isEnabledFor(logging.DEBUG):  # (0.0: no division)
            log.debug(
                "station(s) %s: a chunk in %.3f s (%d rows%s, %d thread(s), position %d, %d page "
                "faults, queued %s), x%.2f of real time",
                ", ".join(ln.spec.id for ln in lanes),
                tuner.last_cost * frames * len(lanes),
                rows,
                ", warm rows" if warming else "",
                tuner.last,
                mean,
                page_faults() - faults,
                "?" if tuner.last_queued is None else f"{tuner.last_queued:.0%}",
                1.0 / (tuner.last_cost * len(lanes) * self.model.frame_rate),
            )
        # a plain chunk (no warm rows, no prefill, no fold, not a prompt change's first read:
        # its codec restarts) on the count in use: the steady rate the ladder weighs, and,
        # within its windows, its cost at the positions its steps attended over (what the
        # ladder's window levels weigh). With guidance back at a prompt change, the change's
        # first read (x0.54 of real time) and the one that folded its text (x0.85) were two of
        # the three chunks the ladder judged its new rows by: x0.71, guidance off again at once
        plain = not warming and not changed and undisturbed()
        if plain and tuner.last_cost and tuner.last == before == tuner.current:
            if self._recent_key != self._plain_key():
                self._recent.clear()
                self._recent_key = self._plain_key()
            self._recent.append((tuner.last_cost, mean))
            if all(e > p for e, p in zip(ends, positions, strict=True)):
                # in int8's terms, as the ladder weighs it: a stream's first chunks on int8
                # weights at a window's first positions, the rest on int4 ones, drew a line
                # falling with the position (so none: two stations ran on whole windows)
                self.position_cost.add(mean, tuner.last_cost * self._speedup())
        # a chunk that ran wholly with warm rows, on the count in use (no trial, no switch)
        ran = warming and all(s.tokens.warming for s in streams)
        if ran and tuner.last_cost is not None and tuner.last == before == tuner.current:
            self.warm_cost = smooth(self.warm_cost or None, tuner.last_cost, tuner.smoothing)
        if tuner.current != before:
            log.info(
                "generation now runs on %d thread(s), measured faster on this machine now: %s",
                tuner.current,
                tuner.describe(),
            )
        return pcms

    def _read_together(
        self, streams: list[AudioStream], frames: int, interrupt: Callable[[], bool] | None = None
    ) -> list[np.ndarray]:
        if len(streams) == 1:
            return [streams[0].read(frames, interrupt)]
        return self.model.read_together(streams, frames, interrupt)

    def _read_alone(self, lane: _Lane, frames: int) -> np.ndarray | Exception:
        try:
            return lane.stream.read(frames)
        except Exception as e:  # noqa: BLE001 - this station's failure, not the others'
            return e

    # ---- healing ------------------------------------------------------------------------

    def _failed(self, lane: _Lane, error: Exception, what: str) -> None:
        """`what` raised `error`: the station is down until its backoff's delay has passed."""
        sid = lane.spec.id
        delay = lane.healing.failed(self.clock())
        in_a_row = lane.healing.backoff.in_a_row
        reason = f"{what} ({describe(error)})"
        log.error(
            "station %s: %s; reopening it from its recent tokens in %s (failure %d in a row)",
            sid,
            reason,
            seconds(delay),
            in_a_row,
        )
        log.debug("station %s: %s", sid, what, exc_info=error)
        if lane.watchdog is not None:
            lane.watchdog.interrupted()
        self._to_loop(self.sink.on_failure, sid, Failure(reason, in_a_row, delay))

    def _reopen_due(self, lanes: Iterable[_Lane]) -> None:
        now = self.clock()
        for lane in lanes:
            if lane.healing.due(now):
                self._reopen(lane)

    def _reopen(self, lane: _Lane) -> None:
        """Reopen a station that is down from its recent tokens, with its current prompt."""
        sid = lane.spec.id
        try:
            with self._engine_call(f"station {sid}: reopening its stream", prefill=True):
                if self.faults is not None:
                    self.faults.before_reopen(sid)
                frame = lane.stream.restart()
        except Exception as e:  # noqa: BLE001 - a failure like any other: backoff, retry
            self._failed(lane, e, "reopening failed")
            return
        self._reopened(lane, frame)
        log.info(
            "station %s: reopened from its recent tokens at %.1f s",
            sid,
            frame / self.model.frame_rate,
        )

    def _reopened(self, lane: _Lane, frame: int) -> None:
        lane.healing.reopened()
        lane.cut_frame = frame
        self._to_loop(self.sink.on_reopened, lane.spec.id, frame)

    # ---- the music watchdog -------------------------------------------------------------

    def _reanchor(self, lane: _Lane, problem: Problem) -> None:
        """Restart the stream a little ahead of what is heard, from a short fresh context."""
        assert lane.watchdog is not None, "a re-anchor without a watchdog"
        sid, rate = lane.spec.id, self.model.frame_rate
        earliest = max(lane.played_frame + round(GUARD_SECONDS * rate), lane.cut_frame)
        plan = lane.watchdog.plan(problem, lane.stream.frame, earliest)
        try:
            with self._engine_call(f"station {sid}: re-anchoring its stream", prefill=True):
                frame = lane.stream.restart(plan.frame, context_frames=plan.context_frames)
        except Exception as e:  # noqa: BLE001 - a failure like any other: backoff, reopen
            self._failed(lane, e, "re-anchoring failed")
            return
        lane.watchdog.reanchored(problem, frame)
        lane.cut_frame = frame
        if self.faults is not None:
            self.faults.reanchored(sid)
        context = plan.context_frames / rate
        log.warning(
            "station %s: music watchdog: %s; re-anchored at %.1f s from %s",
            sid,
            problem.detail,
            frame / rate,
            f"{seconds(context)} of context" if context else "no context (the prompt alone)",
        )
        self._to_loop(self.sink.on_reanchored, sid, Reanchor(problem, frame, context))

    # ---- commands -----------------------------------------------------------------------

    def _drain(self, lanes: dict[str, _Lane], block: bool) -> bool:
        """Handle queued commands (waiting briefly for one if `block`); False on stop."""
        self._prompt_waiting.clear()  # (one queued later sets it again)
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
            lane.on_air = True
        elif isinstance(cmd, _SetPrompt):
            self._apply_prompt(lane, cmd)
        else:
            try:
                with self._engine_call(f"station {lane.spec.id}: changing its sampling"):
                    lane.stream.set_sampling(cmd.sampling)
            except Exception as e:  # noqa: BLE001 - the caller gets the reason
                self._resolve(cmd.future, error=e)
                return
            self._resolve(cmd.future, True)

    def _apply_prompt(self, lane: _Lane, cmd: _SetPrompt) -> None:
        sid = lane.spec.id
        prefill = lane.stream.tokens.last_prefill
        began = time.perf_counter()
        try:
            with self._engine_call(f"station {sid}: changing its prompt", prefill=True):
                frame = start_prompt(lane.stream, cmd.change)
        except Exception as e:  # noqa: BLE001 - the caller gets the reason
            log.error("station %s: prompt change failed (%s)", sid, describe(e))
            log.debug("station %s: prompt change failed", sid, exc_info=e)
            self._resolve(cmd.future, error=e)
            return
        self._learn_change(time.perf_counter() - began, lane.stream.tokens.last_prefill, prefill)
        self._renew_heap_reserve()
        lane.cut_frame = frame
        lane.changed = True
        if lane.watchdog is not None:
            lane.watchdog.interrupted()
        self._to_loop(self.sink.on_prompt_applied, sid, cmd.change, frame)
        if lane.healing.down:  # the new prompt's prefill has reopened the stream
            self._reopened(lane, frame)
            log.info(
                "station %s: reopened by a prompt change at %.1f s",
                sid,
                frame / self.model.frame_rate,
            )
        self._resolve(cmd.future, frame)


@dataclass(frozen=True)
class _ChangeCost:
    """A prompt change as it ran (`Generator.change_cost`)."""

    spent: float  # seconds, all of it
    prefill: Prefill | None  # its decoder prefill (None: it prefilled nothing)
    first_read: float | None = None  # seconds of the read that made its first audio

    def seconds(self, rows: int) -> float:
        """What it would have cost had its prefill had `rows` rows (`Prefill.at_rows`; the
        rest does not grow with them)."""
        if self.prefill is None:
            return self.spent
        return self.spent + self.prefill.at_rows(rows) - self.prefill.seconds


@dataclass(frozen=True)
class _Chunk:
    """A station's chunk, made (worker thread only)."""

    start: int  # its first frame
    pcm: np.ndarray  # [C, frames * hop]
    tokens: np.ndarray | None  # [K, frames] its tokens, for the watchdog (when on)


def _never() -> bool:
    """`_run_parts`'s `ready` for work that is done when its parts end."""
    return False


def _what(lanes: Sequence[_Lane]) -> str:
    """The engine call a step is (`Generator.busy`)."""
    if len(lanes) == 1:
        return f"station {lanes[0].spec.id}: generating a chunk"
    return f"stations {', '.join(ln.spec.id for ln in lanes)}: generating their chunks together"


class _OpenFailed(Exception):
    """The stations' streams did not open (the thread ends; the supervisor restarts it)."""
