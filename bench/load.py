"""Many listeners on one radio process: what serving them costs, measured from outside.

    python bench/load.py                                   # 1000 MP3 + 100 HLS clients, tiny model
    python bench/load.py --mp3 200 --hls 20 --seconds 20   # a smaller look
    python bench/load.py --mp3 20 --hls 4 --seconds 6      # CI smoke run

Starts `radio serve` on the tiny random-weight model (what is measured here is the serving, not
the music), then:

1. a baseline of `--seconds` with no client: the process's CPU (user + system, from
   /proc/PID/stat) is what generating, encoding and the clock cost;
2. the same time with `--mp3` MP3 listeners (raw sockets reading the ICY stream at the pace it
   comes) and `--hls` HLS clients (each reloads the playlist every half segment and fetches every
   new segment), plus one slow MP3 listener that reads 500 bytes a second.

Prints the cores the process used in each phase (their difference is what serving costs), how
many listeners were dropped (their connection ended before the run did), the longest gap any
fast MP3 listener saw between two reads, HLS segment errors, and how many listeners the server
itself dropped as lagging (from /metrics: only the slow one should be). The clients run in this process's event loop, on the same cores: on a 2-core
machine they compete with the server, so the figures are an upper bound of the serving cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_engine import model_dir, say  # noqa: E402
from tests.helpers import start_radio_serve  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Mp3Listener:
    def __init__(self, port: int, rate: float | None = None) -> None:
        self.port, self.rate = port, rate  # rate: bytes per second for a slow reader
        self.bytes = 0
        self.longest_gap = 0.0
        self.dropped = False
        self.error = ""

    async def run(self, until: float) -> None:
        try:
            sock = socket.socket()
            if self.rate:  # a small receive buffer, as a slow player's: the lag shows at once
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        except OSError as e:
            self.dropped, self.error = True, f"connect: {e}"
            return
        writer.write(b"GET /main.mp3 HTTP/1.0\r\nIcy-MetaData: 1\r\n\r\n")
        last = time.monotonic()
        try:
            while (now := time.monotonic()) < until:
                want = 500 if self.rate else 65536
                try:
                    data = await asyncio.wait_for(reader.read(want), timeout=until - now)
                except TimeoutError:
                    break
                if not data:
                    self.dropped = True
                    break
                now = time.monotonic()
                if self.bytes > 20000:  # past the head and the burst
                    self.longest_gap = max(self.longest_gap, now - last)
                last = now
                self.bytes += len(data)
                if self.rate:
                    await asyncio.sleep(len(data) / self.rate)
        except OSError as e:
            self.dropped, self.error = True, str(e)
        finally:
            writer.close()


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    raw = await reader.read(-1)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body


async def server_drops(port: int) -> dict[str, int]:
    """The server's own count of MP3 listeners it dropped, by reason (from /metrics): the slow
    client itself sees the drop only once its receive buffers drain, at 500 B/s tens of seconds
    later."""
    status, body = await http_get(port, "/metrics")
    if status != 200:
        raise SystemExit(f"/metrics answered {status}")
    found = re.findall(
        r'^radio_listeners_dropped_total\{[^}]*reason="(\w+)"[^}]*\} ([\d.]+)$', body.decode(), re.M
    )
    return {reason: int(float(n)) for reason, n in found}


class HlsClient:
    def __init__(self, port: int, every: float) -> None:
        self.port, self.every = port, every
        self.segments = 0
        self.errors = 0
        self.seen: set[str] = set()

    async def run(self, until: float) -> None:
        while time.monotonic() < until:
            try:
                status, body = await http_get(self.port, "/hls/main/live.m3u8")
                if status != 200:
                    self.errors += 1
                else:
                    for name in re.findall(r"^(seg\d+\.ts)$", body.decode(), re.M)[-2:]:
                        if name not in self.seen:
                            self.seen.add(name)
                            status, data = await http_get(self.port, f"/hls/main/{name}")
                            ok = status == 200 and data[:1] == b"\x47"  # an MPEG-TS sync byte
                            self.segments += ok
                            self.errors += not ok
            except OSError:
                self.errors += 1
            await asyncio.sleep(self.every)


async def load_phase(port: int, args: argparse.Namespace) -> dict:
    until = time.monotonic() + args.seconds
    mp3 = [Mp3Listener(port) for _ in range(args.mp3)]
    slow = Mp3Listener(port, rate=500)
    hls = [HlsClient(port, every=1.0) for _ in range(args.hls)]
    tasks = [c.run(until) for c in (*mp3, slow, *hls)]
    await asyncio.gather(*tasks)
    return {"mp3": mp3, "slow": slow, "hls": hls}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mp3", type=int, default=1000, help="MP3 listeners")
    parser.add_argument("--hls", type=int, default=100, help="HLS clients")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    args = parser.parse_args()
    if args.mp3 < 0 or args.hls < 0 or args.seconds <= 0:
        raise SystemExit("--mp3 and --hls must be >= 0, --seconds > 0")
    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    extra = (
        f"[audio]\nlistener_queue_seconds = 3.0\n"
        f"[security]\nmax_listeners = {args.mp3 + 10}\n"
        f"[hls]\nsegment_seconds = 1.0\n"
    )
    say(f"radio serve on the tiny model (log: {tmp / 'radio-serve.log'}) ...")
    proc, base = start_radio_serve(str(model_dir("tiny")), tmp, extra)
    port = int(base.rsplit(":", 1)[1])
    try:
        time.sleep(2)
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(args.seconds)
        base_cores = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
        say(f"  no clients: the server used {base_cores:.2f} cores")
        say(
            f"  {args.mp3} MP3 listeners + 1 slow one + {args.hls} HLS clients, {args.seconds:.0f} s ..."
        )
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        result = asyncio.run(load_phase(port, args))
        load_cores = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
        dropped_by_server = asyncio.run(server_drops(port))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    mp3, hls = result["mp3"], result["hls"]
    dropped = sum(c.dropped for c in mp3)
    gaps = sorted(c.longest_gap for c in mp3) or [0.0]
    mbytes = sum(c.bytes for c in mp3) / 1e6
    say("")
    say(f"| {args.mp3} MP3 + {args.hls} HLS clients, tiny model, {args.seconds:.0f} s | figure |")
    say("| --- | --- |")
    say(f"| server CPU, no clients | {base_cores:.2f} cores |")
    say(f"| server CPU, with the clients | {load_cores:.2f} cores |")
    say(f"| serving cost (the difference) | {load_cores - base_cores:.2f} cores |")
    say(f"| MP3 listeners dropped | {dropped} of {args.mp3} |")
    say(f"| MP3 bytes delivered | {mbytes:.1f} MB |")
    say(
        f"| longest gap, median / worst MP3 listener | {gaps[len(gaps) // 2]:.2f} s / {gaps[-1]:.2f} s |"
    )
    say(
        f"| HLS segments fetched / errors | {sum(c.segments for c in hls)} / {sum(c.errors for c in hls)} |"
    )
    say(
        f"| listeners the server dropped as lagging / stalled (only the slow one should be) "
        f"| {dropped_by_server.get('lagging', 0)} / {dropped_by_server.get('stalled', 0)} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
