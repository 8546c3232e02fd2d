"""A slow MP3 listener is dropped once it lags `listener_queue_seconds` behind, counting the bytes
that wait in asyncio's buffer and in the kernel for it (the socket's send buffer is bounded), while
a listener that keeps up plays on at wall-clock rate."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
import urllib.parse
import urllib.request

import numpy as np

from radio.mounts import Listener
from radio.rawhttp import KERNEL_SLACK, kernel_unsent


class FakeSink:
    def __init__(self, buffered: int, kernel_limit: int, unsent: int) -> None:
        self._buffered, self.kernel_limit, self._unsent = buffered, kernel_limit, unsent
        self.asked = 0  # kernel_unsent calls (system calls in the real sink)
        self.aborted = False

    def buffered(self) -> int:
        return self._buffered

    def kernel_unsent(self) -> int:
        self.asked += 1
        return self._unsent

    def abort(self) -> None:
        self.aborted = True


def test_lag_counts_the_connections_buffers_and_asks_the_kernel_only_near_the_limit():
    sink = FakeSink(buffered=300, kernel_limit=200, unsent=150)
    listener = Listener(limit=1000, sink=sink)
    assert listener.offer(b"x" * 400)  # 400 + 300 (+ at most 200 in the kernel) <= 1000
    assert sink.asked == 0 and not sink.aborted
    assert not listener.offer(b"x" * 200)  # 600 + 300 + 150 = 1050 > 1000
    assert sink.asked == 1 and sink.aborted and listener.dropped and listener.lag == 1050
    assert not listener.offer(b"x")  # stays dropped
    near = Listener(limit=1000, sink=FakeSink(buffered=300, kernel_limit=200, unsent=100))
    assert near.offer(b"x" * 600)  # 600 + 300 + 100 = 1000: exactly at the limit is fine


def test_kernel_unsent_counts_what_the_peer_has_not_taken():
    server = socket.create_server(("127.0.0.1", 0))
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by the accepted
    reader = socket.create_connection(server.getsockname())
    sender, _ = server.accept()
    try:
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        limit = sender.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert kernel_unsent(sender) == 0
        sender.setblocking(False)
        sent = 0
        try:
            while True:
                sent += sender.send(b"\xaa" * 4096)
        except BlockingIOError:
            pass
        waiting = kernel_unsent(sender)  # more than SO_SNDBUF: one big loopback packet beyond
        assert 0 < waiting <= limit + KERNEL_SLACK and limit < sent, (waiting, limit, sent)
        got = 0
        while got < sent:
            got += len(reader.recv(65536))
        deadline = time.monotonic() + 5
        while kernel_unsent(sender) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert kernel_unsent(sender) == 0
    finally:
        for s in (sender, reader, server):
            s.close()
    assert kernel_unsent(None) == 0


def _connect(base: str, rcvbuf: int | None = None) -> socket.socket:
    u = urllib.parse.urlsplit(base)
    s = socket.socket()
    if rcvbuf is not None:  # an embedded player's small buffer (set before connecting)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)
    s.connect((u.hostname, u.port))
    s.sendall(b"GET /main.mp3 HTTP/1.1\r\nHost: test\r\n\r\n")
    return s


def test_a_slow_reader_is_dropped_in_time_and_a_normal_one_plays_on(radio_factory):
    queue_seconds = 3.0
    radio = radio_factory(
        audio={"listener_queue_seconds": queue_seconds, "mp3_burst_seconds": 1.0},
        hls={"enabled": False},
    )
    mount = radio.radio.mp3["main"]
    stop = threading.Event()
    arrivals: list[tuple[float, int]] = []  # the normal listener: (time, bytes)

    def normal() -> None:
        s = _connect(radio.base_url)
        try:
            while not stop.is_set():
                data = s.recv(65536)
                if not data:
                    return
                arrivals.append((time.monotonic(), len(data)))
        finally:
            s.close()

    player = threading.Thread(target=normal, daemon=True)
    player.start()
    time.sleep(1.0)

    slow = _connect(radio.base_url, rcvbuf=4096)
    connected = time.monotonic()
    dropped_at = None
    try:
        while time.monotonic() - connected < queue_seconds + 6:  # read 500 bytes/s
            if radio.call(lambda: mount.dropped["lagging"]):
                dropped_at = time.monotonic() - connected
                break
            with contextlib.suppress(OSError):  # a timeout, or the drop
                slow.recv(50)
            time.sleep(0.1)
    finally:
        slow.close()
    time.sleep(2.0)  # the normal listener goes on after the drop
    stop.set()
    player.join(5)

    print(f"\na listener reading 500 bytes/s was dropped {dropped_at} s after it connected")
    assert dropped_at is not None, "the slow listener was never dropped"
    # its lag passes queue + burst seconds of audio about queue_seconds after it connected
    assert queue_seconds - 0.5 < dropped_at < queue_seconds + 1.5, dropped_at
    assert radio.call(lambda: (mount.dropped["lagging"], mount.count())) == (1, 1)

    times = np.array([t for t, _ in arrivals])
    assert np.diff(times).max() < 1.0, "the normal listener stalled"
    late = [(t, n) for t, n in arrivals if t >= times[0] + 2.0]  # after its burst
    rate = sum(n for _, n in late[1:]) / (late[-1][0] - late[0][0])
    assert abs(rate / 16000 - 1) < 0.1, rate  # 128 kbit/s, as the clock releases it

    with urllib.request.urlopen(f"{radio.base_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert re.search(r'radio_listeners_dropped_total\{reason="lagging",station="main"\} 1\.0', text)
