"""The MP3 mount as Icecast serves it, checked byte by byte and with real ICY clients.

Icecast 2.4.4 answers every listener `HTTP/1.0 200 OK` with the raw stream until the connection
ends (never chunked), `icy-metaint` only for `Icy-MetaData: 1`, the stream for any `Range`, and
(icecast-kh, and what HTTP says) the head alone for `HEAD`. A raw socket checks exactly that;
then mpv, VLC (as a non-root user) and streamripper play or record the station, see its title,
and streamripper splits tracks where the prompt changes. ffmpeg and Chromium play it in
test_mp3_ffmpeg.py and test_browser.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from radio.icecast import IcecastSource
from radio.icy import parse_stream_title
from radio.rawhttp import format_head
from tests.helpers import InProcessRadio, free_port, require_tool, serving, wait_until
from tests.helpers import post_prompt as _post_prompt
from tests.radio.test_icecast import PASSWORD, IcecastServer, _tone_mp3

TOKEN = "icy-clients-admin-token"
FIRST = "calm lofi beat with piano"  # the default prompt of station main
METAINT = 16000
BYTES_PER_SECOND = 16000  # 128 kbit/s


@pytest.fixture(scope="module")
def station(radio_model):
    """One radio for the module (HLS off: these clients read the MP3 mount)."""
    data = {
        "server": {"host": "127.0.0.1"},
        "generation": {"seed": 7},
        "hls": {"enabled": False},
        "security": {"admin_token": TOKEN, "prompt_rate_limit": "100 per 1 s"},
    }
    with serving(data, radio_model, timeout=60) as radio:
        yield radio


def post_prompt(base: str, prompt: str) -> None:
    _post_prompt(base, prompt, token=TOKEN)


def set_prompt(radio: InProcessRadio, prompt: str) -> None:
    """Make `prompt` the title on air (a module-scoped station keeps what the last test left):
    the ICY title changes when the new prompt is heard, a few seconds after the POST."""
    if radio.call(lambda: radio.radio.stations["main"].prompt) != prompt:
        post_prompt(radio.base_url, prompt)
    timeline = radio.radio.timing["main"]
    wait_until(lambda: radio.call(lambda: timeline.on_air) == prompt, 30, f"{prompt!r} on air")


class RawClient:
    """A listener on a bare socket: sends `request`, reads the head, then exact byte counts."""

    def __init__(self, base: str, request: str) -> None:
        u = urllib.parse.urlsplit(base)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=10)
        self.sock.sendall(request.replace("\n", "\r\n").encode("latin-1"))
        self._buf = bytearray()
        while b"\r\n\r\n" not in self._buf:
            self._fill()
        head, _, rest = bytes(self._buf).partition(b"\r\n\r\n")
        self._buf = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        self.status_line = lines[0]
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError(f"connection closed after {len(self._buf)} buffered bytes")
        self._buf += data

    def read(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def at_eof(self, timeout: float = 3.0) -> bool:
        """True if the server closes the connection with nothing more sent."""
        self.sock.settimeout(timeout)
        return not self._buf and self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


def decoded_seconds(mp3: bytes) -> float:
    """Seconds of audio PyAV decodes from MP3 bytes (44.1 kHz)."""
    with av.open(io.BytesIO(mp3), format="mp3") as f:
        return sum(frame.samples for frame in f.decode(audio=0)) / 44100


def test_raw_socket_sees_icecast_framing(station):
    """HTTP/1.1 with Icy-MetaData: 1 -> HTTP/1.0, no chunks, a length byte after exactly every
    16000 audio bytes, a full StreamTitle block first and whenever the prompt changes, a zero
    byte otherwise; the audio between the blocks is clean MP3."""
    set_prompt(station, FIRST)
    new = "raw socket jazz, it's 'quoted'"
    c = RawClient(
        station.base_url, "GET /main.mp3 HTTP/1.1\nHost: radio.test:8000\nIcy-MetaData: 1\n\n"
    )
    try:
        assert c.status_line == "HTTP/1.0 200 OK"
        h = c.headers
        assert "transfer-encoding" not in h and "content-length" not in h
        assert h["connection"] == "close" and h["content-type"] == "audio/mpeg"
        assert h["icy-metaint"] == str(METAINT) and h["icy-br"] == "128"
        assert h["icy-name"] == "Endless Radio" and h["icy-url"] == "http://radio.test:8000/"
        audio, lengths, titles = bytearray(), [], []
        deadline = time.monotonic() + 30
        while new not in titles:
            assert time.monotonic() < deadline, f"title never changed: {titles}"
            audio += c.read(METAINT)
            length = c.read(1)[0]
            lengths.append(length)
            if length:
                block = c.read(16 * length)
                body = block.rstrip(b"\0")
                assert body.startswith(b"StreamTitle='") and body.endswith(b"';"), block
                assert len(body) > 16 * (length - 1), "more NUL padding than a block needs"
                titles.append(parse_stream_title(block))
            if len(lengths) == 1:
                post_prompt(station.base_url, new)
    finally:
        c.close()
    assert titles == [FIRST, new], titles  # full blocks only at the start and on the change
    assert lengths[0] > 0 and sum(1 for n in lengths if n) == 2
    assert audio[0] == 0xFF and audio[1] & 0xE0 == 0xE0  # starts on an MP3 frame
    seconds = decoded_seconds(bytes(audio))
    assert abs(seconds - len(audio) / BYTES_PER_SECOND) < 0.1, seconds


@pytest.mark.parametrize(
    "request_text",
    [
        "GET /main.mp3 HTTP/1.0\n\n",  # no Host, no Icy-MetaData: a bare embedded player
        "GET /main.mp3 HTTP/1.1\nHost: x\nIcy-MetaData: 0\n\n",
        "GET /main.mp3 HTTP/1.1\nHost: x\nIcy-MetaData: yes\n\n",  # atoi("yes") == 0
        "GET /main.mp3 HTTP/1.1\nHost: x\nIcy-MetaData: " + "0" * 8000 + "\n\n",
    ],
)
def test_without_metadata_the_body_is_plain_mp3(station, request_text):
    c = RawClient(station.base_url, request_text)
    try:
        assert c.status_line == "HTTP/1.0 200 OK"
        assert "icy-metaint" not in c.headers and "transfer-encoding" not in c.headers
        data = c.read(3 * BYTES_PER_SECOND)
    finally:
        c.close()
    assert b"StreamTitle" not in data
    assert abs(decoded_seconds(data) - 3.0) < 0.1


def test_head_and_ranges_as_icecast(station):
    head = RawClient(station.base_url, "HEAD /main.mp3 HTTP/1.1\nHost: x\nIcy-MetaData: 1\n\n")
    try:
        assert head.status_line == "HTTP/1.0 200 OK" and head.headers["icy-metaint"] == "16000"
        assert head.at_eof(), "HEAD got a body"
    finally:
        head.close()
    many = RawClient(station.base_url, f"GET /main.mp3 HTTP/1.0\nIcy-MetaData: {'9' * 8000}\n\n")
    try:
        assert many.headers["icy-metaint"] == "16000"  # a number above 0, however long
    finally:
        many.close()
    # iOS and browsers ask for bytes=0-; Safari probes bytes=0-1: both get the live stream
    for wanted in ("bytes=0-", "bytes=0-1", "bytes=5000-"):
        c = RawClient(station.base_url, f"GET /main.mp3 HTTP/1.1\nHost: x\nRange: {wanted}\n\n")
        try:
            assert c.status_line == "HTTP/1.0 200 OK", wanted
            assert "content-range" not in c.headers and "content-length" not in c.headers
            assert decoded_seconds(c.read(2 * BYTES_PER_SECOND)) > 1.9
        finally:
            c.close()


def test_head_values_cannot_break_the_head():
    head = format_head(
        "HTTP/1.0 200 OK",
        {"icy-name": "Café\r\nX-Evil: 1", "icy-description": "東京\x00 rain", "A": "b"},
    )
    assert head == (
        b"HTTP/1.0 200 OK\r\nicy-name: Caf\xe9  X-Evil: 1\r\n"
        b"icy-description: ??  rain\r\nA: b\r\n\r\n"
    )
    with pytest.raises(ValueError, match="header name"):
        format_head("HTTP/1.0 200 OK", {"Bad Name": "x"})


def test_mpv_plays_and_shows_the_title(station, tmp_path):
    mpv = require_tool("mpv")
    set_prompt(station, FIRST)
    new = "mpv sees marimba"
    log, raw = tmp_path / "mpv.log", tmp_path / "mpv.s16"
    # The end reason from mpv's terminal output (flushed as written; its log file was once
    # closed at exit without its last lines), the titles from its log (verbose level).
    cmd = [
        mpv,
        "--no-config",
        "--no-input-terminal",
        "--no-video",
        "--length=5",
        f"--log-file={log}",
    ]
    cmd += ["--ao=pcm", f"--ao-pcm-file={raw}", "--ao-pcm-waveheader=no", "--audio-format=s16"]
    cmd += ["--audio-samplerate=44100", "--audio-channels=mono"]
    proc = subprocess.Popen(
        [*cmd, f"{station.base_url}/main.mp3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(1.5)
        post_prompt(station.base_url, new)
        terminal, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, terminal[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert f"icy-title: {FIRST}" in text, text[-3000:]  # shown when playback starts
    assert f"Metadata update for StreamTitle: {new}" in text, text[-3000:]  # then the change
    assert "Exiting... (End of file)" in terminal, terminal[-3000:]  # its --length, no error
    pcm = np.frombuffer(raw.read_bytes(), np.int16) / 32768
    assert 4.5 < len(pcm) / 44100 < 5.5, len(pcm) / 44100
    assert 20 * np.log10(np.sqrt(np.mean(pcm**2))) > -40  # the station's sound, not silence


def _as_user() -> tuple[list[str], str]:
    """(command prefix, a folder that user can write): VLC refuses to run as root."""
    folder = tempfile.mkdtemp(prefix="vlc-test-")  # not under root's 0700 pytest folder
    if os.geteuid() != 0:
        return [], folder
    os.chmod(folder, 0o777)
    return [require_tool("runuser"), "-u", "nobody", "--"], folder


def test_vlc_plays_and_shows_the_title(station):
    cvlc = require_tool("cvlc")
    set_prompt(station, FIRST)
    prefix, folder = _as_user()
    out = Path(folder) / "vlc.wav"
    sout = f"#transcode{{acodec=s16l,channels=1}}:std{{access=file,mux=wav,dst={out}}}"
    cmd = [*prefix, cvlc, "-vv", "--no-video", "--run-time=3", "--play-and-exit"]
    cmd += ["--sout", sout, f"{station.base_url}/main.mp3", "vlc://quit"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr[-3000:]
        assert f"New Icy-Title={FIRST}" in p.stderr, p.stderr[-3000:]
        with wave.open(str(out)) as w:
            seconds = w.getnframes() / w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16) / 32768
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert 2.8 < seconds < 3.6, seconds
    assert 20 * np.log10(np.sqrt(np.mean(pcm**2))) > -40  # the station's sound, not silence


def test_streamripper_records_and_splits_at_the_prompt_change(station):
    streamripper = require_tool("streamripper")
    set_prompt(station, FIRST)
    new = "streamripper hears dub"
    folder = Path(tempfile.mkdtemp(prefix="streamripper-test-"))
    cmd = [streamripper, f"{station.base_url}/main.mp3", "-d", str(folder), "-s"]
    cmd += ["-k", "0", "--xs_none", "-D", "%T", "-l", "7"]  # keep track 1, split at the title
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        timer = threading.Timer(2.0, post_prompt, (station.base_url, new))
        timer.start()
        out, _ = proc.communicate(timeout=30)
        timer.join()
        log = out.decode(errors="replace").replace("\r", "\n")
        assert proc.returncode == 0 and "error" not in log.lower(), log[-2000:]
        complete = sorted(p.name for p in folder.glob("*.mp3"))
        partial = sorted(p.name for p in (folder / "incomplete").glob("*.mp3"))
        assert complete == [f"{FIRST}.mp3"], (complete, partial, log[-2000:])
        assert len(partial) == 1 and new in partial[0], partial
        first = (folder / complete[0]).read_bytes()
        second = (folder / "incomplete" / partial[0]).read_bytes()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    # each track is clean MP3 (streamripper strips the metadata blocks it splits on)
    assert decoded_seconds(first) > 1.5 and decoded_seconds(second) > 1.0
    assert b"StreamTitle" not in first + second


SAME_AS_ICECAST = [
    "GET /main.mp3 HTTP/1.1\nHost: x\n\n",
    "GET /main.mp3 HTTP/1.1\nHost: x\nIcy-MetaData: 1\n\n",
    "GET /main.mp3 HTTP/1.0\nIcy-MetaData: 1\n\n",
    "GET /main.mp3 HTTP/1.0\n\n",
    "GET /main.mp3 HTTP/1.1\nHost: x\nIcy-MetaData: 0\n\n",
    "GET /main.mp3 HTTP/1.1\nHost: x\nRange: bytes=0-\n\n",
    "GET /main.mp3 HTTP/1.1\nHost: x\nRange: bytes=0-1\n\n",
]


def _shape(c: RawClient) -> tuple:
    """What a raw client depends on: status line, framing, metadata interval, and (with
    metadata) that the byte after the first METAINT audio bytes starts a StreamTitle block."""
    h = c.headers
    metaint = h.get("icy-metaint")
    first_block = None
    if metaint:
        c.read(int(metaint))
        length = c.read(1)[0]
        first_block = c.read(16 * length).startswith(b"StreamTitle='")
    framing = ("transfer-encoding" in h, "content-length" in h, h.get("connection", "").lower())
    return c.status_line, framing, metaint, first_block


def test_the_mount_answers_raw_clients_as_icecast_2_4_does(station):
    """The same raw requests to Debian's Icecast 2.4.4 (fed by our source client) and to the
    radio: the same status line, framing and metadata. HEAD is where they part (see stream_mp3):
    Icecast 2.4.4 refuses it with 400, the radio answers the head."""
    binary = require_tool("icecast2")
    folder = Path(tempfile.mkdtemp(prefix="icecast-test-"))
    server = IcecastServer(binary, folder, free_port())
    server.start()
    loop = asyncio.new_event_loop()
    feeder = threading.Thread(target=loop.run_forever, daemon=True)
    feeder.start()
    source = IcecastSource(server.url, "/main.mp3", password=PASSWORD, channels=1)

    async def start() -> asyncio.Task[None]:
        return asyncio.create_task(source.run(_tone_mp3(60)))

    async def stop(task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    feeding = asyncio.run_coroutine_threadsafe(start(), loop).result(5)
    try:
        asyncio.run_coroutine_threadsafe(source.set_title(FIRST), loop).result(5)
        deadline = time.monotonic() + 10
        while True:  # until the mount is up and has a second of burst for listeners
            with contextlib.suppress(OSError, EOFError):
                probe = RawClient(server.url, SAME_AS_ICECAST[0])
                with contextlib.closing(probe.sock):
                    probe.read(16000)
                    break
            assert time.monotonic() < deadline, "icecast never served the mount"
            time.sleep(0.2)
        for text in SAME_AS_ICECAST:
            theirs, ours = RawClient(server.url, text), RawClient(station.base_url, text)
            try:
                assert _shape(ours) == _shape(theirs), text
            finally:
                theirs.close()
                ours.close()
        head = "HEAD /main.mp3 HTTP/1.1\nHost: x\n\n"
        theirs = RawClient(server.url, head)
        assert theirs.status_line == "HTTP/1.0 400 Bad Request"
        theirs.close()
    finally:
        asyncio.run_coroutine_threadsafe(stop(feeding), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        feeder.join(5)
        loop.close()
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
