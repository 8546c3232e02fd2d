"""The web player in a real browser: headless Debian Chromium, driven by Playwright, against a
real `radio serve` on the tiny model (the `radio_serve` fixture of tests/conftest.py).

What a listener does: open the page, press play, hear the station (HLS through hls.js, or the
MP3 mount), see the sound drawn, send a prompt and see it become the current one, and see a
prompt someone else sent appear without reloading (Server-Sent Events). Also saved: a
screenshot at /tmp/radio-page.png for a human to look at.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers import post_json, require_tool

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


def _station(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/api/stations/main", timeout=5) as r:
        return json.load(r)


def _post_prompt(base: str, prompt: str) -> tuple[int, dict]:
    """(status, JSON body) of a prompt POST to station `main`."""
    status, _, body = post_json(f"{base}/api/stations/main/prompt", {"prompt": prompt})
    return status, body


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


def _play(pg, url: str, keyboard: bool = False) -> None:
    """Open `url`, press play; returns when the audio clock moves (prints how long it took)."""
    pg.goto(url)
    pg.wait_for_selector("#play:not([disabled])", timeout=10_000)
    play = pg.get_by_role("button", name="Play")  # found by its accessible name
    if keyboard:
        play.focus()
        pg.keyboard.press("Space")
    else:
        play.click()
    t0 = time.monotonic()
    pg.wait_for_function(
        "document.getElementById('audio').currentTime > 0", polling=20, timeout=20_000
    )
    mode = pg.get_attribute("#audio", "data-mode")
    print(f"\n{url}: {mode} plays {time.monotonic() - t0:.2f} s after the press", end=" ")


def _delay(pg) -> float:
    """Seconds this player lags the radio's clock, as the page estimates it."""
    return pg.evaluate(
        """() => { const a = document.getElementById('audio');
                   const b = a.buffered;
                   return b.length ? b.end(b.length - 1) - a.currentTime : -1; }"""
    )


def _advance(pg, seconds: float = 2.0) -> float:
    """How far the audio element's clock moves in `seconds` of wall time."""
    t0 = pg.eval_on_selector("#audio", "a => a.currentTime")
    pg.wait_for_timeout(seconds * 1000)
    return pg.eval_on_selector("#audio", "a => a.currentTime") - t0


def _shown_prompt(pg) -> str:
    return pg.text_content("#prompt")


def test_hls_plays_and_prompts_change_live(radio_serve: str, page) -> None:
    station = _station(radio_serve)
    _play(page, radio_serve + "/")
    assert page.get_attribute("#audio", "data-mode") == "hls.js"
    moved = _advance(page)
    assert moved > 1.4, f"audio clock moved {moved:.2f} s in 2 s of wall time"
    print(f"and has {_delay(page):.1f} s buffered ahead", end=" ")
    # The Web Audio analyser hears the stream (noise at -14 LUFS, far above the floor).
    level = int(page.get_attribute("#meter", "aria-valuenow"))
    assert level > -45, f"level meter says {level} dBFS: no sound reaches Web Audio"
    assert page.text_content("#station-name") == station["name"]
    assert _shown_prompt(page) == station["prompt"]

    # A prompt typed into the page: the server's answer is shown, then the prompt itself.
    box = page.get_by_label("Steer the music")
    box.fill("warm analog synthwave at dusk")
    box.press("Enter")
    page.wait_for_function(
        "document.getElementById('prompt-status').textContent.includes('you hear it in about')",
        timeout=10_000,
    )
    page.wait_for_function(
        "document.getElementById('prompt').textContent === 'warm analog synthwave at dusk'",
        timeout=10_000,
    )
    assert "warm analog synthwave at dusk" in page.text_content("#history")

    # A prompt sent by someone else reaches the open page without a reload (SSE).
    assert _post_prompt(radio_serve, "bright marimba over soft rain")[0] == 202
    page.wait_for_function(
        "document.getElementById('prompt').textContent === 'bright marimba over soft rain'",
        timeout=10_000,
    )
    assert page.text_content("#conn") == "live"
    assert int(page.text_content("#listener-count").split()[0]) >= 1  # this page, over HLS
    assert _advance(page, 1.0) > 0.5, "playback stalled after the prompt changes"
    page.screenshot(path=SCREENSHOT, full_page=True)
    assert page.errors == []


def test_refused_prompt_shows_the_servers_reason(radio_serve: str, page) -> None:
    page.goto(radio_serve + "/")
    page.wait_for_selector("#play:not([disabled])")
    before = _shown_prompt(page)
    too_long = "x" * 300  # the default max_prompt_length is 200
    status, body = _post_prompt(radio_serve, too_long)
    assert status == 400
    page.get_by_label("Steer the music").fill(too_long)
    page.get_by_role("button", name="Send").click()
    page.wait_for_selector("#prompt-status.error", timeout=5_000)
    assert page.text_content("#prompt-status") == body["error"]
    assert _shown_prompt(page) == before
    assert [e for e in page.errors if "status of 400" not in e] == []


def test_mp3_player_when_asked(radio_serve: str, page) -> None:
    _play(page, radio_serve + "/?player=mp3", keyboard=True)
    assert page.get_attribute("#audio", "data-mode") == "mp3"
    moved = _advance(page)
    assert moved > 1.4, f"MP3 clock moved {moved:.2f} s in 2 s of wall time"
    print(f"and has {_delay(page):.1f} s buffered ahead", end=" ")
    level = int(page.get_attribute("#meter", "aria-valuenow"))
    assert level > -45, f"level meter says {level} dBFS: no sound reaches Web Audio"
    assert page.errors == []


def test_falls_back_to_mp3_when_hls_fails(radio_serve: str, page) -> None:
    page.route("**/*.m3u8", lambda route: route.fulfill(status=404, body="gone"))
    _play(page, radio_serve + "/")
    page.wait_for_function(
        "document.getElementById('audio').dataset.mode === 'mp3'", timeout=10_000
    )
    assert "HLS failed" in page.text_content("#player-status")
    moved = _advance(page)
    assert moved > 1.4, f"MP3 clock moved {moved:.2f} s in 2 s of wall time"
    print(f"and has {_delay(page):.1f} s buffered ahead", end=" ")


def test_native_hls_where_there_is_no_media_source(radio_serve: str, page) -> None:
    # iOS Safari's situation: no MediaSource, but the media element plays HLS itself
    # (Chromium 156 does too, which lets this test play the real playlist natively).
    page.add_init_script("delete window.MediaSource; delete window.ManagedMediaSource;")
    _play(page, radio_serve + "/")
    mode = page.get_attribute("#audio", "data-mode")
    if mode == "mp3":  # a Chromium without native HLS: the page fell back, as it should
        assert "native HLS" in page.text_content("#player-status")
    else:
        assert mode == "native"
    moved = _advance(page)
    assert moved > 1.4, f"{mode} clock moved {moved:.2f} s in 2 s of wall time"
    print(f"and has {_delay(page):.1f} s buffered ahead", end=" ")
    if mode == "native":
        assert page.errors == []
