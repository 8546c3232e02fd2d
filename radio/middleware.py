"""What every request goes through: JSON errors, refusals before any handler, CORS preflight.

`ApiError` is an HTTP error whose body is `{"error": reason}`. The `json_errors` middleware
answers a CORS preflight (`OPTIONS` to the API or HLS, headers from `radio.cors`), refuses what
no handler accepts (`check_request`: control characters in the path, a compressed body), turns
aiohttp's own errors (404 no route, 405, 413 body too large, a body that broke HTTP's rules) into
`ApiError`s, and counts every 4xx and every client that left mid-request in the application's
`RequestCounts` (`app[REQUEST_COUNTS]`; an application without one counts nothing). A client
that leaves is normal life: counted and logged at debug level, never as an error.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.http import HttpProcessingError

from radio import cors

log = logging.getLogger(__name__)

MAX_BODY = 4096  # bytes in a request body (the app's client_max_size; uploads read their own)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(web.HTTPException):
    """An HTTP error whose body is `{"error": reason}`."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        self.status_code = status
        super().__init__(
            text=json.dumps({"error": reason}), content_type="application/json", headers=headers
        )


@dataclass
class RequestCounts:
    """What the application refused or lost, for /metrics."""

    bad: Counter[int] = field(default_factory=Counter)  # 4xx answers, by status
    aborted: int = 0  # requests whose client left before the answer was complete

    def answered(self, status: int) -> None:
        if 400 <= status < 500:
            self.bad[status] += 1


REQUEST_COUNTS = web.AppKey("request_counts", RequestCounts)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Preflight, refusals, aiohttp's errors as JSON, counts (see the module docstring)."""
    if request.method == "OPTIONS" and cors.preflight(request.path):
        return web.Response(status=204, headers=cors.headers_for(request.path))
    counts = request.app.get(REQUEST_COUNTS) or RequestCounts()
    try:
        check_request(request)
        response = await handler(request)
    except ApiError as e:
        counts.answered(e.status)
        raise
    except web.HTTPException as e:
        if e.status < 400:
            raise
        reason = e.reason
        if e.status == 413:
            reason = f"request body too large (at most {MAX_BODY} bytes)"
        elif e.status == 404:
            reason = "not found"
        counts.answered(e.status)
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None  # 405
        raise ApiError(e.status, reason, allow) from None
    except (HttpProcessingError, web.RequestPayloadError) as e:  # a body broke HTTP's rules
        counts.answered(400)
        reason = e.message if isinstance(e, HttpProcessingError) else str(e)
        raise ApiError(400, f"bad request body: {reason.strip()[:200]}") from None
    except ConnectionError as e:  # the client left: whatever we answer goes nowhere
        counts.aborted += 1
        log.debug("%s %s: the client left (%s)", request.method, request.path, e)
        raise ApiError(400, "the client closed the connection") from None
    counts.answered(response.status)
    return response


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
