"""Prompt-change latency on the tiny model: from the POST to the first new-prompt sample leaving
the clock (after loudness, i.e. handed to the encoders), measured by the server itself.

Re-measure: `pytest -s tests/radio/test_prompt_latency.py` prints the figures.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request

from radio.clock import TICK

TOKEN = "latency-admin-token"
LIMIT_SECONDS = 1.5


def post_prompt(base: str, prompt: str) -> dict:
    req = urllib.request.Request(
        f"{base}/api/stations/main/prompt",
        data=json.dumps({"prompt": prompt}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=20) as r:
        assert r.status == 202
        return json.loads(r.read())


def test_prompt_change_is_heard_within_a_second_and_a_half(radio_factory):
    radio = radio_factory(security={"admin_token": TOKEN})  # default buffer_ahead (4 s)
    st = radio.radio.stations["main"]
    hop, rate = radio.radio.hop, radio.radio.sample_rate
    # let the generator fill its buffer: the change must not wait for the buffered audio
    deadline = time.monotonic() + 20
    while st.health.buffer_seconds < 3.0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert st.health.buffer_seconds >= 3.0, "the buffer never filled"

    latencies, promised = [], []
    for i, prompt in enumerate(["slow jazz piano", "fast rock drums", "ambient synth at night"]):
        before = st.health.prompt_changes
        last = st.health.prompt_latency_seconds
        t = time.monotonic()
        body = post_prompt(radio.base_url, prompt)
        answered = time.monotonic() - t
        assert body["prompt"] == prompt and body["frame"] > 0
        promised.append(answered + body["heard_in_seconds"])
        while st.health.prompt_changes == before or st.health.prompt_latency_seconds == last:
            assert time.monotonic() - t < 10, "the new prompt was never heard"
            time.sleep(0.02)
        latencies.append(st.health.prompt_latency_seconds)
        # the buffered audio of the old prompt was dropped, not played out first
        assert body["frame"] * hop <= radio.call(lambda: st.buffer.head) + 2 * rate
        assert radio.call(lambda: st.prompt) == prompt
        time.sleep(0.5 + 0.3 * i)
    print(
        f"\nprompt-change latency on the tiny model: median {statistics.median(latencies):.2f} s, "
        f"max {max(latencies):.2f} s (promised {', '.join(f'{p:.2f}' for p in promised)} s)"
    )
    assert max(latencies) < LIMIT_SECONDS, latencies
    for got, said in zip(latencies, promised, strict=True):
        # the 202 told the truth (the client's own timing is noisy on a loaded machine)
        assert -0.25 < got - said < TICK + 0.25, (got, said)
