"""Icecast2 source client: push a station's MP3 to an external Icecast server, for scale-out.

`IcecastSource.run(chunks)` connects with a raw asyncio socket, sends `PUT /mount HTTP/1.1`
with `Expect: 100-continue` (falling back to the legacy `SOURCE /mount ICE/1.0` when a server
refuses PUT), Basic auth and the `ice-*` headers, then writes the MP3 bytes as they arrive (the
station's clock already releases them in real time; no chunked encoding). `set_title()` updates
the stream title through `/admin/metadata` (UTF-8); the current title is sent again after every
reconnect.

When the server goes away the source reconnects by itself with a jittered exponential backoff
and logs once per outage; a refused password is logged once and retried slowly. While it is
disconnected the audio that arrives is dropped (the local MP3 mount and HLS do not depend on
this client), so after a reconnect Icecast gets live audio, not a backlog. `status` is a
snapshot for the API and metrics.

It knows nothing of stations: `radio.app` builds one per `[stations.icecast]` (the password
is resolved when the config is read) and `radio.relay` feeds it a station's MP3 mount and
on-air title.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote, urlencode, urlsplit

import aiohttp

log = logging.getLogger(__name__)

USER_AGENT = "endless-radio/0.1"
# (asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
# arrives just as the awaited call finishes, and run() must always stop when cancelled)
CONNECT_TIMEOUT = 10.0  # seconds for TCP connect plus the server's answer to our request
WRITE_TIMEOUT = 10.0  # a server that accepts nothing for this long counts as gone
_REFUSED_PUT = (400, 405, 501)  # answers of a server without PUT support: try SOURCE


@dataclass(frozen=True)
class IcecastStatus:
    """A snapshot of one source connection, for the API and metrics."""

    connected: bool  # streaming to the server right now
    url: str  # where: server URL plus mount
    method: str | None  # "PUT" or "SOURCE" once a connection was accepted
    last_error: str | None  # plain-words reason of the last failure, None if none yet
    reconnects: int  # successful connections after the first one
    bytes_sent: int  # MP3 bytes written to the server, all connections together
    connected_since: float | None  # Unix time of the current connection
    title: str | None  # the title the server was last asked to show

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


class SourceRefused(Exception):
    """The server answered our source request with an error status."""

    def __init__(self, status: int, reason: str, body: str) -> None:
        super().__init__(f"HTTP {status} {reason}: {body}".strip(": "))
        self.status = status
        self.reason = reason
        self.body = body


class _ConnectionLost(Exception):
    pass


class _Backoff:
    """Jittered exponential delays: first, 2*first, ... up to top (each +-20 %)."""

    def __init__(self, first: float, top: float) -> None:
        self.first, self.top = first, top
        self.reset()

    def reset(self) -> None:
        self._next = self.first

    def next(self) -> float:
        delay = self._next
        self._next = min(self.top, self._next * 2)
        return delay * random.uniform(0.8, 1.2)


class IcecastSource:
    """One station's source connection to one Icecast2 mount."""

    def __init__(
        self,
        url: str,
        mount: str,
        *,
        user: str = "source",
        password: str,
        name: str = "",
        description: str = "",
        genre: str = "",
        public: bool = False,
        bitrate_kbps: int = 128,
        sample_rate: int = 32000,
        channels: int = 2,
        label: str | None = None,  # for log lines; default: the mount without "/" and ".mp3"
        retry_min: float = 1.0,  # seconds before the first retry of an outage
        retry_max: float = 30.0,  # the longest wait between retries
        auth_retry: float = 60.0,  # wait between retries while the password is refused
        buffer_seconds: float = 5.0,  # audio kept while the socket is slow; older is dropped
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"icecast.url: expected http://host:port, got {url!r}")
        if not password:
            raise ValueError("icecast.password: empty")
        self.url = url.rstrip("/")
        self.mount = "/" + mount.lstrip("/")
        self.label = label or self.mount.lstrip("/").removesuffix(".mp3")
        self._host = parts.hostname
        self._tls = parts.scheme == "https"
        self._port = parts.port or (443 if self._tls else 80)
        self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self._headers = {
            "Content-Type": "audio/mpeg",
            "ice-name": name,
            "ice-description": description,
            "ice-genre": genre,
            "ice-public": "1" if public else "0",
            "ice-bitrate": str(bitrate_kbps),
            "ice-audio-info": (
                f"ice-samplerate={sample_rate};ice-bitrate={bitrate_kbps};ice-channels={channels}"
            ),
        }
        self._retry_min, self._retry_max, self._auth_retry = retry_min, retry_max, auth_retry
        self._max_buffer = max(1, int(buffer_seconds * bitrate_kbps * 1000 / 8))
        self._method = "PUT"  # becomes "SOURCE" for good once a server refuses PUT

        self._title: str | None = None  # the current title (None: never set)
        self._sent_title: str | None = None  # what the server was last told
        self._title_lock = asyncio.Lock()
        self._connected = False
        self._connected_since: float | None = None
        self._connections = 0
        self._bytes_sent = 0
        self._last_error: str | None = None

        # Filled by the pump task, emptied by the writer; `_wake` is set on new data, on the end
        # of the input and on a lost connection.
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self._input_done = False
        self._lost = False
        self._wake = asyncio.Event()

    # ---- public ----------------------------------------------------------------------------

    @property
    def status(self) -> IcecastStatus:
        return IcecastStatus(
            connected=self._connected,
            url=self.url + self.mount,
            method=self._method if self._connections else None,
            last_error=self._last_error,
            reconnects=max(0, self._connections - 1),
            bytes_sent=self._bytes_sent,
            connected_since=self._connected_since,
            title=self._sent_title,
        )

    async def set_title(self, title: str) -> None:
        """Show `title` on the server now if connected, and after every reconnect."""
        self._title = title
        if self._connected:
            await self._push_title()

    async def run(self, chunks: AsyncIterable[bytes] | asyncio.Queue[bytes | None]) -> None:
        """Stream `chunks` (MP3 bytes; a queue may end with None) until they end or cancelled."""
        source = _from_queue(chunks) if isinstance(chunks, asyncio.Queue) else chunks
        self._input_done = False
        self._drop_buffer()
        pump = asyncio.create_task(self._pump(source), name=f"icecast {self.label} input")
        try:
            await self._connect_loop()
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            self._connected = False
            self._connected_since = None

    # ---- input -----------------------------------------------------------------------------

    async def _pump(self, source: AsyncIterable[bytes]) -> None:
        """Take chunks as they come (never blocking the station) into a bounded buffer."""
        try:
            async for chunk in source:
                if not chunk:
                    continue
                self._buffer.append(chunk)
                self._buffered += len(chunk)
                while self._buffered > self._max_buffer and len(self._buffer) > 1:
                    self._buffered -= len(self._buffer.popleft())
                self._wake.set()
        finally:
            self._input_done = True
            self._wake.set()

    def _drop_buffer(self) -> None:
        self._buffer.clear()
        self._buffered = 0

    async def _next_chunk(self) -> bytes | None:
        """The next chunk to send; None at the end of the input; raises when the server left."""
        while True:
            if self._lost:
                raise _ConnectionLost("the server closed the connection")
            if self._buffer:
                chunk = self._buffer.popleft()
                self._buffered -= len(chunk)
                return chunk
            if self._input_done:
                return None
            self._wake.clear()
            await self._wake.wait()

    # ---- connection ------------------------------------------------------------------------

    async def _connect_loop(self) -> None:
        backoff = _Backoff(self._retry_min, self._retry_max)
        outage_since: float | None = None  # when the current outage began
        reported: set[str] = set()  # what this outage already logged: "network", refusals
        while not self._input_done or self._buffer:
            try:
                reader, writer = await self._open()
            except (OSError, TimeoutError, SourceRefused, _ConnectionLost) as exc:
                delay, why, level = self._failure(exc, backoff)
                self._last_error = why
                if outage_since is None:
                    outage_since = time.monotonic()
                kind = why if isinstance(exc, SourceRefused) else "network"
                if kind not in reported:
                    reported.add(kind)
                    what = "connection lost" if self._connections else "cannot connect"
                    msg = why if kind != "network" else f"{what} ({why})"
                    log.log(level, "icecast %s: %s, retrying in %s", self.label, msg, _secs(delay))
                else:
                    log.debug("icecast %s: %s, retrying in %s", self.label, why, _secs(delay))
                await self._idle(delay)
                continue
            if outage_since is not None and self._connections:
                log.info(
                    "icecast %s: reconnected to %s%s after %s",
                    self.label,
                    self.url,
                    self.mount,
                    _secs(time.monotonic() - outage_since),
                )
            elif not self._connections:
                log.info("icecast %s: streaming to %s%s", self.label, self.url, self.mount)
            self._connections += 1
            outage_since, reported = None, set()
            backoff.reset()
            try:
                await self._stream(reader, writer)
                return  # the input ended
            except (OSError, TimeoutError, _ConnectionLost) as exc:
                why = _plain(exc)
                self._last_error = why
                outage_since = time.monotonic()
                reported.add("network")
                delay = backoff.next()
                log.warning(
                    "icecast %s: connection lost (%s), retrying in %s",
                    self.label,
                    why,
                    _secs(delay),
                )
                await self._idle(delay)

    def _failure(self, exc: BaseException, backoff: _Backoff) -> tuple[float, str, int]:
        """Delay before the next try, the reason in plain words, and the log level."""
        if isinstance(exc, SourceRefused):
            if exc.status == 401:
                why = f"the server refused the source password for {self.mount} (HTTP 401)"
                return self._auth_retry, why, logging.ERROR
            if exc.status == 403 and "in use" in exc.body.lower():
                why = f"the mount {self.mount} is already in use on the server (HTTP 403)"
                return backoff.next(), why, logging.ERROR
            text = exc.body or exc.reason
            why = f"the server refused the source for {self.mount}: HTTP {exc.status} {text}"
            return backoff.next(), why, logging.ERROR
        return backoff.next(), _plain(exc), logging.WARNING

    async def _idle(self, seconds: float) -> None:
        """Wait, dropping the audio that arrives meanwhile (live audio only after a reconnect)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self._input_done:
            self._drop_buffer()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._wake.wait()
        self._drop_buffer()

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect and get the server to accept us as the source (PUT, else SOURCE)."""
        while True:
            method = self._method
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    self._host, self._port, ssl=self._tls or None
                )
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    writer.write(self._request(method))
                    await writer.drain()
                    await self._answer(reader)
                return reader, writer
            except SourceRefused as exc:
                _abort(writer)
                if method == "PUT" and exc.status in _REFUSED_PUT:
                    log.info(
                        "icecast %s: server refused PUT (HTTP %d), using SOURCE",
                        self.label,
                        exc.status,
                    )
                    self._method = "SOURCE"
                    continue
                raise
            except BaseException:
                _abort(writer)
                raise

    def _request(self, method: str) -> bytes:
        if method == "PUT":
            lines = [f"PUT {_path(self.mount)} HTTP/1.1", f"Host: {self._host}:{self._port}"]
            extra = {"Expect": "100-continue"}
        else:
            lines = [f"SOURCE {_path(self.mount)} ICE/1.0"]
            extra = {}
        headers = {"Authorization": self._auth, "User-Agent": USER_AGENT, **self._headers, **extra}
        lines += [f"{k}: {_header_value(v)}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")

    async def _answer(self, reader: asyncio.StreamReader) -> None:
        """Read the server's answer: 100 Continue or 200 OK, else raise SourceRefused."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise _ConnectionLost("the server closed the connection before answering") from exc
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise SourceRefused(400, "Bad Request", f"unexpected answer {status_line!r}")
        status = int(parts[1])
        if status in (100, 200):
            return
        body = b""
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(1.0):
                body = await reader.read(1024)
        text = " ".join(body.decode("utf-8", "replace").split())
        if "<" in text:  # an HTML error page: keep only the words
            text = " ".join(_strip_tags(text).split())
        raise SourceRefused(status, parts[2] if len(parts) > 2 else "", text[:200])

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Write the audio as it comes until the input ends; raises when the server leaves."""
        self._lost = False
        self._drop_buffer()  # start with live audio
        watcher = asyncio.create_task(self._watch(reader), name=f"icecast {self.label} watch")
        self._connected = True
        self._connected_since = time.time()
        self._sent_title = None
        title_task: asyncio.Task[None] | None = None
        try:
            while (chunk := await self._next_chunk()) is not None:
                writer.write(chunk)
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.drain()
                self._bytes_sent += len(chunk)
                if title_task is None and self._title is not None:
                    # the server knows the mount once audio flows: tell it the current title
                    title_task = asyncio.create_task(self._push_title())
        finally:
            self._connected = False
            self._connected_since = None
            watcher.cancel()
            if title_task is not None:
                title_task.cancel()
            _abort(writer)
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if title_task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await title_task

    async def _watch(self, reader: asyncio.StreamReader) -> None:
        """Notice the server closing the connection even while no audio is written."""
        with contextlib.suppress(OSError):
            while await reader.read(4096):
                pass  # Icecast's "HTTP/1.0 200 OK" after 100 Continue, nothing else
        self._lost = True
        self._wake.set()

    # ---- metadata --------------------------------------------------------------------------

    async def _push_title(self) -> None:
        """Send the current title until the server has the latest one (one request at a time)."""
        async with self._title_lock:
            while self._connected and self._title is not None and self._title != self._sent_title:
                title = self._title
                try:
                    await self._send_metadata(title)
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    log.warning(
                        "icecast %s: could not update the title (%s); will retry on reconnect",
                        self.label,
                        _plain(exc),
                    )
                    return
                self._sent_title = title

    async def _send_metadata(self, title: str) -> None:
        query = urlencode(
            {"mount": self.mount, "mode": "updinfo", "song": title, "charset": "UTF-8"},
            quote_via=quote,
        )
        url = f"{self.url}/admin/metadata?{query}"
        headers = {"Authorization": self._auth, "User-Agent": USER_AGENT}
        timeout = aiohttp.ClientTimeout(total=CONNECT_TIMEOUT)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, headers=headers) as resp,
        ):
            body = await resp.text(errors="replace")
            if resp.status != 200:
                text = " ".join(_strip_tags(body).split())[:200]
                raise aiohttp.ClientResponseError(
                    resp.request_info, (), status=resp.status, message=text or resp.reason or ""
                )


async def _from_queue(queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    while (chunk := await queue.get()) is not None:
        yield chunk


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close the socket now, without waiting for unsent data."""
    with contextlib.suppress(Exception):
        writer.transport.abort()


def _path(mount: str) -> str:
    return quote(mount, safe="/._-~")


def _header_value(value: str) -> str:
    """A header value that cannot break the request (no CR/LF)."""
    return " ".join(str(value).split())


def _strip_tags(text: str) -> str:
    out, inside = [], False
    for ch in text:
        if ch == "<":
            inside = True
            out.append(" ")
        elif ch == ">":
            inside = False
        elif not inside:
            out.append(ch)
    return "".join(out)


def _secs(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 2 else f"{seconds:.1f} s"


def _plain(exc: BaseException) -> str:
    """An exception in plain words for a log line."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status} {exc.message}".strip()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
