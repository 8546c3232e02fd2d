"""A response written on the connection itself: an Icecast-style head, then a raw body.

aiohttp frames every HTTP/1.1 response body that has no Content-Length as
`Transfer-Encoding: chunked`, and has no public switch to turn that off. A listener of an
Icecast mount must never get chunks: raw ICY clients (streamripper, hardware radios, embedded
players) count `icy-metaint` bytes straight off the socket, so chunk-size lines inside the audio
break them. Icecast 2.4.4 answers every listener, whatever HTTP version it spoke, with
`HTTP/1.0 200 OK`, `Connection: Close`, no Content-Length and no Transfer-Encoding: the body is
the raw bytes and ends when the connection does (checked against Debian's icecast2 2.4.4; see
docs/protocols.md).

`RawStream` does the same with aiohttp's public pieces: it writes the head and the body through
`request.writer` (the connection's writer, which frames nothing unless a response turns framing
on) and waits on its `drain()`; at the end it closes the connection, and `finish()` returns a
response for aiohttp that can no longer be sent, which aiohttp handles as a peer that left
(quietly, at debug level).

It also bounds the socket's kernel send buffer (SO_SNDBUF): left alone, Linux grows it to
megabytes for a peer that reads slowly, minutes of audio that no lag check would see. `backlog`
then tells what still waits on the server's side for this peer: asyncio's write buffer plus the
kernel's unacknowledged bytes (the SIOCOUTQ ioctl on Linux; elsewhere only the bound is known).
"""

from __future__ import annotations

import email.utils
import fcntl
import re
import socket
import struct
import sys
from collections.abc import Mapping

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

SIOCOUTQ = 0x5411  # Linux: bytes in a TCP socket's send queue not yet acknowledged by the peer
# The kernel may queue one packet beyond SO_SNDBUF, and a segmentation-offload packet holds up
# to 64 KiB (loopback: 56 KiB unacknowledged with SO_SNDBUF at 32 KiB, measured)
KERNEL_SLACK = 65536
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # an RFC 9110 token
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # CR or LF would end the head early


def format_head(status_line: str, headers: Mapping[str, str]) -> bytes:
    """The response head: status line, `Name: value` lines, blank line; Latin-1.

    A control character in a value (CR, LF, NUL, ...) becomes a space, so a value can never end
    the head or start a header of its own; a character outside Latin-1 becomes `?`. A header
    name that is not an HTTP token is a programming error (ValueError)."""
    lines = [status_line]
    for name, value in headers.items():
        if not _HEADER_NAME.match(name):
            raise ValueError(f"not an HTTP header name: {name!r}")
        lines.append(f"{name}: {_CONTROL.sub(' ', value)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", errors="replace")


def kernel_unsent(sock: socket.socket | None) -> int:
    """Bytes written to `sock` that its peer has not acknowledged yet (0 where unknown)."""
    if sock is None or not sys.platform.startswith("linux"):
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):  # closed meanwhile
        return 0
    return struct.unpack("i", raw)[0]


class RawStream:
    """One connection's response, head and body written raw (no chunks), as Icecast does."""

    def __init__(self, request: web.BaseRequest, send_buffer: int) -> None:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client left before the response started")
        self._transport = transport
        self._writer = request.writer
        self._sock: socket.socket | None = transport.get_extra_info("socket")
        self.kernel_limit = 0  # the most the kernel holds for this peer (bytes)
        if self._sock is not None:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
            doubled = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)  # Linux: x2
            self.kernel_limit = doubled + KERNEL_SLACK

    async def send_head(self, status_line: str, headers: Mapping[str, str]) -> None:
        """The head with `Date`, `Server` and `Connection: close` added (the body ends with
        the connection)."""
        head = {
            "Date": email.utils.formatdate(usegmt=True),
            "Server": SERVER_SOFTWARE,
            "Connection": "close",
            **headers,
        }
        await self.write(format_head(status_line, head))

    async def write(self, data: bytes) -> None:
        """Send bytes as they are; waits while the connection's buffers are full. Raises
        ConnectionError once the peer has gone (or `abort` was called)."""
        await self._writer.write(data)
        await self._writer.drain()

    def buffered(self) -> int:
        """Bytes asyncio holds for this peer (not yet handed to the kernel)."""
        return self._transport.get_write_buffer_size()

    def kernel_unsent(self) -> int:
        """Bytes the kernel holds for this peer, sent or not, until it acknowledges them."""
        return kernel_unsent(self._sock)

    def backlog(self) -> int:
        """Everything written that the peer has not acknowledged yet, in bytes."""
        return self.buffered() + self.kernel_unsent()

    def abort(self) -> None:
        """Stop now: asyncio's buffer is dropped, a pending write raises ConnectionError."""
        self._transport.abort()

    def finish(self) -> web.StreamResponse:
        """Close the connection (what is buffered is still sent) and return the response to
        hand back to aiohttp, which finds the connection closed and sends nothing more."""
        self._transport.close()
        return web.StreamResponse(status=200)
