"""`radio serve` end to end with real clients: ICY titles, live HLS read by ffmpeg and checked
against the m3u8 rules, a bridge instead of silence when generation falls behind, and a clean
exit on Ctrl-C."""

from __future__ import annotations

import http.client
import io
import json
import re
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import av
import numpy as np
import pyloudnorm

from radio.testing import FaultInjector
from tests.helpers import IcyReader, post_prompt, require_tool


def open_mp3(base: str, icy: bool) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", "/main.mp3", headers={"Icy-MetaData": "1"} if icy else {})
    return conn, conn.getresponse()


def test_icy_title_follows_the_prompt(radio_serve):
    conn, r = open_mp3(radio_serve, icy=True)
    try:
        assert r.status == 200
        h = r.headers
        assert h["Content-Type"] == "audio/mpeg" and h["icy-metaint"] == "16000"
        assert h["icy-name"] == "Endless Radio" and h["icy-genre"] == "Various"
        assert h["icy-br"] == "128" and "no-cache" in h["Cache-Control"]
        reader = IcyReader(16000)
        titles: list[str] = []
        audio = bytearray()
        deadline = time.monotonic() + 5
        while not titles:
            assert time.monotonic() < deadline, "no StreamTitle within 5 s"
            a, t = reader.feed(r.read1(4096))
            audio += a
            titles += t
        assert titles == ["calm lofi beat with piano"]
        assert audio[0] == 0xFF and audio[1] & 0xE0 == 0xE0  # starts on an MP3 frame

        new = "it's 'quoted' jazz \u00e9t\u00e9 \u266b"
        post_prompt(radio_serve, new)
        deadline = time.monotonic() + 8
        while titles[-1] != new:
            assert time.monotonic() < deadline, f"title did not change: {titles}"
            titles += reader.feed(r.read1(4096))[1]
    finally:
        conn.close()

    # a listener who tunes in now gets ~1 s of recent audio at once, so the player starts
    conn, r = open_mp3(radio_serve, icy=False)
    try:
        t, got = time.monotonic(), 0
        while got < 24000:  # 1.5 s of audio: with the 1 s burst, it takes 0.5 s
            got += len(r.read1(4096))
        assert time.monotonic() - t < 1.0, "no burst: the player would wait"
    finally:
        conn.close()


def parse_playlist(text: str) -> dict:
    lines = text.strip().splitlines()
    assert lines[0] == "#EXTM3U"
    target = int(re.search(r"^#EXT-X-TARGETDURATION:(\d+)$", text, re.M).group(1))
    sequence = int(re.search(r"^#EXT-X-MEDIA-SEQUENCE:(\d+)$", text, re.M).group(1))
    durations = [float(x) for x in re.findall(r"^#EXTINF:([\d.]+),", text, re.M)]
    uris = [ln for ln in lines if ln and not ln.startswith("#")]
    assert len(uris) == len(durations)
    assert "#EXT-X-PROGRAM-DATE-TIME:" in text
    assert "#EXT-X-ENDLIST" not in text
    return {"target": target, "sequence": sequence, "durations": durations, "uris": uris}


def fetch(url: str) -> tuple[int, dict, bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers, r.read()


def test_hls_playlist_obeys_the_rules_and_ffmpeg_decodes_it(radio_serve):
    ffmpeg = require_tool("ffmpeg")
    url = f"{radio_serve}/hls/main/live.m3u8"
    seen: dict[int, str] = {}  # media sequence number -> URI, across reloads
    playlists = []
    deadline = time.monotonic() + 15
    while True:
        status, headers, body = fetch(url)
        assert status == 200
        assert headers["Content-Type"] == "application/vnd.apple.mpegurl"
        assert headers["Access-Control-Allow-Origin"] == "*"
        if b"#EXTINF" not in body and not playlists:  # on air, the first segment not cut yet
            assert time.monotonic() < deadline, f"no segment ever: {body.decode()}"
            time.sleep(0.25)
            continue
        p = parse_playlist(body.decode())
        playlists.append(p)
        for i, uri in enumerate(p["uris"]):
            assert seen.setdefault(p["sequence"] + i, uri) == uri, "a sequence number changed URI"
        moved = p["sequence"] > playlists[0]["sequence"]
        if len(playlists) >= 4 and moved and sum(p["durations"]) >= 3 * p["target"]:
            break
        assert time.monotonic() < deadline, f"playlist never grew: {body.decode()}"
        time.sleep(0.5)
    assert len({p["target"] for p in playlists}) == 1, "EXT-X-TARGETDURATION changed"
    sequences = [p["sequence"] for p in playlists]
    assert sequences == sorted(sequences) and sequences[-1] > sequences[0], sequences
    for p in playlists:
        assert all(d <= p["target"] for d in p["durations"])
    last = playlists[-1]
    assert sum(last["durations"]) >= 3 * last["target"]

    # a segment that left the playlist can still be fetched for a while
    gone = min(seen)
    assert gone < last["sequence"]
    status, headers, data = fetch(f"{radio_serve}/hls/main/{seen[gone]}")
    assert status == 200 and headers["Content-Type"] == "video/mp2t" and data[0] == 0x47
    assert headers["Access-Control-Allow-Origin"] == "*"

    # a real HLS client: ffmpeg reads the live playlist and decodes several segments
    p = subprocess.run(
        [ffmpeg, "-nostdin", "-v", "error", "-i", url, "-t", "3", "-f", "s16le", "-ac", "1", "-"],
        capture_output=True,
        timeout=30,
    )
    assert p.returncode == 0, p.stderr.decode()
    assert p.stderr.decode().strip() == ""
    seconds = len(p.stdout) / 2 / 44100
    assert 2.9 <= seconds <= 3.1, seconds
    pcm = np.frombuffer(p.stdout, np.int16).astype(np.float32) / 32768
    loudness = pyloudnorm.Meter(44100).integrated_loudness(pcm)
    peak = 20 * np.log10(np.abs(pcm).max())
    print(f"\nHLS as decoded by ffmpeg: {loudness:.1f} LUFS, sample peak {peak:.1f} dBFS")
    assert -17 < loudness < -11  # the loudness stage sits before the encoders (target -14)
    assert peak < -0.5  # true-peak ceiling -1 dBTP, plus a little AAC overshoot

    with urllib.request.urlopen(f"{radio_serve}/api/stations/main", timeout=10) as r:
        assert json.loads(r.read())["listeners"]["hls"] >= 1


def test_falling_behind_plays_a_bridge_not_silence(radio_factory):
    faults = FaultInjector()
    radio = radio_factory(faults=faults, generation={"buffer_ahead": 1.0, "seed": 5})
    st = radio.radio.stations["main"]
    chunks: list[tuple[float, int]] = []
    data = bytearray()
    stop = threading.Event()

    def listen() -> None:
        with urllib.request.urlopen(f"{radio.base_url}/main.mp3", timeout=10) as r:
            while not stop.is_set():
                b = r.read1(4096)
                if not b:
                    return
                chunks.append((time.monotonic(), len(b)))
                data.extend(b)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    time.sleep(1.0)
    faults.slow_down(0.6)  # 0.2 s of audio now takes > 0.6 s: x0.3 real time
    t = time.monotonic()
    while st.health.underruns == 0:
        assert time.monotonic() - t < 10, "no underrun although generation was slowed down"
        time.sleep(0.05)
    with urllib.request.urlopen(f"{radio.base_url}/api/stations/main", timeout=10) as r:
        assert json.loads(r.read())["health"]["bridging"] is True
    time.sleep(2.0)  # two seconds of bridge
    faults.slow_down(0.0)
    t = time.monotonic()
    while st.health.bridging:
        assert time.monotonic() - t < 10, "never recovered from the underrun"
        time.sleep(0.05)
    time.sleep(1.0)
    stop.set()
    listener.join(5)
    assert st.health.underruns >= 1 and st.health.bridge_seconds > 1.5

    # the connection never stalled ...
    times = [c[0] for c in chunks]
    assert max(np.diff(times)) < 1.0, "the MP3 stream stalled"  # without a bridge: seconds
    # ... and it never went silent: decode what the listener got, 100 ms windows after 0.5 s
    with av.open(io.BytesIO(bytes(data)), format="mp3") as f:
        pcm = np.concatenate([fr.to_ndarray().reshape(-1) for fr in f.decode(audio=0)])
    win = 4410
    rms = np.sqrt(np.mean(pcm[: len(pcm) // win * win].reshape(-1, win) ** 2, axis=1))
    dbfs = 20 * np.log10(rms[5:-2] + 1e-9)
    assert len(dbfs) > 40
    assert dbfs.min() > -40, f"quietest 100 ms: {dbfs.min():.1f} dBFS"

    with urllib.request.urlopen(f"{radio.base_url}/metrics", timeout=10) as r:
        assert re.search(r'radio_underruns_total\{station="main"\} [1-9]', r.read().decode())


def test_a_slow_mp3_listener_is_dropped_without_slowing_the_others():
    import asyncio

    from radio.mounts import Mp3Mount

    async def run() -> None:
        counts: list[int] = []
        mount = Mp3Mount(32000, 1, 128, 44100, 1.0, 2.0, on_count=counts.append)
        pcm = (0.1 * np.sin(np.arange(3200) / 5)).astype(np.float32)[None]  # [1, 3200] = 0.1 s
        for _ in range(20):  # 2 s of history: the burst
            mount.push(pcm, None)
        slow, fast = mount.add(), mount.add()
        assert len(await fast.next()) >= 15000  # the ~1 s burst arrives at once
        got = 0
        for _ in range(100):  # 10 s of audio; `slow` never reads
            mount.push(pcm, None)
            got += len(await fast.next() or b"")
            assert slow._size <= slow.limit  # memory stays bounded
        assert slow.dropped and slow not in mount.listeners
        assert await slow.next() is None  # its handler ends
        assert fast in mount.listeners and not fast.dropped
        assert abs(got - 10 * 16000) < 1000  # the fast one got every byte, at 128 kbit/s
        assert counts[-1] == 1
        relay = mount.add(counted=False)  # e.g. the Icecast source client
        assert counts[-1] == 1 and mount.count() == 1
        mount.push(pcm, None)
        assert await relay.next()

    asyncio.run(run())


def test_two_stations_share_one_model(radio_factory):
    radio = radio_factory(
        stations=[
            {"id": "main", "prompt": "slow jazz"},
            {"id": "rock", "name": "Rock", "prompt": "loud rock"},
        ],
        security={"admin_token": "two-station-token"},
    )
    base = radio.base_url
    with urllib.request.urlopen(f"{base}/api/stations", timeout=10) as r:
        stations = json.loads(r.read())["stations"]
    assert [(s["id"], s["prompt"]) for s in stations] == [
        ("main", "slow jazz"),
        ("rock", "loud rock"),
    ]
    with (
        urllib.request.urlopen(f"{base}/main.mp3", timeout=10) as a,
        urllib.request.urlopen(f"{base}/rock.mp3", timeout=10) as b,
    ):
        assert len(a.read(20000)) == 20000 and len(b.read(20000)) == 20000
        req = urllib.request.Request(
            f"{base}/api/stations/rock/prompt",
            data=b'{"prompt": "punk rock"}',
            headers={"Authorization": "Bearer two-station-token"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 202
        assert len(a.read(20000)) == 20000 and len(b.read(20000)) == 20000
    st = radio.radio.stations
    assert st["rock"].prompt == "punk rock" and st["main"].prompt == "slow jazz"


def test_every_listener_hears_the_same_moment(radio_serve):
    conn_a, a = open_mp3(radio_serve, icy=False)
    conn_b, b = open_mp3(radio_serve, icy=False)
    try:
        data_a, data_b = b"", b""
        while len(data_a) < 64000:  # ~1 s burst + 3 s live
            data_a += a.read1(65536)
        while len(data_b) < 40000:
            data_b += b.read1(65536)
    finally:
        conn_a.close()
        conn_b.close()
    # the same MP3 bytes at the same place in the broadcast: one encoder, one clock
    assert data_b[-8000:] in data_a
    assert data_b[:4000] in data_a  # the burst too


# Keep this test last in the module: it stops the shared `radio serve` process.
def test_ctrl_c_closes_listeners_and_exits_quickly(radio_serve_process):
    proc, base, log_path = radio_serve_process
    conn, r = open_mp3(base, icy=False)
    assert len(r.read1(4096)) > 0
    events = urllib.request.urlopen(f"{base}/api/stations/main/events", timeout=10)
    assert events.readline()  # connected
    t = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(5)
    took = time.monotonic() - t
    assert rc == 0, rc
    # the listener and the event stream see a clean end, not a hang
    while r.read1(65536):
        pass
    while events.readline():
        pass
    conn.close()
    events.close()
    log = log_path.read_text()
    assert re.search(r"closing [1-9]\d* listener", log) and "generator stopped" in log, log[-2000:]
    assert "Traceback" not in log, log[-3000:]
    print(f"\nexit {took:.2f} s after SIGINT")
    assert took < 5
