"""The Icecast-compatible MP3 mounts: `GET /{station}.mp3`, with ICY metadata on request.

`Mp3Mount` is one station's MP3 output: the clock pushes PCM, one long-lived encoder turns it
into MP3 frames, and every listener gets the same bytes. A new listener first receives a burst of
the most recent ~1 s (so players start at once), then the live bytes. A listener that falls
`listener_queue_seconds` behind is dropped, so it never slows the others or grows memory; its lag
counts its queue here, asyncio's write buffer and what the kernel still holds for it (the
socket's send buffer is bounded to about `SEND_BUFFER_SECONDS` of audio, see `radio.rawhttp`).

`stream_mp3` answers a listener as Icecast 2.4 does: `HTTP/1.0 200 OK` and the raw MP3 bytes
until the connection ends, never chunked, whatever HTTP version the client spoke; with
`Icy-MetaData: 1` (any number above 0, as Icecast reads it) the handler interleaves
`StreamTitle='<prompt>';` blocks every `METAINT` bytes (`radio.icy`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter, deque
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

import numpy as np
from aiohttp import web

from radio.encoders import Mp3Encoder
from radio.icy import IcyInterleaver
from radio.rawhttp import RawStream

log = logging.getLogger(__name__)

METAINT = 16000  # audio bytes between ICY metadata blocks (what Icecast uses)
WRITE_TIMEOUT = 10.0  # seconds one write may make no progress before the listener is dropped
SEND_BUFFER_SECONDS = 1.0  # SO_SNDBUF asked for a listener's socket (Linux doubles it)
_LEADING_NUMBER = re.compile(r"\s*\+?(\d+)")


class Sink(Protocol):
    """Where a listener's bytes go after its queue (`radio.rawhttp.RawStream`)."""

    kernel_limit: int  # the most the kernel holds for the peer, bytes

    def buffered(self) -> int: ...  # bytes in asyncio's write buffer

    def kernel_unsent(self) -> int: ...  # bytes the kernel holds, not yet acknowledged

    def abort(self) -> None: ...  # close the connection now


class Listener:
    """One MP3 listener's queue of encoded bytes; dropped once it lags `limit` bytes behind,
    counting what its `sink` still holds."""

    def __init__(self, limit: int, sink: Sink | None = None) -> None:
        self.limit = limit
        self.sink = sink
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._ready = asyncio.Event()
        self.dropped = False  # too slow
        self.lag = 0  # bytes behind when it was dropped
        self.closed = False  # server shutdown

    def offer(self, data: bytes) -> bool:
        """Queue data; False (and the listener is dropped) when it would lag too far behind."""
        if self.dropped or self.closed:
            return False
        lag = self._lag(len(data))
        if lag > self.limit:
            self.drop(lag)
            return False
        self._chunks.append(data)
        self._size += len(data)
        self._ready.set()
        return True

    def _lag(self, incoming: int) -> int:
        """Bytes not yet acknowledged by the peer once `incoming` is queued: exact when that
        could exceed the limit, else a lower bound (the kernel is asked only when it matters:
        one system call per listener near its limit, none for the others)."""
        lag = self._size + incoming
        if self.sink is None:
            return lag
        lag += self.sink.buffered()
        if lag + self.sink.kernel_limit <= self.limit:
            return lag
        return lag + self.sink.kernel_unsent()

    def drop(self, lag: int = 0) -> None:
        """Too slow: forget the queue and close the connection now."""
        self.dropped = True
        self.lag = lag
        self._chunks.clear()
        self._size = 0
        self._ready.set()
        if self.sink is not None:
            self.sink.abort()

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
        self.bytes_per_second = bitrate_kbps * 125
        self._burst_limit = int(self.bytes_per_second * burst_seconds)  # bytes
        self._queue_limit = int(self.bytes_per_second * queue_seconds) + self._burst_limit
        self.send_buffer = max(4096, int(self.bytes_per_second * SEND_BUFFER_SECONDS))
        self.listeners: set[Listener] = set()  # everyone who gets the bytes
        self._relays: set[Listener] = set()  # those not counted as listeners
        self._on_count = on_count
        self.bytes_out = 0  # total MP3 bytes encoded
        # listeners dropped, by reason: "lagging" (listener_queue_seconds behind), "stalled"
        # (one write made no progress for WRITE_TIMEOUT)
        self.dropped: Counter[str] = Counter()
        self.refused = 0  # listeners turned away: the station was full

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
                if listener.dropped:
                    self.dropped["lagging"] += 1
                    log.info(
                        "listener dropped: %.1f s behind (mp3, %d now)",
                        listener.lag / self.bytes_per_second,
                        self.count(),
                    )

    def add(self, counted: bool = True, sink: Sink | None = None) -> Listener:
        """A new listener queue, primed with the burst. `counted=False` for a relay (the
        Icecast source client): it gets the bytes but is not a listener in the counts.
        `sink`: the listener's connection, whose buffers count in its lag."""
        listener = Listener(self._queue_limit, sink)
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
    """What Icecast sends a listener (icy-* names are what players read), plus no-cache (CORS:
    `radio.cors`)."""
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
        "X-Content-Type-Options": "nosniff",
    }


def _latin(text: str) -> str:
    """HTTP header values are Latin-1 in practice: keep what fits, replace the rest."""
    return text.encode("latin-1", errors="replace").decode("latin-1")


def wants_icy_metadata(value: str) -> bool:
    """`Icy-MetaData` asks for metadata when it starts with a number above 0 (Icecast reads it
    with atoi: "1" yes, "0", "", "yes" no)."""
    m = _LEADING_NUMBER.match(value)
    return m is not None and m.group(1).strip("0") != ""  # not int(): 8000 digits would raise


async def stream_mp3(
    request: web.Request,
    mount: Mp3Mount,
    headers: dict[str, str],
    title: Callable[[], str],
) -> web.StreamResponse:
    """Serve one listener until it leaves, is dropped, or the server shuts down.

    As Icecast 2.4.4 does: `HTTP/1.0 200 OK`, the raw stream until the connection ends, for
    HTTP/1.0 and 1.1 clients alike. A `Range` header is ignored (Icecast too: `bytes=0-` from
    iOS and browsers, or any other range, gets the live stream with 200). `HEAD` gets the same
    head and no body (Icecast 2.4.4 refuses HEAD with 400; icecast-kh and link checkers expect
    the head, which is what HTTP says)."""
    headers = dict(headers)
    interleaver = None
    if wants_icy_metadata(request.headers.get("Icy-MetaData", "")):
        headers["icy-metaint"] = str(METAINT)
        interleaver = IcyInterleaver(METAINT)
    stream = RawStream(request, mount.send_buffer)
    await stream.send_head("HTTP/1.0 200 OK", headers)
    if request.method == "HEAD":
        return stream.finish()
    listener = mount.add(sink=stream)
    peer = request.remote or "?"
    log.info("listener connected (mp3 from %s, %d now)", peer, mount.count())
    try:
        while (data := await listener.next()) is not None:
            if interleaver is not None:
                data = interleaver.feed(data, title())
            # a peer that stops reading is dropped by its lag; this is the last resort
            async with asyncio.timeout(WRITE_TIMEOUT):
                await stream.write(data)
    except ConnectionError:
        pass  # the listener went away (or was dropped): normal life
    except TimeoutError:
        mount.dropped["stalled"] += 1
        listener.drop()
    finally:
        mount.remove(listener)
        why = "too slow" if listener.dropped else "server closing" if listener.closed else "left"
        log.info("listener disconnected (mp3, %s, %d now)", why, mount.count())
    return stream.finish()
