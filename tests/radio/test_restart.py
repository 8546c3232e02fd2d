"""Restarts lose nothing: the prompt and its history come back from the state file, HLS
numbering goes on above the last segment with EXT-X-DISCONTINUITY, and a corrupt state file is
moved aside with a log line while the radio starts fresh."""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.request

from radio.config import parse_config
from tests.helpers import InProcessRadio, wait_healthy

PROMPT = "restart test: deep ambient drones"


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def _playlist(base: str, min_segments: int, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = _get(base + "/hls/main/live.m3u8").decode()
            if text.count("#EXTINF") >= min_segments:
                return text
        except OSError:
            pass
        assert time.monotonic() < deadline, f"no playlist with {min_segments} segments"
        time.sleep(0.2)


def _sequences(playlist: str) -> list[int]:
    first = int(re.search(r"#EXT-X-MEDIA-SEQUENCE:(\d+)", playlist).group(1))
    return list(range(first, first + playlist.count("#EXTINF")))


def _start(state_file, radio_model) -> InProcessRadio:
    data = {
        "server": {"host": "127.0.0.1", "state_file": str(state_file)},
        "generation": {"seed": 1},
        "security": {"prompt_rate_limit": "100 per 1 s"},
    }
    r = InProcessRadio(parse_config(data, env={}), radio_model)
    wait_healthy(r.base_url, timeout=30)
    return r


def test_restart_restores_prompt_history_and_hls_numbering(tmp_path, radio_model) -> None:
    state_file = tmp_path / "state.json"
    r1 = _start(state_file, radio_model)
    try:
        config_prompt = json.loads(_get(r1.base_url + "/api/stations/main"))["prompt"]
        req = urllib.request.Request(
            r1.base_url + "/api/stations/main/prompt",
            data=json.dumps({"prompt": PROMPT}).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert urllib.request.urlopen(req, timeout=20).status in (200, 202)
        before = _sequences(_playlist(r1.base_url, 2))
    finally:
        r1.close()  # the final save happens here
    saved = json.loads(state_file.read_text())["state"]["stations"]["main"]
    assert saved["prompt"] == PROMPT

    r2 = _start(state_file, radio_model)
    try:
        station = json.loads(_get(r2.base_url + "/api/stations/main"))
        assert station["prompt"] == PROMPT
        history = [h["prompt"] for h in station["history"]]
        assert history[:2] == [PROMPT, config_prompt]
        after = _playlist(r2.base_url, 1)
        assert _sequences(after)[0] > before[-1], (before, after)
        assert "#EXT-X-DISCONTINUITY" in after
    finally:
        r2.close()


def test_corrupt_state_file_is_moved_aside_and_the_radio_starts(tmp_path, radio_model, caplog):
    state_file = tmp_path / "state.json"
    state_file.write_text('{"version": 1, "state": {"stations": {"main": {"prom')
    with caplog.at_level(logging.ERROR, logger="radio.statefile"):
        r = _start(state_file, radio_model)
    try:
        assert "moved it to state.json.corrupt-" in caplog.text
        assert list(tmp_path.glob("state.json.corrupt-*"))
        assert json.loads(_get(r.base_url + "/api/stations/main"))["prompt"]
    finally:
        r.close()
    assert json.loads(state_file.read_text())["version"] == 1  # a fresh file was saved
