"""ICY (SHOUTcast/Icecast) in-band metadata: build blocks and interleave them with the audio.

A listener that sends `Icy-MetaData: 1` gets `icy-metaint: N`; after every N audio bytes the
stream carries one length byte L and 16*L bytes of `StreamTitle='...';` padded with NUL (L=0 means
"unchanged"). Titles are UTF-8; a quote is escaped as `\\'` and a backslash as `\\\\` so that a
title can never end the field early; control characters become spaces. `IcyInterleaver` is one
listener's writer; `parse_stream_title` reads a block back (a player's side: the tests'
`IcyReader` in tests/helpers.py).
"""

from __future__ import annotations

MAX_BLOCK = 255 * 16  # the largest metadata payload one length byte can announce
_PREFIX = b"StreamTitle='"
_SUFFIX = b"';"


def _escape(title: str) -> list[bytes]:
    """The title as escaped UTF-8 pieces, one per character (so a cut never splits one)."""
    pieces = []
    for ch in title:
        if ch in "\\'":
            pieces.append(b"\\" + ch.encode())
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            pieces.append(b" ")
        else:
            pieces.append(ch.encode("utf-8", errors="replace"))
    return pieces


def format_stream_title(title: str) -> bytes:
    """The length byte L plus `StreamTitle='...';` NUL-padded to 16*L bytes (at most 255*16).

    A title too long for one block is cut at a whole character (never inside a UTF-8 sequence or
    an escape).
    """
    room = MAX_BLOCK - len(_PREFIX) - len(_SUFFIX)
    body, size = [], 0
    for piece in _escape(title):
        if size + len(piece) > room:
            break
        body.append(piece)
        size += len(piece)
    payload = _PREFIX + b"".join(body) + _SUFFIX
    blocks = -(-len(payload) // 16)
    return bytes([blocks]) + payload.ljust(16 * blocks, b"\0")


def parse_stream_title(payload: bytes) -> str | None:
    """The StreamTitle of a metadata payload (NUL padding allowed), or None if it has none."""
    start = payload.find(_PREFIX)
    if start < 0:
        return None
    out, i = bytearray(), start + len(_PREFIX)
    while i < len(payload):
        b = payload[i]
        if b == 0x5C and i + 1 < len(payload):  # backslash: the next byte is literal
            out.append(payload[i + 1])
            i += 2
            continue
        if b == 0x27 and payload[i + 1 : i + 2] in (b";", b"\0", b""):  # the closing quote
            break
        out.append(b)
        i += 1
    return out.decode("utf-8", errors="replace")


class IcyInterleaver:
    """One listener's ICY writer: audio bytes in, audio with metadata blocks every metaint out.

    A full block goes out the first time and whenever the title differs from the last one this
    listener was sent; otherwise a single zero byte (L=0).
    """

    def __init__(self, metaint: int) -> None:
        if metaint <= 0:
            raise ValueError(f"metaint must be positive, got {metaint}")
        self.metaint = metaint
        self._until_block = metaint  # audio bytes left before the next metadata block
        self._sent_title: str | None = None

    def feed(self, audio: bytes, title: str) -> bytes:
        """audio with a metadata block inserted at every metaint boundary it crosses."""
        out, view = bytearray(), memoryview(audio)
        while len(view) >= self._until_block:
            out += view[: self._until_block]
            view = view[self._until_block :]
            self._until_block = self.metaint
            if title != self._sent_title:
                out += format_stream_title(title)
                self._sent_title = title
            else:
                out.append(0)
        out += view
        self._until_block -= len(view)
        return bytes(out)
