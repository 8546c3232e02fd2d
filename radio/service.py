"""`Radio`: everything the request handlers and background tasks share, as `app[RADIO]`.

No singletons: `radio.app.init_app` builds one `Radio` per application (tests build theirs the
same way), and handlers read it from `request.app[RADIO]`. `StationSink` is where the
generator's results land on the event loop (new PCM, prompt changes applied, errors, failures
and reopens, re-anchors), as the stations' buffers and health.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from aiohttp import web
from prometheus_client import CollectorRegistry

from radio.clock import StationClock
from radio.config import Config
from radio.generator import Generator, Reanchor
from radio.healing import Failure, Supervisor
from radio.history import iso
from radio.hls_output import HlsOutput
from radio.icecast import IcecastSource
from radio.loudness import LoudnessNormalizer
from radio.middleware import RequestCounts
from radio.mounts import Mp3Mount
from radio.programme_runner import StationProgramme
from radio.quietlog import ClientNoise
from radio.ratelimit import RateLimiter
from radio.statefile import StateStore
from radio.station import Station
from radio.timing import PromptChange, PromptTimeline
from radio.uploads import ClipReader

if TYPE_CHECKING:
    from engine.lane import Prefill
    from engine.model import MusicModel
    from radio.testing import FaultInjector

log = logging.getLogger(__name__)


@dataclass
class Radio:
    config: Config
    model: MusicModel  # shared by every station
    stations: dict[str, Station]
    generator: Generator  # started by the app's background context
    supervisor: Supervisor  # restarts the generator's thread, reports a stalled step
    timing: dict[str, PromptTimeline]  # station id -> its prompt changes in time
    programmes: dict[str, StationProgramme]  # station id -> its director, on the radio's clock
    loudness: dict[str, LoudnessNormalizer]  # station id -> its loudness stage
    mp3: dict[str, Mp3Mount]
    limiter: RateLimiter  # prompt changes per client address
    client_noise: ClientNoise  # malformed requests aiohttp refused itself (process-wide)
    clips: ClipReader  # clip uploads ([clips]), one encode at a time
    store: StateStore | None = None  # when server.state_file is set
    hls: dict[str, HlsOutput] = field(default_factory=dict)  # when hls.enabled
    icecast: dict[str, IcecastSource] = field(default_factory=dict)  # [stations.icecast]
    clocks: dict[str, StationClock] = field(default_factory=dict)  # while running
    metrics: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )
    requests: RequestCounts = field(default_factory=RequestCounts)
    faults: FaultInjector | None = None  # tests only (radio.testing)
    started_at: float = field(default_factory=time.time)

    @property
    def sample_rate(self) -> int:
        """The model's (32000)."""
        return self.model.sample_rate

    @property
    def channels(self) -> int:
        return self.model.channels

    @property
    def hop(self) -> int:
        """Samples per engine frame (640)."""
        return self.model.hop

    @property
    def frame_rate(self) -> int:
        """Engine frames per second (50)."""
        return self.model.frame_rate


RADIO = web.AppKey("radio", Radio)


class StationSink:
    """The generator's results, applied on the event loop (see `radio.generator`)."""

    def __init__(self, radio: Radio) -> None:
        self.radio = radio

    def on_pcm(self, station_id: str, start_frame: int, pcm: np.ndarray, rtf: float) -> None:
        st = self.radio.stations[station_id]
        st.buffer.append(start_frame * self.radio.hop, pcm)
        recovered = bool(st.health.error)
        st.health.error = ""  # audio again: whatever stopped it is over
        st.health.realtime_factor = rtf
        st.health.buffer_seconds = len(st.buffer) / self.radio.sample_rate
        if recovered:  # the pages' "generation is down" note goes now, not at the next heartbeat
            st.events.publish("health", st.health_json())

    def on_prompt_applied(self, station_id: str, change: PromptChange, frame: int) -> None:
        self.radio.timing[station_id].applied(change, frame)

    def on_error(self, station_id: str, message: str) -> None:
        st = self.radio.stations[station_id]
        st.health.error = message
        log.error("station %s: %s", station_id, message)

    def on_failure(self, station_id: str, failure: Failure) -> None:
        """Generation raised (the worker logged it): down until the reopen, the bridge plays.
        The pages hear of it at once (their note counts down to the reopen)."""
        st = self.radio.stations[station_id]
        h = st.health
        h.error = failure.reason
        h.failures += 1
        h.down = True
        h.retry_at = time.monotonic() + failure.retry_in
        st.events.publish("health", st.health_json())

    def on_reopened(self, station_id: str, frame: int) -> None:
        st = self.radio.stations[station_id]
        h = st.health
        h.reopens += 1
        h.down = False
        h.retry_at = None
        sample = frame * self.radio.hop
        if sample > st.buffer.tail:  # it could only go on later than it stopped (a batch)
            st.buffer.skip_to(sample)

    def on_restart_context(
        self, station_id: str, seconds: float | None, window_seconds: float | None
    ) -> None:
        """The ladder moved (`radio.ladder`, the worker logged it): what window restarts
        re-read (None: the whole context) and how long windows are (None: whole)."""
        health = self.radio.stations[station_id].health
        health.restart_context_seconds = None if seconds is None else round(seconds, 2)
        health.window_seconds = None if window_seconds is None else round(window_seconds, 2)

    def on_rungs(self, station_id: str, rungs: tuple[str, ...]) -> None:
        """The ladder's rungs that cost the music some exactness, as now in use (the worker
        logged each move): the int4 KV cache, int4 weights, guidance off."""
        self.radio.stations[station_id].health.rungs = rungs

    def on_prefill(self, station_id: str, prefill: Prefill) -> None:
        """The engine re-read a station's context (a window restart, a prompt change or
        transition, a seed, a reopen): shown in its health as it ran."""
        self.radio.stations[station_id].health.last_prefill = {
            "seconds": round(prefill.seconds, 3),
            "rows": prefill.rows,
            "frames": prefill.frames,
        }

    def on_reanchored(self, station_id: str, reanchor: Reanchor) -> None:
        """The watchdog re-anchored the station (the worker logged it): the buffered audio from
        that frame on is replaced by the new (crossfaded) audio that follows."""
        st = self.radio.stations[station_id]
        st.buffer.truncate(reanchor.frame * self.radio.hop)
        h = st.health
        kind = reanchor.problem.kind
        h.reanchors[kind] = h.reanchors.get(kind, 0) + 1
        h.last_reanchor = {
            "problem": kind,
            "detail": reanchor.problem.detail,
            "at": iso(time.time()),
            "stream_seconds": round(reanchor.frame / self.radio.frame_rate, 2),
            "context_seconds": reanchor.context_seconds,
        }
        st.events.publish("health", st.health_json())
