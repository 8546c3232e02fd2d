"""`Radio`: everything the request handlers reach, stored on the app as `app[RADIO]`.

No singletons: `radio.app.init_app` builds one `Radio` per application (tests build theirs the
same way), and handlers read it from `request.app[RADIO]`. `RadioSink` is where the generator's
results land on the event loop (new PCM, prompt changes applied, errors).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import web

from radio.config import Config
from radio.mounts import Mp3Mount
from radio.station import Station

log = logging.getLogger(__name__)


@dataclass
class RequestCounts:
    """What the application refused or lost, for /metrics (`api.json_errors` counts)."""

    bad: Counter[int] = field(default_factory=Counter)  # 4xx answers, by status
    aborted: int = 0  # requests whose client left before the answer was complete


@dataclass
class Radio:
    config: Config
    model: Any  # engine MusicModel, shared by every station
    sample_rate: int  # the model's (32000)
    channels: int
    hop: int  # samples per engine frame (640)
    frame_rate: int  # engine frames per second (50)
    stations: dict[str, Station]
    mp3: dict[str, Mp3Mount] = field(default_factory=dict)
    hls: dict[str, Any] = field(default_factory=dict)  # station id -> hls_routes.HlsOutput
    icecast: dict[str, Any] = field(default_factory=dict)  # station id -> icecast.IcecastSource
    store: Any = None  # state.StateStore when server.state_file is set
    generator: Any = None  # radio.generator.Generator while running
    clocks: dict[str, Any] = field(default_factory=dict)  # station id -> clock.StationClock
    output_latency: int = 0  # model-rate samples between the clock and the encoders (loudness)
    limiter: Any = None  # api.RateLimiter
    metrics: Any = None  # metrics.RadioMetrics
    requests: RequestCounts = field(default_factory=RequestCounts)
    client_noise: Any = None  # quietlog.ClientNoise: malformed requests aiohttp refused itself
    started_at: float = field(default_factory=time.time)


RADIO = web.AppKey("radio", Radio)


class RadioSink:
    """The generator's results, applied on the event loop (see `radio.generator`)."""

    def __init__(self, radio: Radio) -> None:
        self.radio = radio

    def on_pcm(self, station_id: str, start_frame: int, pcm: np.ndarray, rtf: float) -> None:
        st = self.radio.stations[station_id]
        st.buffer.append(start_frame * self.radio.hop, pcm)
        st.health.realtime_factor = rtf
        st.health.buffer_seconds = len(st.buffer) / self.radio.sample_rate

    def on_prompt_applied(
        self, station_id: str, prompt: str, frame: int, posted_at: float, source: str
    ) -> None:
        r = self.radio
        st = r.stations[station_id]
        sample = frame * r.hop
        st.buffer.truncate(sample)
        st.pending_prompt = (sample, posted_at)
        st.health.prompt_changes += 1
        st.record_prompt(prompt, source)
        heard_in = (
            max(sample - st.buffer.head, 0) / r.sample_rate + r.output_latency / r.sample_rate
        )
        log.info("prompt changed on %s: %r heard in %.1f s", station_id, prompt, heard_in)

    def on_error(self, station_id: str, message: str) -> None:
        st = self.radio.stations[station_id]
        st.health.error = message
        log.error("station %s: %s", station_id, message)
