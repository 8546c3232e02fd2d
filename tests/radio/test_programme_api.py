"""The programme's API on the real app (`init_app` on the tiny model, its generator running),
through pytest-aiohttp's client: blends and their validation, the queue (suggest, upvote, rate
limits), skip votes, the admin's pin, queue actions and schedule edits (checked like the
config), and the state file round trip. The programme's clock is a `ShiftedClock`: a rotation
tick an hour away comes when the test says. Every refusal is a 4xx with a JSON reason, and the
station plays on."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient

from radio.app import init_app
from radio.config import parse_config
from radio.service import RADIO
from radio.testing import ShiftedClock
from tests.helpers import STARTUP_SECONDS

TOKEN = "programme-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
A, B = "gentle acoustic guitar", "soft bossa nova"


def config(state_file: str = "", **station) -> object:
    data = {
        "server": {"host": "127.0.0.1", "trust_forwarded": True, "state_file": state_file},
        "generation": {"seed": 1},
        "hls": {"enabled": False},
        "security": {"admin_token": TOKEN, "prompt_rate_limit": "2 per 60 s"},
        "stations": [
            {
                "id": "main",
                "prompt": "house",
                "vote_rate_limit": "3 per 60 s",
                "schedule": [  # all day, every day: A and B by the hour
                    {"start": "00:00", "end": "24:00", "prompts": [A, B], "rotate_minutes": 60}
                ],
                **station,
            }
        ],
    }
    return parse_config(data, env={})


@pytest.fixture
def clock() -> ShiftedClock:
    # noon UTC: the all-day slot's next change is an hourly rotation tick; in the hour before
    # midnight it would be the next day's slot (the test failed in CI at 23:03 UTC)
    return ShiftedClock.at_utc(12)


@pytest.fixture
def make(aiohttp_client, radio_model, clock):
    """make(state_file="", **station keys) -> a client of a radio on air."""

    async def start(state_file: str = "", **station) -> TestClient:
        app = init_app(config(state_file, **station), radio_model, programme_clock=clock)
        client = await aiohttp_client(app)
        async with asyncio.timeout(STARTUP_SECONDS):
            while (await client.get("/healthz")).status != 200:
                await asyncio.sleep(0.05)
        return client

    return start


def who(address: str) -> dict[str, str]:
    """A listener at `address` (the radio trusts X-Forwarded-For here)."""
    return {"X-Forwarded-For": address}


async def call(client: TestClient, method: str, path: str, json=None, headers=None):
    r = await client.request(method, "/api/stations/main" + path, json=json, headers=headers)
    assert r.content_type == "application/json", await r.text()
    return r.status, await r.json()


def programme(client: TestClient):
    return client.app[RADIO].programmes["main"]


async def on_air(client: TestClient, title: str, timeout: float = 30.0) -> None:
    """Wait until listeners hear `title` (the ICY title follows what is heard)."""
    timeline = client.app[RADIO].timing["main"]
    async with asyncio.timeout(timeout):
        while timeline.on_air != title:
            await asyncio.sleep(0.05)


async def test_bad_input_is_named_and_the_station_plays_on(make):
    client = await make()
    bad = [
        ("POST", "/prompt", {"prompt": [{"text": "a", "weight": -1}]}, {}, 400,
         "prompt[0].weight: must be > 0, got -1"),
        ("POST", "/prompt", {"prompt": [{"text": f"t{i}"} for i in range(5)]}, {}, 400,
         "at most 4 texts"),
        ("POST", "/prompt", {"prompt": [{"text": "a"}, {"text": "a"}]}, {}, 400,
         "prompt[1].text: 'a' is already prompt[0]"),
        ("POST", "/prompt", {"prompt": [{"txt": "a"}]}, {}, 400, "prompt[0].txt: unknown key"),
        ("POST", "/prompt", {"prompt": []}, {}, 400, "at least one"),
        ("POST", "/prompt", {"prompt": {"text": "a"}}, {}, 400, "must be a string or a list"),
        ("POST", "/prompt", {"prompt": "x" * 201}, {}, 400, "too long"),
        ("POST", "/prompt", {"prompt": "jazz", "mood": 1}, {}, 400, "unknown field 'mood'"),
        ("POST", "/prompt", {"prompt": "jazz", "transition_seconds": 5}, {}, 403,
         "transition_seconds is for the admin"),
        ("POST", "/prompt", {"prompt": "jazz", "transition_seconds": 301}, ADMIN, 400,
         "transition_seconds: must be a number in [0, 300], got 301"),
        ("POST", "/prompt", {"prompt": "jazz", "transition_seconds": True}, ADMIN, 400,
         "transition_seconds: must be a number"),
        ("POST", "/suggestions", {"prompt": "jazz"}, {}, 403, "takes no suggestions"),
        ("POST", "/suggestions/1/vote", None, {}, 403, "no suggestion queue"),
        ("DELETE", "/suggestions/1", None, {}, 401, "admin token required"),
        ("DELETE", "/suggestions", None, {}, 401, "admin token required"),
        ("POST", "/pin", {"prompt": "jazz"}, {}, 401, "admin token required"),
        ("POST", "/pin", {"prompt": "jazz"}, {"Authorization": "Bearer wrong-token"}, 403,
         "wrong admin token"),
        ("POST", "/pin", {"prompt": "jazz", "minutes": 0}, ADMIN, 400,
         "minutes: must be a number in [1, 10080]"),
        ("DELETE", "/pin", None, ADMIN, 409, "nothing is pinned"),
        ("PUT", "/schedule", {"schedule": []}, {}, 401, "admin token required"),
        ("PUT", "/schedule", {}, ADMIN, 400, "names no programme key"),
        ("PUT", "/schedule", {"name": "x"}, ADMIN, 400, "name: not a programme key"),
        ("PUT", "/schedule", {"timezone": "Mars/Olympus"}, ADMIN, 400,
         "timezone: 'Mars/Olympus' is not an IANA time zone"),
        ("PUT", "/schedule", {"schedule": [{"start": "25:00", "prompts": ["a"]}]}, ADMIN, 400,
         "schedule[0].start: must be a time 'HH:MM'"),
        ("PUT", "/schedule",
         {"schedule": [{"start": "07:00", "end": "12:00", "prompts": ["a"]},
                       {"days": "mon", "start": "11:00", "end": "13:00", "prompts": ["b"]}]},
         ADMIN, 400, "schedule[1] (mon 11:00-13:00) overlaps schedule[0] (mon 07:00-12:00)"),
        ("PUT", "/schedule", {"schedule": [{"prompts": ["a"], "rotate_minutes": 0.5}]}, ADMIN,
         400, "schedule[0].rotate_minutes: must be 0 (no rotation) or in [1, 1440]"),
        ("GET", "/nope", None, {}, 404, "not found"),
    ]  # fmt: skip
    for method, path, body, headers, status, words in bad:
        got, data = await call(client, method, path, body, headers)
        assert (got, list(data)) == (status, ["error"]), (path, body, data)
        assert words in data["error"], (path, data)
    r = await client.put(
        "/api/stations/main/schedule",
        data=b'{"schedule": "' + b"x" * 200_000 + b'"}',
        headers={**ADMIN, "Content-Type": "application/json"},
    )
    assert r.status == 413 and "at most 131072 bytes" in (await r.json())["error"]
    assert (await client.get("/healthz")).status == 200  # the station plays on
    assert programme(client).director.station.schedule[0].prompts[0].describe() == A


async def test_a_listener_blend_plays_now_and_the_rate_limit_holds(make):
    client = await make()
    blend = [{"text": "warm jazz trio", "weight": 0.7}, {"text": "rain on a window", "weight": 0.3}]
    status, body = await call(client, "POST", "/prompt", {"prompt": blend}, who("192.0.2.1"))
    assert status == 202, body
    assert (
        body["source"] == "listener"
        and body["prompt"] == "warm jazz trio 70% + rain on a window 30%"
    )
    assert body["heard_in_seconds"] > 0 and body["frame"] > 0
    await on_air(client, "warm jazz trio")  # ICY and Icecast show the dominant text
    status, station = await call(client, "GET", "")
    assert station["blend"] == blend and station["history"][0]["source"] == "listener"
    assert station["programme"]["playing"]["source"] == "listener"
    assert station["programme"]["next"]["why"] == "prompt_end"  # it plays until the next tick
    status, body = await call(client, "POST", "/prompt", {"prompt": blend}, who("192.0.2.1"))
    assert (status, body["unchanged"]) == (202, True)  # it plays already
    status, body = await call(client, "POST", "/prompt", {"prompt": "x"}, who("192.0.2.1"))
    assert status == 429 and "too many prompt changes" in body["error"]
    status, body = await call(client, "POST", "/prompt", {"prompt": "x"}, who("192.0.2.2"))
    assert status == 202  # another address
    status, body = await call(
        client, "POST", "/prompt", {"prompt": "y", "transition_seconds": 6}, ADMIN
    )
    assert status == 202 and body["source"] == "admin"
    assert programme(client).director.current.transition_seconds == 6.0


async def test_the_queue_takes_suggestions_votes_and_plays_the_winner_at_the_tick(make, clock):
    client = await make(listener_prompts="queue")
    prog = programme(client)
    status, body = await call(client, "POST", "/prompt", {"prompt": "french chanson"}, who("a"))
    assert status == 202 and body["suggestion"]["votes"] == 1 and body["position"] == 1
    first = body["suggestion"]["id"]
    status, body = await call(client, "POST", "/suggestions", {"prompt": "cumbia"}, who("b"))
    assert status == 202 and body["position"] == 2
    second = body["suggestion"]["id"]
    status, body = await call(client, "POST", "/suggestions", {"prompt": "cumbia"}, who("b"))
    assert status == 409 and "already has your vote" in body["error"]
    status, body = await call(client, "POST", f"/suggestions/{second}/vote", None, who("c"))
    assert status == 200 and body["suggestion"]["votes"] == 2
    status, body = await call(client, "POST", f"/suggestions/{second}/vote", None, who("c"))
    assert status == 409 and body["error"].endswith("already has your vote")
    status, body = await call(client, "POST", "/suggestions/999/vote", None, who("c"))
    assert status == 404 and "no suggestion #999" in body["error"]
    for voter in ("d", "e", "g"):
        assert (await call(client, "POST", f"/suggestions/{first}/vote", None, who(voter)))[
            0
        ] == 200
    status, body = await call(client, "POST", "/prompt", {"prompt": "polka"}, who("a"))
    assert status == 202 and body["position"] == 3
    third = body["suggestion"]["id"]
    # vote_rate_limit "3 per 60 s": upvotes and skip votes together, per address
    assert (await call(client, "POST", f"/suggestions/{second}/vote", None, who("g")))[0] == 200
    assert (await call(client, "POST", "/skip", None, who("g")))[0] == 200
    r = await client.post(f"/api/stations/main/suggestions/{third}/vote", headers=who("g"))
    assert r.status == 429 and int(r.headers["Retry-After"]) > 50
    assert "too many votes" in (await r.json())["error"]
    # suggestion_rate_limit "2 per 600 s"
    status, body = await call(client, "POST", "/prompt", {"prompt": "reggae"}, who("a"))
    assert status == 429 and "too many suggestions" in body["error"]
    status, queue = await call(client, "GET", "/suggestions")
    assert [(s["text"], s["votes"]) for s in queue["queue"]] == [
        ("french chanson", 4),
        ("cumbia", 3),
        ("polka", 1),
    ]
    assert queue["listener_prompts"] == "queue" and queue["skip"]["votes"] == 1

    nxt = prog.director.upcoming()
    assert (nxt.why, nxt.source, nxt.blend) == ("rotation", "vote", None)
    clock.advance(nxt.at - clock() + 0.5)  # the rotation tick: the most-voted plays
    await on_air(client, "french chanson")
    status, station = await call(client, "GET", "")
    assert station["history"][0]["source"] == "vote"
    assert station["programme"]["playing"]["reason"].startswith(f"suggestion #{first}")
    assert [s["text"] for s in station["programme"]["queue"]] == ["cumbia", "polka"]

    status, body = await call(client, "DELETE", f"/suggestions/{second}", None, ADMIN)
    assert status == 200 and body["removed"]["text"] == "cumbia"
    status, body = await call(client, "DELETE", "/suggestions/x1", None, ADMIN)
    assert status == 404
    status, body = await call(client, "DELETE", f"/suggestions/{second}", None, ADMIN)
    assert status == 404
    status, body = await call(client, "DELETE", "/suggestions", None, ADMIN)
    assert (status, body["removed"]) == (200, 1)


async def test_a_skip_vote_moves_the_rotation_on(make):
    client = await make()
    prog = programme(client)
    before = prog.director.current.blend.describe()
    after = B if before == A else A
    status, body = await call(client, "POST", "/skip", None, who("a"))
    assert status == 200 and body["skip"] == {"votes": 1, "needed": 2, "passed": False}
    status, body = await call(client, "POST", "/skip", None, who("a"))
    assert status == 409 and "already voted to skip" in body["error"]
    status, body = await call(client, "POST", "/skip", None, who("b"))
    assert status == 200 and body["skip"]["passed"] and body["prompt"] == after
    assert body["source"] == "vote" and body["heard_in_seconds"] > 0
    await on_air(client, after)


async def test_the_admin_pins_and_unpins_and_nothing_else_changes_the_music(make, clock):
    client = await make()
    pin = {"prompt": [{"text": "quiet guitar", "weight": 2}, {"text": "birds"}], "minutes": 90}
    status, body = await call(client, "POST", "/pin", pin, ADMIN)
    assert status == 202 and body["source"] == "admin"
    status, body = await call(client, "POST", "/prompt", {"prompt": "metal"}, who("a"))
    assert status == 403 and "pinned" in body["error"]
    status, body = await call(client, "POST", "/skip", None, who("a"))
    assert status == 403
    clock.advance(3600)  # rotation ticks pass under the pin
    programme(client).tick()
    status, station = await call(client, "GET", "")
    assert station["programme"]["pinned"]["text"] == "quiet guitar 67% + birds 33%"
    assert station["programme"]["next"]["why"] == "pin_end"
    await on_air(client, "quiet guitar")
    status, body = await call(client, "DELETE", "/pin", None, ADMIN)
    assert status == 202 and body["source"] == "schedule" and body["prompt"] in (A, B)


async def test_a_schedule_edit_and_the_queue_survive_a_restart(make, tmp_path, clock):
    state = str(tmp_path / "state.json")
    client = await make(state, listener_prompts="queue")
    new = {
        "timezone": "Europe/Paris",
        "transition_seconds": 3,
        "schedule": [
            {"name": "all day", "start": "00:00", "end": "24:00",
             "prompts": ["morning mist", [{"text": "harp", "weight": 1}, {"text": "wind"}]],
             "rotate_minutes": 30, "order": "listed"}
        ],
    }  # fmt: skip
    status, body = await call(client, "PUT", "/schedule", new, ADMIN)
    assert status == 200 and body["edited"] and body["programme"]["timezone"] == "Europe/Paris"
    assert body["programme"]["schedule"][0]["prompts"][1] == [
        {"text": "harp", "weight": 0.5},
        {"text": "wind", "weight": 0.5},
    ]
    assert body["today"][0]["name"] == "all day" and body["today"][0]["current"]
    status, body = await call(client, "POST", "/prompt", {"prompt": "fado"}, who("a"))
    await call(client, "POST", f"/suggestions/{body['suggestion']['id']}/vote", None, who("b"))
    playing = programme(client).director.current.blend.describe()
    assert playing in ("morning mist", "harp 50% + wind 50%")
    await client.close()  # the app shuts down: the state file is written

    again = await make(state, listener_prompts="queue")
    status, body = await call(again, "GET", "/schedule")
    assert body["edited"] and body["programme"]["schedule"][0]["name"] == "all day"
    status, queue = await call(again, "GET", "/suggestions")
    assert [(s["text"], s["votes"]) for s in queue["queue"]] == [("fado", 2)]
    status, body = await call(again, "POST", "/suggestions/1/vote", None, who("b"))
    assert status == 409  # the votes came back (as digests of the addresses)
    status, station = await call(again, "GET", "")
    assert station["prompt"] == playing and station["programme"]["playing"]["text"] == playing
