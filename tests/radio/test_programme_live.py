"""A scheduled rotation on a live radio, heard by a raw ICY client: the radio serves on a real
socket (in-process, tiny model), the programme's clock is moved so that a rotation tick comes
a few seconds from now, and the `StreamTitle` read byte by byte off the MP3 mount changes to
the next rotation prompt, heard when it was due (the change was sent ahead of the boundary)."""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
import urllib.request

import pytest

from radio.testing import ShiftedClock
from tests.helpers import IcyReader, serving

FIRST, SECOND = "rotation one: slow piano", "rotation two: bright marimba"


@pytest.fixture
def radio(radio_model):
    data = {
        "server": {"host": "127.0.0.1"},
        "generation": {"seed": 5},
        "hls": {"enabled": False},
        "stations": [
            {
                "id": "main",
                "prompt": "between slots",
                "schedule": [
                    {
                        "name": "all day",
                        "start": "00:00",
                        "end": "24:00",
                        "prompts": [FIRST, SECOND],
                        "rotate_minutes": 60,
                    }
                ],
            }
        ],
    }
    clock = ShiftedClock.at_utc(12)  # noon UTC: the next change is a rotation tick, not midnight
    with serving(data, radio_model, programme_clock=clock) as r:
        r.clock = clock
        yield r


def test_a_rotation_tick_changes_the_icy_title_when_it_is_due(radio):
    u = urllib.parse.urlsplit(radio.base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", "/main.mp3", headers={"Icy-MetaData": "1"})
    r = conn.getresponse()
    try:
        reader = IcyReader(int(r.headers["icy-metaint"]))
        titles: list[str] = []
        deadline = time.monotonic() + 10
        while not titles:
            assert time.monotonic() < deadline, "no StreamTitle within 10 s"
            titles += reader.feed(r.read1(1))[1]  # byte by byte, as a hardware radio reads
        playing = titles[-1]
        assert playing in (FIRST, SECOND)
        following = SECOND if playing == FIRST else FIRST

        director = radio.radio.programmes["main"].director
        nxt = radio.call(director.upcoming)
        assert nxt.blend.describe() == following
        # a rotation tick; from 23:00 to midnight UTC the next one is the slot's next start
        assert (nxt.why, nxt.source) in (("rotation", "rotation"), ("slot", "schedule"))
        radio.clock.advance(nxt.at - radio.clock() - 3.0)  # the tick comes in 3 s
        due = time.time() + 3.0
        deadline = due + 15
        while titles[-1] != following:
            assert time.time() < deadline, f"the title did not change: {titles}"
            titles += reader.feed(r.read1(1))[1]
        assert time.time() > due - 1.0, "the new title came long before the tick"
    finally:
        conn.close()
    with urllib.request.urlopen(radio.base_url + "/api/stations/main", timeout=10) as got:
        station = json.load(got)
    assert station["history"][0]["prompt"] == following
    assert station["history"][0]["source"] == nxt.source
    assert station["programme"]["playing"]["source"] == nxt.source
    lag = station["health"]["schedule_lag_seconds"]
    print(f"\nrotation tick heard {lag:+.3f} s after it was due", end=" ")
    assert abs(lag) < 0.5, f"heard {lag:.2f} s from the tick (sent ahead: should be on time)"
