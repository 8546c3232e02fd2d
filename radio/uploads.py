"""Clip uploads: an admin's audio file, read from a request with a byte cap and turned into
MusicGen tokens off the event loop, or refused with a 4xx JSON reason.

Two ways to send the file, both streamed and refused (413) as soon as they pass
`clips.max_bytes`, before the rest is read (a declared Content-Length over it is refused unread):

- the raw file as the body, with an audio Content-Type (`audio/*`, `application/ogg` or
  `application/octet-stream`): `curl -H 'Content-Type: audio/mpeg' --data-binary @clip.mp3 URL`,
  or `fetch(url, {method: "POST", body: file})` from a page (the browser sends the file's type);
- `multipart/form-data` (an HTML form, `curl -F clip=@clip.mp3 -F prompt='...' URL`): exactly one
  file part (any field name), plus at most `MAX_FIELDS` short text fields, handed to the caller
  (a route reads e.g. `prompt` from them).

Decoding and encoding (PyAV, then EnCodec: seconds of CPU for a 30 s clip on a small CPU) run in
a thread started for that clip, on that thread alone (no OpenMP team of its own) and at a lower
CPU priority (nice +10 on Linux), so that neither the event loop nor the generator's thread
waits for it; one clip is encoded at a time (another upload meanwhile gets 429). Not the loop's
default executor: torch gives every thread that runs a parallel op its own OpenMP team, and with
more OpenMP threads than cores the generator's steps ran at half speed
(`engine.load_thread`).

Statuses: 413 too big; 415 not an accepted Content-Type, or not an audio file; 422 an audio file
that cannot seed (empty, silent, too short, too long, too many channels, odd sample rate, too
slow to decode); 400 a malformed form; 429 another clip is being encoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, web

from engine.clip import Clip, ClipError
from radio.config import ClipsConfig
from radio.middleware import ApiError

RAW_TYPES = ("application/ogg", "application/octet-stream")  # raw bodies besides audio/*
MAX_FIELDS = 8  # text fields in a multipart form
MAX_FIELD_BYTES = 4096  # bytes in one text field
FORM_SLACK = 64 * 1024  # multipart bytes allowed beyond max_bytes (boundaries, headers, fields)
CHUNK = 64 * 1024  # bytes read at a time
ENCODE_NICE = 10  # CPU priority of the clip's thread, below the generator's
STATUS = {"too_big": 413, "not_audio": 415}  # ClipError code -> HTTP status; the rest: 422


@dataclass(frozen=True)
class ClipUpload:
    clip: Clip  # tokens [K, T] and the audio they encode
    fields: dict[str, str]  # the form's text fields (multipart), e.g. {"prompt": "..."}; else {}


def refuse(status: int, reason: str) -> Exception:
    """The API's JSON error (`{"error": reason}`)."""
    return ApiError(status, reason)


class ClipReader:
    """Reads clip uploads for one application: its limits, and one encode at a time.

    `model` is the engine's `MusicModel` (anything with its `encode_clip`): the encode runs in a
    fresh thread, on that thread alone (`single_thread=True`: no OpenMP team beside the
    generator's), and raises `ClipError` for a bad file."""

    def __init__(self, config: ClipsConfig, model: Any) -> None:
        self.config = config
        self.limits = config.limits()
        self.model = model
        self.busy = False  # a clip's thread is running (until it ends, even if its client left)

    async def read(self, request: web.Request) -> ClipUpload:
        """The request's clip, encoded; `ApiError` 4xx with the reason for any bad upload."""
        data, fields = await read_upload(request, self.config.max_bytes)
        if self.busy:
            raise refuse(429, "another clip is being encoded; try again in a few seconds")
        self.busy = True
        try:
            clip = await run_in_fresh_thread(self._encode, data, done=self._idle)
        except ClipError as e:
            raise refuse(STATUS.get(e.code, 422), str(e)) from None
        return ClipUpload(clip, fields)

    def _encode(self, data: bytes) -> Clip:
        return self.model.encode_clip(data, self.limits, single_thread=True)

    def _idle(self) -> None:
        self.busy = False


def clip_json(clip: Clip) -> dict[str, Any]:
    """What an upload answers: the tokens' shape, the duration and what the file was."""
    source = clip.audio.source
    return {
        "codebooks": int(clip.tokens.shape[0]),
        "frames": clip.frames,
        "seconds": round(clip.seconds, 3),
        "source": {
            "format": source.format,
            "codec": source.codec,
            "sample_rate": source.sample_rate,
            "channels": source.channels,
            "seconds": round(source.seconds, 3),
        },
    }


# ---- reading the body --------------------------------------------------------------------------


async def read_upload(request: web.Request, max_bytes: int) -> tuple[bytes, dict[str, str]]:
    """(the file's bytes, the form's text fields) of a raw or multipart upload, at most
    `max_bytes` of file; 413 as soon as it is larger, 415 for another Content-Type."""
    kind = request.content_type  # lower case, without parameters
    form = kind == "multipart/form-data"
    if not (form or kind.startswith("audio/") or kind in RAW_TYPES):
        raise refuse(
            415,
            f"Content-Type must be audio/* (the file as the body) or multipart/form-data, "
            f"got {kind!r}",
        )
    declared = request.content_length
    if declared is not None and declared > max_bytes + (FORM_SLACK if form else 0):
        raise refuse(413, _too_big(max_bytes, declared))
    if form:
        return await _read_form(request, max_bytes)
    data = await _read_capped(request.content.read, max_bytes)
    if data is None:
        raise refuse(413, _too_big(max_bytes))
    return data, {}


async def _read_capped(read: Callable[[int], Any], limit: int) -> bytes | None:
    """Chunks of `read(n)` until b"", or None as soon as they pass `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await read(CHUNK):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_form(request: web.Request, max_bytes: int) -> tuple[bytes, dict[str, str]]:
    """The one file part and the text fields of a multipart/form-data body."""
    data: bytes | None = None
    fields: dict[str, str] = {}
    try:
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                raise refuse(400, "the form must not nest multipart bodies")
            if part.filename is not None:  # a file
                if data is not None:
                    raise refuse(400, "the form holds more than one file; send one clip")
                data = await _read_capped(part.read_chunk, max_bytes)
                if data is None:
                    raise refuse(413, _too_big(max_bytes))
            else:
                name, value = await _read_field(part, len(fields))
                fields[name] = value
            if request.content.total_bytes > max_bytes + FORM_SLACK:
                raise refuse(413, _too_big(max_bytes))
    except web.HTTPException:
        raise
    except (ValueError, AssertionError, RuntimeError) as e:  # aiohttp's multipart parser
        raise refuse(400, f"malformed multipart/form-data body ({e})") from None
    if data is None:
        raise refuse(400, "the form holds no file (a part with a filename); send the clip in one")
    return data, fields


async def _read_field(part: BodyPartReader, count: int) -> tuple[str, str]:
    if not part.name:
        raise refuse(400, "a form field has no name")
    if count >= MAX_FIELDS:
        raise refuse(400, f"the form has more than {MAX_FIELDS} text fields")
    raw = await _read_capped(part.read_chunk, MAX_FIELD_BYTES)
    if raw is None:
        raise refuse(400, f"form field {part.name!r} is longer than {MAX_FIELD_BYTES} bytes")
    try:
        return part.name, raw.decode("utf-8")
    except UnicodeDecodeError:
        raise refuse(400, f"form field {part.name!r} is not UTF-8 text") from None


def _too_big(max_bytes: int, declared: int | None = None) -> str:
    size = f"is {declared} bytes" if declared is not None else "is larger"
    return f"the upload {size}, more than the limit of {max_bytes} bytes (clips.max_bytes)"


# ---- the worker thread -------------------------------------------------------------------------


async def run_in_fresh_thread(fn: Callable[..., Any], *args: Any, done: Callable[[], None]) -> Any:
    """`fn(*args)` in a new thread at a lower CPU priority; its result or exception. `done()`
    runs on the loop when the thread has ended, also when the awaiting task was cancelled
    meanwhile (the thread cannot be stopped; it is bounded by the clip's limits)."""
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        done()
        if outcome.done():  # cancelled
            return
        if error is None:
            outcome.set_result(result)
        else:
            outcome.set_exception(error)

    def run() -> None:
        _lower_priority()
        result, error = None, None
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            error = e
        with contextlib.suppress(RuntimeError):  # the loop closed (shutdown): nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="clip-encode", daemon=True).start()
    return await outcome


def _lower_priority() -> None:
    """Nice the calling thread (Linux: per thread; its OpenMP workers, created by it, inherit
    it), so that the generator wins the CPU while a clip is encoded."""
    if sys.platform != "linux":
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + ENCODE_NICE)
    except OSError:
        pass
