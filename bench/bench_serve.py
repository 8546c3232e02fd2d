"""The radio itself in real time: `radio serve` on a model, a real listener, measured from outside.

    python bench/bench_serve.py                              # musicgen-small shapes, ~2 min
    python bench/bench_serve.py --size tiny --seconds 8      # CI smoke run
    python bench/bench_serve.py --boundary                   # ... and a scheduled slot boundary
    python bench/bench_serve.py --transition 8               # ... and a prompt change gliding 8 s

Starts `radio serve --model DIR` with the default settings (on a CPU: int8 decoder, int8 KV
cache, our kernels), plays the MP3 mount into ffmpeg as a listener (when ffmpeg is installed),
and every few seconds reads the station's health from the API: the generator's real-time factor
(seconds of audio per second of generating), the audio buffered ahead of the clock, and the
underruns (times the buffer ran dry and the bridge played). A third of the way in it posts a prompt
change and reports when the new prompt was heard. With `--boundary` the station also runs a
schedule whose slot starts at the first whole minute two thirds of the way in (the run is
stretched to reach it): the director sends the slot's prompt ahead, and the figure is how long
after the boundary its first sample left the loudness stage (`schedule_lag_seconds`; 0 = on the
dot) and the underruns around it. With `--transition S` a second prompt change, two thirds of
the way in, glides over S seconds: its prefill re-reads the context with three decoder rows (the
old text's, the new one's and the null row) where a plain change reads two, and the figures are
both prefills as the server measured them (`health.last_prefill`), the extra cost, when the new
text was heard and the underruns through the glide. Everything the encoders, the clock and the HTTP server cost on
the same cores is included: this is the figure a café gets.

Random-weight models are built once into ./models (or $BENCH_MODELS), as by bench_engine.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_engine import model_dir, say  # noqa: E402
from tests.helpers import call, free_port, get_json, wait_healthy  # noqa: E402

ADMIN_TOKEN = "bench-serve-admin-token"


def health(base: str) -> dict:
    return get_json(f"{base}/api/stations/main")["health"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("small", "tiny"), default="small")
    parser.add_argument("--seconds", type=float, default=90.0, help="how long to listen")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between health samples")
    parser.add_argument(
        "--boundary", action="store_true", help="also time a scheduled slot boundary"
    )
    parser.add_argument(
        "--transition",
        type=float,
        default=0.0,
        metavar="S",
        help="also post a prompt change that glides over S seconds, two thirds of the way in",
    )
    args = parser.parse_args()

    path = model_dir(args.size)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    logdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    log = open(logdir / "radio-serve.log", "wb")  # noqa: SIM115 - closed at the end
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "radio.cli", "serve", "--model", str(path)]
    boundary: float | None = None
    config = logdir / "radio.toml"  # the admin: schedules, transitions
    config.write_text(f'[security]\nadmin_token = "{ADMIN_TOKEN}"\n')
    cmd += ["--config", str(config)]
    proc = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=log, env=env
    )
    listener = None
    try:
        say(f"radio serve --model {path} on port {port} (log: {logdir / 'radio-serve.log'}) ...")
        wait_healthy(base, timeout=300, proc=proc)
        if args.boundary:  # a slot from the first whole minute 2/3 of the way in (UTC)
            boundary = math.ceil((time.time() + args.seconds * 2 / 3) / 60) * 60
            _put_slot(base, boundary)
            args.seconds = max(args.seconds, boundary - time.time() + 3 * args.every)
            say(f"  a slot starts at {_hhmm(boundary)} UTC: listening {args.seconds:.0f} s")
        if shutil.which("ffmpeg"):
            listener = subprocess.Popen(
                [
                    "ffmpeg",
                    "-nostdin",
                    "-loglevel",
                    "error",
                    "-i",
                    f"{base}/main.mp3",
                    "-f",
                    "null",
                    "-",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            say("  listener: ffmpeg decoding /main.mp3")
        else:
            say("  no ffmpeg: measuring without a listener")
        began, rtfs, buffers = time.monotonic(), [], []
        prompt: dict | None = None
        glide: dict | None = None
        if args.transition:  # the glide must end, and a little more, before the run does
            args.seconds = max(args.seconds, 1.5 * (args.transition + 3 * args.every))
        start_underruns = health(base)["underruns"]
        while (elapsed := time.monotonic() - began) < args.seconds:
            time.sleep(args.every)
            h = health(base)
            rtfs.append(h["realtime_factor"])
            buffers.append(h["buffer_seconds"])
            say(
                f"  {elapsed + args.every:5.0f} s: real-time factor {h['realtime_factor']:.2f}, "
                f"buffer {h['buffer_seconds']:.1f} s, underruns {h['underruns'] - start_underruns}"
            )
            if prompt is None and elapsed >= args.seconds / 3:
                prompt = _change(base, {"prompt": "slow rainy-day jazz"}, h)
                say(f"  prompt posted: to be heard {prompt['heard_in']:.2f} s after the POST")
            elif prompt is not None and "prefill" not in prompt:
                prompt.update(_heard(base, prompt))
            if (
                args.transition
                and glide is None
                and elapsed >= args.seconds * 2 / 3 - args.transition
            ):
                body = {
                    "prompt": "warm jazz trio with brushes",
                    "transition_seconds": args.transition,
                }
                glide = _change(base, body, h)
                say(f"  transition posted: gliding over {args.transition:g} s")
            elif glide is not None and "prefill" not in glide:
                glide.update(_heard(base, glide))
        for change in (prompt, glide):
            if change is not None and "prefill" not in change:
                change.update(_heard(base, change, wait=15))
        h = health(base)
        underruns = h["underruns"] - start_underruns
        lag = h.get("schedule_lag_seconds") if boundary is not None else None
        say("")
        say("| what | figure |")
        say("| --- | --- |")
        say(f"| model | {args.size} shapes, `radio serve` defaults, {os.cpu_count()} cores |")
        say(f"| listened | {args.seconds:.0f} s{' (ffmpeg on /main.mp3)' if listener else ''} |")
        say(
            f"| generator real-time factor | median {statistics.median(rtfs):.2f}, "
            f"min {min(rtfs):.2f} (of {len(rtfs)} samples) |"
        )
        say(
            f"| buffer ahead of the clock | min {min(buffers):.1f} s, median {statistics.median(buffers):.1f} s |"
        )
        say(f"| underruns | {underruns} |")
        if prompt is not None:
            say(
                f"| prompt change | promised {prompt['heard_in']:.2f} s after the POST, heard after "
                f"{prompt['latency']:.2f} s, underruns after it: "
                f"{h['underruns'] - prompt['underruns_before']} |"
            )
            p = prompt["prefill"]
            say(f"| its prefill | {p['seconds']:.2f} s ({p['rows']} rows, {p['frames']} frames) |")
        if glide is not None:
            g, p = glide["prefill"], prompt["prefill"] if prompt else None
            extra = (
                f", {g['seconds'] - p['seconds']:+.2f} s ({g['seconds'] / p['seconds']:.2f}x) against the plain change's"
                if p
                else ""
            )
            say(
                f"| transition over {args.transition:g} s | prefill {g['seconds']:.2f} s "
                f"({g['rows']} rows, {g['frames']} frames){extra}; heard after "
                f"{glide['latency']:.2f} s (promised {glide['heard_in']:.2f}); underruns through "
                f"the glide and after: {h['underruns'] - glide['underruns_before']} |"
            )
        if boundary is not None:
            heard = "never heard" if lag is None else f"heard {lag:+.2f} s after it was due"
            say(f"| scheduled slot boundary ({_hhmm(boundary)} UTC) | {heard} |")
        return 0
    finally:
        if listener is not None:
            listener.terminate()
            listener.wait()
        proc.terminate()
        proc.wait(30)
        log.close()


def _change(base: str, body: dict, h: dict) -> dict:
    """Post a prompt change as the admin (answered after its prefill); what to follow it by."""
    posted = time.monotonic()
    status, _, answer = call(
        "POST",
        f"{base}/api/stations/main/prompt",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    if status != 202:
        raise RuntimeError(f"the prompt change was refused: {answer}")
    heard_in = time.monotonic() - posted + answer["heard_in_seconds"]
    return {
        "heard_in": heard_in,
        "underruns_before": h["underruns"],
        "latency_before": h["prompt_latency_seconds"],
        "prefill_before": h["last_prefill"],
    }


def _heard(base: str, change: dict, wait: float = 0.0) -> dict:
    """Once the change is heard: its latency and its prefill as the server measured them ({}
    while it is not heard yet; after `wait` s of waiting, an error)."""
    deadline = time.monotonic() + wait
    while True:
        h = health(base)
        heard = h["prompt_latency_seconds"] not in (None, change["latency_before"])
        if heard and h["last_prefill"] != change["prefill_before"]:
            return {"latency": h["prompt_latency_seconds"], "prefill": h["last_prefill"]}
        if time.monotonic() >= deadline:
            if wait:
                raise RuntimeError("the posted prompt was never heard")
            return {}
        time.sleep(0.2)


def _hhmm(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%H:%M")


def _put_slot(base: str, boundary: float) -> None:
    """A 30-minute slot from `boundary` in the station's schedule (the admin API, checked like
    the config); before it the station plays its own prompt."""
    slot = {
        "start": _hhmm(boundary),
        "end": _hhmm(boundary + 1800),
        "prompts": ["slow rainy-day jazz with brushes"],
    }
    status, _, body = call(
        "PUT",
        f"{base}/api/stations/main/schedule",
        json.dumps({"schedule": [slot]}).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    if status != 200:
        raise RuntimeError(f"the schedule was refused: {body}")


if __name__ == "__main__":
    sys.exit(main())
