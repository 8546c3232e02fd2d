"""Start to first sound: from `radio serve` on the command line to the first MP3 byte a listener gets.

    python bench/first_sound.py                     # musicgen-small shapes, 2 runs (~1 min)
    python bench/first_sound.py --size tiny --runs 1   # CI smoke run

Each run starts `radio serve --model DIR` in a fresh process, connects to `/main.mp3` as soon as
the port answers, and times: the port accepting connections, `/healthz` answering 200, and the
first byte of MP3 audio. The first run may build our CPU kernels or fill other caches; the runs
after it are what a restart costs with the weights and kernels cached (the figure to quote).
Also prints the start-up lines the radio logged and, from their times, where the seconds went
(median over the cached runs):

    imports   the command to the load's first line: Python, torch, the web stack
    weights   reading the checkpoint into modules (`engine.musicgen`: no transformers import)
    engine    packing the int8 weights, the codec's and the decoder's set-up
    listen    the web stack and the stations' set-up, to the port listening
    music     the first notes: prompt, prefill, generating until the station is on air
    deliver   on air to the listener's first MP3 byte

`--python` runs the radio with another interpreter (for example a venv made by the README's first
command, without the test extras).
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import os
import re
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


# (phase, the log line that ends it); "deliver" ends at the first byte
PHASES = (
    ("imports", "loading MusicGen"),
    ("weights", "engine.loading: loaded"),
    ("engine", "model loaded in"),
    ("listen", "listen on"),
    ("music", ": on air"),
)
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def logged_at(line: str) -> float | None:
    """The wall-clock time (seconds since the epoch) a log line carries, or None."""
    match = STAMP.match(line)
    if match is None:
        return None
    return datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def phases(lines: list[str], started: float, first_byte: float) -> dict[str, float]:
    """Seconds per phase (`PHASES`) from the log's times; `started` wall-clock time of the
    command, `first_byte` seconds after it. A phase whose line is missing is left out."""
    out: dict[str, float] = {}
    last = started
    for phase, marker in PHASES:
        at = next((logged_at(x) for x in lines if marker in x), None)
        if at is None:
            continue
        out[phase], last = at - last, at
    out["deliver"] = started + first_byte - last
    return out


def one_run(path: Path, timeout: float, python: str) -> tuple[dict, list[str]]:
    port = free_port()
    logfile = Path(tempfile.mkdtemp(prefix="first-sound-")) / "radio-serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    cmd = [python, "-m", "radio.cli", "serve", "--model", str(path)]
    with open(logfile, "wb") as log:
        began, started = time.monotonic(), time.time()
        proc = subprocess.Popen(
            [*cmd, "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=log, env=env
        )
        try:
            times = first_mp3_byte(port, proc, began, timeout)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    lines = [line for line in logfile.read_text(errors="replace").splitlines() if " INFO " in line]
    times["phases"] = phases(lines, started, times["first_byte_s"])
    return times, lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("small", "tiny"), default="small")
    parser.add_argument("--runs", type=int, default=2, help="fresh starts (the first warms caches)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a start may take")
    parser.add_argument(
        "--python", default=sys.executable, help="the interpreter that runs the radio"
    )
    args = parser.parse_args()
    if args.runs < 1:
        raise SystemExit(f"--runs: at least 1, got {args.runs}")
    path = model_dir(args.size)
    say(f"radio's Python: {args.python}")
    runs = []
    for i in range(args.runs):
        say(f"run {i + 1}: radio serve --model {path} ...")
        times, lines = one_run(path, args.timeout, args.python)
        runs.append(times)
        say(
            f"  port open {times['port_s']:.2f} s, healthy {times['healthy_s']:.2f} s, "
            f"first MP3 byte {times['first_byte_s']:.2f} s"
        )
        say("  " + ", ".join(f"{k} {v:.2f} s" for k, v in times["phases"].items()))
        for line in lines:
            say(f"    log: {line[:160]}")
    cached = runs[1:] or runs
    names = [p for p, _ in PHASES if all(p in r["phases"] for r in cached)] + ["deliver"]
    say(
        "where the seconds went (median): "
        + ", ".join(f"{p} {statistics.median(r['phases'][p] for r in cached):.2f} s" for p in names)
    )
    say(
        f"start to first sound, {args.size} shapes, weights and kernels cached: median "
        f"{statistics.median(r['first_byte_s'] for r in cached):.2f} s over {len(cached)} run(s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
