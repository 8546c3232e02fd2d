"""A station's director wired to its prompt timeline, with one fake clock and a fake generator:
a slot boundary and a rotation tick change the prompt at the boundary's frame (sent ahead of
time), the history records each change's source, an API-caused change goes as soon as
possible, a change the engine did not take is sent again, a programme that changes its mind
undoes the cut it sent ahead, and the `programme` event goes out only when something changed."""

from __future__ import annotations

import asyncio
import datetime as dt
import math

import numpy as np
import pytest

from engine.blend import Blend
from engine.options import SamplingOptions
from radio.config import parse_config, with_programme
from radio.programme.director import Director
from radio.programme_runner import StationProgramme, open_station
from radio.station import Station
from radio.timing import ChangeCost, Horizon, PromptChange, PromptTimeline

RATE, HOP = 32000, 640
LATENCY = 6400  # samples in a slow loudness stage (0.2 s)
START = dt.datetime(2026, 6, 1, 6, 59, 0, tzinfo=dt.UTC).timestamp()  # a Monday, 06:59 UTC


class FakeClock:
    """Wall time (Unix seconds) for the director and the timeline; monotonic = wall - START."""

    def __init__(self) -> None:
        self.t = START

    def __call__(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t - START


class FakeEngine:
    """A generator that takes each change when the test says so."""

    def __init__(self) -> None:
        self.alive = True
        self.sustained_rtf, self.together = 0.0, 0
        self.asked: list[tuple[PromptChange, asyncio.Future[int]]] = []

    def change_cost(self, rows: int = 2) -> ChangeCost:
        return ChangeCost(0.2, 0.2)  # a fast change and its first read

    def first_read_seconds(self) -> float:
        return 0.0  # none made yet

    def guided_next(self, station_id: str) -> bool:
        return True

    def set_prompt(self, station_id: str, change: PromptChange) -> asyncio.Future[int]:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.asked.append((change, fut))
        return fut

    def take(self, timeline: PromptTimeline) -> PromptChange:
        change, fut = self.asked.pop(0)
        timeline.applied(change, change.from_frame)
        fut.set_result(change.from_frame)
        return change


def cafe(**keys) -> dict:
    return {
        "id": "cafe",
        "prompt": "house",
        "schedule": [
            {
                "name": "morning",
                "start": "07:00",
                "end": "11:30",
                "prompts": ["guitar", [{"text": "bossa", "weight": 3}, {"text": "rain"}]],
                "rotate_minutes": 20,
                "transition_seconds": 4.0,
            }
        ],
        **keys,
    }


class Rig:
    def __init__(self, **keys) -> None:
        self.clock = FakeClock()
        config = parse_config({"stations": [cafe(**keys)]}, env={})
        self.station = Station(config.stations[0], 0, 1, SamplingOptions())
        self.director = Director(config.stations[0], self.clock)
        self.first = open_station(self.station, self.director)
        self.engine = FakeEngine()
        self.timeline = PromptTimeline(
            self.station,
            self.engine,
            hop=HOP,
            sample_rate=RATE,
            horizon=Horizon(-1, chunk_seconds=0.2),  # auto: 0.5 s at what a change costs here
            output_latency=LATENCY,
            clock=self.clock.monotonic,
            wallclock=self.clock,
            apply_timeout=0.5,
        )
        self.programme = StationProgramme(self.station, self.director, self.timeline)
        self.events = self.station.events.subscribe()
        # 4 s generated ahead of the head (sample 0): changes within it can be placed exactly
        self.station.buffer.append(0, np.zeros((1, 4 * RATE), np.float32))

    def at(self, hh: int, mm: int, ss: float = 0.0) -> None:
        self.clock.t = dt.datetime(2026, 6, 1, hh, mm, tzinfo=dt.UTC).timestamp() + ss

    def frame_heard_at(self, instant: float) -> int:
        """The frame listeners hear at `instant` (buffer head 0 heard now, after the latency)."""
        return math.ceil(((instant - self.clock()) * RATE - LATENCY) / HOP)

    def history(self) -> list[tuple[str, str]]:
        return [(r.prompt, r.source) for r in self.station.history]

    def news(self) -> list[tuple[str, dict]]:
        """The SSE events published since the last call: (name, data)."""
        out = []
        while not self.events.empty():
            out.append(self.events.get_nowait())
        return out


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_slot_boundary_and_a_rotation_tick_are_heard_on_time_with_their_source():
    rig = Rig()
    assert rig.first == Blend.of("house") and rig.history() == [("house", "config")]
    assert rig.timeline.on_air == "house"

    rig.at(6, 59, 50)  # 10 s before the slot: too early to send
    assert rig.programme.tick() is None
    await settle()
    assert rig.engine.asked == []

    rig.at(6, 59, 58.5)  # 1.5 s before: within the horizon (0.5 s) and its margin (1.5 s)
    assert rig.programme.tick() is None  # sent ahead, nobody waits for it
    await settle()
    [(change, _)] = rig.engine.asked
    boundary = dt.datetime(2026, 6, 1, 7, 0, tzinfo=dt.UTC).timestamp()
    assert change.blend == Blend.of("guitar") and change.source == "schedule"
    assert change.at == boundary and change.transition_seconds == 4.0
    assert change.from_frame == rig.frame_heard_at(boundary) == 65  # 1.5 s - 0.2 s, in frames
    rig.engine.take(rig.timeline)
    assert rig.history()[0] == ("guitar", "schedule")
    assert rig.director.current.blend == Blend.of("house")  # not due yet: nothing else sent
    rig.programme.tick()
    await settle()
    assert rig.engine.asked == []

    rig.at(7, 0, 0.2)  # the slot began: what was sent ahead plays, nothing more to send
    rig.programme.tick()
    await settle()
    assert rig.engine.asked == [] and rig.director.current.source == "schedule"

    rig.at(7, 19, 59)  # the rotation tick at 07:20, 1 s ahead
    rig.programme.tick()
    await settle()
    [(change, _)] = rig.engine.asked
    bossa = Blend.parse([{"text": "bossa", "weight": 3}, {"text": "rain"}])
    assert change.blend == bossa and change.source == "rotation"
    assert change.from_frame == rig.frame_heard_at(change.at)
    rig.engine.take(rig.timeline)
    assert rig.history()[:2] == [("bossa 75% + rain 25%", "rotation"), ("guitar", "schedule")]
    assert change.title == "bossa"  # what ICY and Icecast show once it is heard


async def test_a_boundary_seen_late_is_sent_at_once_and_an_api_change_measures_its_latency():
    rig = Rig()
    rig.at(7, 0, 3)  # the loop was busy: the boundary is 3 s past
    task = rig.programme.tick()
    assert task is not None
    await settle()
    [(change, _)] = rig.engine.asked
    assert change.source == "schedule" and change.at is not None
    assert change.from_frame == rig.timeline.start_frame()  # as soon as the horizon allows
    rig.engine.take(rig.timeline)
    assert (await task).frame == change.from_frame

    rig.director.admin_prompt(Blend.of("quiet guitar"))
    task = rig.programme.tick(requested_at=rig.clock.monotonic())
    await settle()
    [(change, _)] = rig.engine.asked
    assert (change.source, change.at) == ("admin", None)  # latency measured from the request
    rig.engine.take(rig.timeline)
    await task
    assert rig.history()[0] == ("quiet guitar", "admin")


async def test_a_change_the_engine_did_not_take_is_sent_again():
    rig = Rig()
    rig.engine.alive = False
    rig.at(7, 0, 1)
    task = rig.programme.tick()
    with pytest.raises(Exception, match="not running"):
        await task
    rig.engine.alive = True
    rig.programme.tick()
    await settle()
    [(change, _)] = rig.engine.asked
    assert change.blend == Blend.of("guitar")


async def test_a_programme_that_changes_its_mind_undoes_what_it_sent_ahead():
    rig = Rig()
    rig.at(6, 59, 59)
    rig.programme.tick()
    await settle()
    rig.engine.take(rig.timeline)  # guitar from 07:00's frame
    # the admin moves the slot to the evening before 07:00 comes
    settings = {"schedule": [{**cafe()["schedule"][0], "start": "19:00", "end": "21:00"}]}
    rig.director.set_station(with_programme(rig.director.station, settings))
    rig.programme.tick()
    await settle()
    [(change, _)] = rig.engine.asked
    boundary = dt.datetime(2026, 6, 1, 7, 0, tzinfo=dt.UTC).timestamp()
    assert change.blend == Blend.of("house") and change.at == boundary  # the same frame
    rig.engine.take(rig.timeline)
    rig.at(7, 0, 1)
    rig.programme.tick()
    await settle()
    assert rig.engine.asked == [] and rig.director.current.blend == Blend.of("house")


async def test_the_programme_event_goes_out_when_something_changed():
    rig = Rig(listener_prompts="queue")
    rig.news()
    rig.programme.tick()
    [(name, first)] = rig.news()
    assert name == "programme"
    assert first["playing"]["source"] == "config" and first["next"]["why"] == "slot"
    assert [s["name"] for s in first["today"]] == ["morning"]
    rig.clock.t += 1
    rig.programme.tick()
    assert rig.news() == []  # nothing new
    rig.director.listener_prompt("198.51.100.7", Blend.of("chanson"))
    rig.programme.publish_queue()
    [(first_name, queue), (second_name, programme)] = rig.news()
    assert (first_name, second_name) == ("queue", "programme")
    assert [s["text"] for s in queue["queue"]] == ["chanson"] and queue["queue"][0]["votes"] == 1
    assert programme["next"]["source"] == "vote"  # the queue's winner decides at the next tick
