"""Request bodies as bounded JSON: at most `MAX_BODY` bytes of UTF-8, nested at most
`MAX_JSON_DEPTH` deep, finite numbers only (no NaN, Infinity or 1e999), each key once, an object
at the top. Anything else is an `ApiError` 413 or 400 naming what is wrong."""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

from radio.middleware import MAX_BODY, ApiError

MAX_JSON_DEPTH = 8  # nesting levels in a JSON body (the API's bodies are flat objects)


async def read_json_object(request: web.Request, limit: int = MAX_BODY) -> dict[str, Any]:
    """The body as a JSON object of at most `limit` bytes (more than the app's
    `client_max_size` only for routes that take larger documents, e.g. a schedule); ApiError
    413/400 naming what is wrong with it."""
    if limit <= MAX_BODY:
        body = await request.read()  # raises 413 beyond client_max_size
    else:
        body = await _read_capped(request, limit)
    if len(body) > limit:
        raise ApiError(413, f"request body too large (at most {limit} bytes)")
    return parse_json_object(body)


async def _read_capped(request: web.Request, limit: int) -> bytes:
    """The body streamed, refused (413) as soon as it passes `limit` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"request body too large (at most {limit} bytes)")
    chunks, size = [], 0
    while chunk := await request.content.read(65536):
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body too large (at most {limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


class _Refused(ValueError):
    """JSON that parses but that the API does not take (the message says why)."""


def parse_json_object(body: bytes) -> dict[str, Any]:
    """A JSON object from UTF-8 bytes: nested at most MAX_JSON_DEPTH deep, finite numbers
    only (no NaN, Infinity or 1e999), each key once; ApiError 400 otherwise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "body is not valid JSON (it must be UTF-8)") from None
    if json_depth(text) > MAX_JSON_DEPTH:
        raise ApiError(400, f"body is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    try:
        data = json.loads(
            text,
            parse_constant=_no_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except _Refused as e:
        raise ApiError(400, f"body is not accepted: {e}") from None
    except ValueError:  # JSONDecodeError, or an integer of more than 4300 digits
        raise ApiError(400, "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a JSON object")
    return data


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in JSON text (brackets inside strings not counted)."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:20]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"the key {key[:40]!r} appears twice")
        out[key] = value
    return out
