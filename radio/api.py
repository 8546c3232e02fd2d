"""The JSON API: now playing, admin settings, health.

- `GET /api/stations`, `GET /api/stations/{id}`: name, prompt (and blend) and since when,
  history, listener counts, absolute stream URLs, generation health, and the `programme` (what
  plays and why, a transition, what comes next, today's schedule, the queue with votes).
- Prompts, suggestions, votes, skips, pins, schedules and clips: `radio.programme_api`.
- `POST /api/stations/{id}/sampling` `{"temperature": 0.9, ...}`: admin only.
- `GET /healthz`: 200 when every station plays, 503 (with the reasons) otherwise: a station
  down until its reopen, a generator thread that died, a generation step that made no progress
  for `generation.stall_seconds` (`radio.healing`), a clock that stopped ticking.

Every error is JSON `{"error": "..."}` with a 4xx/5xx status, CORS included, input bounded before
use (`radio.middleware`, `radio.jsonbody`, `radio.cors`). The routes are declared in
`radio.routes`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from typing import Any

from aiohttp import web

from radio.access import require_admin
from radio.history import iso
from radio.jsonbody import read_json_object
from radio.middleware import ApiError
from radio.service import RADIO, Radio
from radio.station import Station
from radio.timing import APPLY_TIMEOUT

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
        "blend": st.blend.to_json(),
        "prompt_since": iso(st.prompt_since),
        "listeners": st.listeners_json(),
        "streams": streams,
        "health": st.health_json(),
        "programme": radio.programmes[st.id].now_playing(),
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
    problems = radio.supervisor.problems()  # a dead generator thread, a stalled step
    now = time.monotonic()
    for st in radio.stations.values():
        retry_in = st.health.retry_in(now)
        if retry_in is not None:
            problems.append(f"{st.id}: {st.health.error}; reopening it in {retry_in:.0f} s")
        elif st.health.error:
            problems.append(f"{st.id}: {st.health.error}")
        elif not st.health.started:
            problems.append(f"{st.id}: starting (filling its buffer)")
        elif now - st.health.last_tick > STUCK_SECONDS:
            problems.append(f"{st.id}: clock stuck for {now - st.health.last_tick:.0f} s")
    if problems:
        return web.json_response({"status": "unavailable", "problems": problems}, status=503)
    return web.json_response({"status": "ok"})
