"""The programme on the web page, in headless Chromium (Playwright) against an in-process radio
on the tiny model whose station runs a schedule and takes listener suggestions by vote: the
blend's weight bars, who chose it, what comes next, today's schedule with the current slot
marked; suggesting from the page, a suggestion from someone else arriving live, voting and
skipping with the keyboard, and the server's refusals shown."""

from __future__ import annotations

import pytest

from radio.testing import ShiftedClock
from tests.helpers import post_json, serving
from tests.radio.test_browser import browser, page  # noqa: F401 - the Chromium fixtures

BLEND = [{"text": "warm jazz trio", "weight": 0.7}, {"text": "rain on a window", "weight": 0.3}]


@pytest.fixture(scope="module")
def radio(radio_model):
    data = {
        "server": {"host": "127.0.0.1", "trust_forwarded": True},
        "generation": {"seed": 4},
        "stations": [
            {
                "id": "main",
                "name": "Café Lumière",
                "prompt": "house",
                "listener_prompts": "queue",
                "schedule": [
                    {
                        "name": "all day",
                        "start": "00:00",
                        "end": "24:00",
                        "prompts": [BLEND, BLEND[0]["text"] + " with brushes"],
                        "rotate_minutes": 720,
                    }
                ],
            }
        ],
    }
    clock = ShiftedClock.at_utc(6)  # the programme's 06:00 UTC: the blend plays until noon
    with serving(data, radio_model, programme_clock=clock) as r:
        yield r


def test_the_page_shows_the_programme_and_takes_votes_and_skips(radio, page) -> None:  # noqa: F811
    base = radio.base_url
    page.goto(base + "/")
    page.wait_for_selector("#play:not([disabled])", timeout=10_000)

    # what plays: the blend as weight bars, chosen by the schedule; today's slot marked
    page.wait_for_selector("#blend li", timeout=10_000)
    bars = page.locator("#blend li").all_inner_texts()
    assert [" ".join(b.split()) for b in bars] == ["warm jazz trio 70%", "rain on a window 30%"]
    assert page.text_content("#source") == "chosen by the schedule"
    today = page.locator("#today li")
    assert today.count() == 1 and today.first.get_attribute("aria-current") == "true"
    assert "all day" in today.first.inner_text() and "now" in today.first.inner_text()
    assert page.is_visible("#next") and "Next at" in page.text_content("#next")

    # suggesting from the page: the form says so, and the queue shows it
    assert page.text_content("#prompt-label") == "Suggest music"
    box = page.get_by_label("Suggest music")
    box.fill("french chanson with accordion")
    box.press("Enter")
    page.wait_for_function(
        "document.getElementById('prompt-status').textContent.startsWith('Suggested: #1')",
        timeout=10_000,
    )
    page.wait_for_function("document.querySelectorAll('#queue li').length === 1", timeout=10_000)

    # someone else suggests: it arrives without a reload (SSE `queue`)
    status, _, body = post_json(
        f"{base}/api/stations/main/prompt", {"prompt": "cumbia"}, {"X-Forwarded-For": "192.0.2.9"}
    )
    assert status == 202, body
    page.wait_for_function("document.querySelectorAll('#queue li').length === 2", timeout=10_000)

    # vote for it with the keyboard: Tab to its button, Enter
    vote = page.get_by_role("button", name="Vote for “cumbia” (1 vote)")
    vote.focus()
    page.keyboard.press("Enter")
    page.wait_for_function(
        "document.getElementById('vote-status').textContent === 'Voted for “cumbia”.'",
        timeout=10_000,
    )
    page.wait_for_selector("text=2 votes", timeout=10_000)
    # a second vote from the same address: the server's reason is shown
    page.get_by_role("button", name="Vote for “cumbia” (2 votes)").press("Enter")
    page.wait_for_selector("#vote-status.error", timeout=10_000)
    assert "already has your vote" in page.text_content("#vote-status")
    first = page.locator("#queue li").first.inner_text()
    assert first.startswith("cumbia"), first  # the most-voted first

    # skip with the keyboard (Space on the focused button): one vote of the two needed
    page.get_by_role("button", name="Skip this").focus()
    page.keyboard.press("Space")
    page.wait_for_function(
        "document.getElementById('skip-tally').textContent === '1 of 2 skip votes'",
        timeout=10_000,
    )
    assert "Skip vote counted" in page.text_content("#vote-status")
    page.screenshot(path="/tmp/radio-page-programme.png", full_page=True)
    assert [e for e in page.errors if "status of 409" not in e] == []
