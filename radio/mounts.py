"""The Icecast-compatible MP3 mounts: `GET /{station}.mp3`, with ICY metadata on request.

`Mp3Mount` is one station's MP3 output: the clock pushes PCM, one long-lived encoder turns it
into MP3 frames, and every listener gets the same bytes. A new listener first receives a burst of
the most recent ~1 s (so players start at once), then the live bytes. Each listener has a queue
bounded in bytes; one that reads too slowly is dropped when it fills, so it never slows the others
or grows memory. With `Icy-MetaData: 1` the handler interleaves `StreamTitle='<prompt>';` blocks
every `METAINT` bytes (`radio.icy`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from datetime import datetime

import numpy as np
from aiohttp import web

from radio.encoders import Mp3Encoder
from radio.icy import IcyInterleaver

log = logging.getLogger(__name__)

METAINT = 16000  # audio bytes between ICY metadata blocks (what Icecast uses)
WRITE_TIMEOUT = 10.0  # seconds one write may wait for a peer that does not read


class Listener:
    """One MP3 listener's queue of encoded bytes, bounded by `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._ready = asyncio.Event()
        self.dropped = False  # too slow
        self.closed = False  # server shutdown

    def offer(self, data: bytes) -> bool:
        """Queue data; False (and the listener is dropped) when the queue would overflow."""
        if self.dropped or self.closed:
            return False
        if self._size + len(data) > self.limit:
            self.dropped = True
            self._chunks.clear()
            self._size = 0
            self._ready.set()
            return False
        self._chunks.append(data)
        self._size += len(data)
        self._ready.set()
        return True

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def next(self) -> bytes | None:
        """All queued bytes, waiting for some; None once dropped or closed."""
        while not self._chunks:
            if self.dropped or self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        if self.dropped or self.closed:
            return None
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        return data


class Mp3Mount:
    """PCM from the clock -> MP3 frames -> every listener (an `Output` of the clock)."""

    def __init__(
        self,
        sample_rate: int,
        channels: int,
        bitrate_kbps: int,
        output_sample_rate: int,
        burst_seconds: float,
        queue_seconds: float,
        on_count: Callable[[int], None],
    ) -> None:
        self.encoder = Mp3Encoder(
            sample_rate, channels, bitrate_kbps, output_sample_rate=output_sample_rate
        )
        self.bitrate_kbps = bitrate_kbps
        self.output_sample_rate = output_sample_rate
        self._burst: deque[bytes] = deque()
        self._burst_size = 0
        self._burst_limit = int(bitrate_kbps * 125 * burst_seconds)  # bytes
        self._queue_limit = int(bitrate_kbps * 125 * queue_seconds) + self._burst_limit
        self.listeners: set[Listener] = set()  # everyone who gets the bytes
        self._relays: set[Listener] = set()  # those not counted as listeners
        self._on_count = on_count
        self.bytes_out = 0  # total MP3 bytes encoded

    def push(self, pcm: np.ndarray, wallclock: datetime) -> None:
        data = self.encoder.encode(pcm)  # whole MP3 frames
        if not data:
            return
        self.bytes_out += len(data)
        self._burst.append(data)
        self._burst_size += len(data)
        while self._burst_size - len(self._burst[0]) >= self._burst_limit:
            self._burst_size -= len(self._burst.popleft())
        for listener in list(self.listeners):
            if not listener.offer(data):
                self.remove(listener)
                log.info("listener dropped (mp3, too slow; %d now)", self.count())

    def add(self, counted: bool = True) -> Listener:
        """A new listener queue, primed with the burst. `counted=False` for a relay (the
        Icecast source client): it gets the bytes but is not a listener in the counts."""
        listener = Listener(self._queue_limit)
        for chunk in self._burst:
            listener.offer(chunk)
        self.listeners.add(listener)
        if not counted:
            self._relays.add(listener)
        self._on_count(self.count())
        return listener

    def remove(self, listener: Listener) -> None:
        if listener in self.listeners:
            self.listeners.discard(listener)
            self._relays.discard(listener)
            self._on_count(self.count())

    def count(self) -> int:
        """Listeners, relays not included."""
        return len(self.listeners) - len(self._relays)

    def close(self) -> None:
        for listener in list(self.listeners):
            listener.close()


def mp3_headers(
    name: str, description: str, genre: str, bitrate: int, sample_rate: int, url: str
) -> dict[str, str]:
    """What Icecast sends a listener (icy-* names are what players read), plus no-cache."""
    return {
        "Content-Type": "audio/mpeg",
        "icy-name": _latin(name),
        "icy-description": _latin(description),
        "icy-genre": _latin(genre),
        "icy-url": url,
        "icy-br": str(bitrate),
        "icy-sr": str(sample_rate),
        "icy-pub": "0",
        "ice-audio-info": f"bitrate={bitrate};samplerate={sample_rate}",
        "Cache-Control": "no-cache, no-store, must-revalidate",
        "Pragma": "no-cache",
        "Expires": "0",
        "Access-Control-Allow-Origin": "*",
        "X-Content-Type-Options": "nosniff",
    }


def _latin(text: str) -> str:
    """HTTP header values are Latin-1 in practice: keep what fits, replace the rest."""
    return text.encode("latin-1", errors="replace").decode("latin-1")


async def stream_mp3(
    request: web.Request,
    mount: Mp3Mount,
    headers: dict[str, str],
    title: Callable[[], str],
) -> web.StreamResponse:
    """Serve one listener until it leaves, is dropped, or the server shuts down."""
    icy = request.headers.get("Icy-MetaData", "").strip() == "1"
    response = web.StreamResponse(headers=headers)
    interleaver = None
    if icy:
        response.headers["icy-metaint"] = str(METAINT)
        interleaver = IcyInterleaver(METAINT)
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    listener = mount.add()
    peer = request.remote or "?"
    log.info("listener connected (mp3 from %s, %d now)", peer, mount.count())
    try:
        while True:
            data = await listener.next()
            if data is None:
                break
            if interleaver is not None:
                data = interleaver.feed(data, title())
            # a peer that stopped reading entirely would block write() forever
            await asyncio.wait_for(response.write(data), WRITE_TIMEOUT)
    except (ConnectionResetError, ConnectionError):
        pass  # the listener went away: normal life
    except TimeoutError:
        listener.dropped = True
    finally:
        mount.remove(listener)
        why = "too slow" if listener.dropped else "server closing" if listener.closed else "left"
        log.info("listener disconnected (mp3, %s, %d now)", why, mount.count())
    return response
