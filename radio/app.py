"""`init_app(config)`: the aiohttp application of `radio serve`, built the same way in tests.

`build_radio` puts the parts together once (the model is loaded once, or handed in): per
`[[stations]]` a `Station`, its programme (`StationProgramme`: the director, restored from the
state file, which says what the station opens with), its `PromptTimeline`, its loudness stage,
its MP3 mount, its HLS output and its Icecast source; one `Generator` for all of them. The
background work lives in `cleanup_ctx`: on start-up the generator thread, one clock task and one
programme task per station, the Icecast relays, the state saver, the heartbeat and the
generator's supervisor (`radio.healing`) start; on shutdown the listeners and event streams are closed
first (so Ctrl-C never waits on a player), then the tasks stop and the worker thread is joined.

Per station: generator thread -> station buffer -> clock -> loudness -> MP3 mount and HLS
(-> Icecast). Routes: `radio.routes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from radio import cors, ladder, metrics, quietlog, restarts
from radio.clock import Output, Recovery, StationClock
from radio.config import Config, StationConfig, model_key
from radio.generator import STEADY_AHEAD, Generator, StationSpec
from radio.healing import Supervisor
from radio.hls import HlsSegmenter
from radio.hls_output import HlsOutput
from radio.icecast import IcecastSource
from radio.loudness import LoudnessNormalizer
from radio.middleware import MAX_BODY, REQUEST_COUNTS, json_errors
from radio.mounts import Mp3Mount
from radio.programme_runner import StationProgramme, open_station
from radio.ratelimit import RateLimiter
from radio.relay import relay_tasks
from radio.routes import add_routes
from radio.service import RADIO, Radio, StationSink
from radio.statefile import StationState
from radio.station import Station
from radio.timing import Horizon, PromptTimeline
from radio.uploads import ClipReader

if TYPE_CHECKING:
    from engine.load_thread import Loading
    from engine.model import MusicModel
    from radio.testing import FaultInjector

log = logging.getLogger(__name__)

HEALTH_EVENT_SECONDS = 5.0  # how often SSE subscribers get a health event
LOG_SECONDS = 30.0  # how often the log says how each station is doing


def load_model(config: Config, loading: Loading | None = None) -> MusicModel:
    """The model `config` names; `loading`: its load already under way (`radio serve` starts it
    before importing the web stack)."""
    from engine.load_thread import Loading
    from engine.loading import SettingError

    # in a thread of its own: all torch work then runs in the generator's thread
    loading = loading or Loading(config.model)
    try:
        model = loading.result()
    except SettingError as err:  # named as config.toml names it: model.kv_cache, model.id
        raise SettingError(f"model.{model_key(err.key)}: {err.reason}") from None
    log.info(
        "model loaded in %.1f s: %d Hz, %d channel(s)",
        time.monotonic() - loading.began,
        model.sample_rate,
        model.channels,
    )
    return model


def init_app(
    config: Config,
    model: MusicModel | None = None,
    *,
    faults: FaultInjector | None = None,
    programme_clock: Callable[[], float] = time.time,
) -> web.Application:
    """The application; `model` = an already loaded engine `MusicModel` (tests share one);
    `faults` = a `radio.testing.FaultInjector`, `programme_clock` = the clock the stations'
    directors read (tests only, e.g. `radio.testing.ShiftedClock`: the config cannot set them)."""
    if model is None:
        model = load_model(config)
    app = web.Application(client_max_size=MAX_BODY, middlewares=[json_errors])
    radio = build_radio(config, model, faults, programme_clock)
    app[RADIO] = radio
    app[REQUEST_COUNTS] = radio.requests
    add_routes(app)
    app.on_response_prepare.append(cors.add_cors)
    app.cleanup_ctx.append(_background)
    app.on_shutdown.append(_close_listeners)
    return app


def _coarse_when_behind(setting: bool | str, model: MusicModel) -> bool:
    """`generation.coarse_when_behind` for this model: "auto" is on where the model can decode
    with int4 weights while behind, and says so either way; true where it cannot is refused."""
    from engine.loading import SettingError

    why = model.coarse_available()
    if setting is True and why is not None:
        raise SettingError(f"generation.coarse_when_behind: {why}")
    if setting == "auto" and why is not None:
        log.info("generation.coarse_when_behind (auto) is off for this model: %s", why)
    return setting is True or (setting == "auto" and why is None)


def _say_rungs(adaptive_restarts: bool, model: MusicModel, coarse: bool, unguided: bool) -> None:
    """One start-up line for what the ladder takes under its margin and while generation falls
    behind."""
    if not adaptive_restarts:
        return
    rungs = ["shorter window restarts and windows"]
    if coarse:
        rungs.append("int4 weights (generation.coarse_when_behind)")
    if coarse and unguided:
        rungs.append("guidance off (generation.drop_guidance_when_behind)")
    behind = ", then ".join(rungs)
    if model.cheap_cache_available() is None:
        log.info(
            "under x%.1f of real time generation takes an int4 KV cache in place of the int8 "
            "one (within the precision budget); while it falls behind even so, %s until it can "
            "keep up",
            ladder.MARGIN,
            behind,
        )
    else:
        log.info(
            "while generation falls behind real time, it takes %s until it can keep up", behind
        )


def build_radio(
    config: Config,
    model: MusicModel,
    faults: FaultInjector | None = None,
    programme_clock: Callable[[], float] = time.time,
) -> Radio:
    coarse = _coarse_when_behind(config.generation.coarse_when_behind, model)
    unguided = config.generation.drop_guidance_when_behind
    _say_rungs(config.generation.adaptive_restarts, model, coarse, unguided)
    store = restarts.open_store(config.server.state_file)
    saved = restarts.load_saved(store)
    stations = {}
    for i, sc in enumerate(config.stations):
        stations[sc.id] = Station(sc, i, model.channels, config.generation.sampling_options(i))
    restarts.restore(stations, saved)
    directors = {
        sid: restarts.director(st.config, saved.get(sid), programme_clock)
        for sid, st in stations.items()
    }
    opening = {sid: open_station(st, directors[sid]) for sid, st in stations.items()}
    model.expect_stations(len(stations))
    g = config.generation
    chunk, steady = g.chunk_for(len(stations)), g.steady_chunk_for(len(stations))
    if g.chunk_seconds == "auto" or g.steady_chunk_seconds == "auto":
        log.info(
            "the generator makes %.1f s of audio a step for %d station(s), %.1f s once they "
            "have %.1f s ahead (generation.chunk_seconds, steady_chunk_seconds)",
            chunk,
            len(stations),
            steady,
            STEADY_AHEAD * steady,
        )
    generator = Generator(
        model,
        [StationSpec(st.id, opening[st.id], st.sampling, g.windows) for st in stations.values()],
        buffer_ahead=g.buffer_ahead,
        chunk_frames=max(1, round(chunk * model.frame_rate)),
        steady_frames=max(1, round(steady * model.frame_rate)),
        watchdog=config.watchdog,
        adaptive_restarts=g.adaptive_restarts,
        coarse_when_behind=coarse,
        drop_guidance_when_behind=unguided,
        faults=faults,
    )
    a = config.audio
    loudness = {
        sid: LoudnessNormalizer(model.sample_rate, model.channels, a.loudness_target, a.true_peak)
        for sid in stations
    }
    horizon = Horizon(g.prompt_horizon, chunk)
    recovery = bridge_recovery(g.buffer_ahead)
    timing = {
        sid: PromptTimeline(
            st,
            generator,
            hop=model.hop,
            sample_rate=model.sample_rate,
            horizon=horizon,
            output_latency=loudness[sid].latency_samples,
            recovery=recovery,
        )
        for sid, st in stations.items()
    }
    programmes = {
        sid: StationProgramme(st, directors[sid], timing[sid]) for sid, st in stations.items()
    }
    radio = Radio(
        config=config,
        model=model,
        stations=stations,
        generator=generator,
        supervisor=Supervisor(generator, g.stall_seconds),
        timing=timing,
        programmes=programmes,
        clips=ClipReader(config.clips, model),
        loudness=loudness,
        mp3={sid: _mp3_mount(config, model, st) for sid, st in stations.items()},
        limiter=RateLimiter(*config.security.rate_limit()),
        client_noise=quietlog.install(),  # malformed requests and lost peers: debug level
        store=store,
        faults=faults,
    )
    for sid, st in stations.items():
        if st.config.icecast is not None:
            radio.icecast[sid] = _icecast_source(config, st.config, model.channels)
        if config.hls.enabled:
            radio.hls[sid] = _hls_output(config, model, st, saved.get(sid))
    metrics.register(radio)
    return radio


def _mp3_mount(config: Config, model: MusicModel, st: Station) -> Mp3Mount:
    a = config.audio
    return Mp3Mount(
        model.sample_rate,
        model.channels,
        a.mp3_bitrate,
        a.output_sample_rate,
        a.mp3_burst_seconds,
        a.listener_queue_seconds,
        on_count=lambda n: st.set_listeners(mp3=n),
    )


def _hls_output(
    config: Config, model: MusicModel, st: Station, saved: StationState | None
) -> HlsOutput:
    h = config.hls
    segmenter = HlsSegmenter(
        model.sample_rate,
        model.channels,
        segment_seconds=h.segment_seconds,
        playlist_segments=h.playlist_segments,
        bitrate_kbps=h.bitrate,
        out_dir=Path(h.dir) / st.id if h.dir else None,
        output_sample_rate=config.audio.output_sample_rate,
        start_sequence=restarts.hls_start_sequence(saved, h.segment_seconds),
    )
    return HlsOutput(segmenter, on_count=lambda n: st.set_listeners(hls=n))


def _icecast_source(config: Config, sc: StationConfig, channels: int) -> IcecastSource:
    """The source client of a station with [stations.icecast] (its password was resolved when
    the config was read)."""
    ic = sc.icecast
    assert ic is not None, f"station {sc.id} has no [stations.icecast]"
    return IcecastSource(
        ic.url,
        ic.mount or f"/{sc.id}.mp3",
        user=ic.user,
        password=ic.password,
        name=sc.name,
        description=sc.description,
        genre=sc.genre,
        public=ic.public,
        bitrate_kbps=config.audio.mp3_bitrate,
        sample_rate=config.audio.output_sample_rate,
        channels=channels,
        label=sc.id,
    )


# ---- background work ---------------------------------------------------------------------


async def _background(app: web.Application) -> AsyncIterator[None]:
    radio = app[RADIO]
    gen = radio.generator
    gen.start(asyncio.get_running_loop(), StationSink(radio))
    tasks = []
    for sid in radio.stations:
        clock = _clock(radio, sid)
        radio.clocks[sid] = clock
        tasks.append(asyncio.create_task(clock.run(), name=f"clock-{sid}"))
    for sid, programme in radio.programmes.items():
        tasks.append(asyncio.create_task(programme.run(), name=f"programme-{sid}"))
    tasks += relay_tasks(radio.icecast, radio.mp3, radio.timing)
    if radio.store is not None:
        saver = restarts.keep_saving(radio.store, radio.stations, radio.hls, radio.programmes)
        tasks.append(asyncio.create_task(saver, name="state"))
    tasks.append(asyncio.create_task(_heartbeat(radio.stations), name="heartbeat"))
    tasks.append(asyncio.create_task(radio.supervisor.run(), name="supervisor"))
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await asyncio.get_running_loop().run_in_executor(None, gen.stop)
        log.info("generator stopped")


def prime_seconds(buffer_ahead: float) -> float:
    """Audio a station's clock buffers before it starts, and before it leaves a bridge."""
    return min(1.0, buffer_ahead / 2)


def bridge_recovery(buffer_ahead: float) -> Recovery:
    """When a station's clock leaves a bridge (`StationClock._caught_up`)."""
    prime = prime_seconds(buffer_ahead)
    return Recovery(prime, max(prime, 0.95 * buffer_ahead))


def _clock(radio: Radio, sid: str) -> StationClock:
    g = radio.config.generation
    prime = prime_seconds(g.buffer_ahead)
    recovery = bridge_recovery(g.buffer_ahead)
    outputs: list[Output] = [radio.mp3[sid]]
    if sid in radio.hls:
        outputs.append(radio.hls[sid])
    return StationClock(
        radio.stations[sid],
        radio.sample_rate,
        radio.hop,
        outputs,
        process=radio.loudness[sid].process,
        timeline=radio.timing[sid],
        on_played=lambda frame: radio.generator.played(sid, frame),
        prime_seconds=prime,
        recover_seconds=recovery.recover_seconds,
        full_seconds=recovery.full_seconds,
        speed_judged=lambda: radio.generator.speed_judged,
    )


async def _heartbeat(stations: Mapping[str, Station]) -> None:
    """Health events for the pages, and a plain-words log line now and then."""
    last_log = time.monotonic()
    while True:
        await asyncio.sleep(HEALTH_EVENT_SECONDS)
        for st in stations.values():
            st.events.publish("health", st.health_json())
        if time.monotonic() - last_log >= LOG_SECONDS:
            last_log = time.monotonic()
            for st in stations.values():
                h = st.health
                log.info(
                    "station %s: generating %.1f s ahead, real time x%.1f, %d listener(s), "
                    "%d underrun(s)",
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
