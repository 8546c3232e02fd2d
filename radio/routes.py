"""Every route of the radio, declared here, and the handlers of what listeners fetch.

| route | handler |
| --- | --- |
| `GET /` | the web page (`radio/static/index.html`) |
| `GET /static/...` | its scripts, styles and vendored hls.js |
| `GET /{station}.mp3` | the Icecast-compatible MP3 mount (`radio.mounts.stream_mp3`) |
| `GET /hls/{station}/live.m3u8`, `GET /hls/{station}/{segment}` | HLS (`radio.hls`) |
| `GET /api/stations`, `GET /api/stations/{station}` | now playing (`radio.api`) |
| `POST /api/stations/{station}/prompt` | a prompt or blend: played, queued or refused (`radio.programme_api`) |
| `GET`, `POST /api/stations/{station}/suggestions` | the listeners' queue (`radio.programme_api`) |
| `POST /api/stations/{station}/suggestions/{n}/vote` | an upvote |
| `DELETE /api/stations/{station}/suggestions[/{n}]` | admin: clear the queue, remove one |
| `POST /api/stations/{station}/skip` | a skip vote |
| `POST`, `DELETE /api/stations/{station}/pin` | admin: pin a blend, unpin |
| `GET`, `PUT /api/stations/{station}/schedule` | the programme settings; admin: replace them |
| `POST /api/stations/{station}/clip` | admin: continue from an uploaded clip |
| `POST /api/stations/{station}/sampling` | sampling settings, admin (`radio.api`) |
| `GET /api/stations/{station}/events` | Server-Sent Events (`radio.events`) |
| `GET /healthz` | 200 or 503 with the reasons (`radio.api`) |
| `GET /metrics` | Prometheus text (`radio.metrics`) |

CORS headers come from `radio.cors` (one rule for every response).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from radio import api, cors, events, metrics, mounts
from radio import programme_api as prog
from radio.access import client_address
from radio.hls import PLAYLIST_CONTENT_TYPE, SEGMENT_CONTENT_TYPE
from radio.hls_output import HlsOutput
from radio.middleware import ApiError
from radio.service import RADIO

STATIC_DIR = Path(__file__).parent / "static"


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/", index)
    if STATIC_DIR.is_dir():
        r.add_static("/static", STATIC_DIR)
    r.add_get("/{station:[a-z0-9][a-z0-9_-]*}.mp3", mp3)
    r.add_get("/hls/{station}/live.m3u8", hls_playlist)
    r.add_get("/hls/{station}/{segment}", hls_segment)
    r.add_get("/api/stations", api.list_stations)
    r.add_get("/api/stations/{station}", api.get_station)
    r.add_post("/api/stations/{station}/prompt", prog.post_prompt)
    r.add_get("/api/stations/{station}/suggestions", prog.get_suggestions)
    r.add_post("/api/stations/{station}/suggestions", prog.post_suggestion)
    r.add_delete("/api/stations/{station}/suggestions", prog.delete_suggestions)
    r.add_post("/api/stations/{station}/suggestions/{suggestion}/vote", prog.post_vote)
    r.add_delete("/api/stations/{station}/suggestions/{suggestion}", prog.delete_suggestion)
    r.add_post("/api/stations/{station}/skip", prog.post_skip)
    r.add_post("/api/stations/{station}/pin", prog.post_pin)
    r.add_delete("/api/stations/{station}/pin", prog.delete_pin)
    r.add_get("/api/stations/{station}/schedule", prog.get_schedule)
    r.add_put("/api/stations/{station}/schedule", prog.put_schedule)
    r.add_post("/api/stations/{station}/clip", prog.post_clip)
    r.add_post("/api/stations/{station}/sampling", api.post_sampling)
    r.add_get("/api/stations/{station}/events", station_events)
    r.add_get("/healthz", api.healthz)
    r.add_get("/metrics", metrics.metrics)


async def index(request: web.Request) -> web.StreamResponse:
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        raise ApiError(404, "the web page is not installed (radio/static/index.html)")
    return web.FileResponse(page, headers={"Cache-Control": "no-cache"})


async def mp3(request: web.Request) -> web.StreamResponse:
    radio = request.app[RADIO]
    st = api.station_of(request)
    mount = radio.mp3[st.id]
    if mount.count() >= radio.config.security.max_listeners:
        mount.refused += 1
        raise ApiError(503, f"station {st.id} is full ({mount.count()} listeners)")
    sc = st.config
    headers = mounts.mp3_headers(
        sc.name,
        sc.description,
        sc.genre,
        radio.config.audio.mp3_bitrate,
        radio.config.audio.output_sample_rate,
        api.base_url(request) + "/",
    )
    headers.update(cors.headers_for(request.path))  # the head is written raw: no prepare signal
    timeline = radio.timing[st.id]
    return await mounts.stream_mp3(request, mount, headers, title=lambda: timeline.on_air)


async def station_events(request: web.Request) -> web.StreamResponse:
    st = api.station_of(request)
    snapshot = api.station_json(request.app[RADIO], st, api.base_url(request), full=True)
    return await events.stream_events(request, st.events, snapshot)


def _hls_output(request: web.Request) -> HlsOutput:
    st = api.station_of(request)
    out = request.app[RADIO].hls.get(st.id)
    if out is None:
        raise ApiError(404, "HLS is disabled (hls.enabled = false)")
    return out


def _listener(request: web.Request) -> str:
    """An HLS client: its address and player (one address may hold several players)."""
    return f"{client_address(request)}|{request.headers.get('User-Agent', '')}"


async def hls_playlist(request: web.Request) -> web.Response:
    out = _hls_output(request)
    out.saw(_listener(request))
    return web.Response(
        body=out.segmenter.playlist().encode(),
        headers={"Content-Type": PLAYLIST_CONTENT_TYPE, "Cache-Control": "no-cache, no-store"},
    )


async def hls_segment(request: web.Request) -> web.Response:
    out = _hls_output(request)
    name = request.match_info["segment"]
    data = out.segmenter.segment(name)
    if data is None:
        raise ApiError(404, f"segment {name} is not (or no longer) available")
    out.saw(_listener(request))
    return web.Response(
        body=data,
        headers={
            "Content-Type": SEGMENT_CONTENT_TYPE,
            "Cache-Control": "public, max-age=60",  # a segment never changes once listed
        },
    )
