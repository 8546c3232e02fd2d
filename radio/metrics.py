"""`GET /metrics`: Prometheus text from `prometheus-client`, one registry per application.

A collector reads the stations' live state at scrape time (no counters to keep in step):
listeners, buffer seconds ahead, real-time factor, underruns and bridge time, prompt changes and
the last prompt-change latency, MP3 bytes sent, whether each station plays; and what the radio
refused or dropped: listeners dropped (by reason) or refused (station full), event subscribers
dropped, requests answered 4xx (by status), requests whose client left mid-way, and malformed
requests aiohttp refused before the application saw them (process-wide); and what healed
itself: generation failures and reopens per station, stations down now, generator thread
restarts, stalled steps, and the music watchdog's re-anchors (by problem).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from radio.service import RADIO, Radio
from radio.watchdog import PROBLEMS


class RadioCollector:
    """Reads a `Radio` when Prometheus scrapes."""

    def __init__(self, radio: Radio) -> None:
        self.radio = radio

    def collect(self) -> Iterator[Metric]:
        r = self.radio
        listeners = GaugeMetricFamily(
            "radio_listeners",
            "Listeners now (HLS: clients seen in the last 30 s)",
            labels=["station", "kind"],
        )
        buffer = GaugeMetricFamily(
            "radio_buffer_seconds", "Audio generated ahead of the clock", labels=["station"]
        )
        rtf = GaugeMetricFamily(
            "radio_realtime_factor",
            "Seconds of audio generated per second of work (smoothed)",
            labels=["station"],
        )
        playing = GaugeMetricFamily(
            "radio_playing", "1 while the station's clock releases audio", labels=["station"]
        )
        latency = GaugeMetricFamily(
            "radio_prompt_latency_seconds",
            "Last prompt change: from the POST to its first sample leaving the clock",
            labels=["station"],
        )
        bridging = GaugeMetricFamily(
            "radio_bridging", "1 while the bridge plays (generation behind)", labels=["station"]
        )
        underruns = CounterMetricFamily(
            "radio_underruns",
            "Times generation fell behind and the bridge played",
            labels=["station"],
        )
        bridge = CounterMetricFamily(
            "radio_bridge_seconds", "Time the bridge played", labels=["station"]
        )
        holds = CounterMetricFamily(
            "radio_holds",
            "Times a prompt change's first audio came late and the old prompt's played on",
            labels=["station"],
        )
        prompts = CounterMetricFamily(
            "radio_prompt_changes", "Prompt changes applied", labels=["station"]
        )
        mp3_bytes = CounterMetricFamily(
            "radio_mp3_bytes", "MP3 bytes encoded for the mount", labels=["station"]
        )
        for sid, st in r.stations.items():
            h = st.health
            listeners.add_metric([sid, "mp3"], st.mp3_listeners)
            listeners.add_metric([sid, "hls"], st.hls_listeners)
            buffer.add_metric([sid], h.buffer_seconds)
            rtf.add_metric([sid], h.realtime_factor)
            playing.add_metric([sid], 1.0 if h.started and not h.error else 0.0)
            if h.prompt_latency_seconds is not None:
                latency.add_metric([sid], h.prompt_latency_seconds)
            bridging.add_metric([sid], 1.0 if h.bridging else 0.0)
            underruns.add_metric([sid], h.underruns)
            bridge.add_metric([sid], h.bridge_seconds)
            holds.add_metric([sid], h.holds)
            prompts.add_metric([sid], h.prompt_changes)
            mount = r.mp3.get(sid)
            mp3_bytes.add_metric([sid], mount.bytes_out if mount else 0)
        ice_up = GaugeMetricFamily(
            "radio_icecast_connected", "1 while streaming to the Icecast server", labels=["station"]
        )
        ice_bytes = CounterMetricFamily(
            "radio_icecast_bytes", "MP3 bytes sent to the Icecast server", labels=["station"]
        )
        ice_reconnects = CounterMetricFamily(
            "radio_icecast_reconnects", "Reconnections to the Icecast server", labels=["station"]
        )
        for sid, src in r.icecast.items():
            status = src.status
            ice_up.add_metric([sid], 1.0 if status.connected else 0.0)
            ice_bytes.add_metric([sid], status.bytes_sent)
            ice_reconnects.add_metric([sid], status.reconnects)
        uptime = GaugeMetricFamily("radio_uptime_seconds", "Seconds since the service started")
        uptime.add_metric([], time.time() - r.started_at)
        yield from self._refusals()
        yield from self._healing()
        yield from (
            listeners,
            buffer,
            rtf,
            playing,
            latency,
            bridging,
            underruns,
            bridge,
            holds,
            prompts,
            mp3_bytes,
            ice_up,
            ice_bytes,
            ice_reconnects,
            uptime,
        )

    def _refusals(self) -> Iterator[Metric]:
        r = self.radio
        dropped = CounterMetricFamily(
            "radio_listeners_dropped",
            "MP3 listeners dropped: lagging = listener_queue_seconds behind, "
            "stalled = a write made no progress for 10 s",
            labels=["station", "reason"],
        )
        refused = CounterMetricFamily(
            "radio_listeners_refused",
            "MP3 listeners refused because the station was full (security.max_listeners)",
            labels=["station"],
        )
        subscribers = CounterMetricFamily(
            "radio_event_subscribers_dropped",
            "Event-stream (SSE) subscribers closed because they did not keep up",
            labels=["station"],
        )
        for sid, st in r.stations.items():
            mount = r.mp3.get(sid)
            for reason in ("lagging", "stalled"):
                dropped.add_metric([sid, reason], mount.dropped[reason] if mount else 0)
            refused.add_metric([sid], mount.refused if mount else 0)
            subscribers.add_metric([sid], st.events.dropped)
        bad = CounterMetricFamily(
            "radio_bad_requests",
            "Requests the application answered with a 4xx status (bad input, unknown path, "
            "rate limit, authorization, ...)",
            labels=["status"],
        )
        for status, n in sorted(r.requests.bad.items()):
            bad.add_metric([str(status)], n)
        aborted = CounterMetricFamily(
            "radio_aborted_requests", "Requests whose client left before the answer was complete"
        )
        aborted.add_metric([], r.requests.aborted)
        malformed = CounterMetricFamily(
            "radio_malformed_requests",
            "Requests aiohttp's HTTP parser refused with 400 (bad request line, header, chunk, "
            "...), for the whole process",
        )
        malformed.add_metric([], r.client_noise.malformed)
        yield from (dropped, refused, subscribers, bad, aborted, malformed)

    def _healing(self) -> Iterator[Metric]:
        r = self.radio
        failures = CounterMetricFamily(
            "radio_generation_failures",
            "Times a station's generation raised (each is reopened after a backoff)",
            labels=["station"],
        )
        reopens = CounterMetricFamily(
            "radio_generation_reopens",
            "Times a station's stream was reopened from its recent tokens after a failure",
            labels=["station"],
        )
        down = GaugeMetricFamily(
            "radio_station_down",
            "1 while a station's generation failed and its reopen is pending (the bridge plays)",
            labels=["station"],
        )
        reanchors = CounterMetricFamily(
            "radio_watchdog_reanchors",
            "Times the music watchdog re-anchored a station, by problem (silence, loop, collapse)",
            labels=["station", "problem"],
        )
        for sid, st in r.stations.items():
            h = st.health
            failures.add_metric([sid], h.failures)
            reopens.add_metric([sid], h.reopens)
            down.add_metric([sid], 1.0 if h.down else 0.0)
            for problem in PROBLEMS:
                reanchors.add_metric([sid, problem], h.reanchors.get(problem, 0))
        restarts = CounterMetricFamily(
            "radio_generator_restarts", "Times the generator thread died and was restarted"
        )
        restarts.add_metric([], r.supervisor.restarts)
        stalls = CounterMetricFamily(
            "radio_generation_stalls",
            "Generation steps that made no progress for generation.stall_seconds",
        )
        stalls.add_metric([], r.supervisor.stalls)
        yield from (failures, reopens, down, reanchors, restarts, stalls)


def register(radio: Radio) -> None:
    """Read `radio` into its registry (`radio.metrics`) at every scrape."""
    radio.metrics.register(RadioCollector(radio))


async def metrics(request: web.Request) -> web.Response:
    radio = request.app[RADIO]
    body = generate_latest(radio.metrics)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
