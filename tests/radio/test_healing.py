"""Failures that heal themselves (`radio.healing`): the backoff, a station reopened from its
recent tokens after a failure, a dead generator thread restarted, a stalled step reported.

With a fake clock and the fake engine (tests/radio/fake_engine.py) the schedule is exact and
the tests take milliseconds; three live radios on the tiny model then show it end to end: the
failure healed while an MP3 listener keeps playing, the dead thread restarted, the hung step
turned into a 503 from /healthz. Faults come through `radio.testing.FaultInjector`, which the
config cannot reach."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import threading
import time
import urllib.request

import av
import numpy as np
import pytest

from radio.generator import Generator
from radio.healing import Backoff, LaneHealing, Supervisor, describe
from radio.testing import FaultInjector
from tests.helpers import call, wait_until
from tests.radio.fake_engine import CHUNK, FakeModel, spec


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def messages(caplog, name: str = "radio") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith(name)]


# ---- the schedule ------------------------------------------------------------------------


def test_the_backoff_doubles_from_one_second_up_to_a_minute_and_resets_after_a_success():
    b = Backoff()
    assert [b.next_delay() for _ in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert b.in_a_row == 9
    b.reset()
    assert (b.next_delay(), b.next_delay()) == (1, 2)
    assert [Backoff(first=0.5, cap=3).next_delay() for _ in range(1)] == [0.5]


def test_a_station_is_down_until_its_reopen_is_due():
    h = LaneHealing()
    assert not h.down and not h.due(0.0)
    assert h.failed(100.0) == 1.0 and h.down
    assert not h.due(100.9) and h.due(101.0)
    h.reopened()
    assert not h.down and (h.failures, h.reopens) == (1, 1)
    assert h.failed(200.0) == 2.0  # no chunk since: the second failure in a row
    h.reopened()
    h.succeeded()
    assert h.failed(300.0) == 1.0


def test_errors_are_described_in_one_line():
    assert describe(RuntimeError("out of\nmemory")) == "RuntimeError: out of memory"
    assert describe(KeyError()) == "KeyError"
    assert len(describe(ValueError("x" * 1000))) < 320


# ---- the generator with a fake clock -----------------------------------------------------


async def quiet(seconds: float = 0.15) -> None:
    """Let the worker run a while (nothing is due: it must not do anything new)."""
    await asyncio.sleep(seconds)


async def until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_a_failing_station_is_reopened_after_1_2_4_s_and_the_backoff_resets(run):
    clock = FakeClock()
    faults = FaultInjector()
    gen, sink = await run(FakeModel(), ("a", "b"), faults=faults, clock=clock)
    await sink.until(lambda: len(sink.pcm("a")) == 5)  # frames 0..49 made
    stream = gen.model.streams[0]
    faults.fail_next_step("a", times=3)
    gen.played("a", 30)
    gen.played("b", 30)
    await sink.until(lambda: len(sink.of("failure")) == 1)
    delays = []
    for n in (1, 2, 3):
        failure = sink.of("failure")[-1]
        assert failure.reason == "generation failed (InjectedFault: injected fault)"
        assert failure.in_a_row == n
        delays.append(failure.retry_in)
        clock.advance(failure.retry_in - 0.25)  # binary fractions: the sums are exact
        await quiet()
        assert len(sink.of("reopened")) == n - 1, "reopened before its delay had passed"
        clock.advance(0.25)
        if n < 3:
            await sink.until(lambda n=n: len(sink.of("failure")) == n + 1)
    assert delays == [1.0, 2.0, 4.0]
    await sink.until(lambda: len(sink.pcm("a")) == 8)  # the third reopen made audio
    assert sink.of("reopened") == [50, 50, 50]
    assert stream.restarts == [(50, None)] * 3  # from its recent tokens: all of the context
    assert sink.pcm("a")[5:] == [50, 60, 70]  # the audio goes on where it stopped
    assert len(sink.pcm("b")) == 9  # the other station never waited (and went along a's first)
    faults.fail_next_step("a")  # a success reset the backoff: 1 s again
    gen.played("a", 60)
    await sink.until(lambda: len(sink.of("failure")) == 4)
    assert (sink.of("failure")[-1].in_a_row, sink.of("failure")[-1].retry_in) == (1, 1.0)


async def test_a_reopen_that_fails_waits_longer(run, caplog):
    caplog.set_level(logging.INFO, "radio")
    clock = FakeClock()
    faults = FaultInjector()
    faults.fail_next_step("a")
    faults.fail_next_reopen("a")
    gen, sink = await run(FakeModel(), ("a",), faults=faults, clock=clock)
    await sink.until(lambda: len(sink.of("failure")) == 1)
    clock.advance(1.0)
    await sink.until(lambda: len(sink.of("failure")) == 2)
    second = sink.of("failure")[1]
    assert second.reason == "reopening failed (InjectedFault: injected reopen fault)"
    assert (second.in_a_row, second.retry_in) == (2, 2.0)
    clock.advance(2.0)
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    assert sink.of("reopened") == [0]
    assert [m for m in messages(caplog, "radio.generator") if m.startswith("station a:")] == [
        "station a: generation failed (InjectedFault: injected fault); reopening it from its "
        "recent tokens in 1 s (failure 1 in a row)",
        "station a: reopening failed (InjectedFault: injected reopen fault); reopening it from "
        "its recent tokens in 2 s (failure 2 in a row)",
        "station a: reopened from its recent tokens at 0.0 s",
    ]


async def test_a_dead_generator_thread_is_restarted_with_the_same_streams(run, caplog):
    caplog.set_level(logging.INFO, "radio")
    clock = FakeClock()
    model = FakeModel()
    faults = FaultInjector()
    gen, sink = await run(model, ("a",), faults=faults, clock=clock)
    supervisor = Supervisor(gen, stall_seconds=60, clock=clock)
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    faults.kill_generator()  # the idle worker dies at the next turn of its loop
    await until(lambda: not gen.alive)
    assert gen.death == "InjectedFault: injected death"
    supervisor.check()
    assert supervisor.problems() == [
        "the generator thread died (InjectedFault: injected death); restarting it in 1 s"
    ]
    clock.advance(0.75)
    supervisor.check()
    assert not gen.alive and supervisor.restarts == 0
    faults.kill_generator()  # the new thread dies before it made audio: the next wait is 2 s
    clock.advance(0.25)
    supervisor.check()
    assert supervisor.restarts == 1
    await until(lambda: not gen.alive and gen.death != "")
    supervisor.check()
    assert supervisor.problems()[0].endswith("restarting it in 2 s")
    clock.advance(2)
    supervisor.check()
    assert gen.alive and supervisor.restarts == 2
    gen.played("a", 10)
    await sink.until(lambda: len(sink.pcm("a")) == 6)
    assert sink.pcm("a")[5] == 50 and model.streams[0].reads == 6  # the same stream, going on
    supervisor.check()  # the restarted thread made audio: the backoff resets
    assert supervisor.backoff.in_a_row == 0 and supervisor.problems() == []
    assert messages(caplog, "radio.healing") == [
        "the generator thread died (InjectedFault: injected death); restarting it in 1 s",
        "the generator thread was restarted (restart 1)",
        "the generator thread died (InjectedFault: injected death); restarting it in 2 s",
        "the generator thread was restarted (restart 2)",
    ]
    gen.stop()
    supervisor.check()
    assert supervisor.restarts == 2  # a generator that was stopped stays stopped
    assert supervisor.problems() == ["the generator thread is not running"]


async def test_a_step_that_makes_no_progress_is_a_stall_until_it_ends(run, caplog):
    caplog.set_level(logging.INFO, "radio")
    clock = FakeClock()
    faults = FaultInjector()
    gen, sink = await run(FakeModel(), ("a",), faults=faults, clock=clock)
    supervisor = Supervisor(gen, stall_seconds=60, clock=clock)
    await sink.until(lambda: len(sink.pcm("a")) == 5)
    faults.hang_next_step("a")
    gen.played("a", 10)
    try:
        await until(lambda: gen.busy is not None)
        assert gen.busy == (clock.now, "station a: generating a chunk")
        clock.advance(59)
        supervisor.check()
        assert supervisor.problems() == [] and supervisor.stalls == 0
        clock.advance(1)
        supervisor.check()
        supervisor.check()  # counted and logged once
        assert supervisor.problems() == [
            "a generation step has made no progress for 60 s (station a: generating a chunk)"
        ]
        assert supervisor.stalls == 1 and gen.alive
    finally:
        faults.release()
    await sink.until(lambda: len(sink.pcm("a")) == 6)
    supervisor.check()
    assert supervisor.problems() == [] and supervisor.stalls == 1
    assert messages(caplog, "radio.healing") == [
        "a generation step has made no progress for 60 s (station a: generating a chunk); "
        "/healthz answers 503 so a supervisor restarts the radio",
        "the stalled generation step ended after 60 s; /healthz no longer reports it",
    ]


async def test_the_first_chunk_is_not_watched_for_stalls(run):
    """It may compile the decoder step (minutes on a GPU)."""
    clock = FakeClock()
    faults = FaultInjector()
    faults.hang_next_step("a", seconds=0.3)
    gen, sink = await run(FakeModel(), ("a",), faults=faults, clock=clock)
    await asyncio.sleep(0.1)
    assert gen.busy is None and gen.chunks == 0
    await sink.until(lambda: len(sink.pcm("a")) >= 1)


def test_a_generator_that_never_started_is_not_running_and_not_restarted():
    gen = Generator(FakeModel(), [spec("a")], chunk_frames=CHUNK)
    supervisor = Supervisor(gen, stall_seconds=60)
    supervisor.check()
    assert supervisor.problems() == ["the generator thread is not running"]
    gen.stop()


# ---- the loop side: the station's health and buffer ---------------------------------------


def test_the_station_sink_keeps_failures_reopens_and_re_anchors_in_the_health():
    from types import SimpleNamespace

    from engine.options import SamplingOptions
    from radio.config import StationConfig
    from radio.generator import Reanchor
    from radio.healing import Failure
    from radio.service import StationSink
    from radio.station import Station
    from radio.watchdog import Problem

    st = Station(StationConfig(), 0, 1, SamplingOptions())
    sink = StationSink(
        SimpleNamespace(stations={"main": st}, hop=640, frame_rate=50, sample_rate=32000)
    )
    sink.on_pcm("main", 0, np.ones((1, 6400), np.float32), 2.0)
    sink.on_failure("main", Failure("generation failed (RuntimeError: boom)", 1, 2.0))
    h = st.health_json()
    assert (h["failures"], h["reopens"], h["error"]) == (
        1,
        0,
        "generation failed (RuntimeError: boom)",
    )
    assert 1.9 < h["retry_in_seconds"] <= 2.0 and st.health.down
    st.buffer.take(6400)  # the clock played it all (the bridge plays now)
    sink.on_reopened("main", 30)  # a batched stream went on later than it stopped
    assert st.buffer.head == st.buffer.tail == 30 * 640 and not st.health.down
    sink.on_pcm("main", 30, np.ones((1, 6400), np.float32), 2.0)
    assert len(st.buffer) == 6400  # follows without a resync
    h = st.health_json()
    assert (h["reopens"], h["retry_in_seconds"], h["error"]) == (1, None, None)
    sink.on_reanchored("main", Reanchor(Problem("loop", "a loop: ..."), 35, 1.0))
    assert st.buffer.tail == 35 * 640  # what followed the re-anchor's frame is dropped
    h = st.health_json()
    assert h["reanchors"] == 1 and st.health.reanchors == {"loop": 1}
    last = h["last_reanchor"]
    assert (last["problem"], last["detail"], last["stream_seconds"]) == ("loop", "a loop: ...", 0.7)


# ---- live: the tiny model behind a real server ---------------------------------------------


def metric(base: str, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert found, f"{name}{labels} not in /metrics"
    return float(found.group(1))


class Listener:
    """An MP3 listener in a thread: what it got, and when each piece arrived."""

    def __init__(self, base: str) -> None:
        self.arrivals: list[float] = []
        self.data = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, args=(base,), daemon=True)
        self._thread.start()

    def _listen(self, base: str) -> None:
        with urllib.request.urlopen(f"{base}/main.mp3", timeout=10) as r:
            while not self._stop.is_set():
                b = r.read1(4096)
                if not b:
                    return
                self.arrivals.append(time.monotonic())
                self.data.extend(b)

    def stop(self) -> float:
        """Stop; the longest gap between two pieces, in seconds."""
        self._stop.set()
        self._thread.join(10)
        gaps = [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]
        return max(gaps, default=float("inf"))


def loudness_per_100_ms(mp3: bytes) -> np.ndarray:
    """dBFS of each 100 ms of the decoded MP3 (44.1 kHz), the first 0.5 s and the end left out."""
    with av.open(io.BytesIO(mp3), format="mp3") as f:
        pcm = np.concatenate([fr.to_ndarray().reshape(-1) for fr in f.decode(audio=0)])
    win = 4410
    rms = np.sqrt(np.mean(pcm[: len(pcm) // win * win].reshape(-1, win) ** 2, axis=1))
    assert len(rms) > 40, f"only {len(rms) / 10:.1f} s of audio"
    return 20 * np.log10(rms[5:-2] + 1e-9)


def test_a_failing_station_heals_while_the_mp3_listener_keeps_playing(radio_factory, caplog):
    caplog.set_level(logging.INFO, "radio")
    faults = FaultInjector()
    # a 1 s buffer: the 3 s the station is down are bridged
    radio = radio_factory(faults=faults, generation={"buffer_ahead": 1.0, "seed": 5})
    base, st = radio.base_url, radio.radio.stations["main"]
    listener = Listener(base)
    time.sleep(1.0)
    faults.fail_next_step("main", times=2)  # reopened after 1 s, fails again, after 2 s more
    status, _, body = wait_until(
        lambda: (answer := call("GET", f"{base}/healthz"))[0] == 503 and answer,
        5,
        "/healthz to report the failure",
    )
    assert re.fullmatch(
        r"main: generation failed \(InjectedFault: injected fault\); reopening it in [0-2] s",
        body["problems"][0],
    ), body
    health = wait_until(
        lambda: (
            (h := call("GET", f"{base}/api/stations/main")[2]["health"])["retry_in_seconds"]
            is not None
            and h
        ),
        5,
        "the health to show the pending reopen",
    )
    assert health["failures"] >= 1 and 0 <= health["retry_in_seconds"] <= 2, health
    wait_until(lambda: metric(base, "radio_station_down", '{station="main"}') == 1.0, 5, "down")
    wait_until(lambda: st.health.reopens == 2 and not st.health.down, 10, "two reopens")
    wait_until(lambda: call("GET", f"{base}/healthz")[0] == 200, 10, "/healthz 200 again")
    wait_until(lambda: not st.health.bridging, 10, "live audio again")
    time.sleep(0.5)
    gap = listener.stop()
    assert gap < 1.0, f"the MP3 stream stalled for {gap:.1f} s"
    assert st.health.underruns >= 1  # the listener heard the bridge meanwhile ...
    dbfs = loudness_per_100_ms(bytes(listener.data))
    assert dbfs.min() > -40, f"quietest 100 ms: {dbfs.min():.1f} dBFS"  # ... never silence
    health = call("GET", f"{base}/api/stations/main")[2]["health"]
    assert (health["failures"], health["reopens"], health["retry_in_seconds"]) == (2, 2, None)
    assert health["error"] is None
    assert metric(base, "radio_generation_failures_total", '{station="main"}') == 2.0
    assert metric(base, "radio_generation_reopens_total", '{station="main"}') == 2.0
    assert metric(base, "radio_station_down", '{station="main"}') == 0.0
    said = messages(caplog, "radio.generator")
    fail = "station main: generation failed (InjectedFault: injected fault); reopening it from "
    assert fail + "its recent tokens in 1 s (failure 1 in a row)" in said
    assert fail + "its recent tokens in 2 s (failure 2 in a row)" in said
    reopened = [m for m in said if m.startswith("station main: reopened from its recent tokens")]
    assert len(reopened) == 2 and re.fullmatch(r".* at \d+\.\d s", reopened[0])


def test_a_dead_generator_thread_is_restarted_live(radio_factory, caplog):
    caplog.set_level(logging.INFO, "radio")
    faults = FaultInjector()
    radio = radio_factory(faults=faults)
    base, gen = radio.base_url, radio.radio.generator
    made = gen.chunks
    faults.kill_generator()
    wait_until(lambda: metric(base, "radio_generator_restarts_total") == 1.0, 10, "a restart")
    wait_until(lambda: gen.chunks > made + 5, 10, "audio from the new thread")
    assert call("GET", f"{base}/healthz")[0] == 200
    assert (
        "the generator thread died (InjectedFault: injected death); restarting it in 1 s"
        in messages(caplog, "radio.healing")
    )


def test_a_hung_step_makes_healthz_answer_503_with_the_reason(radio_factory):
    faults = FaultInjector()
    radio = radio_factory(faults=faults, generation={"stall_seconds": 1.0})
    base = radio.base_url
    faults.hang_next_step("main")
    try:
        status, _, body = wait_until(
            lambda: (answer := call("GET", f"{base}/healthz"))[0] == 503 and answer,
            10,
            "/healthz to report the stall",
        )
        assert any(
            re.fullmatch(
                r"a generation step has made no progress for \d+ s "
                r"\(station main: generating a chunk\)",
                p,
            )
            for p in body["problems"]
        ), body
        wait_until(lambda: metric(base, "radio_generation_stalls_total") == 1.0, 5, "counted")
    finally:
        faults.release()
    wait_until(lambda: call("GET", f"{base}/healthz")[0] == 200, 10, "/healthz 200 again")


@pytest.mark.parametrize(
    "value, words",
    [(0.5, "generation.stall_seconds: must be in [1, 3600] seconds, got 0.5")],
)
def test_stall_seconds_is_checked(value, words):
    from radio.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as err:
        parse_config({"generation": {"stall_seconds": value}})
    assert str(err.value) == words
