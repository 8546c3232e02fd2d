"""Start to first sound: from `radio serve` on the command line to the first MP3 byte a listener gets.

    python bench/first_sound.py                     # musicgen-small shapes, 2 runs (~1 min)
    python bench/first_sound.py --size tiny --runs 1   # CI smoke run

Each run starts `radio serve --model DIR` in a fresh process, connects to `/main.mp3` as soon as
the port answers, and times: the port accepting connections, `/healthz` answering 200, and the
first byte of MP3 audio. The first run may build our CPU kernels or fill other caches; the runs
after it are what a restart costs with the weights and kernels cached (the figure to quote).
Also prints the start-up lines the radio logged, with their times, so that a slow phase shows.
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_engine import model_dir, say  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_mp3_byte(port: int, proc: subprocess.Popen, began: float, timeout: float) -> dict:
    """Seconds from `began` to the port accepting, /healthz 200 and the first MP3 byte."""
    times: dict[str, float] = {}
    deadline = began + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"radio serve exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            conn.request("GET", "/healthz")
            times.setdefault("port_s", time.monotonic() - began)
            if conn.getresponse().status == 200:
                times["healthy_s"] = time.monotonic() - began
                break
        except OSError:
            pass
        time.sleep(0.05)
    else:
        raise RuntimeError(f"radio serve was not healthy within {timeout:.0f} s")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("GET", "/main.mp3")
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"/main.mp3 answered {response.status}")
    if not response.read(1):
        raise RuntimeError("/main.mp3 ended before its first byte")
    times["first_byte_s"] = time.monotonic() - began
    conn.close()
    return times


def one_run(path: Path, timeout: float) -> tuple[dict, list[str]]:
    port = free_port()
    logfile = Path(tempfile.mkdtemp(prefix="first-sound-")) / "radio-serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "radio.cli", "serve", "--model", str(path)]
    with open(logfile, "wb") as log:
        began = time.monotonic()
        proc = subprocess.Popen(
            [*cmd, "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=log, env=env
        )
        try:
            times = first_mp3_byte(port, proc, began, timeout)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    lines = [line for line in logfile.read_text(errors="replace").splitlines() if " INFO " in line]
    return times, lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("small", "tiny"), default="small")
    parser.add_argument("--runs", type=int, default=2, help="fresh starts (the first warms caches)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a start may take")
    args = parser.parse_args()
    if args.runs < 1:
        raise SystemExit(f"--runs: at least 1, got {args.runs}")
    path = model_dir(args.size)
    runs = []
    for i in range(args.runs):
        say(f"run {i + 1}: radio serve --model {path} ...")
        times, lines = one_run(path, args.timeout)
        runs.append(times)
        say(
            f"  port open {times['port_s']:.2f} s, healthy {times['healthy_s']:.2f} s, "
            f"first MP3 byte {times['first_byte_s']:.2f} s"
        )
        for line in lines:
            say(f"    log: {line[:160]}")
    cached = runs[1:] or runs
    say(
        f"start to first sound, {args.size} shapes, weights and kernels cached: median "
        f"{statistics.median(r['first_byte_s'] for r in cached):.2f} s over {len(cached)} run(s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
