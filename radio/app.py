"""`init_app(config)`: the aiohttp application of `radio serve`, built the same way in tests.

It loads the model once (or takes one already loaded), makes a `Station` per `[[stations]]`,
and wires the routes. The background work lives in `cleanup_ctx`: on start-up the generator
thread and one clock task per station start; on shutdown the listeners and event streams are
closed first (so Ctrl-C never waits on a player), then the clocks stop and the worker thread is
joined.

Per station: generator thread -> station buffer -> clock -> loudness -> MP3 mount and HLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from radio import api, events, hls_routes, metrics, mounts, persist, quietlog
from radio.clock import StationClock
from radio.config import Config
from radio.context import RADIO, Radio, RadioSink
from radio.generator import Generator, StationSpec
from radio.icecast import IcecastSource, follow_prompts, mount_chunks, resolve_password
from radio.loudness import LoudnessNormalizer
from radio.station import Station

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
HEALTH_EVENT_SECONDS = 5.0  # how often SSE subscribers get a health event
LOG_SECONDS = 30.0  # how often the log says how each station is doing


def load_model(config: Config) -> Any:
    from engine import MusicModel

    opts = config.model.load_options()
    log.info("loading model %s (device %s, dtype %s) ...", opts.model, opts.device, opts.dtype)
    t = time.monotonic()
    model = MusicModel.load_in_thread(opts)  # all torch work then runs in the generator's thread
    log.info(
        "model loaded in %.1f s: %d Hz, %d channel(s)",
        time.monotonic() - t,
        model.sample_rate,
        model.channels,
    )
    return model


def init_app(config: Config, model: Any = None) -> web.Application:
    """The application; `model` = an already loaded engine `MusicModel` (tests share one)."""
    if model is None:
        model = load_model(config)
    app = web.Application(client_max_size=api.MAX_BODY, middlewares=[api.json_errors])
    radio = build_radio(config, model)
    app[RADIO] = radio
    add_routes(app)
    app.cleanup_ctx.append(_background)
    app.on_shutdown.append(_close_listeners)
    return app


def build_radio(config: Config, model: Any) -> Radio:
    store = persist.open_store(config.server.state_file)
    saved = persist.load_saved(store)
    stations = {}
    for i, sc in enumerate(config.stations):
        st = Station(config=sc, index=i, channels=model.channels)
        st.sampling = config.generation.sampling_options(i)
        st.record_prompt(sc.prompt, "config")
        stations[sc.id] = st
    radio = Radio(
        config=config,
        model=model,
        sample_rate=model.sample_rate,
        channels=model.channels,
        hop=model.hop,
        frame_rate=model.frame_rate,
        stations=stations,
        store=store,
    )
    persist.restore(radio, saved)
    count, seconds = config.security.rate_limit()
    radio.limiter = api.RateLimiter(count, seconds)
    radio.client_noise = quietlog.install()  # malformed requests and lost peers: debug level
    radio.metrics = metrics.make_registry(radio)
    a = config.audio
    for sid, st in stations.items():
        radio.mp3[sid] = mounts.Mp3Mount(
            model.sample_rate,
            model.channels,
            a.mp3_bitrate,
            a.output_sample_rate,
            a.mp3_burst_seconds,
            a.listener_queue_seconds,
            on_count=lambda n, st=st: st.set_listeners(mp3=n),
        )
        if st.config.icecast is not None:
            radio.icecast[sid] = _icecast_source(config, st.config, model.channels)
        if config.hls.enabled:
            radio.hls[sid] = hls_routes.HlsOutput(
                _segmenter(config, model, sid, saved.get(sid)),
                on_count=lambda n, st=st: st.set_listeners(hls=n),
            )
    return radio


def _segmenter(config: Config, model: Any, station_id: str, saved: Any = None) -> Any:
    from radio.hls import HlsSegmenter

    h = config.hls
    out_dir = str(Path(h.dir) / station_id) if h.dir else None
    return HlsSegmenter(
        model.sample_rate,
        model.channels,
        segment_seconds=h.segment_seconds,
        playlist_segments=h.playlist_segments,
        bitrate_kbps=h.bitrate,
        out_dir=out_dir,
        output_sample_rate=config.audio.output_sample_rate,
        start_sequence=persist.hls_start_sequence(saved, h.segment_seconds),
    )


# ---- routes ------------------------------------------------------------------------------


def add_routes(app: web.Application) -> None:
    api.add_routes(app)
    app.router.add_get("/api/stations/{station}/events", _events)
    app.router.add_get("/metrics", metrics.metrics)
    app.router.add_get("/{station:[a-z0-9][a-z0-9_-]*}.mp3", _mp3)
    app.router.add_get("/hls/{station}/live.m3u8", _hls_playlist)
    app.router.add_get("/hls/{station}/{segment}", _hls_segment)
    app.router.add_get("/", _index)
    if STATIC_DIR.is_dir():
        app.router.add_static("/static", STATIC_DIR)


async def _index(request: web.Request) -> web.StreamResponse:
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        raise api.ApiError(404, "the web page is not installed (radio/static/index.html)")
    return web.FileResponse(page, headers={"Cache-Control": "no-cache"})


async def _events(request: web.Request) -> web.StreamResponse:
    st = api.station_of(request)
    snapshot = api.station_json(request.app[RADIO], st, api.base_url(request), full=True)
    return await events.stream_events(request, st, snapshot)


async def _mp3(request: web.Request) -> web.StreamResponse:
    radio = request.app[RADIO]
    st = api.station_of(request)
    mount = radio.mp3[st.id]
    if mount.count() >= radio.config.security.max_listeners:
        mount.refused += 1
        raise api.ApiError(503, f"station {st.id} is full ({mount.count()} listeners)")
    sc = st.config
    headers = mounts.mp3_headers(
        sc.name,
        sc.description,
        sc.genre,
        radio.config.audio.mp3_bitrate,
        radio.config.audio.output_sample_rate,
        api.base_url(request) + "/",
    )
    return await mounts.stream_mp3(request, mount, headers, title=lambda: st.prompt)


def _hls_output(request: web.Request) -> hls_routes.HlsOutput:
    st = api.station_of(request)
    out = request.app[RADIO].hls.get(st.id)
    if out is None:
        raise api.ApiError(404, "HLS is disabled (hls.enabled = false)")
    return out


async def _hls_playlist(request: web.Request) -> web.Response:
    return hls_routes.playlist_response(_hls_output(request), request, api.client_address(request))


async def _hls_segment(request: web.Request) -> web.Response:
    name = request.match_info["segment"]
    return hls_routes.segment_response(
        _hls_output(request), name, request, api.client_address(request)
    )


# ---- background work ---------------------------------------------------------------------


async def _background(app: web.Application) -> AsyncIterator[None]:
    radio = app[RADIO]
    loop = asyncio.get_running_loop()
    g = radio.config.generation
    specs = [
        StationSpec(st.id, st.prompt, st.sampling, g.window_options())
        for st in radio.stations.values()
    ]
    gen = Generator(
        radio.model,
        specs,
        RadioSink(radio),
        loop,
        buffer_ahead=g.buffer_ahead,
        chunk_frames=max(1, round(g.chunk_seconds * radio.frame_rate)),
    )
    radio.generator = gen
    gen.start()
    prime = min(1.0, g.buffer_ahead / 2)
    a = radio.config.audio
    tasks = []
    for sid, st in radio.stations.items():
        norm = LoudnessNormalizer(radio.sample_rate, radio.channels, a.loudness_target, a.true_peak)
        radio.output_latency = norm.latency_samples
        outputs: list[Any] = [radio.mp3[sid]]
        if sid in radio.hls:
            outputs.append(radio.hls[sid])
        clock = StationClock(
            st,
            radio.sample_rate,
            radio.hop,
            outputs,
            process=norm.process,
            process_latency=norm.latency_samples,
            on_played=lambda frame, sid=sid: gen.played(sid, frame),
            prime_seconds=prime,
            recover_seconds=prime,
            full_seconds=max(prime, 0.95 * g.buffer_ahead),
        )
        radio.clocks[sid] = clock
        tasks.append(asyncio.create_task(clock.run(), name=f"clock-{sid}"))
    tasks += _icecast_tasks(radio)
    if radio.store is not None:
        tasks.append(asyncio.create_task(persist.keep_saving(radio, radio.store), name="state"))
    tasks.append(asyncio.create_task(_heartbeat(radio), name="heartbeat"))
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await loop.run_in_executor(None, gen.stop)
        log.info("generator stopped")


def _icecast_source(config: Config, sc: Any, channels: int) -> IcecastSource:
    """The source client of a station with [stations.icecast]; ValueError names a bad key."""
    ic = sc.icecast
    password = resolve_password(
        ic.password, ic.password_env, key=f"stations.{sc.id}.icecast.password"
    )
    return IcecastSource(
        ic.url,
        ic.mount or f"/{sc.id}.mp3",
        user=ic.user,
        password=password,
        name=sc.name,
        description=sc.description,
        genre=sc.genre,
        public=ic.public,
        bitrate_kbps=config.audio.mp3_bitrate,
        sample_rate=config.audio.output_sample_rate,
        channels=channels,
        label=sc.id,
    )


def _icecast_tasks(radio: Radio) -> list[asyncio.Task[None]]:
    """Each source streams its station's MP3 mount; its title follows the prompt."""
    tasks = []
    for sid, src in radio.icecast.items():
        chunks = mount_chunks(radio.mp3[sid])
        tasks.append(asyncio.create_task(src.run(chunks), name=f"icecast-{sid}"))
        tasks.append(
            asyncio.create_task(
                follow_prompts(src, radio.stations[sid]), name=f"icecast-title-{sid}"
            )
        )
    return tasks


async def _heartbeat(radio: Radio) -> None:
    """Health events for the pages, and a plain-words log line now and then."""
    last_log = time.monotonic()
    while True:
        await asyncio.sleep(HEALTH_EVENT_SECONDS)
        for st in radio.stations.values():
            st.events.publish("health", st.health_json())
        if time.monotonic() - last_log >= LOG_SECONDS:
            last_log = time.monotonic()
            for st in radio.stations.values():
                h = st.health
                log.info(
                    "station %s: generating %.1f s ahead, real time x%.1f, %d listener(s), %d underrun(s)",
                    st.id,
                    h.buffer_seconds,
                    h.realtime_factor,
                    st.mp3_listeners + st.hls_listeners,
                    h.underruns,
                )


async def _close_listeners(app: web.Application) -> None:
    radio = app[RADIO]
    n = sum(m.count() for m in radio.mp3.values())
    log.info("shutting down: closing %d listener(s)", n)
    for mount in radio.mp3.values():
        mount.close()
    for st in radio.stations.values():
        st.events.close()
