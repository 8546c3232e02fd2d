"""A fake engine and a recording sink for the generator's worker thread (tests/radio/
test_generator.py, test_healing.py, test_watchdog.py; the `run` fixture is in conftest.py).

The fake streams do no work: a read is instant, its audio says which frames it holds (sample s
of frame f holds f + 1, never silent), and its tokens are random but fixed per frame and
"take" (a restart or a prompt change from frame F draws new ones from F on), so the real thread,
the real command queue and the real detectors run in milliseconds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import numpy as np

from engine.blend import Blend
from engine.options import SamplingOptions, WindowOptions
from engine.token_stream import Interrupted
from radio.generator import StationSpec

FRAME_RATE, HOP, CHUNK, CODEBOOKS = 50, 640, 10, 4
COARSE_PARTS = 3  # steps of the fake's int4 preparation (a real model: one per layer)


class FakeTokens:
    rows = 2  # decoder rows a step: the prompt's and the null row
    guided_next = True  # a prompt change prefills the null row too
    last_prefill = None
    prefills = 0
    folds = 0
    warming = False
    position = 0  # the window's position (the fake's never moves: no slope is fitted)


class FakeStream:
    """An endless stream whose sample s of frame f holds f + 1 (so the audio says where it is)."""

    def shorten_restarts(self, frames: int | None) -> None:
        self.restart_context = frames

    def shorten_windows(self, frames: int | None) -> None:
        self.window_frames = frames

    def __init__(self, prompt: str, floor: int = 0) -> None:
        self.prompt = prompt
        self.frame = 0
        self.floor = floor  # the earliest frame a prompt change may rewind to
        self.tokens = FakeTokens()
        self.restart_context: int | None = None  # shorten_restarts
        self.window_frames: int | None = None  # shorten_windows
        self.sampling: SamplingOptions | None = None
        self.reads = 0
        self.interrupted = 0  # reads stopped by their `interrupt`
        self.restarts: list[tuple[int, int | None]] = []  # (frame, context_frames) asked
        self.restart_error: Exception | None = None  # raised by restart() while set
        self.read_error: Exception | None = None  # raised by read() while set
        self._takes = 0  # restarts and prompt changes so far: new tokens from then on
        self._codes: dict[int, np.ndarray] = {}  # frame -> [K] tokens

    read_seconds = 0.0  # how long a read takes (the engine's steady speed)

    def read(self, frames: int, interrupt: Callable[[], bool] | None = None) -> np.ndarray:
        """Like the engine's: `read_seconds` spread over the frames as decoder steps, each
        step first asking `interrupt` (True: `Interrupted`, nothing read)."""
        if self.read_error is not None:
            raise self.read_error
        for _ in range(frames):
            if interrupt is not None and interrupt():
                self.interrupted += 1
                raise Interrupted("a prompt change")
            time.sleep(self.read_seconds / frames)
        start = self.frame
        self.frame += frames
        self.reads += 1
        return np.repeat(np.arange(start, self.frame, dtype=np.float32) + 1, HOP)[None]

    def token_frames(self, start: int, stop: int) -> np.ndarray:
        """[K, stop - start] int64: random tokens, the same for a frame until it is remade."""
        for f in range(start, stop):
            if f not in self._codes:
                rng = np.random.default_rng([f, self._takes])
                self._codes[f] = rng.integers(0, 2048, CODEBOOKS)
        return np.stack([self._codes[f] for f in range(start, stop)], axis=1)

    def restart(self, from_frame: int | None = None, *, context_frames: int | None = None) -> int:
        if self.restart_error is not None:
            raise self.restart_error
        frame = self.frame if from_frame is None else from_frame
        self.restarts.append((frame, context_frames))
        self._remake(frame)
        return frame

    def set_prompt(self, text: str, from_frame: int | None = None) -> int:
        assert from_frame is not None
        if from_frame < self.floor:
            raise ValueError("too far back")
        self.prompt = text
        self._remake(from_frame)
        return from_frame

    def _remake(self, frame: int) -> None:
        self.frame = min(self.frame, frame)
        self._takes += 1
        self._codes = {f: c for f, c in self._codes.items() if f < frame}

    def set_sampling(self, sampling: SamplingOptions) -> None:
        if sampling.temperature > 2:
            raise ValueError("too hot")
        self.sampling = sampling


class FakeModel:
    frame_rate = FRAME_RATE
    hop = HOP

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.streams: list[FakeStream] = []
        self.together: list[list[str]] = []  # the prompts of each read_together's streams

    # what a step reads (`read_per_step`): (weights, per position per row); no weights: no
    # guess of how the cost grows with the position
    step_read = (0.0, 0.0)

    def read_per_step(self) -> tuple[float, float]:
        return self.step_read

    stations_expected = 1  # what the radio said (`expect_stations`)

    def expect_stations(self, count: int) -> None:
        self.stations_expected = count

    def open_streams(self, prompts, samplings, window):
        if self.fail:
            raise RuntimeError("no memory")
        self.streams = [FakeStream(p) for p in prompts]
        return self.streams

    def read_together(
        self,
        streams: list[FakeStream],
        frames: int,
        interrupt: Callable[[], bool] | None = None,
    ) -> list[np.ndarray]:
        """Each stream's read, recorded as one call (the engine batches their codec decodes).
        Like the engine's, it moves no stream on when one of them fails or it is interrupted."""
        self.together.append([s.prompt for s in streams])
        for s in streams:
            if s.read_error is not None:
                raise s.read_error
            if interrupt is not None and interrupt():
                s.interrupted += 1
                raise Interrupted("a prompt change")
        return [s.read(frames) for s in streams]

    timed_frames: int | None = None  # what the last measure_prefill timed

    def measure_prefill(self, window, frames=None) -> float:
        self.timed_frames = frames
        return 0.25

    # coarse weights (`MusicModel.use_coarse`): recorded, each switch and whether it found
    # them prepared (`prepare_coarse`, in COARSE_PARTS steps) or had to quantize them at once
    coarse = False
    coarse_ready = False
    prepared = 0

    def coarse_available(self) -> str | None:
        return None

    prepare_error: Exception | None = None  # what preparing them raises (after one part)

    def prepare_coarse(self) -> Iterator[None]:
        while not self.coarse_ready:
            if self.prepare_error is not None and self.prepared:
                raise self.prepare_error
            time.sleep(0.01)  # a part takes longer than the generator's share of a fake chunk
            self.prepared += 1
            self.coarse_ready = self.prepared == COARSE_PARTS
            yield

    def use_coarse(self, on: bool) -> None:
        self.switches = [*getattr(self, "switches", []), (on, self.coarse_ready)]
        self.coarse = on
        self.coarse_ready = True

    # guidance dropped (`MusicModel.drop_guidance`): each switch recorded
    unguided = False

    def drop_guidance(self, on: bool) -> None:
        self.guidance_switches = [*getattr(self, "guidance_switches", []), on]
        self.unguided = on

    # the cheaper cache (`MusicModel.use_cheap_cache`): off unless a test gives the model one
    # (`cheap_cache_reason = None`); each switch recorded
    cheap_cache = False
    cheap_cache_reason: str | None = "the fake model's cache is not int8"

    def cheap_cache_available(self) -> str | None:
        return self.cheap_cache_reason

    spares_missing = False  # (the fake streams lay no cache out: `MusicModel.prepare_spares`)

    def prepare_spares(self) -> Iterator[None]:
        yield from ()

    cache_parts = 0  # slices of `prepare_cheap_cache` run

    def prepare_cheap_cache(self) -> Iterator[None]:
        for _ in range(3):
            self.cache_parts += 1
            yield

    cheap_cache_error: Exception | None = None  # what a switch to it raises

    def use_cheap_cache(self, on: bool) -> None:
        assert self.cheap_cache_reason is None, self.cheap_cache_reason
        self.cache_switches = [*getattr(self, "cache_switches", []), on]
        if on and self.cheap_cache_error is not None:
            raise self.cheap_cache_error
        self.cheap_cache = on


class Sink:
    """Records what crosses back to the loop, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.audio: dict[str, list[np.ndarray]] = {}
        self.times: list[float] = []  # loop time of each PCM
        self.changed = asyncio.Event()

    # the chunk lengths a test's generator reads (`steady_frames` when it has one; half a chunk
    # first after a prompt change: `Generator.change_frames`)
    lengths: tuple[int, ...] = (CHUNK, CHUNK // 2)

    def on_pcm(self, station_id, start_frame, pcm, rtf) -> None:
        assert pcm.shape in [(1, n * HOP) for n in self.lengths], pcm.shape
        # a station's first chunk runs cold and is left out of its real-time factor (`next_rtf`)
        assert rtf > 0 or station_id not in self.audio
        self.audio.setdefault(station_id, []).append(pcm)
        self.times.append(asyncio.get_running_loop().time())
        self._record("pcm", station_id, start_frame)

    def on_prompt_applied(self, station_id, change, frame) -> None:
        self._record("prompt", station_id, change.prompt, frame)

    def on_error(self, station_id, message) -> None:
        self._record("error", station_id, message)

    def on_failure(self, station_id, failure) -> None:
        self._record("failure", station_id, failure)

    def on_reopened(self, station_id, frame) -> None:
        self._record("reopened", station_id, frame)

    def on_reanchored(self, station_id, reanchor) -> None:
        self._record("reanchored", station_id, reanchor)

    def on_prefill(self, station_id, prefill) -> None:
        self._record("prefill", station_id, prefill)

    def on_rungs(self, station_id, rungs) -> None:
        self._record("rungs", station_id, rungs)

    def on_restart_context(self, station_id, seconds, window_seconds) -> None:
        self._record("restart_context", station_id, seconds)
        if window_seconds is not None or any(c[0] == "window" for c in self.calls):
            self._record("window", station_id, window_seconds)

    def _record(self, *call) -> None:
        self.calls.append(call)
        self.changed.set()

    def pcm(self, station_id: str) -> list[int]:
        return [c[2] for c in self.calls if c[0] == "pcm" and c[1] == station_id]

    def of(self, kind: str, station_id: str = "a") -> list:
        """The payloads of the calls of one kind for one station (failures, reopens, ...)."""
        return [c[2] for c in self.calls if c[0] == kind and c[1] == station_id]

    async def until(self, predicate, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


def spec(sid: str, window: WindowOptions | None = None) -> StationSpec:
    return StationSpec(sid, Blend.of(f"{sid} music"), SamplingOptions(), window or WindowOptions())


def frames(start: int, stop: int) -> np.ndarray:
    """What a FakeStream's audio holds for frames [start, stop)."""
    return np.repeat(np.arange(start, stop, dtype=np.float32) + 1, HOP)
