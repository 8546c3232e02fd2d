"""The director with a fake clock: a café's day (slots, rotation, the station's prompt between
slots), listener prompts now / queue / off, holds, skips, pins, daylight-saving days, restarts
through to_state / from_state, and the now-playing JSON."""

from __future__ import annotations

import datetime as dt
import json
import tomllib
from pathlib import Path

import pytest

from engine.blend import Blend
from radio.config import parse_config, with_programme
from radio.programme.changes import Change
from radio.programme.director import Director
from radio.programme.votes import Refused

PARIS = dt.timezone(dt.timedelta(hours=2))  # CEST, for writing June times by hand
MIN = 60.0
A, B, C = (Blend.of(x) for x in ("gentle acoustic guitar", "soft bossa nova", "calm piano"))
LUNCH = Blend.of("upbeat swing jazz")
HOUSE = Blend.of("calm lofi beat")
SUGGESTED = Blend.parse([{"text": "slow jazz", "weight": 3}, {"text": "rain", "weight": 1}])


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def at(self, *args: int, tz: dt.tzinfo = PARIS) -> FakeClock:
        self.t = dt.datetime(*args, tzinfo=tz).timestamp()
        return self

    def advance(self, minutes: float) -> FakeClock:
        self.t += minutes * MIN
        return self


def paris(*args: int) -> float:
    return dt.datetime(*args, tzinfo=PARIS).timestamp()


def cafe(**station) -> dict:
    """A café: mornings rotate three moods every 20 min, lunch one mood, otherwise the house
    prompt; Europe/Paris."""
    return {
        "id": "cafe",
        "prompt": "calm lofi beat",
        "timezone": "Europe/Paris",
        "transition_seconds": 8.0,
        "schedule": [
            {
                "name": "morning",
                "days": "mon-fri",
                "start": "07:00",
                "end": "11:30",
                "prompts": ["gentle acoustic guitar", "soft bossa nova", "calm piano"],
                "rotate_minutes": 20,
                "transition_seconds": 12.0,
            },
            {
                "name": "lunch",
                "days": "mon-fri",
                "start": "11:30",
                "end": "14:30",
                "prompts": ["upbeat swing jazz"],
            },
        ],
        **station,
    }


def director(clock: FakeClock, **station) -> Director:
    config = parse_config({"stations": [cafe(**station)]}, env={})
    return Director(config.stations[0], clock)


def plays(d: Director) -> tuple[Blend, str]:
    change = d.tick()
    assert change is not None, "expected a change"
    return change.blend, change.source


def test_a_cafe_day_slots_rotation_and_the_house_prompt_between():
    clock = FakeClock(0).at(2026, 6, 1, 6, 59)  # a Monday
    d = director(clock)
    first = d.start()
    assert (first.blend, first.source, first.reason) == (HOUSE, "config", "the station's prompt")
    assert d.tick() is None
    nxt = d.upcoming()
    assert (nxt.at, nxt.why, nxt.blend, nxt.source) == (paris(2026, 6, 1, 7), "slot", A, "schedule")
    clock.at(2026, 6, 1, 7, 0, 0, 300_000)  # the loop ticks a little after the boundary
    change = d.tick()
    assert change == Change(A, "schedule", paris(2026, 6, 1, 7), 12.0, "slot 'morning' starts")
    clock.advance(19)
    assert d.tick() is None
    assert d.upcoming().at == paris(2026, 6, 1, 7, 20) and d.upcoming().why == "rotation"
    clock.advance(1)
    change = d.tick()
    assert (change.blend, change.source, change.at) == (B, "rotation", paris(2026, 6, 1, 7, 20))
    assert change.reason == "rotation: prompt 2 of 3"
    clock.advance(20)
    assert plays(d) == (C, "rotation")
    clock.advance(20)
    assert plays(d) == (A, "rotation")
    clock.at(2026, 6, 1, 11, 29)
    assert plays(d)[0] in (A, B, C)  # many ticks were missed: the item due now
    assert d.upcoming().blend == LUNCH and d.upcoming().why == "slot"
    clock.at(2026, 6, 1, 11, 30)
    change = d.tick()
    assert (change.blend, change.source, change.transition_seconds) == (LUNCH, "schedule", 8.0)
    clock.at(2026, 6, 1, 14, 30)
    assert plays(d) == (HOUSE, "config")
    assert d.upcoming().at == paris(2026, 6, 2, 7)  # Tuesday's morning slot
    assert d.scheduled(paris(2026, 6, 2, 7, 45)).blend == C  # Tuesday, third 20-minute tick
    clock.at(2026, 6, 6, 10)  # Saturday: no slots at all
    assert d.tick() is None and d.upcoming().at == paris(2026, 6, 8, 7)


def test_today_and_now_playing():
    clock = FakeClock(0).at(2026, 6, 1, 12)
    d = director(clock)
    d.start()
    today = d.today()
    assert [(s["name"], s["start"], s["end"], s["current"]) for s in today] == [
        ("morning", "07:00", "11:30", False),
        ("lunch", "11:30", "14:30", True),
    ]
    np = d.now_playing(listeners=3)
    assert np["playing"]["text"] == "upbeat swing jazz" and np["playing"]["source"] == "schedule"
    assert np["slot"]["name"] == "lunch" and np["next"]["at"] == paris(2026, 6, 1, 14, 30)
    assert np["next"]["source"] == "config" and np["transition"] is None
    assert np["skip"] == {"votes": 0, "needed": 2, "passed": False}
    json.dumps(np)  # JSON all the way down
    clock.at(2026, 6, 1, 14, 30, 4)
    d.tick()
    tr = d.now_playing()["transition"]
    assert tr["progress"] == 0.5 and tr["from"] == LUNCH.to_json() and tr["to"] == HOUSE.to_json()
    assert Blend.parse(tr["blend"]) == Blend.glide(LUNCH, HOUSE, 0.5)


def test_listener_prompts_now_last_until_the_programme_moves_on():
    clock = FakeClock(0).at(2026, 6, 1, 7, 5)
    d = director(clock)
    d.start()
    assert d.listener_prompt("10.0.0.1", SUGGESTED) is None
    change = d.tick()
    assert (change.blend, change.source, change.at) == (SUGGESTED, "listener", clock.t)
    assert d.upcoming().at == paris(2026, 6, 1, 7, 20) and d.upcoming().blend == B
    clock.at(2026, 6, 1, 7, 20)
    assert plays(d) == (B, "rotation")
    # no schedule at all: a listener's prompt plays until the next one, as it always did
    plain = Director(parse_config({"stations": [{"id": "x"}]}, env={}).stations[0], clock)
    plain.start()
    plain.listener_prompt("10.0.0.1", SUGGESTED)
    assert plays(plain) == (SUGGESTED, "listener")
    clock.advance(60 * 24 * 30)
    assert plain.tick() is None and plain.upcoming() is None


def test_off_refuses_listeners():
    d = director(FakeClock(0).at(2026, 6, 1, 7, 5), listener_prompts="off")
    d.start()
    for call in (
        lambda: d.listener_prompt("10.0.0.1", SUGGESTED),
        lambda: d.skip("10.0.0.1", 5),
        lambda: d.upvote("10.0.0.1", 1),
    ):
        with pytest.raises(Refused) as e:
            call()
        assert e.value.code == "off"


def test_queue_mode_takes_the_most_voted_at_the_next_tick_holds_it_then_resumes():
    clock = FakeClock(0).at(2026, 6, 1, 7, 5)
    d = director(clock, listener_prompts="queue", listener_hold_minutes=10)
    d.start()
    first = d.listener_prompt("10.0.0.1", Blend.of("first idea"))
    s = d.listener_prompt("10.0.0.2", SUGGESTED)
    d.upvote("10.0.0.3", s.id)
    assert first.id == 1 and s.votes == 2
    assert d.tick() is None  # suggestions wait for the tick
    assert d.upcoming().at == paris(2026, 6, 1, 7, 20) and d.upcoming().source == "vote"
    assert d.upcoming().blend is None  # whichever wins by then
    clock.at(2026, 6, 1, 7, 20, 1)
    change = d.tick()
    assert (change.blend, change.source, change.at) == (SUGGESTED, "vote", paris(2026, 6, 1, 7, 20))
    assert change.reason == "suggestion #2 (2 votes)"
    assert [q["id"] for q in d.now_playing()["queue"]] == [1]
    nxt = d.upcoming()
    # the hold ends at 07:30: B (due by the rotation clock since 07:20) plays until 07:40
    assert (nxt.at, nxt.why, nxt.blend, nxt.source) == (
        paris(2026, 6, 1, 7, 30),
        "hold_end",
        B,
        "schedule",
    )
    clock.at(2026, 6, 1, 7, 30)
    change = d.tick()
    assert (change.blend, change.source, change.at) == (B, "schedule", paris(2026, 6, 1, 7, 30))
    assert change.reason == "the schedule resumes after suggestion #2 (2 votes)"
    clock.at(2026, 6, 1, 7, 40)  # the next tick takes the remaining suggestion
    assert plays(d) == (Blend.of("first idea"), "vote")
    clock.at(2026, 6, 1, 7, 50)
    assert plays(d) == (C, "schedule")
    clock.at(2026, 6, 1, 8, 0)
    assert plays(d) == (A, "rotation")


def test_a_hold_stops_at_the_slot_boundary_and_stale_ticks_take_nothing():
    clock = FakeClock(0).at(2026, 6, 1, 11, 15)
    d = director(clock, listener_prompts="queue", listener_hold_minutes=30)
    d.start()
    d.listener_prompt("10.0.0.1", SUGGESTED)
    clock.at(2026, 6, 1, 11, 20)
    assert plays(d) == (SUGGESTED, "vote")
    assert d.upcoming().at == paris(2026, 6, 1, 11, 30) and d.upcoming().blend == LUNCH
    clock.at(2026, 6, 1, 11, 30)
    assert plays(d) == (LUNCH, "schedule")
    # lunch does not rotate: the queue is looked at every hold (30 min) from 11:30
    d.listener_prompt("10.0.0.2", A)
    assert d.upcoming().at == paris(2026, 6, 1, 12, 0) and d.upcoming().why == "queue"
    clock.at(2026, 6, 1, 12, 0)
    assert plays(d) == (A, "vote")
    # after a long outage a tick whose hold is already over takes nothing
    d2 = director(FakeClock(paris(2026, 6, 1, 7, 5)), listener_prompts="queue")
    d2.start()
    d2.listener_prompt("10.0.0.1", SUGGESTED)
    d2.clock.t = paris(2026, 6, 1, 7, 39)  # the 07:20 tick was missed; 07:20 + 10 min is past
    assert d2.tick().blend == B and len(d2.votes.suggestions) == 1


def test_queue_without_a_schedule_picks_every_hold_then_returns_to_the_prompt():
    clock = FakeClock(0).at(2026, 6, 1, 9, 3, tz=dt.UTC)
    d = Director(
        parse_config(
            {"stations": [{"id": "x", "prompt": "house", "listener_prompts": "queue"}]}, env={}
        ).stations[0],
        clock,
    )
    assert d.start().blend == Blend.of("house")
    d.listener_prompt("10.0.0.1", SUGGESTED)
    nxt = d.upcoming()
    assert nxt.at == dt.datetime(2026, 6, 1, 9, 10, tzinfo=dt.UTC).timestamp()  # every 10 min
    clock.advance(7)
    assert plays(d) == (SUGGESTED, "vote")
    clock.advance(10)
    assert plays(d) == (Blend.of("house"), "config")


def test_skip_moves_the_rotation_on_with_a_full_period():
    clock = FakeClock(0).at(2026, 6, 1, 7, 5)
    d = director(clock, skip_threshold=0.5, skip_minimum=2)
    d.start()
    t1 = d.skip("10.0.0.1", listeners=6)
    assert (t1.votes, t1.needed, t1.passed) == (1, 3, False)
    with pytest.raises(Refused) as e:
        d.skip("10.0.0.1", listeners=6)
    assert e.value.code == "already_voted"
    d.skip("10.0.0.2", listeners=6)
    clock.advance(1)
    assert d.skip("10.0.0.3", listeners=6).passed
    change = d.tick()
    assert (change.blend, change.source, change.at) == (B, "vote", paris(2026, 6, 1, 7, 6))
    assert change.reason == "skip vote (3 of 3 needed)"
    assert d.upcoming().at == paris(2026, 6, 1, 7, 26)  # a full 20 minutes for B
    clock.at(2026, 6, 1, 7, 26)
    assert plays(d) == (C, "rotation")
    assert d.now_playing(6)["skip"]["votes"] == 0  # a new item, a new count
    clock.at(2026, 6, 1, 12)  # lunch has one prompt: nothing to skip to
    d.tick()
    with pytest.raises(Refused) as e:
        d.skip("10.0.0.1", listeners=1)
    assert e.value.code == "no_skip"


def test_skip_ends_a_hold_but_not_an_admin_prompt():
    clock = FakeClock(0).at(2026, 6, 1, 7, 5)
    d = director(clock, listener_prompts="queue", skip_minimum=1, skip_threshold=0.1)
    d.start()
    d.listener_prompt("10.0.0.1", SUGGESTED)
    clock.at(2026, 6, 1, 7, 20)
    assert plays(d) == (SUGGESTED, "vote")
    clock.advance(2)
    assert d.skip("10.0.0.9", 1).passed
    assert plays(d) == (B, "vote")  # the schedule resumes because of the vote
    d.admin_prompt(LUNCH, transition_seconds=3)
    change = d.tick()
    assert (change.blend, change.source, change.transition_seconds) == (LUNCH, "admin", 3)
    with pytest.raises(Refused) as e:
        d.skip("10.0.0.8", 1)
    assert e.value.code == "pinned"


def test_a_pin_holds_until_unpinned_or_for_n_minutes_and_the_queue_waits():
    clock = FakeClock(0).at(2026, 6, 1, 7, 5)
    d = director(clock, listener_prompts="queue")
    d.start()
    d.pin(LUNCH)
    assert plays(d) == (LUNCH, "admin")
    d.listener_prompt("10.0.0.1", SUGGESTED)  # suggestions still queue and collect votes
    assert d.upcoming() is None
    clock.at(2026, 6, 1, 8, 30)  # five rotation ticks later: nothing moves a pin
    assert d.tick() is None and len(d.votes.suggestions) == 1
    with pytest.raises(Refused):
        d.skip("10.0.0.2", 1)
    assert d.unpin() and not d.unpin()
    change = d.tick()
    assert (change.blend, change.source, change.reason) == (B, "schedule", "unpinned by the admin")
    clock.at(2026, 6, 1, 8, 40)
    assert plays(d) == (SUGGESTED, "vote")  # the queue goes on at the next tick
    d.pin(LUNCH, minutes=15)  # replaces the hold
    assert plays(d) == (LUNCH, "admin")
    assert d.upcoming().at == paris(2026, 6, 1, 8, 55) and d.upcoming().why == "pin_end"
    clock.at(2026, 6, 1, 8, 55)
    assert plays(d) == (C, "schedule")  # the 08:40 item, until 09:00
    with pytest.raises(ValueError, match="minutes: must be in"):
        d.pin(C, minutes=0)


def test_a_clip_plays_until_the_next_change():
    clock = FakeClock(0).at(2026, 6, 1, 7, 5)
    d = director(clock)
    d.start()
    d.clip(SUGGESTED)
    change = d.tick()
    assert (change.source, change.transition_seconds) == ("clip", 0.0)
    clock.at(2026, 6, 1, 7, 20)
    assert plays(d) == (B, "rotation")


def test_rotation_ticks_in_real_minutes_across_both_daylight_saving_changes():
    def night(clock):
        station = cafe(
            schedule=[
                {
                    "days": "sun",
                    "start": "01:00",
                    "end": "04:00",
                    "prompts": ["a", "b", "c", "d", "e"],
                    "rotate_minutes": 60,
                }
            ]
        )
        return Director(parse_config({"stations": [station]}, env={}).stations[0], clock)

    def sequence(start_utc: float) -> list[tuple[str, float]]:
        clock = FakeClock(start_utc - 30 * MIN)
        d = night(clock)
        d.start()
        out = []
        for _ in range(6 * 12):  # five hours, every five minutes
            clock.advance(5)
            change = d.tick()
            if change is not None:
                out.append((change.blend.dominant, change.at))
        return out

    utc = lambda *a: dt.datetime(*a, tzinfo=dt.UTC).timestamp()  # noqa: E731
    # spring forward: 01:00 CET (00:00 UTC) to 04:00 CEST (02:00 UTC) is two real hours
    assert sequence(utc(2026, 3, 29, 0)) == [
        ("a", utc(2026, 3, 29, 0)),
        ("b", utc(2026, 3, 29, 1)),  # 03:00 CEST: ticks count real minutes
        ("calm lofi beat", utc(2026, 3, 29, 2)),
    ]
    # fall back: 01:00 CEST (23:00 UTC Saturday) to 04:00 CET (03:00 UTC) is four real hours
    assert sequence(utc(2026, 10, 24, 23)) == [
        ("a", utc(2026, 10, 24, 23)),
        ("b", utc(2026, 10, 25, 0)),
        ("c", utc(2026, 10, 25, 1)),  # 02:00 CET, the second time the clocks show 02:00
        ("d", utc(2026, 10, 25, 2)),
        ("calm lofi beat", utc(2026, 10, 25, 3)),
    ]


def test_a_slot_across_midnight_with_a_shuffled_rotation():
    clock = FakeClock(0).at(2026, 6, 5, 21, 59)  # a Friday
    station = cafe(
        schedule=[
            {
                "name": "late",
                "days": "fri",
                "start": "22:00",
                "end": "02:00",
                "prompts": ["a", "b", "c"],
                "rotate_minutes": 15,
                "order": "shuffled",
            }
        ]
    )
    d = Director(parse_config({"stations": [station]}, env={}).stations[0], clock)
    d.start()
    played = []
    for _ in range(4 * 60 + 2):
        clock.advance(1)
        change = d.tick()
        if change is not None:
            played.append(change.blend.dominant)
    assert played[-1] == "calm lofi beat" and len(played) == 4 * 4 + 1  # a change every 15 min
    items = played[:-1]
    assert all(x != y for x, y in zip(items, items[1:], strict=False))
    assert all(sorted(items[i : i + 3]) == ["a", "b", "c"] for i in range(0, 15, 3))
    # Saturday 01:00 still belongs to Friday's slot; reproducible after a restart
    again = Director(parse_config({"stations": [station]}, env={}).stations[0], clock)
    clock.at(2026, 6, 6, 1, 0)
    assert again.start().blend.dominant == items[12]


def run(d: Director, clock: FakeClock, minutes: int) -> list[tuple[str, str, float]]:
    out = []
    for _ in range(minutes):
        clock.advance(1)
        change = d.tick()
        if change is not None:
            out.append((change.blend.describe(), change.source, change.at))
    return out


def test_a_restart_goes_on_where_it_left_off():
    clock = FakeClock(0).at(2026, 6, 1, 7, 5)
    d = director(clock, listener_prompts="queue", skip_minimum=1, skip_threshold=0.1)
    d.start()
    d.listener_prompt("10.0.0.1", SUGGESTED)
    d.listener_prompt("10.0.0.2", Blend.of("second"))
    clock.at(2026, 6, 1, 7, 21)
    d.tick()  # the hold of suggestion #1 runs
    clock.at(2026, 6, 1, 7, 35)
    d.tick()
    assert d.skip("10.0.0.3", 1).passed  # skip B at 07:35: C plays until 07:55
    d.tick()
    d.pin(A, minutes=5)
    d.tick()
    saved = json.loads(json.dumps(d.to_state()))
    clock2 = FakeClock(clock.t)
    back = Director.from_state(d.station, saved, clock2)
    assert back.start() == d.current  # the same item, the same since: no change at start
    assert back.tick() is None
    assert run(back, clock2, 120) == run(d, clock, 120)
    assert back.now_playing() == d.now_playing()


def test_a_live_programme_edit_survives_a_restart_unless_config_toml_changed():
    clock = FakeClock(0).at(2026, 6, 1, 12)
    config = parse_config({"stations": [cafe()]}, env={}).stations[0]
    d = Director(config, clock)
    d.start()
    edited = with_programme(
        config, {"schedule": [{"start": "11:00", "end": "13:00", "prompts": ["brunch"]}]}
    )
    d.set_station(edited)
    assert plays(d) == (Blend.of("brunch"), "schedule")
    saved = json.loads(json.dumps(d.to_state()))
    assert Director.from_state(config, saved, clock).start().blend == Blend.of("brunch")
    changed = parse_config({"stations": [cafe(transition_seconds=2.0)]}, env={}).stations[0]
    back = Director.from_state(changed, saved, clock)  # the owner edited config.toml since
    assert back.start().blend == LUNCH and back.edited is None


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"format": 2}, "programme.format: expected 1, got 2"),
        (
            {"current": {"blend": "x", "source": "nobody", "at": 0, "transition_seconds": 0}},
            "programme.current.source",
        ),
        (
            {"current": {"blend": 5, "source": "config", "at": 0, "transition_seconds": 0}},
            "programme.current.blend",
        ),
        ({"overlay": {"kind": "forever"}}, "programme.overlay: expected {kind"),
        ({"anchor": {"slot": 0, "index": -1, "at": 0}}, "programme.anchor.index"),
        ({"resumed": [0, "config"]}, "programme.resumed: expected [at, source, reason]"),
        ({"checked": "soon"}, "programme.checked: expected a number"),
        ({"queue": []}, "programme.queue: expected an object"),
        ({"programme": {"settings": {"timezone": "Nowhere"}, "base": None}}, None),
    ],
)
def test_a_bad_saved_state_names_the_key(patch, message):
    clock = FakeClock(paris(2026, 6, 1, 12))
    config = parse_config({"stations": [cafe()]}, env={}).stations[0]
    data = {**Director(config, clock).to_state(), **patch}
    if message is None:  # an edit made on another config.toml is ignored, not an error
        assert Director.from_state(config, data, clock).edited is None
        return
    with pytest.raises(ValueError) as e:
        Director.from_state(config, data, clock)
    assert str(e.value).startswith(message), str(e.value)


def test_a_bad_saved_programme_edit_names_the_key():
    clock = FakeClock(paris(2026, 6, 1, 12))
    config = parse_config({"stations": [cafe()]}, env={}).stations[0]
    d = Director(config, clock)
    d.set_station(config)
    data = d.to_state()
    data["programme"]["settings"]["timezone"] = "Nowhere/Land"
    with pytest.raises(ValueError, match=r"^programme.programme.settings.timezone: 'Nowhere/Land'"):
        Director.from_state(config, data, clock)


def test_the_cafe_story_in_docs_programming_md():
    text = (Path(__file__).resolve().parents[3] / "docs" / "programming.md").read_text()
    toml = text.split("```toml\n", 1)[1].split("```", 1)[0]
    config = parse_config(tomllib.loads(toml), env={})
    clock = FakeClock(0).at(2026, 6, 1, 6, 0)  # a Monday
    d = Director(config.stations[0], clock)
    assert d.start().source == "config"
    clock.at(2026, 6, 1, 7, 0)
    assert d.tick().source == "schedule"
    clock.at(2026, 6, 1, 11, 30)
    assert plays(d) == (Blend.of("upbeat swing jazz quartet"), "schedule")
    clock.at(2026, 6, 1, 12, 0)
    assert plays(d)[0].describe() == "warm jazz trio 70% + busy café chatter 30%"
    clock.at(2026, 6, 1, 12, 10)
    s = d.listener_prompt("198.51.100.1", Blend.of("french chanson, accordion"))
    d.upvote("198.51.100.2", s.id), d.upvote("198.51.100.3", s.id)
    clock.at(2026, 6, 1, 12, 30)
    assert plays(d) == (Blend.of("french chanson, accordion"), "vote")
    clock.at(2026, 6, 1, 12, 40)
    assert plays(d) == (Blend.of("upbeat swing jazz quartet"), "schedule")
    clock.at(2026, 6, 1, 13, 0)
    assert plays(d)[1] == "rotation"
    clock.at(2026, 6, 1, 13, 5)
    assert [d.skip(f"198.51.100.{i}", 5).passed for i in (1, 2, 3)] == [False, False, True]
    assert plays(d) == (Blend.of("upbeat swing jazz quartet"), "vote")
    assert d.upcoming().at == paris(2026, 6, 1, 13, 35)
    clock.at(2026, 6, 1, 14, 30)
    assert plays(d) == (Blend.of("calm lofi beat with soft piano"), "config")
    clock.at(2026, 6, 1, 22, 0)
    d.tick()
    assert d.upcoming().at == paris(2026, 6, 2, 7, 0)
    clock.at(2026, 6, 6, 9, 0)  # Saturday brunch
    assert plays(d) == (Blend.of("sunny jazz manouche"), "schedule")
