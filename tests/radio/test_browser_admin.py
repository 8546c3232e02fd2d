"""The admin part of the web page, in headless Chromium (Playwright) against an in-process radio
on the tiny model with an admin token: the token entered by keyboard (kept in the tab's
sessionStorage only), the schedule edited through the form and saved with Tab and Enter, a bad
schedule (overlapping slots, a bad time) and a wrong token refused with the server's reason and
nothing changed, a WAV clip uploaded that the station then continues from, a prompt pinned and
unpinned, and the queue's suggestions removed and cleared. Every outcome is checked through the
API, not only on the page."""

from __future__ import annotations

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from radio.testing import ShiftedClock
from tests.audio_files import tones, wav_bytes
from tests.helpers import get_json, post_json, serving
from tests.radio.test_browser import browser, page  # noqa: F401 - the Chromium fixtures

TOKEN = "café-admin-token"
SLOT = {
    "name": "all day",
    "start": "00:00",
    "end": "24:00",
    "prompts": ["warm jazz trio", "bossa nova with brushes"],
    "rotate_minutes": 720,
}
WAV = wav_bytes(tones(32000, 1, 2.0), 32000)


@pytest.fixture(scope="module")
def radio(radio_model):
    data = {
        "server": {"host": "127.0.0.1", "trust_forwarded": True},
        "generation": {"seed": 6},
        "security": {"admin_token": TOKEN},
        "clips": {"max_seconds": 3.0},
        "stations": [
            {"id": "main", "prompt": "house", "listener_prompts": "queue", "schedule": [SLOT]}
        ],
    }
    clock = ShiftedClock.at_utc(6)  # the programme's 06:00 UTC: no rotation tick for hours
    with serving(data, radio_model, programme_clock=clock) as r:
        yield r


def schedule(base: str) -> dict:
    return get_json(f"{base}/api/stations/main/schedule")["programme"]


def programme(base: str) -> dict:
    return get_json(f"{base}/api/stations/main")["programme"]


def status_says(pg, node: str, words: str, kind: str, timeout: float = 10_000) -> str:
    """Wait until the live region `node` says `words` with class `kind`; its text."""
    try:
        pg.wait_for_function(
            "([id, words, kind]) => { const n = document.getElementById(id);"
            " return n.classList.contains(kind) && n.textContent.includes(words); }",
            arg=[node, words, kind],
            timeout=timeout,
        )
    except PlaywrightTimeout:
        said = pg.eval_on_selector(f"#{node}", "n => `${n.className}: ${n.textContent}`")
        raise AssertionError(f"#{node} never said {words!r} ({kind}); it says {said!r}") from None
    return pg.text_content(f"#{node}")


def open_admin(pg, base: str, token: str = TOKEN) -> None:
    """Open the page, unfold the admin part and enter `token`, all by keyboard."""
    pg.goto(base + "/")
    pg.wait_for_selector("#play:not([disabled])", timeout=10_000)
    assert not pg.is_visible("#admin-tools"), "admin tools shown without a token"
    pg.focus("#admin-title")
    pg.keyboard.press("Enter")  # <summary>: opens the <details>
    assert pg.get_attribute("#admin", "open") is not None
    pg.focus("#admin-token")
    pg.keyboard.type(token)
    pg.keyboard.press("Enter")
    status_says(pg, "token-status", "Token kept for this tab", "ok")
    pg.wait_for_selector("#admin-tools", state="visible")
    pg.wait_for_selector("#slots fieldset.slot", timeout=10_000)  # the schedule loaded


def slot(pg, n: int):
    return pg.locator("#slots fieldset.slot").nth(n)


def test_the_admin_edits_the_schedule_and_saves_it_by_keyboard(radio, page) -> None:  # noqa: F811
    base = radio.base_url
    open_admin(page, base)
    # the token stays in this tab: sessionStorage, never localStorage or the URL
    stored = page.evaluate(
        "() => [sessionStorage.getItem('radio.adminToken'), JSON.stringify(localStorage)]"
    )
    assert stored[0] == TOKEN and TOKEN not in stored[1], stored
    assert TOKEN not in page.url and "token" not in page.url

    first = slot(page, 0)
    assert first.get_by_label("Name").input_value() == "all day"
    assert first.get_by_label("Prompts, one per line").input_value() == "\n".join(SLOT["prompts"])
    # the morning until 11:00 rotating a plain prompt and a blend every 30 minutes, shuffled
    first.get_by_label("Name").fill("morning")
    first.get_by_label("End (optional)").fill("11:00")
    first.get_by_label("Prompts, one per line").fill(
        "gentle acoustic guitar\nwarm jazz trio @ 0.7 | rain on a window @ 0.3"
    )
    first.get_by_label("Rotate every (minutes)").fill("30")
    first.get_by_label("Order").select_option("shuffled")
    # a new evening slot, weekends only, gliding 8 s
    page.get_by_role("button", name="Add a slot").click()
    evening = slot(page, 1)
    assert evening.locator(":scope > legend").inner_text() == "Slot 2"
    evening.get_by_label("Name").fill("weekend evening")
    evening.get_by_label("Start").fill("18:00")
    evening.get_by_label("End (optional)").fill("23:30")
    for day in ("Mon", "Tue", "Wed", "Thu", "Fri"):
        evening.get_by_label(day).uncheck()
    evening.get_by_label("Prompts, one per line").fill("slow rainy-day jazz")
    page.get_by_label("Time zone").fill("Europe/Paris")

    # from the last field of the last slot, Tab reaches the slot's remove button, then the
    # form's buttons in reading order; Enter on "Save schedule" saves
    evening.get_by_label("Transition (s)").fill("8")
    order = []
    for _ in range(4):
        page.keyboard.press("Tab")
        order.append(page.evaluate("() => document.activeElement.textContent"))
    assert order == ["Remove slot 2", "Add a slot", "Discard changes", "Save schedule"], order
    page.keyboard.press("Enter")
    said = status_says(page, "schedule-status", "Saved: 2 slots", "ok")
    assert "in effect now" in said

    got = schedule(base)
    assert got["timezone"] == "Europe/Paris"
    morning, weekend = got["schedule"]
    assert (morning["name"], morning["days"], morning["start"], morning["end"]) == (
        "morning",
        "daily",
        "00:00",
        "11:00",
    )
    assert morning["prompts"][0] == "gentle acoustic guitar"
    blend = morning["prompts"][1]
    assert [p["text"] for p in blend] == ["warm jazz trio", "rain on a window"]
    assert [round(p["weight"], 3) for p in blend] == [0.7, 0.3]
    assert (morning["rotate_minutes"], morning["order"]) == (30.0, "shuffled")
    assert morning["transition_seconds"] == -1  # left empty: the station's
    assert (weekend["name"], weekend["days"], weekend["start"], weekend["end"]) == (
        "weekend evening",
        "sat-sun",
        "18:00",
        "23:30",
    )
    assert (weekend["prompts"], weekend["transition_seconds"]) == (["slow rainy-day jazz"], 8.0)
    # the form shows what the radio kept, and the page's programme card follows (SSE)
    assert slot(page, 1).get_by_label("Sat").is_checked()
    assert slot(page, 1).locator(":scope > legend").inner_text() == "Slot 2 (weekend evening)"
    page.screenshot(path="/tmp/radio-page-admin.png", full_page=True)
    assert page.errors == []


def test_a_bad_schedule_shows_the_servers_reason_and_changes_nothing(radio, page) -> None:  # noqa: F811
    base = radio.base_url
    before = schedule(base)
    open_admin(page, base)
    n = page.locator("#slots fieldset.slot").count()
    assert n == len(before["schedule"]) >= 1

    # a slot overlapping the first one: both named, in plain words, both marked
    page.get_by_role("button", name="Add a slot").click()
    extra = slot(page, n)
    first = before["schedule"][0]
    extra.get_by_label("Start").fill(first["start"])
    extra.get_by_label("End (optional)").fill("23:59" if first["end"] else "")
    extra.get_by_label("Prompts, one per line").fill("cumbia")
    page.get_by_role("button", name="Save schedule").click()
    said = status_says(page, "schedule-status", "Not saved:", "error")
    assert f"slot {n + 1} (" in said and "overlaps slot 1 (" in said, said
    assert "The radio keeps the schedule it had." in said
    assert "schedule[" not in said  # the slots are named as the form numbers them
    assert extra.get_attribute("aria-invalid") == "true"
    assert slot(page, 0).get_attribute("aria-invalid") == "true"
    assert schedule(base) == before

    # a bad time: the server's own words, and the slot marked
    extra.get_by_role("button", name="Remove slot").click()
    slot(page, 0).get_by_label("Start").fill("25:00")
    page.get_by_role("button", name="Save schedule").click()
    said = status_says(page, "schedule-status", "must be a time", "error")
    assert "slot 1, start: must be a time 'HH:MM' from 00:00 to 23:59, got '25:00'" in said, said
    assert slot(page, 0).get_attribute("aria-invalid") == "true"
    assert schedule(base) == before

    # "Discard changes" loads the radio's schedule again
    page.get_by_role("button", name="Discard changes").click()
    status_says(page, "schedule-status", "Changes discarded.", "ok")
    assert slot(page, 0).get_by_label("Start").input_value() == first["start"]
    assert slot(page, 0).get_attribute("aria-invalid") == "false"
    assert [e for e in page.errors if "status of 400" not in e] == []


def test_a_wrong_token_is_refused_with_the_servers_reason(radio, page) -> None:  # noqa: F811
    base = radio.base_url
    before = schedule(base)
    open_admin(page, base, token="not-the-token")
    slot(page, 0).get_by_label("Name").fill("hijacked")
    page.get_by_role("button", name="Save schedule").click()
    said = status_says(page, "schedule-status", "Not saved:", "error")
    assert "wrong admin token" in said, said
    assert schedule(base) == before
    # forgetting the token hides the tools and empties the tab's storage
    page.get_by_role("button", name="Forget token").click()
    assert not page.is_visible("#admin-tools")
    assert page.evaluate("() => sessionStorage.getItem('radio.adminToken')") is None
    assert [e for e in page.errors if "status of 403" not in e] == []


def test_a_clip_upload_seeds_the_station(radio, page) -> None:  # noqa: F811
    base = radio.base_url
    open_admin(page, base)
    # nothing chosen yet: said, nothing sent
    page.get_by_role("button", name="Upload and continue from it").click()
    status_says(page, "clip-status", "Choose an audio file first.", "error")
    page.set_input_files(
        "#clip-file", files=[{"name": "intro.wav", "mimeType": "audio/wav", "buffer": WAV}]
    )
    page.get_by_label("Prompt (optional)").fill("mellow bossa nova")
    page.get_by_role("button", name="Upload and continue from it").click()
    said = status_says(page, "clip-status", "continues from the clip", "ok", timeout=60_000)
    assert "(2.0 s) with “mellow bossa nova”" in said, said
    playing = programme(base)["playing"]
    assert (playing["source"], playing["text"]) == ("clip", "mellow bossa nova")

    # not audio: the server's reason, the station untouched
    page.set_input_files(
        "#clip-file",
        files=[{"name": "notes.wav", "mimeType": "audio/wav", "buffer": b"hello" * 100}],
    )
    page.get_by_role("button", name="Upload and continue from it").click()
    said = status_says(page, "clip-status", "Not used:", "error", timeout=30_000)
    assert len(said) > len("Not used: .") + 10, said
    assert programme(base)["playing"]["at"] == playing["at"]
    assert [e for e in page.errors if "status of 415" not in e] == []


def test_the_admin_pins_unpins_and_manages_the_queue(radio, page) -> None:  # noqa: F811
    base = radio.base_url
    for text, address in (("cumbia", "192.0.2.1"), ("sea shanties", "192.0.2.2")):
        status, _, body = post_json(
            f"{base}/api/stations/main/suggestions", {"prompt": text}, {"X-Forwarded-For": address}
        )
        assert status == 202, body
    page.goto(base + "/")
    page.wait_for_selector("#queue li", timeout=10_000)
    # without a token: no admin buttons on the queue
    assert page.locator("#queue button.remove").count() == 0
    assert not page.is_visible("#queue-clear")
    open_admin(page, base)
    page.get_by_role("button", name="Remove “cumbia”").click()
    status_says(page, "vote-status", "Removed “cumbia”.", "ok")
    queue = get_json(f"{base}/api/stations/main/suggestions")["queue"]
    assert [s["text"] for s in queue] == ["sea shanties"]
    page.wait_for_function("document.querySelectorAll('#queue li').length === 1", timeout=10_000)
    page.get_by_role("button", name="Clear the queue").click()
    status_says(page, "vote-status", "Queue cleared (1 removed).", "ok")
    assert get_json(f"{base}/api/stations/main/suggestions")["queue"] == []

    # pin a blend for an hour: nothing else changes the music; then unpin
    page.get_by_label("Prompt or blend to pin").fill("harp @ 0.6 | soft rain @ 0.4")
    page.get_by_label("Minutes (optional)").fill("60")
    page.get_by_role("button", name="Pin", exact=True).click()
    status_says(page, "pin-status", "Pinned “", "ok")
    pinned = programme(base)["pinned"]
    assert pinned is not None and [p["text"] for p in pinned["blend"]] == ["harp", "soft rain"]
    page.wait_for_function(
        "document.getElementById('pin-now').textContent.startsWith('Pinned:')", timeout=10_000
    )
    page.get_by_role("button", name="Unpin").click()
    status_says(page, "pin-status", "Unpinned: the schedule resumes.", "ok")
    assert programme(base)["pinned"] is None
    page.wait_for_function("document.getElementById('unpin').disabled", timeout=10_000)
    assert page.errors == []


def test_the_forms_words_become_the_servers_values(radio, page) -> None:  # noqa: F811
    """schedule-form.js alone, in the page: days as the server writes them, prompt lines and
    blends both ways, the server's `schedule[i]` named as the form numbers its slots."""
    page.goto(radio.base_url + "/")
    got = page.evaluate(
        """async () => {
          const f = await import('/static/js/schedule-form.js');
          const days = (v) => [...f.dayNumbers(v)].sort();
          const blend = [{text: 'warm jazz trio', weight: 0.7}, {text: 'rain', weight: 0.3}];
          return {
            daily: days('daily'), weekdays: days('mon-fri'), wrap: days('fri-mon'),
            list: days(['mon', 'wed,sun']), mixed: days('mon-wed,fri,sun'), bad: days('someday'),
            line: f.promptLine(blend), back: f.parsePromptLine(f.promptLine(blend)),
            plain: f.parsePromptLine('slow jazz'), one: f.parsePromptLine('harp @ 2'),
            unweighted: f.parsePromptLine('harp | rain @ 0.5'),
            reason: f.plainReason("schedule[1] (mon 00:00-...) overlaps schedule[0] (mon 00:00-11:00)"),
            field: f.plainReason("schedule[0].start: must be a time"),
            named: [...f.slotsNamed("schedule[3] (x) overlaps schedule[0] (y)")].sort(),
          };
        }"""
    )
    assert got["daily"] == [0, 1, 2, 3, 4, 5, 6] and got["weekdays"] == [0, 1, 2, 3, 4]
    assert got["wrap"] == [0, 4, 5, 6] and got["list"] == [0, 2, 6]
    assert got["mixed"] == [0, 1, 2, 4, 6] and got["bad"] == []
    assert got["line"] == "warm jazz trio @ 0.7 | rain @ 0.3"
    assert got["back"] == [
        {"text": "warm jazz trio", "weight": 0.7},
        {"text": "rain", "weight": 0.3},
    ]
    assert got["plain"] == "slow jazz" and got["one"] == [{"text": "harp", "weight": 2}]
    assert got["unweighted"] == [{"text": "harp"}, {"text": "rain", "weight": 0.5}]
    assert got["reason"] == "slot 2 (mon 00:00-...) overlaps slot 1 (mon 00:00-11:00)"
    assert got["field"] == "slot 1, start: must be a time"
    assert got["named"] == [0, 3]
    assert page.errors == []
