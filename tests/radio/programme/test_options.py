"""The programme's config keys: the café example of config.toml loads, every key is documented
with its default, every bad value stops start-up with one line naming it."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from engine.blend import Blend
from radio.config import (
    PROGRAMME_KEYS,
    ConfigError,
    StationConfig,
    load_config,
    parse_config,
    programme_settings,
    with_programme,
)
from radio.programme.options import Days, SlotConfig

REPO = Path(__file__).resolve().parents[3]


def cafe_toml() -> str:
    """config.toml with its commented schedule example switched on."""
    text = (REPO / "config.toml").read_text()
    start = text.index("# [[stations.schedule]]")
    end = text.index("# Optional, per station: also push it")
    example = "\n".join(line.removeprefix("# ") for line in text[start:end].splitlines())
    return text[:start] + example.replace("\n#\n", "\n\n") + "\n" + text[end:]


def station(**keys) -> StationConfig:
    return parse_config({"stations": [{"id": "cafe", **keys}]}, env={}).stations[0]


def test_the_cafe_example_in_config_toml_loads(tmp_path):
    path = tmp_path / "cafe.toml"
    path.write_text(cafe_toml())
    (s,) = load_config(path, env={}).stations
    assert [slot.name for slot in s.schedule] == ["morning", "lunch", "evening"]
    morning, lunch, evening = s.schedule
    assert morning.days == Days((0, 1, 2, 3, 4)) and (morning.start, morning.end) == (
        "07:00",
        "11:30",
    )
    assert morning.order == "shuffled" and morning.rotate_minutes == 20.0
    assert morning.prompts[0] == Blend.of("gentle acoustic guitar, morning light")
    assert lunch.prompts[1].describe() == "warm jazz trio 70% + busy café chatter 30%"
    assert evening.days.label() == "daily" and evening.transition_seconds == -1


def test_every_station_key_is_in_config_toml_with_its_default_and_a_comment():
    text = (REPO / "config.toml").read_text()
    defaults = StationConfig()
    for f in dataclasses.fields(StationConfig):
        if f.name in ("icecast", "schedule"):
            assert f"[stations.{f.name}]" in text
            continue
        (line,) = [x for x in text.splitlines() if re.match(rf"^{f.name} = ", x)][-1:]
        value = tomllib.loads(line.split("#")[0] if f.name != "prompt" else line)[f.name]
        assert value == getattr(defaults, f.name), f"{f.name}: default differs in config.toml"
    for f in dataclasses.fields(SlotConfig):
        (line,) = [x for x in text.splitlines() if x.startswith(f"# {f.name} = ")][:1]
        assert "  # " in line, f"schedule key {f.name} has no comment"


def test_a_station_prompt_may_be_a_blend_and_a_text_stays_a_text():
    assert station(prompt="rain").prompt == "rain"
    assert station(prompt="rain").blend == Blend.of("rain")
    b = station(prompt=[{"text": "jazz", "weight": 3}, {"text": "rain", "weight": 1}])
    assert isinstance(b.prompt, Blend) and b.blend.describe() == "jazz 75% + rain 25%"


GOOD_SLOT = {"start": "07:00", "prompts": ["jazz"]}


def slot(**keys):
    return {"schedule": [{**GOOD_SLOT, **keys}]}


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"prompt": 3}, "stations[0].prompt: must be a string or a list of {text, weight}, got 3"),
        ({"prompt": "a\tb"}, "stations[0].prompt: must not contain control characters"),
        (
            {"prompt": [{"text": "a"}, {"text": "b", "weight": -1}]},
            "stations[0].prompt[1].weight: must be > 0, got -1",
        ),
        ({"transition_seconds": -1}, "stations[0].transition_seconds: must be in [0, 300], got -1"),
        ({"transition_seconds": "5"}, "stations[0].transition_seconds: must be a float"),
        ({"timezone": "Europe/Pariss"}, "stations[0].timezone: 'Europe/Pariss' is not an IANA"),
        ({"timezone": "../etc/passwd"}, "stations[0].timezone: '../etc/passwd' is not an IANA"),
        ({"listener_prompts": "vote"}, "stations[0].listener_prompts: must be one of ('now', "),
        ({"listener_hold_minutes": 0}, "stations[0].listener_hold_minutes: must be in [1, 1440]"),
        ({"skip_threshold": 1.5}, "stations[0].skip_threshold: must be in [0, 1] (0 = no skips)"),
        ({"skip_minimum": 0}, "stations[0].skip_minimum: must be in [1, 10000], got 0"),
        ({"skip_minimum": 2.5}, "stations[0].skip_minimum: must be an integer, got 2.5"),
        ({"suggestion_rate_limit": "lots"}, "stations[0].suggestion_rate_limit: must look like"),
        ({"vote_rate_limit": "3 per 0 s"}, "stations[0].vote_rate_limit: must look like"),
        ({"max_suggestions": 0}, "stations[0].max_suggestions: must be in [1, 1000], got 0"),
        ({"suggestion_minutes": 0.5}, "stations[0].suggestion_minutes: must be in [1, 10080]"),
        ({"schedule": {"start": "07:00"}}, "stations[0].schedule: must be an array"),
        (slot(colour="red"), "stations[0].schedule[0].colour: unknown key"),
        (slot(name="a\nb"), "stations[0].schedule[0].name: must not contain control characters"),
        (slot(days="weekdays"), "stations[0].schedule[0].days: 'weekdays' is not a day"),
        (slot(days="mon-fri-sun"), "stations[0].schedule[0].days: 'mon-fri-sun' is not a day"),
        (slot(days=[]), "stations[0].schedule[0].days: must name at least one day"),
        (slot(days=[1]), "stations[0].schedule[0].days: must be a string like 'mon-fri'"),
        (
            slot(start="7:00"),
            "stations[0].schedule[0].start: must be a time 'HH:MM' from 00:00 to 23:59",
        ),
        (slot(start="24:00"), "stations[0].schedule[0].start: must be a time 'HH:MM'"),
        (
            slot(end="25:00"),
            "stations[0].schedule[0].end: must be a time 'HH:MM' from 00:00 to 24:00",
        ),
        (slot(end="07:00"), "stations[0].schedule[0].end: must differ from start (07:00)"),
        (slot(prompts=[]), "stations[0].schedule[0].prompts: must list at least one prompt"),
        (slot(prompts="jazz"), "stations[0].schedule[0].prompts: must be an array"),
        (
            slot(prompts=["jazz", " jazz "]),
            "stations[0].schedule[0].prompts[1]: the same as prompts[0]",
        ),
        (
            slot(prompts=["a", [{"text": "b", "weight": 0}]]),
            "stations[0].schedule[0].prompts[1][0].weight: must be > 0",
        ),
        (
            slot(rotate_minutes=0.5),
            "stations[0].schedule[0].rotate_minutes: must be 0 (no rotation) or in [1, 1440]",
        ),
        (
            slot(order="random"),
            "stations[0].schedule[0].order: must be one of ('listed', 'shuffled')",
        ),
        (slot(transition_seconds=-2), "stations[0].schedule[0].transition_seconds: must be -1"),
        (
            {**slot(rotate_minutes=1), "transition_seconds": 90},
            "stations[0].schedule[0].transition_seconds: a 90 s glide does not fit in rotate_minutes (1 min)",
        ),
        (
            {
                "schedule": [
                    {"days": "sat", "start": "01:00", "prompts": ["a"]},
                    {"days": "mon-thu", "start": "08:00", "end": "09:00", "prompts": ["b"]},
                    {"days": "fri", "start": "22:00", "end": "02:00", "prompts": ["c"]},
                ]
            },
            "stations[0].schedule[2] (fri 22:00-02:00) overlaps stations[0].schedule[0] (sat 01:00-...)",
        ),
        (
            {
                "schedule": [
                    {"days": "sun", "start": "23:00", "end": "24:00", "prompts": ["b"]},
                    {"days": "sun", "start": "23:30", "end": "00:45", "prompts": ["c"]},
                ]
            },
            "stations[0].schedule[1] (sun 23:30-00:45) overlaps stations[0].schedule[0] (sun 23:00-24:00)",
        ),
        (
            {
                "schedule": [
                    {"days": "mon", "start": "00:30", "end": "01:00", "prompts": ["a"]},
                    {"days": "sun", "start": "23:30", "end": "00:45", "prompts": ["c"]},
                ]
            },
            "stations[0].schedule[1] (sun 23:30-00:45) overlaps stations[0].schedule[0] (mon 00:30-01:00)",
        ),
        (
            {
                "schedule": [
                    {"start": "08:00", "prompts": ["a"]},
                    {"days": "wed", "start": "08:00", "end": "09:00", "prompts": ["b"]},
                ]
            },
            "stations[0].schedule[1] (wed 08:00-09:00) overlaps stations[0].schedule[0] (wed 08:00-...)",
        ),
    ],
)
def test_bad_programme_values_name_the_key(keys, message):
    with pytest.raises(ConfigError) as e:
        parse_config({"stations": [{"id": "cafe", **keys}]}, env={})
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_slots_that_touch_or_run_on_until_the_next_do_not_overlap():
    s = station(
        schedule=[
            {"days": "daily", "start": "07:00", "end": "11:30", "prompts": ["a"]},
            {"days": "daily", "start": "11:30", "prompts": ["b"]},  # until 18:00
            {"days": "daily", "start": "18:00", "end": "07:00", "prompts": ["c"]},
        ]
    )
    assert [x.end_minutes for x in s.schedule] == [690, None, 420 + 1440]
    assert Days.parse("fri-mon").label() == "mon,fri-sun"
    assert Days.parse(["sat", "sun", "mon-wed"]).label() == "mon-wed,sat-sun"


def test_programme_settings_round_trip_through_with_programme():
    toml = tomllib.loads(cafe_toml())
    (s,) = parse_config({"stations": toml["stations"]}, env={}).stations
    s = dataclasses.replace(s, timezone="Europe/Paris", listener_prompts="queue")
    settings = programme_settings(s)
    assert set(settings) == set(PROGRAMME_KEYS)
    back = with_programme(StationConfig(), settings)
    assert all(getattr(back, k) == getattr(s, k) for k in PROGRAMME_KEYS)
    assert back.schedule[1].prompts == s.schedule[1].prompts and len(back.schedule) == 3
    assert with_programme(s, {"schedule": []}).schedule == ()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"id": "x"}, "programme.id: not a programme key (known: timezone, "),
        ({"timezone": "Mars/Olympus"}, "programme.timezone: 'Mars/Olympus' is not an IANA"),
        (
            {"schedule": [{"start": "noon", "prompts": ["a"]}]},
            "programme.schedule[0].start: must be",
        ),
        (
            {
                "schedule": [
                    {"start": "08:00", "prompts": ["a"]},
                    {"start": "08:00", "prompts": ["b"]},
                ]
            },
            "programme.schedule[1] (mon 08:00-...) overlaps programme.schedule[0] (mon 08:00-...)",
        ),
    ],
)
def test_live_programme_edits_are_checked_like_the_config(data, message):
    with pytest.raises(ConfigError) as e:
        with_programme(StationConfig(), data, where="programme")
    assert str(e.value).startswith(message), str(e.value)


def test_cli_refuses_an_overlapping_schedule_with_one_line(tmp_path):
    path = tmp_path / "radio.toml"
    path.write_text(
        '[[stations]]\nid = "cafe"\n'
        '[[stations.schedule]]\nstart = "08:00"\nend = "12:00"\nprompts = ["a"]\n'
        '[[stations.schedule]]\ndays = "sun"\nstart = "11:00"\nprompts = ["b"]\n'
    )
    p = subprocess.run(
        [sys.executable, "-m", "radio.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert p.stderr.strip() == (
        "radio: stations[0].schedule[1] (sun 11:00-...) overlaps stations[0].schedule[0] (sun 08:00-12:00)"
    )
