"""CORS: which responses a page on another origin may read, decided in this one place.

Everything a listener or a page uses is public: the JSON API (`/api/...`), HLS (`/hls/...`), the
MP3 mounts (`/{station}.mp3`), and every error answer. `headers_for(path)` is the rule;
`add_cors` applies it to every response aiohttp prepares (the app's `on_response_prepare`
signal: handlers' answers, streamed event responses, errors raised anywhere), and the MP3 mount,
whose head is written raw on the socket (`radio.rawhttp`), adds it itself. A preflight
(`OPTIONS`) to the API or HLS is answered by the `radio.middleware.json_errors` middleware.
"""

from __future__ import annotations

from aiohttp import web

ANY_ORIGIN = {"Access-Control-Allow-Origin": "*"}
API = {
    **ANY_ORIGIN,
    "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Authorization",
    "Access-Control-Max-Age": "600",
}
HLS = {
    **ANY_ORIGIN,
    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
    "Access-Control-Allow-Headers": "Range, Content-Type, Authorization",
    "Access-Control-Expose-Headers": "Content-Length, Content-Range",
}


def headers_for(path: str, error: bool = False) -> dict[str, str]:
    """The CORS headers of a response to `path` (an error answer: at least any origin)."""
    if path.startswith("/api/"):
        return API
    if path.startswith("/hls/"):
        return HLS
    if path.endswith(".mp3") or error:
        return ANY_ORIGIN
    return {}


def preflight(path: str) -> bool:
    """An OPTIONS request to this path is a CORS preflight the radio answers (204)."""
    return path.startswith(("/api/", "/hls/"))


async def add_cors(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """`on_response_prepare`: the rule's headers, unless the handler set its own."""
    for name, value in headers_for(request.path, response.status >= 400).items():
        response.headers.setdefault(name, value)
