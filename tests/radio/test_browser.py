"""The web player in a real browser: headless Debian Chromium, driven by Playwright, against a
real `radio serve` on the tiny model.

What a listener does: open the page, press play, hear the station (HLS through hls.js, or the
MP3 mount), see the sound drawn, send a prompt and see it become the current one, and see a
prompt someone else sent appear without reloading (Server-Sent Events). Also saved: a
screenshot at /tmp/radio-page.png for a human to look at.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.conftest import require_tool

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-gpu",
]
SCREENSHOT = "/tmp/radio-page.png"
START_TIMEOUT = 60.0  # seconds for `radio serve` to answer (model load + first audio)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def _post_prompt(base: str, station: str, prompt: str) -> int:
    req = urllib.request.Request(
        f"{base}/api/stations/{station}/prompt",
        data=json.dumps({"prompt": prompt}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status


CONFIG = """
[server]
host = "127.0.0.1"
port = {port}

[hls]
segment_seconds = 1.0
playlist_segments = 6

[security]
prompt_rate_limit = "50 per 60 s"
max_prompt_length = 120

[[stations]]
id = "main"
name = "Browser Test FM"
description = "Random weights: noise, not music"
genre = "Test"
prompt = "calm lofi beat with piano"
"""


@pytest.fixture(scope="module")
def server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a `radio serve` subprocess on a free port; stopped with Ctrl-C (SIGINT)."""
    port = _free_port()
    folder = tmp_path_factory.mktemp("browser-radio")
    config = folder / "config.toml"
    config.write_text(CONFIG.format(port=port))
    log = (folder / "serve.log").open("w+b")
    proc = subprocess.Popen(
        [sys.executable, "-m", "radio.cli", "serve", "--config", str(config)]
        + ["--model", tiny_model_dir, "--port", str(port)],
        cwd=folder,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "CI": os.environ.get("CI", "")},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(base, proc, log)
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_until_up(base: str, proc: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(
                f"radio serve exited with {proc.returncode}:\n{log.read().decode()[-3000:]}"
            )
        try:
            if _get_json(f"{base}/api/stations")["stations"]:
                return
        except OSError:
            pass
        time.sleep(0.25)
    log.seek(0)
    pytest.fail(f"radio serve did not answer in {START_TIMEOUT} s:\n{log.read().decode()[-3000:]}")


@pytest.fixture(scope="module")
def browser():
    chromium = require_tool("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    """A fresh page that records console errors and uncaught exceptions in `page.errors`."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    pg = context.new_page()
    pg.errors = []
    pg.on("console", lambda m: m.type == "error" and pg.errors.append(f"console: {m.text}"))
    pg.on("pageerror", lambda e: pg.errors.append(f"exception: {e}"))
    yield pg
    context.close()


def _play(pg, url: str) -> None:
    pg.goto(url)
    pg.wait_for_selector("#play:not([disabled])", timeout=10_000)
    pg.click("#play")
    pg.wait_for_function("document.getElementById('audio').currentTime > 0", timeout=20_000)


def _advance(pg, seconds: float = 3.0) -> float:
    """How far the audio element's clock moves in `seconds` of wall time."""
    t0 = pg.eval_on_selector("#audio", "a => a.currentTime")
    pg.wait_for_timeout(seconds * 1000)
    return pg.eval_on_selector("#audio", "a => a.currentTime") - t0


def _shown_prompt(pg) -> str:
    return pg.text_content("#prompt")


def test_hls_plays_and_prompts_change_live(server: str, page) -> None:
    _play(page, server + "/")
    assert page.get_attribute("#audio", "data-mode") == "hls.js"
    moved = _advance(page)
    assert moved > 2.0, f"audio clock moved {moved:.2f} s in 3 s of wall time"
    # The Web Audio analyser hears the stream (noise at -14 LUFS, far above the floor).
    level = int(page.get_attribute("#meter", "aria-valuenow"))
    assert level > -50, f"level meter says {level} dBFS: no sound reaches Web Audio"
    assert "Browser Test FM" in page.text_content("#station-name")
    assert _shown_prompt(page) == "calm lofi beat with piano"

    # A prompt typed into the page: the server's answer is shown, then the prompt itself.
    page.fill("#prompt-input", "warm analog synthwave at dusk")
    page.press("#prompt-input", "Enter")
    page.wait_for_function(
        "document.getElementById('prompt-status').textContent.includes('hears it in')",
        timeout=5_000,
    )
    page.wait_for_function(
        "document.getElementById('prompt').textContent === 'warm analog synthwave at dusk'",
        timeout=10_000,
    )
    assert "warm analog synthwave at dusk" in page.text_content("#history")

    # A prompt sent by someone else reaches the open page without a reload.
    assert _post_prompt(server, "main", "bright marimba over soft rain") == 202
    page.wait_for_function(
        "document.getElementById('prompt').textContent === 'bright marimba over soft rain'",
        timeout=10_000,
    )
    assert page.text_content("#conn") == "live"
    assert page.text_content("#listener-count").endswith("listening")
    assert _advance(page, 1.0) > 0.5, "playback stalled after the prompt change"
    page.screenshot(path=SCREENSHOT, full_page=True)
    assert page.errors == []


def test_refused_prompt_shows_the_servers_reason(server: str, page) -> None:
    page.goto(server + "/")
    page.wait_for_selector("#play:not([disabled])")
    before = _shown_prompt(page)
    page.fill("#prompt-input", "x" * 121)  # max_prompt_length is 120
    page.click("#prompt-send")
    page.wait_for_selector("#prompt-status.error", timeout=5_000)
    reason = _get_reason(server, "x" * 121)
    assert page.text_content("#prompt-status") == reason
    assert _shown_prompt(page) == before
    assert [e for e in page.errors if "400" not in e and "422" not in e] == []


def _get_reason(base: str, prompt: str) -> str:
    req = urllib.request.Request(
        f"{base}/api/stations/main/prompt",
        data=json.dumps({"prompt": prompt}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        urllib.request.urlopen(req, timeout=5)
    except urllib.error.HTTPError as e:
        return json.load(e)["error"]
    raise AssertionError("the server accepted an over-long prompt")


def test_mp3_player_when_asked(server: str, page) -> None:
    _play(page, server + "/?player=mp3")
    assert page.get_attribute("#audio", "data-mode") == "mp3"
    moved = _advance(page)
    assert moved > 2.0, f"MP3 clock moved {moved:.2f} s in 3 s of wall time"
    assert page.errors == []


def test_falls_back_to_mp3_when_hls_fails(server: str, page) -> None:
    page.route("**/*.m3u8", lambda route: route.fulfill(status=404, body="gone"))
    _play(page, server + "/")
    page.wait_for_function(
        "document.getElementById('audio').dataset.mode === 'mp3'", timeout=10_000
    )
    assert "HLS failed" in page.text_content("#player-status")
    moved = _advance(page, 2.0)
    assert moved > 1.2, f"MP3 clock moved {moved:.2f} s in 2 s of wall time"
