"""Server-Sent Events: `GET /api/stations/{id}/events` pushes prompt, listener and health news.

Events: `station` (a full snapshot, on connect), `prompt` ({prompt, prompt_since, source,
history}), `listeners` ({mp3, hls, total}), `health` (every few seconds), `sampling` (admin).

`EventHub` is one station's fan-out: each subscriber has a small bounded queue; a subscriber that
does not keep up loses its connection rather than growing memory. The handler writes
`event: NAME` / `data: JSON` blocks, first a snapshot of the station, then news as it happens,
with a keep-alive comment when nothing happened for a while (proxies close idle connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from aiohttp import web

KEEPALIVE_SECONDS = 15.0
QUEUE_SIZE = 64
_CLOSE = ("", None)  # sentinel: the server is shutting down


class EventHub:
    """Publish (event, data) pairs to every subscriber's queue; never blocks."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[tuple[str, Any]]] = set()
        self.dropped = 0  # subscribers closed because they did not keep up

    def subscribe(self) -> asyncio.Queue[tuple[str, Any]]:
        q: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[tuple[str, Any]]) -> None:
        self._subscribers.discard(q)

    def publish(self, event: str, data: Any) -> None:
        for q in list(self._subscribers):
            try:
                q.put_nowait((event, data))
            except asyncio.QueueFull:  # too slow: it gets closed, not an ever longer queue
                self._subscribers.discard(q)
                self.dropped += 1
                _force(q, _CLOSE)

    def close(self) -> None:
        for q in list(self._subscribers):
            _force(q, _CLOSE)
        self._subscribers.clear()

    def __len__(self) -> int:
        return len(self._subscribers)


def _force(q: asyncio.Queue[tuple[str, Any]], item: tuple[str, Any]) -> None:
    while True:
        try:
            q.put_nowait(item)
            return
        except asyncio.QueueFull:
            with contextlib.suppress(asyncio.QueueEmpty):
                q.get_nowait()


def sse_block(event: str, data: Any) -> bytes:
    """One SSE message: `event: NAME\\ndata: {...}\\n\\n` (JSON has no raw newlines)."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def next_event(
    q: asyncio.Queue[tuple[str, Any]], timeout: float = KEEPALIVE_SECONDS
) -> tuple[str, Any] | None:
    """The next (event, data); None after `timeout` seconds of quiet; `_CLOSE` at shutdown."""
    try:
        return await asyncio.wait_for(q.get(), timeout)
    except TimeoutError:
        return None


def is_close(item: tuple[str, Any]) -> bool:
    return item == _CLOSE


async def stream_events(
    request: web.Request, hub: EventHub, snapshot: dict[str, Any]
) -> web.StreamResponse:
    """SSE for one station's `hub`: `event: station` with the full `snapshot` (the API's station
    JSON), then `prompt`, `listeners`, `health` news until the peer leaves. A peer that leaves,
    even before the response started, ends it with ConnectionError (the
    `radio.middleware.json_errors` middleware counts it and lets it go quietly)."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
        }
    )
    await response.prepare(request)  # ConnectionError if the peer already left
    q = hub.subscribe()
    try:
        await response.write(b"retry: 3000\n\n" + sse_block("station", snapshot))
        while True:
            item = await next_event(q)
            if item is None:
                await response.write(b": keep-alive\n\n")
            elif is_close(item):
                break
            else:
                await response.write(sse_block(*item))
    except ConnectionError:
        pass  # the page was closed: normal life
    finally:
        hub.unsubscribe(q)
    return response
