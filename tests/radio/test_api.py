"""The JSON API with a real HTTP client: now playing, bad input, rate limit, admin, SSE, metrics.

Every bad request must get a 4xx with a JSON reason while the MP3 mount keeps playing.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from datetime import datetime

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import call, post_json, read_event, read_exactly

TOKEN = "test-admin-token"


@pytest.fixture
def radio(radio_factory):
    return radio_factory(
        security={
            "admin_token": TOKEN,
            "prompt_rate_limit": "2 per 60 s",
            "max_prompt_length": 40,
            "max_listeners": 1,
        }
    )


def test_bad_inputs_get_a_json_reason_while_the_stream_plays(radio):
    base = radio.base_url
    prompt_url = f"{base}/api/stations/main/prompt"
    sampling_url = f"{base}/api/stations/main/sampling"
    admin = {"Authorization": f"Bearer {TOKEN}"}
    utf8_e = "\u00e9\u00e9\u00e9".encode().decode("latin-1")  # urllib sends headers as Latin-1
    with urllib.request.urlopen(f"{base}/main.mp3", timeout=10) as mp3:
        assert mp3.headers["Content-Type"] == "audio/mpeg"
        before = read_exactly(mp3, 8000)
        assert before[0] == 0xFF and before[1] & 0xE0 == 0xE0, "not an MP3 frame header"

        cases = [
            (post_json(prompt_url, b'{"prompt": "' + b"x" * 5000 + b'"}'), 413, "too large"),
            (post_json(prompt_url, b"{prompt: jazz"), 400, "not valid JSON"),
            (post_json(prompt_url, b"\xff\xfe"), 400, "not valid JSON"),
            (post_json(prompt_url, ["jazz"]), 400, "JSON object"),
            (post_json(prompt_url, {"prompt": 5}), 400, "must be a string"),
            (post_json(prompt_url, {"prompt": None}), 400, "must be a string"),
            (post_json(prompt_url, {}), 400, "missing field 'prompt'"),
            (post_json(prompt_url, {"prompt": "jazz", "x": 1}), 400, "unknown field 'x'"),
            (post_json(prompt_url, {"prompt": "a" * 41}), 400, "too long"),
            (post_json(prompt_url, {"prompt": "slow\njazz"}), 400, "control characters"),
            (post_json(prompt_url, {"prompt": "jazz\x00"}), 400, "control characters"),
            (post_json(prompt_url, {"prompt": "\x1b[31mred"}), 400, "control characters"),
            (post_json(prompt_url, {"prompt": "   "}), 400, "must not be empty"),
            (post_json(f"{base}/api/stations/nope/prompt", {"prompt": "jazz"}), 404, "no station"),
            (call("GET", f"{base}/api/stations/nope"), 404, "no station"),
            (call("GET", f"{base}/nope.mp3"), 404, "no station"),
            (call("GET", f"{base}/api/nothing/here"), 404, "not found"),
            (call("GET", f"{base}/main.mp3"), 503, "is full"),  # max_listeners = 1
            (post_json(f"{base}/api/stations/main/sampling", {"temperature": 0.5}), 401, "admin"),
            (
                post_json(
                    f"{base}/api/stations/main/sampling",
                    {"temperature": 0.5},
                    {"Authorization": "Bearer wrong-token-1"},
                ),
                403,
                "wrong admin token",
            ),
            (
                post_json(prompt_url, {"prompt": "jazz"}, {"Authorization": "Basic abc"}),
                401,
                "Bearer",
            ),
            (
                post_json(prompt_url, {"prompt": "jazz"}, {"Authorization": "Bearer nope-nope"}),
                403,
                "wrong admin token",
            ),
            (
                post_json(f"{base}/api/stations/main/sampling", {"temperature": -1}, admin),
                400,
                "temperature",
            ),
            (post_json(f"{base}/api/stations/main/sampling", {"top_k": 1.5}, admin), 400, "top_k"),
            (post_json(f"{base}/api/stations/main/sampling", {"seed": 1}, admin), 400, "unknown"),
            # bounded input: depth, constants, repeated keys, encodings, ranges, bytes, Host, path
            (post_json(prompt_url, b"[" * 2000 + b"]" * 2000), 400, "nested too deeply"),
            (post_json(prompt_url, b'{"prompt": NaN}'), 400, "NaN is not a number"),
            (post_json(prompt_url, b'{"prompt": 1e999}'), 400, "out of range"),
            (post_json(prompt_url, b'{"prompt": "a", "prompt": "b"}'), 400, "appears twice"),
            (
                call("POST", prompt_url, b"junk", {"Content-Encoding": "gzip"}),
                415,
                "Content-Encoding 'gzip' is not accepted",
            ),
            (post_json(sampling_url, {"guidance_scale": 1e308}, admin), 400, "guidance_scale"),
            (post_json(sampling_url, b'{"temperature": Infinity}', admin), 400, "Infinity"),
            (post_json(sampling_url, {"temperature": 1e-320}, admin), 400, "temperature"),
            (post_json(sampling_url, {"top_k": 2**63}, admin), 400, "top_k: must be in"),
            (post_json(sampling_url, {"top_p": 1.5}, admin), 400, "top_p: must be in"),
            (
                post_json(prompt_url, {"prompt": "x"}, {"Authorization": "Bearer \xe9\xe9\xe9"}),
                403,
                "wrong admin token",  # Latin-1 bytes, not UTF-8: compared as bytes
            ),
            (
                post_json(prompt_url, {"prompt": "x"}, {"Authorization": f"Bearer {utf8_e}"}),
                403,
                "wrong admin token",
            ),
            (call("GET", f"{base}/api/stations", headers={"Host": "a b"}), 400, "Host header"),
            (call("GET", f"{base}/api/stations/main%00"), 400, "control characters"),
        ]
        for (status, headers, body), want_status, want_text in cases:
            assert status == want_status, (body, want_status)
            assert isinstance(body, dict) and want_text in body["error"], (body, want_text)
            assert headers["Access-Control-Allow-Origin"] == "*"

        # the rate limit: 2 per address, then 429 with Retry-After; the admin token lifts it
        assert post_json(prompt_url, {"prompt": "slow jazz"})[0] == 202
        assert post_json(prompt_url, {"prompt": "fast rock"})[0] == 202
        status, headers, body = post_json(prompt_url, {"prompt": "more rock"})
        assert status == 429 and "too many" in body["error"]
        assert 50 <= int(headers["Retry-After"]) <= 60
        status, _, body = post_json(prompt_url, {"prompt": "admin's choice"}, admin)
        assert status == 202 and body["prompt"] == "admin's choice"

        after = read_exactly(mp3, 16000)  # still playing, at the right bitrate
        assert len(after) == 16000

    # what was refused is counted
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("radio_bad_requests_total", (("status", "400"),))] >= 25
    assert samples[("radio_bad_requests_total", (("status", "415"),))] == 1
    assert samples[("radio_bad_requests_total", (("status", "429"),))] == 1
    assert samples[("radio_listeners_refused_total", (("station", "main"),))] == 1


def test_admin_only_prompts(radio_factory):
    radio = radio_factory(security={"admin_token": TOKEN, "prompt_rate_limit": "0 per 1 s"})
    url = f"{radio.base_url}/api/stations/main/prompt"
    status, _, body = post_json(url, {"prompt": "jazz"})
    assert status == 403 and "only the admin" in body["error"]
    assert post_json(url, {"prompt": "jazz"}, {"Authorization": f"Bearer {TOKEN}"})[0] == 202


def test_rate_limit_per_forwarded_address_behind_a_proxy(radio_factory):
    radio = radio_factory(
        server={"trust_forwarded": True}, security={"prompt_rate_limit": "1 per 60 s"}
    )
    url = f"{radio.base_url}/api/stations/main/prompt"

    def post(address: str) -> int:
        return post_json(url, {"prompt": "jazz"}, {"X-Forwarded-For": f"{address}, 10.0.0.1"})[0]

    assert [post("203.0.113.7"), post("203.0.113.8"), post("203.0.113.7")] == [202, 202, 429]


def test_admin_changes_sampling_live(radio):
    url = f"{radio.base_url}/api/stations/main/sampling"
    status, _, body = post_json(
        url, {"temperature": 0.7, "top_k": 50}, {"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200
    assert body["sampling"]["temperature"] == 0.7 and body["sampling"]["top_k"] == 50
    st = radio.radio.stations["main"]
    assert st.sampling.temperature == 0.7 and st.sampling.top_k == 50


def test_now_playing_json(radio):
    base = radio.base_url
    status, headers, body = call("GET", f"{base}/api/stations")
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
    assert [s["id"] for s in body["stations"]] == ["main"]
    status, _, st = call("GET", f"{base}/api/stations/main")
    assert status == 200
    assert st["prompt"] == "calm lofi beat with piano"
    assert datetime.fromisoformat(st["prompt_since"]).tzinfo is not None
    assert st["history"][0] == {
        "prompt": st["prompt"],
        "at": st["prompt_since"],
        "source": "config",
    }
    assert st["streams"] == {
        "mp3": f"{base}/main.mp3",
        "hls": f"{base}/hls/main/live.m3u8",
    }
    assert st["listeners"] == {"mp3": 0, "hls": 0, "total": 0}
    h = st["health"]
    assert h["playing"] is True and h["underruns"] == 0 and h["buffer_seconds"] > 0.5
    assert h["realtime_factor"] > 1.0
    assert call("GET", f"{base}/healthz")[2] == {"status": "ok"}


def test_healthz_fails_when_generation_stops(radio):
    assert call("GET", f"{radio.base_url}/healthz")[0] == 200
    radio.radio.generator.stop()
    status, _, body = call("GET", f"{radio.base_url}/healthz")
    assert status == 503 and "generator thread is not running" in body["problems"][0]
    # the clock keeps the station on the air (bridge) and prompts are refused with a reason
    status, _, body = post_json(f"{radio.base_url}/api/stations/main/prompt", {"prompt": "jazz"})
    assert status == 503 and "generator is not running" in body["error"]


def test_metrics_parse(radio):
    with urllib.request.urlopen(f"{radio.base_url}/main.mp3", timeout=10) as mp3:
        read_exactly(mp3, 1000)
        with urllib.request.urlopen(f"{radio.base_url}/metrics", timeout=10) as r:
            assert r.headers.get_content_type() == "text/plain"
            text = r.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    main = (("station", "main"),)
    assert samples[("radio_playing", main)] == 1.0
    assert samples[("radio_buffer_seconds", main)] > 0.5
    assert samples[("radio_realtime_factor", main)] > 1.0
    assert samples[("radio_underruns_total", main)] == 0.0
    assert samples[("radio_holds_total", main)] == 0.0
    assert samples[("radio_bridging", main)] == 0.0
    assert samples[("radio_listeners", (("kind", "mp3"), ("station", "main")))] == 1.0
    assert samples[("radio_mp3_bytes_total", main)] > 1000


def test_events_deliver_a_prompt_change(radio):
    url = f"{radio.base_url}/api/stations/main/events"
    with urllib.request.urlopen(url, timeout=10) as events:
        assert events.headers.get_content_type() == "text/event-stream"
        first = read_event(events)
        assert first[0] == "station" and first[1]["prompt"] == "calm lofi beat with piano"
        status, _, _ = post_json(
            f"{radio.base_url}/api/stations/main/prompt",
            {"prompt": "rainy day jazz"},
            {"Authorization": f"Bearer {TOKEN}"},
        )
        assert status == 202
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            name, data = read_event(events)
            if name == "prompt":
                break
        assert data["prompt"] == "rainy day jazz" and data["source"] == "admin"
        assert data["history"][0]["prompt"] == "rainy day jazz"
