"""What every request goes through, on a small app served by pytest-aiohttp: CORS from one rule
on every kind of response (JSON, streamed, errors raised anywhere, preflight), aiohttp's own
errors as JSON, refusals before the handler, and the counts /metrics shows. (A compressed body,
refused 415 unread, is tested on raw sockets in test_api.py and test_fuzz.py.)"""

from __future__ import annotations

from aiohttp import web

from radio import cors
from radio.middleware import MAX_BODY, REQUEST_COUNTS, ApiError, RequestCounts, json_errors


def small_app() -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        return response

    async def refuse(request: web.Request) -> web.Response:
        raise ApiError(503, "station main is full")

    async def leave(request: web.Request) -> web.Response:
        raise ConnectionResetError("peer gone")

    app = web.Application(client_max_size=MAX_BODY, middlewares=[json_errors])
    app[REQUEST_COUNTS] = RequestCounts()
    app.on_response_prepare.append(cors.add_cors)
    app.router.add_route("*", "/api/ok", ok)
    app.router.add_get("/api/events", stream)
    app.router.add_get("/hls/main/live.m3u8", ok)
    app.router.add_get("/main.mp3", refuse)
    app.router.add_get("/", ok)
    app.router.add_get("/api/leave", leave)
    return app


async def error(response) -> str:
    assert response.content_type == "application/json"
    return (await response.json())["error"]


async def test_cors_comes_from_one_rule_on_every_kind_of_response(aiohttp_client):
    client = await aiohttp_client(small_app())
    r = await client.get("/api/ok")
    assert r.status == 200 and {k: r.headers.get(k) for k in cors.API} == cors.API
    r = await client.get("/api/events")
    assert r.headers["Access-Control-Allow-Origin"] == "*"  # streamed: set at prepare
    assert await r.content.read() == b"data: 1\n\n"
    r = await client.get("/hls/main/live.m3u8")
    assert r.headers["Access-Control-Expose-Headers"] == "Content-Length, Content-Range"
    r = await client.get("/main.mp3")  # an error raised by a handler
    assert r.status == 503 and await error(r) == "station main is full"
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    r = await client.get("/nowhere")  # aiohttp's own 404, outside /api/
    assert r.status == 404 and await error(r) == "not found"
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    r = await client.get("/")  # the page: same origin only
    assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers


async def test_preflight_is_answered_for_the_api_and_hls(aiohttp_client):
    client = await aiohttp_client(small_app())
    r = await client.options("/api/anything", headers={"Origin": "https://elsewhere.example"})
    assert (
        r.status == 204
        and r.headers["Access-Control-Allow-Methods"] == "GET, POST, PUT, DELETE, OPTIONS"
    )
    r = await client.options("/hls/main/seg1.ts")
    assert r.status == 204 and "Range" in r.headers["Access-Control-Allow-Headers"]


async def test_aiohttps_errors_and_refusals_are_json_and_counted(aiohttp_client):
    app = small_app()
    client = await aiohttp_client(app)
    r = await client.post("/api/ok", data=b"x" * (MAX_BODY + 1))
    assert (
        r.status == 413 and await error(r) == f"request body too large (at most {MAX_BODY} bytes)"
    )
    r = await client.get("/api/ok%01")
    assert r.status == 400 and "control characters" in await error(r)
    r = await client.post("/main.mp3")
    assert r.status == 405 and r.headers["Allow"] == "GET,HEAD" and await error(r)
    r = await client.get("/api/leave")  # the client left mid-request: counted, quietly
    assert r.status == 400
    counts = app[REQUEST_COUNTS]
    assert dict(counts.bad) == {413: 1, 400: 1, 405: 1} and counts.aborted == 1  # left: not a 4xx
