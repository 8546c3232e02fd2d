"""Keep the log about the radio: a peer that leaves or sends garbage is normal life, not an error.

aiohttp logs every request its HTTP parser refuses (a bad request line, an over-long or
malformed header, a bad chunk size, ...) on `aiohttp.server` at ERROR, with a traceback, and
answers it 400 itself, before the application sees it. On a radio open to the internet that is
noise that hides real failures; so is a request body that breaks HTTP's rules, which aiohttp
meets while it reads and discards what a handler left unread (say a body sent with
`Content-Encoding: gzip` that is not gzip, refused 415 unread). `install()` puts one
`ClientNoise` filter on aiohttp's loggers (`aiohttp.server`, `aiohttp.web`, `aiohttp.access`): a
record whose exception is the client's doing (`HttpProcessingError` or `RequestPayloadError`: a
malformed request or body; `ConnectionError`: a peer that left) becomes a one-line DEBUG record,
dropped unless debug logging is on (`radio -v`), and is counted. Every other record passes
unchanged: a real server error keeps its level and its traceback.

The filter and its counts are process-wide, like the loggers it sits on (aiohttp refuses a
malformed request before any application is involved); `/metrics` shows them.
"""

from __future__ import annotations

import logging

from aiohttp.http import HttpProcessingError
from aiohttp.web import RequestPayloadError

LOGGERS = ("aiohttp.server", "aiohttp.web", "aiohttp.access")
MALFORMED = (HttpProcessingError, RequestPayloadError)  # what a client sent broke HTTP's rules


class ClientNoise(logging.Filter):
    """Demotes records about malformed requests and vanished peers to one-line DEBUG records."""

    def __init__(self) -> None:
        super().__init__()
        self.malformed = 0  # requests or bodies aiohttp's parser refused
        self.disconnects = 0  # peers that left while aiohttp handled their request

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, MALFORMED):
            self.malformed += 1
        elif isinstance(exc, ConnectionError):
            self.disconnects += 1
        else:
            return True  # not the client's doing: keep it as it is
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        record.levelno = logging.DEBUG
        record.levelname = logging.getLevelName(logging.DEBUG)
        return True


_installed: ClientNoise | None = None


def install() -> ClientNoise:
    """The process's `ClientNoise` filter, added to aiohttp's loggers on the first call."""
    global _installed
    if _installed is None:
        _installed = ClientNoise()
        for name in LOGGERS:
            logging.getLogger(name).addFilter(_installed)
    return _installed
