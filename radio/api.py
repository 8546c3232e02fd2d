"""The JSON API: now playing, live prompt changes, admin settings, health.

- `GET /api/stations`, `GET /api/stations/{id}`: name, prompt and since when, history, listener
  counts, absolute stream URLs, generation health.
- `POST /api/stations/{id}/prompt` `{"prompt": "..."}`: open to listeners, limited per client
  address (`security.prompt_rate_limit`); `Authorization: Bearer <admin_token>` lifts the limit.
  The station's `PromptTimeline` places the change (`radio.timing`); 202 says when it will be
  heard.
- `POST /api/stations/{id}/sampling` `{"temperature": 0.9, ...}`: admin only.
- `GET /healthz`: 200 when every station plays, 503 (with the reason) otherwise.

Every error is JSON `{"error": "..."}` with a 4xx/5xx status, CORS included, input bounded before
use (`radio.middleware`, `radio.jsonbody`, `radio.cors`). The routes are declared in
`radio.routes`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import time
import unicodedata
from typing import Any

from aiohttp import web

from radio.access import client_address, is_admin, require_admin
from radio.history import iso
from radio.jsonbody import read_json_object
from radio.middleware import ApiError
from radio.service import RADIO, Radio
from radio.station import Station
from radio.timing import APPLY_TIMEOUT, NotRunning

STUCK_SECONDS = 5.0  # a clock that has not ticked for this long makes /healthz fail
SAMPLING_KEYS = {"guidance_scale": float, "temperature": float, "top_k": int, "top_p": float}
_HOST = re.compile(  # a Host header: name or IPv4 address, or [IPv6], and an optional port
    r"^(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?$"
)


def station_of(request: web.Request) -> Station:
    sid = request.match_info["station"]
    st = request.app[RADIO].stations.get(sid)
    if st is None:
        raise ApiError(404, f"no station {sid!r}")
    return st


def base_url(request: web.Request) -> str:
    """`server.public_url`, else scheme and Host of the request (ApiError 400 for a Host
    header that is not a host name or address: it would end up in URLs and headers)."""
    public = request.app[RADIO].config.server.public_url
    if public:
        return public.rstrip("/")
    host = request.host
    if not _HOST.match(host):
        raise ApiError(400, "the Host header is not a host name or address")
    return f"{request.scheme}://{host}"


def station_json(radio: Radio, st: Station, base: str, full: bool) -> dict[str, Any]:
    streams = {"mp3": f"{base}/{st.id}.mp3"}
    if radio.config.hls.enabled:
        streams["hls"] = f"{base}/hls/{st.id}/live.m3u8"
    out: dict[str, Any] = {
        "id": st.id,
        "name": st.config.name,
        "description": st.config.description,
        "genre": st.config.genre,
        "prompt": st.prompt,
        "prompt_since": iso(st.prompt_since),
        "listeners": st.listeners_json(),
        "streams": streams,
        "health": st.health_json(),
    }
    if st.id in radio.icecast:  # connected, last_error, reconnects, bytes_sent, ...
        out["icecast"] = radio.icecast[st.id].status.as_dict()
    if full:
        out["history"] = st.history_json()
        out["events"] = f"{base}/api/stations/{st.id}/events"
    return out


async def list_stations(request: web.Request) -> web.Response:
    radio = request.app[RADIO]
    base = base_url(request)
    return web.json_response(
        {"stations": [station_json(radio, st, base, full=False) for st in radio.stations.values()]}
    )


async def get_station(request: web.Request) -> web.Response:
    st = station_of(request)
    return web.json_response(station_json(request.app[RADIO], st, base_url(request), full=True))


def check_prompt(data: dict[str, Any], radio: Radio, admin: bool) -> str:
    unknown = set(data) - {"prompt"}
    if unknown:
        raise ApiError(400, f"unknown field {sorted(unknown)[0]!r} (only 'prompt')")
    if "prompt" not in data:
        raise ApiError(400, "missing field 'prompt'")
    prompt = data["prompt"]
    if not isinstance(prompt, str):
        raise ApiError(400, f"'prompt' must be a string, got {type(prompt).__name__}")
    sec = radio.config.security
    if any(unicodedata.category(c) in ("Cc", "Cs") or c in "\u2028\u2029" for c in prompt):
        raise ApiError(400, "'prompt' must not contain control characters (newlines, tabs, ...)")
    prompt = " ".join(prompt.split())
    if len(prompt) > sec.max_prompt_length:
        raise ApiError(
            400, f"'prompt' is too long ({len(prompt)} characters, at most {sec.max_prompt_length})"
        )
    if not prompt and not (sec.allow_empty_prompt or admin):
        raise ApiError(400, "'prompt' must not be empty")
    return prompt


def check_rate(request: web.Request, radio: Radio) -> None:
    """ApiError 403 when only the admin may change prompts, 429 when this address changed
    too many lately."""
    if radio.limiter.count == 0:
        raise ApiError(403, "on this radio only the admin changes the prompt")
    wait = radio.limiter.check(client_address(request))
    if wait > 0:
        raise ApiError(
            429,
            f"too many prompt changes from your address; try again in {math.ceil(wait)} s",
            {"Retry-After": str(math.ceil(wait))},
        )


async def post_prompt(request: web.Request) -> web.Response:
    requested_at = time.monotonic()
    radio = request.app[RADIO]
    st = station_of(request)
    admin = is_admin(request)
    prompt = check_prompt(await read_json_object(request), radio, admin)
    if not admin:
        check_rate(request, radio)
    timeline = radio.timing[st.id]
    try:
        applied = await timeline.change(
            prompt, "admin" if admin else "listener", requested_at=requested_at
        )
    except NotRunning as e:
        raise ApiError(503, str(e)) from None
    except TimeoutError:
        raise ApiError(503, "the generator did not take the prompt in time; try again") from None
    except ValueError as e:
        raise ApiError(400, f"the engine refused the prompt: {e}") from None
    return web.json_response(
        {
            "station": st.id,
            "prompt": prompt,
            "frame": applied.frame,
            "heard_in_seconds": round(applied.heard_in, 3),
            "heard_at": iso(applied.heard_at),
        },
        status=202,
    )


async def post_sampling(request: web.Request) -> web.Response:
    radio = request.app[RADIO]
    st = station_of(request)
    require_admin(request)
    data = await read_json_object(request)
    changes = {}
    for key, value in data.items():
        kind = SAMPLING_KEYS.get(key)
        if kind is None:
            raise ApiError(400, f"unknown field {key!r} (one of {', '.join(SAMPLING_KEYS)})")
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or (kind is int and not isinstance(value, int)):
            raise ApiError(400, f"{key!r} must be a number{' (integer)' if kind is int else ''}")
        changes[key] = kind(value)
    try:
        new = dataclasses.replace(st.sampling, **changes).validate()
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    if not radio.generator.alive:
        raise ApiError(503, "the generator is not running")
    fut = radio.generator.set_sampling(st.id, new)
    try:
        await asyncio.wait_for(asyncio.shield(fut), APPLY_TIMEOUT)
    except TimeoutError:
        raise ApiError(503, "the generator did not take the settings in time") from None
    st.sampling = new
    fields = {k: getattr(new, k) for k in SAMPLING_KEYS}
    st.events.publish("sampling", fields)
    return web.json_response({"station": st.id, "sampling": fields})


async def healthz(request: web.Request) -> web.Response:
    radio = request.app[RADIO]
    problems = []
    if not radio.generator.alive:
        problems.append("the generator thread is not running")
    now = time.monotonic()
    for st in radio.stations.values():
        if st.health.error:
            problems.append(f"{st.id}: {st.health.error}")
        elif not st.health.started:
            problems.append(f"{st.id}: starting (filling its buffer)")
        elif now - st.health.last_tick > STUCK_SECONDS:
            problems.append(f"{st.id}: clock stuck for {now - st.health.last_tick:.0f} s")
    if problems:
        return web.json_response({"status": "unavailable", "problems": problems}, status=503)
    return web.json_response({"status": "ok"})
