"""aiohttp's records about malformed requests and vanished peers become one-line debug records
(dropped at the usual INFO level) and are counted; a real server error keeps ERROR and its
traceback."""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import BadStatusLine
from aiohttp.web import RequestPayloadError

from radio import quietlog


def _log_exception(exc: BaseException) -> None:
    try:
        raise exc
    except BaseException:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "1.2.3.4")


def test_client_noise_is_dropped_and_counted_and_server_errors_kept(caplog):
    noise = quietlog.install()
    assert quietlog.install() is noise  # one filter per process, whatever the apps
    malformed, gone = noise.malformed, noise.disconnects
    with caplog.at_level(logging.INFO):
        _log_exception(BadStatusLine("\\x16\\x03\\x01"))
        _log_exception(RequestPayloadError("Can not decode content-encoding: gzip"))
        _log_exception(ConnectionResetError("Connection lost"))
        _log_exception(RuntimeError("a bug in a handler"))
    assert [r.levelname for r in caplog.records] == ["ERROR"]
    assert caplog.records[0].exc_info[0] is RuntimeError  # the traceback is kept
    assert (noise.malformed, noise.disconnects) == (malformed + 2, gone + 1)


def test_with_debug_logging_the_noise_is_one_line(caplog):
    quietlog.install()
    with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
        _log_exception(BadStatusLine("GARBAGE"))
    (record,) = caplog.records
    assert record.levelname == "DEBUG" and record.exc_info is None
    assert record.getMessage().startswith("Error handling request from 1.2.3.4: BadStatusLine")
