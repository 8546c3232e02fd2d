"""The Icecast2 source client against a real Icecast2 (Debian `icecast2`, started here from a temp
config on 127.0.0.1, as user `icecast2` when we are root): ffmpeg decodes the mount, an ICY
reader sees the title change, status-json shows the mount, the source survives a server
restart, a wrong password is reported once, and the PUT -> SOURCE fallback and raw (unchunked)
bytes are checked against a small fake server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from radio.encoders import Mp3Encoder
from radio.icecast import IcecastSource
from radio.relay import mount_chunks
from tests.helpers import IcyReader, free_port, require_tool

RATE, CHANNELS, KBPS, TONE = 32000, 1, 128, 440.0
PASSWORD = "s3cret-source"


class IcecastServer:
    """A real icecast2 process on 127.0.0.1:port from a temp config; stop() and start() again
    to restart it on the same port."""

    def __init__(self, binary: str, folder: Path, port: int) -> None:
        self.binary, self.folder, self.port = binary, folder, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        (folder / "log").mkdir()
        (folder / "icecast.xml").write_text(
            f"""<icecast>
  <location>test</location><admin>test@localhost</admin>
  <limits>
    <clients>20</clients><sources>4</sources><queue-size>524288</queue-size>
    <client-timeout>30</client-timeout><header-timeout>5</header-timeout>
    <source-timeout>5</source-timeout><burst-on-connect>1</burst-on-connect>
    <burst-size>32768</burst-size>
  </limits>
  <authentication>
    <source-password>{PASSWORD}</source-password><relay-password>relay-pw</relay-password>
    <admin-user>admin</admin-user><admin-password>admin-pw</admin-password>
  </authentication>
  <hostname>127.0.0.1</hostname>
  <listen-socket><port>{port}</port><bind-address>127.0.0.1</bind-address></listen-socket>
  <fileserve>1</fileserve>
  <paths>
    <basedir>/usr/share/icecast2</basedir><logdir>{folder}/log</logdir>
    <webroot>/usr/share/icecast2/web</webroot><adminroot>/usr/share/icecast2/admin</adminroot>
  </paths>
  <logging><accesslog>access.log</accesslog><errorlog>error.log</errorlog>
    <loglevel>3</loglevel></logging>
  <security><chroot>0</chroot></security>
  <mount type="normal">
    <!-- Icecast sends ICY titles as ISO-8859-1 unless the mount says UTF-8 -->
    <mount-name>/main.mp3</mount-name><charset>UTF-8</charset>
  </mount>
</icecast>
"""
        )
        self.user = None
        if os.geteuid() == 0:  # icecast refuses to run as root: hand it the folder, run as it
            self.user = "icecast2"
            shutil.chown(folder, self.user)
            for path in folder.rglob("*"):
                shutil.chown(path, self.user)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.folder / "icecast.xml")],
            user=self.user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = (self.folder / "log" / "error.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"icecast2 exited with {self.proc.returncode}: {err}\n{log}")
            # ready once its global stats are filled in (right after start they are not, and
            # status-json.xsl is then not even valid JSON)
            with (
                contextlib.suppress(OSError, ValueError, TypeError, KeyError),
                urllib.request.urlopen(self.url + "/status-json.xsl", timeout=1) as resp,
            ):
                if "server_id" in json.loads(resp.read())["icestats"]:
                    return
            time.sleep(0.05)
        pytest.fail("icecast2 did not answer status-json.xsl within 10 s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def icecast() -> Iterator[IcecastServer]:
    binary = require_tool("icecast2")
    folder = Path(tempfile.mkdtemp(prefix="icecast-test-"))  # not under root's 0700 pytest dir
    server = IcecastServer(binary, folder, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def _tone_mp3(seconds: float = 120.0, chunk: float = 0.1) -> AsyncIterator[bytes]:
    """A 440 Hz tone as MP3, released in real time like the station's clock does."""
    encoder = Mp3Encoder(RATE, CHANNELS, KBPS)
    n = int(RATE * chunk)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(int(seconds / chunk)):
        t = np.arange(i * n, (i + 1) * n) / RATE
        pcm = (0.3 * np.sin(2 * np.pi * TONE * t)).astype(np.float32)[None].repeat(CHANNELS, 0)
        data = encoder.encode(pcm)  # [C, n] -> MP3 frames
        if data:
            yield data
        await asyncio.sleep(max(0.0, start + (i + 1) * chunk - loop.time()))


async def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)


async def _mounts(server: IcecastServer) -> dict[str, dict]:
    """status-json.xsl sources by mount path."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s,
        s.get(server.url + "/status-json.xsl") as resp,
    ):
        stats = json.loads(await resp.text())["icestats"]
    sources = stats.get("source", [])
    if isinstance(sources, dict):
        sources = [sources]
    return {src["listenurl"].removeprefix(server.url): src for src in sources}


async def _icy_listen(url: str, want_title: str, min_audio: int, timeout: float = 8.0):
    """Connect with Icy-MetaData: 1; read until `want_title` was seen and `min_audio` bytes came.

    Returns (all titles seen, audio bytes)."""
    titles: list[str] = []
    audio = bytearray()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout + 5)) as s,
        s.get(url, headers={"Icy-MetaData": "1"}) as resp,
    ):
        assert resp.status == 200
        reader = IcyReader(int(resp.headers["icy-metaint"]))
        deadline = time.monotonic() + timeout
        while want_title not in titles or len(audio) < min_audio:
            if time.monotonic() > deadline:
                pytest.fail(f"no title {want_title!r} within {timeout} s (saw {titles})")
            data = await asyncio.wait_for(resp.content.read(4096), timeout)
            assert data, "icecast closed the listener"
            got, new_titles = reader.feed(data)
            audio += got
            titles += new_titles
    return titles, bytes(audio)


def _assert_tone(pcm: np.ndarray, seconds: float) -> None:
    """pcm: s16 mono at RATE holds at least `seconds` of the 440 Hz tone."""
    assert len(pcm) >= seconds * RATE, f"decoded only {len(pcm) / RATE:.2f} s"
    x = pcm[-int(seconds * RATE) :].astype(np.float64) / 32768
    assert np.sqrt(np.mean(x**2)) > 0.1, "decoded audio is (nearly) silent"
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    peak = np.argmax(spectrum) * RATE / len(x)
    assert abs(peak - TONE) < 5, f"decoded tone at {peak:.1f} Hz, expected {TONE}"


async def _ffmpeg_decode(args: list[str], stdin: bytes | None = None) -> np.ndarray:
    ffmpeg = require_tool("ffmpeg")
    proc = await asyncio.create_subprocess_exec(
        ffmpeg,
        "-nostdin" if stdin is None else "-hide_banner",
        "-v",
        "error",
        *args,
        "-f",
        "s16le",
        "-ac",
        "1",
        "-ar",
        str(RATE),
        "pipe:1",
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")
    # A listener that joins a live MP3 stream starts where the first frame may point back into
    # the bit reservoir of frames it never got: one "backstep" complaint is how every player's
    # decoder starts; anything else is a decode error.
    errors = [
        line
        for line in err.decode(errors="replace").splitlines()
        if line.strip() and "invalid new backstep" not in line
    ]
    assert not errors, f"ffmpeg reported decode errors: {errors}"
    return np.frombuffer(out, dtype=np.int16)


def _source(server: IcecastServer, mount: str, **kw) -> IcecastSource:
    options = dict(
        password=PASSWORD,
        name="Endless Test FM",
        description="a tone that never ends",
        genre="Ambient",
        public=False,
        bitrate_kbps=KBPS,
        sample_rate=RATE,
        channels=CHANNELS,
        retry_min=0.5,
        retry_max=2.0,
    )
    options.update(kw)
    return IcecastSource(server.url, mount, **options)


def _lines(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_stream_title_restart_and_cancel(icecast: IcecastServer, caplog) -> None:
    asyncio.run(_stream_title_restart_and_cancel(icecast, caplog))


async def _stream_title_restart_and_cancel(icecast: IcecastServer, caplog) -> None:
    caplog.set_level(logging.INFO, logger="radio.icecast")
    src = _source(icecast, "/main.mp3")
    await src.set_title("first prompt: café jazz")  # before connecting: sent once connected
    task = asyncio.create_task(src.run(_tone_mp3()))
    try:

        async def mounted() -> bool:
            return "/main.mp3" in await _mounts(icecast)

        await _wait_for(mounted, 10, "the mount in status-json.xsl")
        info = (await _mounts(icecast))["/main.mp3"]
        assert info["server_name"] == "Endless Test FM"
        assert info["server_description"] == "a tone that never ends"
        assert info["genre"] == "Ambient"
        assert info["server_type"] == "audio/mpeg"
        assert info["audio_info"] == f"ice-samplerate={RATE};ice-bitrate={KBPS};ice-channels=1"
        assert src.status.connected and src.status.method == "PUT"

        # a real player decodes the mount
        pcm = await _ffmpeg_decode(
            ["-rw_timeout", "5000000", "-t", "2", "-i", icecast.url + "/main.mp3"]
        )
        _assert_tone(pcm, 1.5)

        # the title set before connecting arrived; a new one shows up in the ICY stream
        titles, _ = await _icy_listen(icecast.url + "/main.mp3", "first prompt: café jazz", 0)
        await src.set_title("second prompt: rainy-day ☔ lofi & more")
        titles, _ = await _icy_listen(
            icecast.url + "/main.mp3", "second prompt: rainy-day ☔ lofi & more", 0
        )
        assert src.status.title == "second prompt: rainy-day ☔ lofi & more"
        sent_before = src.status.bytes_sent
        assert sent_before > 0

        # restart the server mid-stream: the source reconnects by itself, title included
        icecast.stop()
        await asyncio.sleep(0.3)
        icecast.start()
        await _wait_for(mounted, 10, "the source to reconnect after the restart")
        titles, audio = await _icy_listen(
            icecast.url + "/main.mp3", "second prompt: rainy-day ☔ lofi & more", 24000
        )
        assert "first prompt: café jazz" not in titles  # the new server got the current one
        _assert_tone(await _ffmpeg_decode(["-f", "mp3", "-i", "pipe:0"], stdin=audio), 1.0)
        status = src.status
        assert status.connected and status.reconnects == 1
        assert status.bytes_sent > sent_before
        assert len(_lines(caplog, "connection lost")) == 1, caplog.text  # once per outage
        assert len(_lines(caplog, "icecast main: reconnected")) == 1, caplog.text

        # cancelling run() closes the socket promptly: the mount disappears
        task.cancel()
        t0 = time.monotonic()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert time.monotonic() - t0 < 1.0
        assert not src.status.connected

        async def unmounted() -> bool:
            return "/main.mp3" not in await _mounts(icecast)

        await _wait_for(unmounted, 3, "the mount to go away after cancel")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_wrong_password_and_mount_in_use_reported_once(icecast, caplog) -> None:
    asyncio.run(_wrong_password_and_mount_in_use(icecast, caplog))


async def _wrong_password_and_mount_in_use(icecast: IcecastServer, caplog) -> None:
    caplog.set_level(logging.INFO, logger="radio.icecast")
    bad = _source(icecast, "/bad.mp3", password="not-the-password", auth_retry=0.5)
    holder = _source(icecast, "/busy.mp3")
    busy = _source(icecast, "/busy.mp3")
    tasks = [asyncio.create_task(s.run(_tone_mp3())) for s in (bad, holder)]
    try:

        async def holder_up() -> bool:
            return holder.status.connected

        await _wait_for(holder_up, 10, "the first source of /busy.mp3")
        tasks.append(asyncio.create_task(busy.run(_tone_mp3())))
        await asyncio.sleep(3.0)  # several retries of both
        assert not any(t.done() for t in tasks), "a refused source must keep running"
        refused = _lines(caplog, "icecast bad: the server refused the source password for /bad.mp3")
        assert len(refused) == 1, caplog.text
        assert "/bad.mp3" not in await _mounts(icecast)
        assert not bad.status.connected and "password" in (bad.status.last_error or "")
        in_use = _lines(caplog, "icecast busy: the mount /busy.mp3 is already in use")
        assert len(in_use) == 1, caplog.text
        assert holder.status.connected and not busy.status.connected
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_falls_back_to_source_and_writes_raw_bytes() -> None:
    """A server that refuses PUT (405) gets SOURCE; the body is the MP3 bytes, not chunked."""
    asyncio.run(_falls_back_to_source())


async def _falls_back_to_source() -> None:
    requests: list[bytes] = []
    received = bytearray()
    got_all = asyncio.Event()
    chunks = [bytes([i]) * 1000 for i in range(1, 6)]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        requests.append(head)
        if head.startswith(b"PUT "):
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n")
        while data := await reader.read(65536):
            received.extend(data)
            if len(received) >= 5000:
                got_all.set()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()
    src = IcecastSource(
        f"http://127.0.0.1:{port}", "old.mp3", password="pw", name="Ünïcode\r\nX-Evil: 1"
    )
    task = asyncio.create_task(src.run(queue))
    try:
        await asyncio.sleep(0.3)  # connected; audio before this point would be dropped
        for c in chunks:
            queue.put_nowait(c)
            await asyncio.sleep(0.02)
        await asyncio.wait_for(got_all.wait(), 5)
        queue.put_nowait(None)  # end of input: run() returns
        await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
        server.close()
        await server.wait_closed()
    assert [r.split(b" ", 1)[0] for r in requests] == [b"PUT", b"SOURCE"]
    put, source = (r.decode("utf-8") for r in requests)
    assert "Expect: 100-continue" in put and "Transfer-Encoding" not in put
    assert source.startswith("SOURCE /old.mp3 ICE/1.0\r\n")
    assert "\r\nAuthorization: Basic cG9zOnB3\r\n" not in source  # user is "source", not "pos"
    assert "\r\nAuthorization: Basic c291cmNlOnB3\r\n" in source  # source:pw
    assert "\r\nice-name: Ünïcode X-Evil: 1\r\n" in source  # no header injection
    assert bytes(received) == b"".join(chunks)
    assert src.status.method == "SOURCE" and src.status.bytes_sent == 5000


def test_the_source_password_is_resolved_when_the_config_is_read() -> None:
    """The environment variable `password_env` wins when it is set; no password at all stops
    start-up with a config error naming the key."""
    from radio.config import ConfigError, parse_config

    def password(icecast: dict, env: dict) -> str:
        station = {"id": "main", "icecast": {"url": "http://ice:8000", **icecast}}
        ic = parse_config({"stations": [station]}, env=env).stations[0].icecast
        assert ic is not None
        return ic.password

    env = {"RADIO_TEST_ICECAST_PW": "from-env"}
    own = {"password": "from-config", "password_env": "RADIO_TEST_ICECAST_PW"}
    assert password(own, env) == "from-env"
    assert password(own, {}) == "from-config"
    assert password(own, {"RADIO_TEST_ICECAST_PW": ""}) == "from-config"
    assert password({}, {"ICECAST_SOURCE_PASSWORD": "default-env"}) == "default-env"
    assert password({"password": "x", "password_env": ""}, env) == "x"
    with pytest.raises(ConfigError) as e:
        password({"password_env": "RADIO_TEST_ICECAST_PW"}, {})
    assert str(e.value) == (
        "stations[0].icecast.password: no Icecast source password (not set here, nor the "
        "environment variable RADIO_TEST_ICECAST_PW)"
    )
    with pytest.raises(ConfigError, match=r"^stations\[0\]\.icecast\.password: "):
        password({"password_env": ""}, env)


def test_radio_relays_to_icecast_and_prompt_post_changes_its_title(icecast, radio_factory) -> None:
    """End to end, from config: [stations.icecast] makes the radio feed Icecast; a prompt POST
    to the radio shows up as the ICY title on the Icecast mount, also after Icecast restarts."""
    r = radio_factory(
        security={"prompt_rate_limit": "100 per 1 s"},
        stations=[{"id": "main", "icecast": {"url": icecast.url, "password": PASSWORD}}],
    )
    station = r.radio.stations["main"]
    asyncio.run(_relay_checks(icecast, r.base_url, station.prompt, r.radio.icecast["main"]))


async def _relay_checks(icecast: IcecastServer, base_url: str, first: str, src) -> None:
    async def mounted() -> bool:
        return "/main.mp3" in await _mounts(icecast)

    await _wait_for(mounted, 10, "the radio's relay on the Icecast mount")
    info = (await _mounts(icecast))["/main.mp3"]
    assert info["server_name"] == "Endless Radio" and info["genre"] == "Various"
    await _icy_listen(icecast.url + "/main.mp3", first, 0)

    new = "e2e: warm café ☕ strings"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s,
        s.post(f"{base_url}/api/stations/main/prompt", json={"prompt": new}) as resp,
    ):
        assert resp.status in (200, 202), await resp.text()
    _, audio = await _icy_listen(icecast.url + "/main.mp3", new, 16000, timeout=15)
    pcm = await _ffmpeg_decode(["-f", "mp3", "-i", "pipe:0"], stdin=audio)
    assert len(pcm) > 0.5 * RATE and np.abs(pcm).max() > 100, "no audio through Icecast"

    icecast.stop()
    icecast.start()
    await _wait_for(mounted, 10, "the relay to reconnect after the Icecast restart")
    titles, _ = await _icy_listen(icecast.url + "/main.mp3", new, 0)
    assert first not in titles
    assert src.status.reconnects == 1
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.get(f"{base_url}/api/stations/main") as resp:
            ice = (await resp.json())["icecast"]
        async with s.get(f"{base_url}/metrics") as resp:
            metrics = await resp.text()
    assert ice["connected"] and ice["reconnects"] == 1 and ice["bytes_sent"] > 0
    assert 'radio_icecast_connected{station="main"} 1.0' in metrics
    assert 'radio_icecast_reconnects_total{station="main"} 1.0' in metrics


def test_mount_chunks_rejoins_when_dropped_and_ends_with_the_mount(caplog) -> None:
    asyncio.run(_mount_chunks_rejoins(caplog))


async def _mount_chunks_rejoins(caplog) -> None:
    from datetime import UTC, datetime

    from radio.mounts import Mp3Mount

    counts: list[int] = []
    mount = Mp3Mount(
        RATE, 1, KBPS, RATE, burst_seconds=0.5, queue_seconds=0.5, on_count=counts.append
    )
    t = np.arange(RATE // 10) / RATE
    pcm = (0.3 * np.sin(2 * np.pi * TONE * t)).astype(np.float32)[None]  # [1, 3200]: 0.1 s
    chunks = mount_chunks(mount)
    first = asyncio.create_task(anext(chunks))
    await asyncio.sleep(0)  # the relay joined the mount, without counting as a listener
    assert len(mount.listeners) == 1 and counts == [0]
    for _ in range(3):
        mount.push(pcm, datetime.now(UTC))
    assert await first
    for _ in range(30):  # 3 s while the relay does not read: more than its queue holds
        mount.push(pcm, datetime.now(UTC))
    assert not mount.listeners  # dropped by the mount
    with caplog.at_level(logging.WARNING, logger="radio.relay"):
        assert await anext(chunks)  # joined again: the mount's burst
    assert len(mount.listeners) == 1 and "joining it again" in caplog.text
    mount.close()
    with pytest.raises(StopAsyncIteration):
        await anext(chunks)
    assert not mount.listeners and set(counts) == {0}  # never counted as a listener


def test_cancel_always_stops_run_while_streaming() -> None:
    """Cancelling run() at any moment of a busy stream ends it (cancellation is never lost)."""
    asyncio.run(_cancel_at_random_moments())


async def _cancel_at_random_moments() -> None:
    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass

    async def busy() -> AsyncIterator[bytes]:
        while True:
            yield b"\xff" * 417
            await asyncio.sleep(0)

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        for i in range(40):
            src = IcecastSource(url, "/c.mp3", password="pw")
            task = asyncio.create_task(src.run(busy()))
            while src.status.bytes_sent == 0:
                await asyncio.sleep(0.001)
            for _ in range(i % 7):
                await asyncio.sleep(0)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=2)
            assert done, f"run() ignored the cancellation (try {i})"
    finally:
        server.close()
        await server.wait_closed()
