"""config.toml and its loader: every key documented with its default, bad keys named."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from radio.config import (
    Config,
    ConfigError,
    load_config,
    parse_config,
    section_keys,
    with_overrides,
)

REPO = Path(__file__).resolve().parents[2]


def test_config_toml_lists_every_key_with_its_default():
    with open(REPO / "config.toml", "rb") as f:
        data = tomllib.load(f)
    defaults = Config()
    for section in ("server", "model", "generation", "audio", "hls", "security", "clips"):
        keys = set(section_keys(section))
        assert set(data[section]) == keys, (
            f"[{section}] in config.toml differs from radio/config.py"
        )
        table = parse_config({section: data[section]}, env={})
        assert getattr(table, section) == getattr(defaults, section), f"[{section}] defaults"
    assert load_config(REPO / "config.toml", env={}) == defaults


def test_every_key_has_a_comment():
    for line in (REPO / "config.toml").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line.split("=", 1)[1], f"no comment on: {line}"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"generation": {"top_k": -1}}, "generation.top_k: must be in [0, 2048], got -1"),
        ({"generation": {"top_k": 2**63}}, "generation.top_k: must be in [0, 2048]"),
        ({"generation": {"prompt_horizon": -2}}, "generation.prompt_horizon: must be -1 (auto)"),
        ({"generation": {"chunk_seconds": "fast"}}, 'generation.chunk_seconds: must be "auto" or'),
        ({"generation": {"chunk_seconds": 5}}, "generation.chunk_seconds: must be in [0.02, 2]"),
        ({"generation": {"chunk_seconds": True}}, "generation.chunk_seconds: must be"),
        (
            {"generation": {"steady_chunk_seconds": "big"}},
            'generation.steady_chunk_seconds: must be "auto" or',
        ),
        (
            {"generation": {"steady_chunk_seconds": 3}},
            "generation.steady_chunk_seconds: must be in [0.02, 2]",
        ),
        (
            {"generation": {"buffer_ahead": 2, "steady_chunk_seconds": 1.5}},
            "generation.steady_chunk_seconds: must be at most half of buffer_ahead (2.0)",
        ),
        (
            {"generation": {"chunk_seconds": 0.4, "steady_chunk_seconds": 0.3}},
            "generation.steady_chunk_seconds: must be at least chunk_seconds (0.4), got 0.3",
        ),
        ({"generation": {"temperature": 0}}, "generation.temperature: must be in [0.05, 5.0]"),
        ({"generation": {"temperature": 1e-320}}, "generation.temperature: must be in"),
        ({"generation": {"temperature": float("inf")}}, "generation.temperature: must be in"),
        ({"generation": {"guidance_scale": 1e308}}, "generation.guidance_scale: must be in"),
        ({"generation": {"guidance_scale": float("nan")}}, "generation.guidance_scale: must be"),
        ({"generation": {"top_p": 1.5}}, "generation.top_p: must be in [0.0, 1.0]"),
        ({"generation": {"window": 100, "context": 500}}, "generation.window"),
        ({"generation": {"topk": 5}}, "generation.topk: unknown key"),
        ({"colour": "blue"}, "colour: unknown key"),
        ({"server": {"port": "80"}}, "server.port: must be an integer"),
        ({"server": {"port": 70000}}, "server.port: must be in"),
        ({"hls": {"enabled": 1}}, "hls.enabled: must be true or false"),
        ({"hls": {"playlist_segments": 2}}, "hls.playlist_segments"),
        ({"audio": {"mp3_bitrate": 100}}, "audio.mp3_bitrate"),
        ({"model": {"dtype": "int3"}}, "model.dtype"),
        ({"model": {"compile": "fast"}}, "model.compile: must be one of"),
        ({"model": {"kv_cache": "int2"}}, "model.kv_cache: must be one of"),
        ({"model": {"codec": "float16"}}, "model.codec: must be one of"),
        ({"model": {"compile": "graphs", "device": "cpu"}}, "model.compile: graphs need a CUDA"),
        ({"security": {"prompt_rate_limit": "many"}}, "security.prompt_rate_limit"),
        ({"security": {"admin_token": "short"}}, "security.admin_token"),
        ({"clips": {"max_seconds": 45}}, "clips.max_seconds: must be in (0, 30], got 45.0"),
        ({"clips": {"max_bytes": 10}}, "clips.max_bytes: must be in [1024, 500000000], got 10"),
        ({"clips": {"min_seconds": 0.0}}, "clips.min_seconds"),
        ({"clips": {"silence_dbfs": 3.0}}, "clips.silence_dbfs"),
        ({"stations": []}, "stations: at least one"),
        ({"stations": [{"id": "Main Room"}]}, "stations[0].id"),
        ({"stations": [{"id": "a"}, {"id": "a"}]}, "stations[1].id: 'a' is used twice"),
        ({"stations": [{"id": "a", "mood": "x"}]}, "stations[0].mood: unknown key"),
        ({"stations": {"id": "a"}}, "stations: must be an array"),
    ],
)
def test_bad_settings_name_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        parse_config(data, env={})
    assert message in str(e.value)


def test_chunk_seconds_auto_is_short_for_one_station_and_longer_for_several():
    auto = parse_config({}, env={}).generation
    assert auto.chunk_seconds == "auto"
    assert (auto.chunk_for(1), auto.chunk_for(2), auto.chunk_for(8)) == (0.2, 0.4, 0.4)
    small = parse_config({"generation": {"buffer_ahead": 0.6}}, env={}).generation
    assert small.chunk_for(3) == 0.3  # at most half of what is buffered
    fixed = parse_config({"generation": {"chunk_seconds": 1}}, env={}).generation
    assert fixed.chunk_seconds == 1.0 and fixed.chunk_for(4) == 1.0


def test_steady_chunks_are_half_a_second_and_never_shorter_than_the_chunk():
    auto = parse_config({}, env={}).generation
    assert (auto.steady_chunk_for(1), auto.steady_chunk_for(3)) == (0.5, 0.5)
    small = parse_config({"generation": {"buffer_ahead": 1.2}}, env={}).generation
    assert small.steady_chunk_for(1) == 0.3  # a quarter of what is buffered ...
    assert small.steady_chunk_for(2) == 0.4  # ... but never shorter than the chunk
    fixed = parse_config({"generation": {"chunk_seconds": 1}}, env={}).generation
    assert fixed.steady_chunk_for(1) == 1.0
    same = parse_config({"generation": {"steady_chunk_seconds": 0.2}}, env={}).generation
    assert same.steady_chunk_for(1) == 0.2 and same.steady_chunk_for(2) == 0.4


def test_values_and_env_and_overrides(tmp_path):
    path = tmp_path / "radio.toml"
    path.write_text(
        '[generation]\ntemperature = 1\n[security]\nprompt_rate_limit = "5 per 10 s"\n'
        '[[stations]]\nid = "a"\n[[stations]]\nid = "b"\nprompt = "rain"\n'
    )
    c = load_config(path, env={"RADIO_ADMIN_TOKEN": "from-the-env"})
    temperature = c.generation.sampling.temperature
    assert temperature == 1.0 and isinstance(temperature, float)
    assert c.security.rate_limit() == (5, 10.0)
    assert c.security.admin_token == "from-the-env"
    assert [s.id for s in c.stations] == ["a", "b"] and c.station("b").prompt == "rain"
    c2 = with_overrides(c, server={"port": 9000}, model={"id": "/models/x"})
    assert (c2.server.port, c2.model.model) == (9000, "/models/x")  # LoadOptions.model
    c3 = with_overrides(c, generation={"top_k": 7, "window": 1000, "seed": 3})
    assert (c3.generation.sampling.top_k, c3.generation.windows.window) == (7, 1000)
    assert c3.generation.sampling_options(1).seed == 4
    assert c3.generation.sampling.temperature == 1.0  # the rest kept
    with pytest.raises(ConfigError, match="server.port"):
        with_overrides(c, server={"port": -1})
    with pytest.raises(ConfigError, match="model.id: must name a hub id"):
        with_overrides(c, model={"id": ""})
    with pytest.raises(ConfigError, match="generation.greedy: unknown key"):
        with_overrides(c, generation={"greedy": True})


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    path = tmp_path / "radio.toml"
    path.write_text("[generation]\ntop_k = -3\n")
    p = subprocess.run(
        [sys.executable, "-m", "radio.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert p.stderr.strip() == "radio: generation.top_k: must be in [0, 2048], got -3"


def test_a_setting_this_machine_cannot_run_names_its_key(tmp_path, tiny_model_dir):
    """Resolved at load (`engine.settings`): one line naming the key as config.toml does."""
    path = tmp_path / "radio.toml"
    path.write_text(f'[model]\nid = "{tiny_model_dir}"\nkv_cache = "int8"\n')
    p = subprocess.run(
        [sys.executable, "-m", "radio.cli", "serve", "--config", str(path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ENDLESS_RADIO_KERNELS": "0"},
    )
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last == "radio: model.kv_cache: int8 needs our CPU kernels: ENDLESS_RADIO_KERNELS=0"


def test_the_radio_makes_longer_chunks_for_several_stations(tiny_model_dir, caplog):
    """`chunk_seconds = "auto"` as `radio serve` resolves it: 0.2 s for one station, 0.4 s for
    two (said at start); a number is taken as it is."""
    import logging

    from engine import LoadOptions, MusicModel
    from radio.app import build_radio

    caplog.set_level(logging.INFO, logger="radio.app")
    model = MusicModel.load(LoadOptions(model=tiny_model_dir, quantize="none"))
    rate = model.frame_rate
    one = parse_config({}, env={})
    two = parse_config(two_stations(), env={})
    assert build_radio(one, model).generator.chunk_frames == round(0.2 * rate)
    assert build_radio(two, model).generator.chunk_frames == round(0.4 * rate)
    assert build_radio(one, model).generator.steady_frames == round(0.5 * rate)
    assert "0.4 s of audio a step for 2 station(s), 0.5 s once they have 1.0 s ahead" in caplog.text
    fixed = parse_config({"generation": {"chunk_seconds": 0.1}, **two_stations()}, env={})
    assert build_radio(fixed, model).generator.chunk_frames == round(0.1 * rate)


def two_stations() -> dict:
    return {"stations": [{"id": "a"}, {"id": "b"}]}
