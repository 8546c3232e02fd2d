"""Seeding a running station from an uploaded clip, end to end on the tiny model: the admin
POSTs an audio file (raw or multipart, with or without a prompt); the engine's stream goes on
from the clip's tokens at the frame the answer names (the stream's decoder context is the clip:
`AudioStream.seed`), the history and the programme say `clip`, and the new prompt goes on air.
A bad upload is refused with its 4xx and leaves the stream as it was."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest
import torch
from aiohttp.test_utils import TestClient

from radio import timing
from radio.app import init_app
from radio.config import parse_config
from radio.service import RADIO
from tests.audio_files import encode_file, tones, wav_bytes
from tests.helpers import STARTUP_SECONDS

TOKEN = "clip-seed-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
MP3 = encode_file(tones(44100, 2, 2.0), 44100, "mp3", "libmp3lame")


@pytest.fixture
async def client(aiohttp_client, radio_model) -> TestClient:
    data = {
        "server": {"host": "127.0.0.1"},
        "generation": {"seed": 2},
        "hls": {"enabled": False},
        "security": {"admin_token": TOKEN},
        "clips": {"max_bytes": 200_000, "max_seconds": 3.0},
    }
    c = await aiohttp_client(init_app(parse_config(data, env={}), radio_model))
    async with asyncio.timeout(STARTUP_SECONDS):
        while (await c.get("/healthz")).status != 200:
            await asyncio.sleep(0.05)
    return c


@pytest.fixture
def seeds(monkeypatch) -> list[tuple]:
    """Every seed the generator's worker hands the engine: (stream, tokens, text, frame)."""
    calls: list[tuple] = []
    original = timing.seed_blend

    def spy(stream, tokens, blend, from_frame):
        frame = original(stream, tokens, blend, from_frame)
        calls.append((stream, tokens, blend.dominant, frame))
        return frame

    monkeypatch.setattr(timing, "seed_blend", spy)
    return calls


async def on_air(client: TestClient, title: str) -> None:
    timeline = client.app[RADIO].timing["main"]
    async with asyncio.timeout(30):
        while timeline.on_air != title:
            await asyncio.sleep(0.05)


async def test_an_uploaded_clip_seeds_the_station(client, seeds):
    url = "/api/stations/main/clip?prompt=" + "warm jazz trio"
    r = await client.post(url, data=MP3, headers={**ADMIN, "Content-Type": "audio/mpeg"})
    body = await r.json()
    assert r.status == 202, body
    assert body["clip"]["frames"] == 100 and body["clip"]["source"]["format"] == "mp3"
    assert (body["prompt"], body["source"]) == ("warm jazz trio", "clip")
    assert body["heard_in_seconds"] > 0
    [(stream, tokens, text, frame)] = seeds
    assert (text, frame) == ("warm jazz trio", body["frame"])
    assert tuple(tokens.shape) == (4, 100)
    assert torch.equal(stream.tokens.seed_frames, tokens) and stream.tokens.seeded_at == frame
    await on_air(client, "warm jazz trio")
    station = await (await client.get("/api/stations/main")).json()
    assert station["history"][0]["source"] == "clip"
    assert station["programme"]["playing"]["source"] == "clip"
    await asyncio.sleep(0.5)
    history = stream.tokens.history()
    assert stream.tokens.complete > frame + 10, "the stream goes on after the seed"
    assert history[1] <= frame  # the frames heard before the seed are still there

    # multipart, a blend as the prompt field
    form = aiohttp.FormData()
    form.add_field("prompt", '[{"text": "harp", "weight": 3}, {"text": "rain"}]')
    form.add_field("clip", MP3, filename="clip.mp3", content_type="audio/mpeg")
    r = await client.post("/api/stations/main/clip", data=form, headers=ADMIN)
    body = await r.json()
    assert r.status == 202 and body["prompt"] == "harp 75% + rain 25%", body
    assert seeds[-1][2] == "harp"
    await on_air(client, "harp")

    # no prompt: the station's current one goes on
    wav = wav_bytes(tones(16000, 1, 1.5), 16000)
    r = await client.post(
        "/api/stations/main/clip", data=wav, headers={**ADMIN, "Content-Type": "audio/wav"}
    )
    body = await r.json()
    assert (
        r.status == 202 and body["prompt"] == "harp 75% + rain 25%" and body["clip"]["frames"] == 75
    )


@pytest.mark.parametrize(
    "headers, data, status, words",
    [
        ({"Content-Type": "audio/mpeg"}, MP3, 401, "admin token required"),
        ({**ADMIN, "Content-Type": "audio/wav"}, b"not music\n" * 100, 415, "not an audio file"),
        ({**ADMIN, "Content-Type": "audio/wav"}, wav_bytes(np.zeros((1, 32000)), 16000), 422,
         "silent"),
        ({**ADMIN, "Content-Type": "audio/wav"}, wav_bytes(tones(8000, 1, 4.0), 8000), 422,
         "longer than the limit of 3 s"),
        ({**ADMIN, "Content-Type": "audio/wav"}, bytes(200_001), 413, "limit of 200000 bytes"),
        ({**ADMIN, "Content-Type": "text/plain"}, b"hello", 415, "Content-Type must"),
    ],
)  # fmt: skip
async def test_a_bad_upload_leaves_the_stream_untouched(
    client, seeds, headers, data, status, words
):
    before = (await (await client.get("/api/stations/main")).json())["history"]
    r = await client.post("/api/stations/main/clip", data=data, headers=headers)
    body = await r.json()
    assert (r.status, list(body)) == (status, ["error"]) and words in body["error"], body
    assert seeds == []
    after = await (await client.get("/api/stations/main")).json()
    assert after["history"] == before and after["health"]["playing"]


async def test_a_bad_prompt_with_a_good_clip_is_refused(client, seeds):
    r = await client.post(
        "/api/stations/main/clip?prompt=" + '[{"text": 5}]',
        data=MP3,
        headers={**ADMIN, "Content-Type": "audio/mpeg"},
    )
    body = await r.json()
    assert r.status == 400 and "prompt[0].text: must be a string" in body["error"]
    assert seeds == []
