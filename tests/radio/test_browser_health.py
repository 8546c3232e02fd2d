"""The page's generation health in headless Chromium (Playwright): a station whose generation
fails (a fault injected through `radio.testing.FaultInjector`, which the config cannot reach)
shows the note "Generation is down (...): reopening in N s, a bridge plays meanwhile" as soon as
it fails, and the note goes once the station has reopened and makes audio again."""

from __future__ import annotations

from radio.testing import FaultInjector
from tests.helpers import call, wait_until
from tests.radio.test_browser import browser, page  # noqa: F401 - the Chromium fixtures

DOWN = "Generation is down (generation failed (InjectedFault: injected fault)): reopening"


def test_the_page_says_generation_is_down_until_the_station_reopens(radio_factory, page) -> None:  # noqa: F811
    faults = FaultInjector()
    radio = radio_factory(faults=faults, generation={"buffer_ahead": 1.0, "seed": 5})
    base = radio.base_url
    page.goto(base + "/")
    page.wait_for_function("document.getElementById('conn').textContent === 'live'", timeout=10_000)
    page.wait_for_selector("#h-note", state="hidden", timeout=10_000)

    # fails, is reopened after 1 s, fails again, is reopened after 2 s more
    faults.fail_next_step("main", times=2)
    page.wait_for_function(
        "([words]) => { const n = document.getElementById('h-note');"
        " return !n.hidden && n.textContent.startsWith(words); }",
        arg=[DOWN],
        timeout=5_000,  # at once (the failure's own health event), not at the next heartbeat
    )
    note = page.text_content("#h-note")
    assert note.endswith("s, a bridge plays meanwhile") or note.endswith(
        "reopening now, a bridge plays meanwhile"
    ), note
    assert page.get_attribute("#h-note", "role") == "status"  # read out by screen readers

    st = radio.radio.stations["main"]
    wait_until(lambda: st.health.reopens == 2 and not st.health.down, 15, "two reopens")
    page.wait_for_selector("#h-note", state="hidden", timeout=10_000)
    health = call("GET", f"{base}/api/stations/main")[2]["health"]
    assert (health["failures"], health["error"], health["retry_in_seconds"]) == (2, None, None)
    assert faults.injected == 2
    assert page.errors == []
