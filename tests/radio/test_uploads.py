"""Clip uploads through a real HTTP client (aiohttp's test client) against a tiny app that mounts
only the upload handler, behind the API's JSON error middleware and the radio's 4 KB
`client_max_size`: every bad upload gets its 4xx with a JSON reason; a good one answers the
tokens' shape and duration; the encode runs off the event loop, one at a time."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import zlib

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from radio.middleware import MAX_BODY, json_errors
from radio.uploads import ClipReader, ClipsConfig, clip_json
from tests.audio_files import encode_file, flac_bomb, tones, wav_bytes

MP3 = encode_file(tones(44100, 2, 2.0), 44100, "mp3", "libmp3lame")


def tiny_app(reader: ClipReader) -> web.Application:
    async def upload(request: web.Request) -> web.Response:
        got = await reader.read(request)
        return web.json_response({**clip_json(got.clip), "fields": got.fields})

    async def ping(request: web.Request) -> web.Response:
        return web.json_response({"pong": time.monotonic()})

    app = web.Application(client_max_size=MAX_BODY, middlewares=[json_errors])
    app.router.add_post("/clip", upload)
    app.router.add_get("/ping", ping)
    return app


async def answer(response: aiohttp.ClientResponse) -> tuple[int, dict]:
    assert response.content_type == "application/json", await response.text()
    return response.status, await response.json()


@pytest.fixture(scope="module")
def reader(radio_model) -> ClipReader:
    return ClipReader(ClipsConfig(max_bytes=100_000, max_seconds=3.0), radio_model)


@pytest.fixture
async def client(aiohttp_client, reader) -> TestClient:
    """The tiny app, served by pytest-aiohttp on the test's event loop."""
    return await aiohttp_client(tiny_app(reader))


def form(data: bytes, filename: str | None = "clip.mp3", **fields: str) -> aiohttp.FormData:
    out = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        out.add_field(name, value)
    if filename is not None:
        out.add_field("clip", data, filename=filename, content_type="audio/mpeg")
    return out


async def test_a_good_clip_answers_its_tokens_shape_and_duration(client):
    raw = await client.post("/clip", data=MP3, headers={"Content-Type": "audio/mpeg"})
    status, body = await answer(raw)
    assert status == 200, body
    assert body["codebooks"] == 4 and body["frames"] == 100 and body["seconds"] == 2.0
    assert body["source"] == {
        "format": "mp3",
        "codec": "mp3float",
        "sample_rate": 44100,
        "channels": 2,
        "seconds": 2.0,
    }
    assert body["fields"] == {}
    multipart = await client.post("/clip", data=form(MP3, prompt="warm jazz trio"))
    status, body = await answer(multipart)
    assert status == 200, body
    assert body["frames"] == 100 and body["fields"] == {"prompt": "warm jazz trio"}


WAV = {"Content-Type": "audio/wav"}


@pytest.mark.parametrize(
    "case, body, headers, status, words",
    [
        ("json", b'{"clip": 1}', {"Content-Type": "application/json"}, 415, "Content-Type must"),
        ("text as audio", b"not music at all\n" * 50, WAV, 415, "not an audio file"),
        ("empty", b"", WAV, 422, "empty"),
        ("silent", wav_bytes(np.zeros((1, 32000)), 16000), WAV, 422, "silent"),
        ("0.5 s", wav_bytes(tones(16000, 1, 0.5), 16000), WAV, 422, "shorter than"),
        ("4 s > 3 s", wav_bytes(tones(8000, 1, 4.0), 8000), WAV, 422, "longer than the limit"),
        ("6 channels", wav_bytes(tones(8000, 1, 1.0).repeat(6, 0), 8000), WAV, 422, "6 channels"),
        ("1 kHz", wav_bytes(tones(1000, 1, 2.0), 1000), WAV, 422, "1000 Hz"),
        ("bomb", flac_bomb(3600), {"Content-Type": "audio/flac"}, 422, "longer than the limit"),
        ("big", bytes(100_001), WAV, 413, "limit of 100000 bytes"),
    ],
)  # fmt: skip
async def test_bad_uploads_get_a_4xx_with_the_reason(client, case, body, headers, status, words):
    got, data = await answer(await client.post("/clip", data=body, headers=headers))
    assert (got, list(data)) == (status, ["error"]), data
    assert words in data["error"]


@pytest.mark.parametrize(
    "case, data, status, words",
    [
        ("no file", form(MP3, filename=None, prompt="jazz"), 400, "holds no file"),
        ("two files", "two", 400, "more than one file"),
        ("long field", form(MP3, prompt="x" * 5000), 400, "longer than 4096 bytes"),
        ("not utf-8", "latin1", 400, "not UTF-8"),
        ("big file", form(bytes(100_001)), 413, "limit of 100000 bytes"),
        ("text as file", form(b"hello " * 100), 415, "not an audio file"),
    ],
)
async def test_bad_forms_get_a_4xx_with_the_reason(client, case, data, status, words):
    if data == "two":
        data = form(MP3)
        data.add_field("again", MP3, filename="b.mp3", content_type="audio/mpeg")
    elif data == "latin1":
        data = aiohttp.MultipartWriter("form-data")
        data.append(b"caf\xe9", {"Content-Type": "text/plain"}).set_content_disposition(
            "form-data", name="prompt"
        )
        data.append(MP3).set_content_disposition("form-data", name="clip", filename="a.mp3")

    got, body = await answer(await client.post("/clip", data=data))
    assert got == status and words in body["error"], body


async def test_a_malformed_form_is_a_400(client):
    headers = {"Content-Type": "multipart/form-data; boundary=xyz"}
    body = b"--xyz\r\nContent-Disposition: form-data; name=clip; filename=a.mp3\r\n\r\nab"
    got, data = await answer(await client.post("/clip", data=body, headers=headers))
    assert got == 400 and "multipart" in data["error"], data


async def test_a_huge_upload_is_refused_before_it_is_all_read(client):
    """A chunked body (no Content-Length) of 100 MB: 413 after the first 100 KB, and the
    client is answered while most of its body was never sent; a declared Content-Length over
    the limit is refused before any of the body is read."""
    sent = 0

    async def endless():
        nonlocal sent
        for _ in range(1600):
            sent += 65536
            yield bytes(65536)

    try:
        got, data = await answer(await client.post("/clip", data=endless(), headers=WAV))
        assert got == 413 and "is larger, more than the limit" in data["error"], data
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
        pass  # the server closed the connection on the unread rest: also a refusal
    assert sent < 20_000_000, f"{sent} bytes were sent before the refusal"
    raw = await client.post(
        "/clip", data=b"x", headers={**WAV, "Content-Length": "200000"}, chunked=False
    )
    got, data = await answer(raw)
    assert got == 413 and "is 200000 bytes" in data["error"], data


async def test_a_compressed_body_is_refused_before_it_is_read(client):
    """`Content-Encoding: gzip` (20 KB that would inflate to 20 MB): the API refuses compressed
    bodies before reading them (`middleware.check_request`), uploads included; audio is compressed
    already."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    body = b"".join(deflate.compress(bytes(1_000_000)) for _ in range(20)) + deflate.flush()
    assert len(body) < 30_000

    headers = {**WAV, "Content-Encoding": "gzip"}
    got, data = await answer(await client.post("/clip", data=body, headers=headers))
    assert got == 415 and "Content-Encoding 'gzip' is not accepted" in data["error"], data


async def test_encoding_runs_off_the_loop_in_a_fresh_lower_priority_thread_one_at_a_time(
    radio_model, aiohttp_client
):
    """While a clip encodes, the event loop answers at once; a second upload meanwhile gets 429;
    the encode ran in its own thread, niced, which then ends."""
    started, release = threading.Event(), threading.Event()
    seen: dict = {}

    class SlowModel:
        def encode_clip(self, data, limits, *, single_thread):
            seen["thread"] = threading.current_thread()
            seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            seen["single_thread"] = single_thread
            started.set()
            release.wait(10)
            return radio_model.encode_clip(data, limits, single_thread=single_thread)

    reader = ClipReader(ClipsConfig(max_bytes=100_000), SlowModel())
    loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    client = await aiohttp_client(tiny_app(reader))
    first = asyncio.create_task(client.post("/clip", data=MP3, headers=WAV))
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
    began = time.monotonic()
    pong = await client.get("/ping")
    assert pong.status == 200 and time.monotonic() - began < 1.0
    got, data = await answer(await client.post("/clip", data=MP3, headers=WAV))
    assert got == 429 and "another clip" in data["error"], data
    release.set()
    got, data = await answer(await first)
    assert got == 200 and data["frames"] == 100, data
    assert seen["thread"] is not threading.main_thread() and not reader.busy
    assert seen["single_thread"]
    seen["thread"].join(5)
    assert not seen["thread"].is_alive()

    if sys.platform == "linux":
        assert seen["nice"] == min(loop_nice + 10, 19)


def test_clips_config_names_the_bad_key():
    config = ClipsConfig()
    assert config.limits().max_seconds == 30.0
    for key, value, words in [
        ("max_seconds", 45.0, "max_seconds: must be in (0, 30]"),
        ("max_bytes", 10, "max_bytes: must be in [1024"),
        ("min_seconds", 40.0, "min_seconds"),
    ]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("[", r"\[")):
            ClipsConfig(**{key: value}).validate()
