"""HLS over HTTP: `GET /hls/{station}/live.m3u8` and its segments, with CORS and a head count.

The segmenter (`radio.hls.HlsSegmenter`) does the media work; `HlsOutput` is the clock's output
that feeds it, and counts HLS listeners: players reload the playlist every few seconds, so the
number of distinct clients (address + User-Agent) seen in the last `AUDIENCE_WINDOW` seconds is
the audience. Every response carries CORS headers so a page on another origin can play it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import numpy as np
from aiohttp import web

AUDIENCE_WINDOW = 30.0  # seconds a client counts as listening after its last request

CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
    "Access-Control-Allow-Headers": "Range, Content-Type, Authorization",
    "Access-Control-Expose-Headers": "Content-Length, Content-Range",
}

CONTENT_TYPES = {
    ".m3u8": "application/vnd.apple.mpegurl",
    ".ts": "video/mp2t",
    ".aac": "audio/aac",
    ".m4s": "audio/mp4",
    ".mp4": "audio/mp4",
}


class HlsOutput:
    """Feeds one station's segmenter from the clock and tracks who reloads its playlist."""

    def __init__(self, segmenter: Any, on_count: Callable[[int], None]) -> None:
        self.segmenter = segmenter
        self._seen: dict[str, float] = {}  # client key -> time.monotonic() last seen
        self._on_count = on_count

    def push(self, pcm: np.ndarray, wallclock: datetime) -> None:
        self.segmenter.push(pcm, wallclock)
        self._on_count(self.count())

    def saw(self, client: str) -> None:
        self._seen[client] = time.monotonic()
        self._on_count(self.count())

    def count(self) -> int:
        cutoff = time.monotonic() - AUDIENCE_WINDOW
        for key in [k for k, t in self._seen.items() if t < cutoff]:
            del self._seen[key]
        return len(self._seen)


def client_key(request: web.Request, address: str) -> str:
    return f"{address}|{request.headers.get('User-Agent', '')}"


def playlist_response(output: HlsOutput, request: web.Request, address: str) -> web.Response:
    output.saw(client_key(request, address))
    return web.Response(
        body=output.segmenter.playlist().encode(),
        headers={
            **CORS,
            "Content-Type": CONTENT_TYPES[".m3u8"],
            "Cache-Control": "no-cache, no-store",
        },
    )


def segment_response(
    output: HlsOutput, name: str, request: web.Request, address: str
) -> web.Response:
    data = output.segmenter.segment(name)
    if data is None:
        return web.json_response(
            {"error": f"segment {name} is not (or no longer) available"}, status=404, headers=CORS
        )
    output.saw(client_key(request, address))
    ext = name[name.rfind(".") :] if "." in name else ""
    return web.Response(
        body=data,
        headers={
            **CORS,
            "Content-Type": CONTENT_TYPES.get(ext, "application/octet-stream"),
            "Cache-Control": "public, max-age=60",  # a segment never changes once listed
        },
    )
