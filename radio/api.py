"""The JSON API: now playing, live prompt changes, admin settings, health.

- `GET /api/stations`, `GET /api/stations/{id}`: name, prompt and since when, history, listener
  counts, absolute stream URLs, generation health.
- `POST /api/stations/{id}/prompt` `{"prompt": "..."}`: open to listeners, limited per client
  address (`security.prompt_rate_limit`); `Authorization: Bearer <admin_token>` lifts the limit.
  The new prompt starts at the frame about to be heard; 202 says when it will be heard.
- `POST /api/stations/{id}/sampling` `{"temperature": 0.9, ...}`: admin only.
- `GET /healthz`: 200 when every station plays, 503 (with the reason) otherwise.

Every error is JSON `{"error": "..."}` with a 4xx/5xx status (`json_errors` middleware), and
every API response carries CORS headers. Input is bounded before it is used: a body of at most
`MAX_BODY` bytes of UTF-8 JSON nested at most `MAX_JSON_DEPTH` deep, without NaN, infinities or
repeated keys; no `Content-Encoding` (415); no control characters in the path; a Host header that
is a host name or address; a token of any bytes compared as bytes in constant time. A client
that leaves mid-request is counted and logged at debug level, never as an error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import re
import time
import unicodedata
from collections import deque
from typing import Any

from aiohttp import web
from aiohttp.http import HttpProcessingError

from radio.context import RADIO, Radio, RequestCounts
from radio.generator import auto_horizon
from radio.station import Station, iso

log = logging.getLogger(__name__)

MAX_BODY = 4096  # bytes in a POST body (the app's client_max_size)
MAX_JSON_DEPTH = 8  # nesting levels in a JSON body (the API's bodies are flat objects)
_HOST = re.compile(  # a Host header: name or IPv4 address, or [IPv6], and an optional port
    r"^(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?$"
)
APPLY_TIMEOUT = 15.0  # seconds a prompt POST waits for the generator to apply it
STUCK_SECONDS = 5.0  # a clock that has not ticked for this long makes /healthz fail
SAMPLING_KEYS = {"guidance_scale": float, "temperature": float, "top_k": int, "top_p": float}

API_CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Authorization",
    "Access-Control-Max-Age": "600",
}


class ApiError(web.HTTPException):
    """An HTTP error whose body is `{"error": reason}`."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        self.status_code = status
        super().__init__(
            text=json.dumps({"error": reason}),
            content_type="application/json",
            headers={**API_CORS, **(headers or {})},
        )


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own errors (413 body too large, 404 no route, 405) as JSON too; CORS
    preflight (OPTIONS) for the API and HLS; requests that cannot be served refused before the
    handler runs; every 4xx counted, and a client that left counted and let go quietly."""
    if request.method == "OPTIONS" and request.path.startswith(("/api/", "/hls/")):
        return web.Response(status=204, headers=API_CORS)
    radio = request.app.get(RADIO)  # an app without a radio (a test of one handler) counts nothing
    counts = radio.requests if radio is not None else RequestCounts()
    try:
        check_request(request)
        response = await handler(request)
    except ApiError as e:
        _count(counts, e.status)
        raise
    except web.HTTPException as e:
        if e.status < 400:
            raise
        reason = e.reason
        if e.status == 413:
            reason = f"request body too large (at most {MAX_BODY} bytes)"
        elif e.status == 404:
            reason = "not found"
        _count(counts, e.status)
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None  # 405
        raise ApiError(e.status, reason, allow) from None
    except (HttpProcessingError, web.RequestPayloadError) as e:  # a body broke HTTP's rules
        _count(counts, 400)
        reason = e.message if isinstance(e, HttpProcessingError) else str(e)
        raise ApiError(400, f"bad request body: {reason.strip()[:200]}") from None
    except ConnectionError as e:  # the client left: whatever we answer goes nowhere
        counts.aborted += 1
        log.debug("%s %s: the client left (%s)", request.method, request.path, e)
        raise ApiError(400, "the client closed the connection") from None
    _count(counts, response.status)
    if request.path.startswith("/api/"):
        for k, v in API_CORS.items():
            response.headers.setdefault(k, v)
    return response


def _count(counts: Any, status: int) -> None:
    if 400 <= status < 500:
        counts.bad[status] += 1


def check_request(request: web.Request) -> None:
    """ApiError for what no handler accepts: control characters in the path, and compressed
    bodies (the API's bodies are a few hundred bytes of JSON; refusing `Content-Encoding` keeps
    decompression and its failures out of the server)."""
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in request.path):
        raise ApiError(400, "the path contains control characters or bytes that are not UTF-8")
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if request.body_exists and encoding not in ("", "identity"):
        raise ApiError(
            415, f"Content-Encoding {encoding[:40]!r} is not accepted: send the body uncompressed"
        )


class RateLimiter:
    """At most `count` events per `seconds` per key (a sliding window of timestamps)."""

    def __init__(self, count: int, seconds: float) -> None:
        self.count = count
        self.seconds = seconds
        self._events: dict[str, deque[float]] = {}

    def check(self, key: str, now: float | None = None) -> float:
        """0 if allowed (and counted); else the seconds until it would be."""
        now = time.monotonic() if now is None else now
        q = self._events.setdefault(key, deque())
        while q and q[0] <= now - self.seconds:
            q.popleft()
        if len(q) < self.count:
            q.append(now)
            return 0.0
        self._forget_idle(now)
        return (q[0] + self.seconds - now) if q else self.seconds

    def _forget_idle(self, now: float) -> None:
        if len(self._events) > 10000:  # keep memory bounded under a flood of addresses
            for k in [k for k, q in self._events.items() if not q or q[-1] <= now - self.seconds]:
                del self._events[k]


def is_admin(request: web.Request) -> bool:
    """True with a correct `Authorization: Bearer <token>`; ApiError 403 with a wrong one.

    The header may hold any bytes (aiohttp hands over what is not UTF-8 as surrogates): the
    token is compared as the bytes that were sent, through SHA-256 so that neither its content
    nor its length shows in the time taken."""
    token = request.app[RADIO].config.security.admin_token
    header = request.headers.get("Authorization", "")
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(
            401, "Authorization must be 'Bearer <token>'", {"WWW-Authenticate": "Bearer"}
        )
    sent = hashlib.sha256(given.strip().encode("utf-8", "surrogateescape")).digest()
    if not token or not hmac.compare_digest(sent, hashlib.sha256(token.encode()).digest()):
        raise ApiError(403, "wrong admin token")
    return True


def require_admin(request: web.Request) -> None:
    if not request.app[RADIO].config.security.admin_token:
        raise ApiError(403, "admin actions are disabled (security.admin_token is not set)")
    if not is_admin(request):
        raise ApiError(401, "admin token required", {"WWW-Authenticate": "Bearer"})


def client_address(request: web.Request) -> str:
    """The client's address: the peer, or the first X-Forwarded-For hop when
    `server.trust_forwarded` (the radio sits behind the operator's own reverse proxy)."""
    if request.app[RADIO].config.server.trust_forwarded:
        forwarded = request.headers.get("X-Forwarded-For", "").split(",")[0].strip()
        if forwarded:
            return forwarded
    return request.remote or "?"


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


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; ApiError 413/400 naming what is wrong with it."""
    body = await request.read()  # raises 413 beyond client_max_size
    if len(body) > MAX_BODY:
        raise ApiError(413, f"request body too large (at most {MAX_BODY} bytes)")
    return parse_json_object(body)


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


def prompt_horizon(radio) -> float:
    """Seconds after the moment being played at which a posted prompt starts."""
    g = radio.config.generation
    if g.prompt_horizon >= 0:
        return g.prompt_horizon
    return auto_horizon(radio.generator.prefill_seconds, g.chunk_seconds)


async def post_prompt(request: web.Request) -> web.Response:
    posted_at = time.monotonic()
    radio = request.app[RADIO]
    st = station_of(request)
    admin = is_admin(request)
    prompt = check_prompt(await read_json_object(request), radio, admin)
    if not admin:
        if radio.limiter.count == 0:
            raise ApiError(403, "on this radio only the admin changes the prompt")
        wait = radio.limiter.check(client_address(request))
        if wait > 0:
            raise ApiError(
                429,
                f"too many prompt changes from your address; try again in {math.ceil(wait)} s",
                {"Retry-After": str(math.ceil(wait))},
            )
    if radio.generator is None or not radio.generator.alive:
        raise ApiError(503, "the generator is not running")
    horizon = round(prompt_horizon(radio) * radio.frame_rate)
    from_frame = -(-st.buffer.head // radio.hop) + horizon  # ceil(head / hop) + horizon
    fut = radio.generator.set_prompt(
        st.id, prompt, from_frame, posted_at, "admin" if admin else "listener"
    )
    try:
        frame = await asyncio.wait_for(asyncio.shield(fut), APPLY_TIMEOUT)
    except TimeoutError:
        raise ApiError(503, "the generator did not take the prompt in time; try again") from None
    except ValueError as e:
        raise ApiError(400, f"the engine refused the prompt: {e}") from None
    ahead = max(frame * radio.hop - st.buffer.head, 0) + radio.output_latency
    heard_in = ahead / radio.sample_rate
    return web.json_response(
        {
            "station": st.id,
            "prompt": prompt,
            "frame": frame,
            "heard_in_seconds": round(heard_in, 3),
            "heard_at": iso(time.time() + heard_in),
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
    current = st.sampling
    try:
        new = dataclasses.replace(current, **changes).validate()
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    if radio.generator is None or not radio.generator.alive:
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
    if radio.generator is None or not radio.generator.alive:
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


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/stations", list_stations)
    app.router.add_get("/api/stations/{station}", get_station)
    app.router.add_post("/api/stations/{station}/prompt", post_prompt)
    app.router.add_post("/api/stations/{station}/sampling", post_sampling)
    app.router.add_get("/healthz", healthz)
