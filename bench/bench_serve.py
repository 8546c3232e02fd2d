"""The radio itself in real time: `radio serve` on a model, a real listener, measured from outside.

    python bench/bench_serve.py                              # musicgen-small shapes, ~2 min
    python bench/bench_serve.py --size tiny --seconds 8      # CI smoke run
    python bench/bench_serve.py --changes 5                  # five prompt changes: median, max
    python bench/bench_serve.py --boundary                   # ... and a scheduled slot boundary
    python bench/bench_serve.py --transition 8               # ... and a prompt change gliding 8 s
    python bench/bench_serve.py --stations 2                 # two stations, a listener on each
    python bench/bench_serve.py --find-max                   # 1, 2, 3 ... stations until one fails
    python bench/bench_serve.py --busy 1 --verbose           # beside a busy process (shared machine)
    python bench/bench_serve.py --busy 1 --busy-for 60 --seconds 150   # ... that leaves after 60 s

Starts `radio serve --model DIR` with the default settings (on a CPU: int8 decoder, int8 KV
cache, our kernels), plays the MP3 mount into ffmpeg as a listener (when ffmpeg is installed),
and every few seconds reads the station's health from the API: the generator's real-time factor
(seconds of audio per second of generating), the audio buffered ahead of the clock, and the
underruns (times the buffer ran dry and the bridge played) and holds (a prompt change whose first
audio came late: the old prompt's music played on, no bridge). A third of the way in it posts a prompt
change and reports when the new prompt was heard (the server's measure: from the POST to the
first sample of the new prompt leaving the loudness stage); with `--changes N`, N changes spread
evenly from there to the last sixth of the run, each posted once the one before was heard, and
their latencies' median and max, their prefills and the underruns from the first POST on. With `--boundary` the station also runs a
schedule whose slot starts at the first whole minute two thirds of the way in (the run is
stretched to reach it): the director sends the slot's prompt ahead, and the figure is how long
after the boundary its first sample left the loudness stage (`schedule_lag_seconds`; 0 = on the
dot) and the underruns around it. With `--transition S` a second prompt change, two thirds of
the way in, glides over S seconds: its prefill re-reads the context with three decoder rows (the
old text's, the new one's and the null row) where a plain change reads two, and the figures are
both prefills as the server measured them (`health.last_prefill`), the extra cost, when the new
text was heard, and the underruns from the POST to the glide's end (the first sample after it)
and to the end of the run. Everything the encoders, the clock and the HTTP server cost on the
same cores is included: this is the figure a café gets.

Each run says this machine's plain read (256 MB with every thread, as `bench_kernels.py` reads
it) before the server starts and after it stops: on the 2-core machines the same code ran x1.3
faster in a minute at 40 GB/s than in one at 25, so a figure without it says little.

With `--stations N` the radio runs N stations (`main` first, then `s2`, `s3` ..., each with its
own prompt), one ffmpeg listener on each MP3 mount; the prompt change, `--boundary` and
`--transition` are `main`'s. Every station's health is sampled, printed per station with a
total, and the verdict says whether all N held real time: no underrun over the run and audio
always buffered ahead of the clock. `--find-max` runs N = 1, 2, 3 ... (a fresh `radio serve`
each, `--seconds` long) until one does not hold, and prints the largest that did.

With `--busy N`, N single-threaded busy loops (`while True: pass`, as `contention.py` starts)
run beside the radio from the moment it is on air to the end of the listening (or for the first
`--busy-for` seconds): a shared machine, where the radio's thread tuner must find the count that
keeps up, and find the faster one again once the neighbour leaves (with `--verbose` its log says
every count it tried, why it did or did not try one, and each switch).

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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_engine import model_dir, say  # noqa: E402
from bench.bench_kernels import plain_read  # noqa: E402
from bench.contention import BUSY  # noqa: E402
from tests.helpers import call, free_port, get_json, post_json, wait_healthy  # noqa: E402

ADMIN_TOKEN = "bench-serve-admin-token"
PROMPTS = (  # the stations' prompts, one each (main keeps the config's default)
    "warm jazz trio with brushes",
    "driving synthwave with arpeggios",
    "ambient drones and soft rain",
    "acoustic folk guitar and fiddle",
    "deep house with a rolling bassline",
    "baroque harpsichord and strings",
    "dub reggae with echoing horns",
)


CHANGE_PROMPTS = (  # what --changes posts, in turn
    "slow rainy-day jazz",
    "bright marimba and hand drums",
    "dark cinematic strings",
    "lazy bossa nova guitar",
)


def health(base: str, station: str = "main") -> dict:
    return get_json(f"{base}/api/stations/{station}")["health"]


def station_ids(n: int) -> list[str]:
    return ["main", *(f"s{i}" for i in range(2, n + 1))]


def stations_config(n: int) -> str:
    """N `[[stations]]` blocks: `main` with the default prompt, the others one of PROMPTS each."""
    blocks = ['[[stations]]\nid = "main"\n']
    for i, sid in enumerate(station_ids(n)[1:]):
        prompt = PROMPTS[i % len(PROMPTS)] + (
            f", take {i // len(PROMPTS) + 1}" if i >= len(PROMPTS) else ""
        )
        blocks.append(f'[[stations]]\nid = "{sid}"\nprompt = "{prompt}"\n')
    return "\n".join(blocks)


def verdict(n: int, underruns: int, min_buffer: float) -> tuple[bool, str]:
    """Whether n stations held real time (no underrun, always audio ahead), in one line."""
    held = underruns == 0 and min_buffer > 0
    words = "1 station holds" if n == 1 else f"{n} stations hold"
    return held, f"{words} real time: {'yes' if held else 'no'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("small", "tiny"), default="small")
    parser.add_argument("--seconds", type=float, default=90.0, help="how long to listen")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between health samples")
    parser.add_argument(
        "--generation",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [generation] setting for the radio, e.g. context=200 (repeatable)",
    )
    parser.add_argument(
        "--model-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help='a [model] setting for the radio, e.g. quantize="int4" (repeatable)',
    )
    parser.add_argument(
        "--changes",
        type=int,
        default=1,
        metavar="N",
        help="prompt changes to post, spread from a third of the way in (0: none)",
    )
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
    parser.add_argument(
        "--stations", type=int, default=1, metavar="N", help="stations to run (a listener each)"
    )
    parser.add_argument(
        "--find-max",
        action="store_true",
        help="run 1, 2, 3 ... stations until one count does not hold real time",
    )
    parser.add_argument(
        "--max-stations", type=int, default=8, help="--find-max stops here even if it holds"
    )
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="run N single-threaded busy loops beside the radio while listening (a shared machine)",
    )
    parser.add_argument(
        "--busy-for",
        type=float,
        default=0.0,
        metavar="S",
        help="stop the --busy loops after S seconds of listening (0: they run to the end)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="run radio -v: its log (path printed) has every chunk's rows, time and speed",
    )
    args = parser.parse_args()
    if args.stations < 1 or args.max_stations < 1:
        parser.error("--stations and --max-stations: at least 1")
    if args.changes < 0:
        parser.error("--changes: at least 0")
    if args.busy < 0 or args.busy_for < 0:
        parser.error("--busy and --busy-for: at least 0")
    if not args.find_max:
        run(args, args.stations)
        return 0
    held, rows = 0, []
    for n in range(1, args.max_stations + 1):
        say(f"--find-max: {n} station(s)")
        result = run(args, n)
        rows.append(f"| {n} | {result.row} | {'yes' if result.held else 'no'} |")
        if not result.held:
            break
        held = n
        say("")
    say("")
    say(
        "| stations | real-time factor: median, min | underruns | plain read before / after | held |"
    )
    say("| --- | --- | --- | --- | --- |")
    for row in rows:
        say(row)
    say("")
    if held == args.max_stations:
        say(f"largest station count that holds real time: at least {held} (--max-stations)")
    else:
        say(f"largest station count that holds real time: {held}")
    return 0


@dataclass(frozen=True)
class Result:
    """One `radio serve` run: whether its stations held real time, and its figures as the cells
    of `--find-max`'s closing table."""

    held: bool
    row: str


def run(args: argparse.Namespace, n: int) -> Result:
    """One `radio serve` with n stations, listened to for `--seconds`, between two plain reads."""
    before = plain_read(3)
    served = _serve(args, n)
    after = plain_read(3)
    say(f"plain read: {before:.1f} GB/s before, {after:.1f} GB/s after")
    return Result(served.held, f"{served.row} | {before:.1f} / {after:.1f} GB/s")


def _serve(args: argparse.Namespace, n: int) -> Result:
    path = model_dir(args.size)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    seconds = args.seconds
    ids = station_ids(n)
    logdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    log = open(logdir / "radio-serve.log", "wb")  # noqa: SIM115 - closed at the end
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    verbose = ["-v"] if args.verbose else []
    cmd = [sys.executable, "-m", "radio.cli", *verbose, "serve", "--model", str(path)]
    boundary: float | None = None
    config = logdir / "radio.toml"  # the admin (schedules, transitions) and the stations
    generation = "".join(f"{setting}\n" for setting in args.generation)
    model = "".join(f"{setting}\n" for setting in args.model_setting)
    config.write_text(
        f'[security]\nadmin_token = "{ADMIN_TOKEN}"\n\n[generation]\n{generation}\n'
        f"[model]\n{model}\n{stations_config(n)}"
    )
    cmd += ["--config", str(config)]
    proc = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=log, env=env
    )
    listeners: list[subprocess.Popen] = []
    loops: list[subprocess.Popen] = []
    try:
        say(f"radio serve --model {path} on port {port} (log: {logdir / 'radio-serve.log'}) ...")
        wait_healthy(base, timeout=300, proc=proc)
        if args.boundary:  # a slot from the first whole minute 2/3 of the way in (UTC)
            boundary = math.ceil((time.time() + seconds * 2 / 3) / 60) * 60
            _put_slot(base, boundary)
            seconds = max(seconds, boundary - time.time() + 3 * args.every)
            say(f"  a slot starts at {_hhmm(boundary)} UTC: listening {seconds:.0f} s")
        if shutil.which("ffmpeg"):
            listeners = [_listen(f"{base}/{sid}.mp3") for sid in ids]
            say(f"  listeners: ffmpeg decoding {', '.join(f'/{sid}.mp3' for sid in ids)}")
        else:
            say("  no ffmpeg: measuring without a listener")
        if args.busy:
            loops = [subprocess.Popen(BUSY) for _ in range(args.busy)]
            say(f"  {args.busy} busy process(es) beside the radio from now on")
        began = time.monotonic()
        rtfs: dict[str, list[float]] = {sid: [] for sid in ids}
        buffers: dict[str, list[float]] = {sid: [] for sid in ids}
        changes: list[dict] = []  # the plain prompt changes posted, in order
        # when each is due (seconds into the run): from a third of the way in to 5/6
        span = seconds / 2 / max(args.changes - 1, 1)
        due = [seconds / 3 + i * span for i in range(args.changes)]
        glide: dict | None = None
        if args.transition:  # the glide must end, and a little more, before the run does
            seconds = max(seconds, 1.5 * (args.transition + 3 * args.every))
        start_underruns = {sid: health(base, sid)["underruns"] for sid in ids}
        while (elapsed := time.monotonic() - began) < seconds:
            time.sleep(args.every)
            if loops and args.busy_for and time.monotonic() - began >= args.busy_for:
                _stop(loops)
                loops = []
                say(f"  the busy process(es) stopped after {args.busy_for:g} s")
            now = {sid: health(base, sid) for sid in ids}
            for sid, h in now.items():
                rtfs[sid].append(h["realtime_factor"])
                buffers[sid].append(h["buffer_seconds"])
            say(
                f"  {elapsed + args.every:5.0f} s: "
                + "; ".join(
                    f"{sid + ': ' if n > 1 else ''}real-time factor {h['realtime_factor']:.2f}, "
                    f"buffer {h['buffer_seconds']:.1f} s, "
                    f"underruns {h['underruns'] - start_underruns[sid]}"
                    + (f", holds {h['holds']}" if h["holds"] else "")
                    for sid, h in now.items()
                )
            )
            h = now["main"]
            if changes and "prefill" not in changes[-1]:
                changes[-1].update(_heard(base, changes[-1]))
            if len(changes) < len(due) and time.monotonic() - began >= due[len(changes)]:
                _post_change(base, changes, len(due), h)
            if args.transition and glide is None and elapsed >= seconds * 2 / 3 - args.transition:
                body = {
                    "prompt": "warm jazz trio with brushes",
                    "transition_seconds": args.transition,
                }
                glide = _change(base, body, h)
                say(f"  transition posted: gliding over {args.transition:g} s")
            elif glide is not None and "prefill" not in glide:
                glide.update(_heard(base, glide))
            elif glide is not None and "through" not in glide:
                over = glide["posted"] + glide["latency"] + args.transition  # the glide's end
                if time.monotonic() >= over:  # the first sample after it
                    glide["through"] = h["underruns"] - glide["underruns_before"]
        while len(changes) < len(due):  # (a short run's last ones: after the listening)
            _post_change(base, changes, len(due), health(base))
        prompt = changes[0] if changes else None
        for change in (*changes, glide):
            if change is not None and "prefill" not in change:
                change.update(_heard(base, change, wait=15))
        final = {sid: health(base, sid) for sid in ids}
        underruns = {sid: final[sid]["underruns"] - start_underruns[sid] for sid in ids}
        h = final["main"]
        lag = h.get("schedule_lag_seconds") if boundary is not None else None
        heard_by = (
            ""
            if not listeners
            else " (ffmpeg on /main.mp3)"
            if n == 1
            else f" (an ffmpeg listener on each of the {n} stations)"
        )
        say("")
        say("| what | figure |")
        say("| --- | --- |")
        say(
            f"| model | {args.size} shapes, `radio serve` defaults, {os.cpu_count()} cores"
            f"{f', {n} stations' if n > 1 else ''} |"
        )
        if args.generation or args.model_setting:
            shown = [
                f"`[{name}]` {', '.join(given)}"
                for name, given in (("model", args.model_setting), ("generation", args.generation))
                if given
            ]
            say(f"| settings | {'; '.join(shown)}, the rest defaults |")
        say(f"| listened | {seconds:.0f} s{heard_by} |")
        if args.busy:
            span = f"the first {args.busy_for:g} s" if args.busy_for else "all the while"
            say(f"| beside | {args.busy} single-threaded busy process(es), {span} |")
        main_rtfs, main_buffers = rtfs["main"], buffers["main"]
        say(
            f"| generator real-time factor | median {statistics.median(main_rtfs):.2f}, "
            f"min {min(main_rtfs):.2f} (of {len(main_rtfs)} samples) |"
        )
        say(
            f"| buffer ahead of the clock | min {min(main_buffers):.1f} s, "
            f"median {statistics.median(main_buffers):.1f} s |"
        )
        say(f"| underruns | {underruns['main']} |")
        say(
            f"| holds (a change's first audio late: the old music played on) | {h['holds']}, "
            f"{h['held_seconds']:.1f} s in all |"
        )
        if prompt is not None and len(changes) == 1:
            say(
                f"| prompt change | promised {prompt['heard_in']:.2f} s after the POST, heard after "
                f"{prompt['latency']:.2f} s, underruns after it: "
                f"{h['underruns'] - prompt['underruns_before']} |"
            )
            p = prompt["prefill"]
            say(f"| its prefill | {p['seconds']:.2f} s ({p['rows']} rows, {p['frames']} frames) |")
        elif changes:
            latencies = [c["latency"] for c in changes]
            promised = [c["heard_in"] for c in changes]
            prefills = [c["prefill"]["seconds"] for c in changes]
            first = changes[0]
            p = first["prefill"]
            say(
                f"| {len(changes)} prompt changes | heard after median {statistics.median(latencies):.2f} s, "
                f"max {max(latencies):.2f} s (promised median {statistics.median(promised):.2f}, "
                f"max {max(promised):.2f}); underruns from the first POST on: "
                f"{h['underruns'] - first['underruns_before']}, holds "
                f"{h['holds'] - first['holds_before']} |"
            )
            say(
                f"| their prefills | median {statistics.median(prefills):.2f} s, max "
                f"{max(prefills):.2f} s ({p['rows']} rows, {p['frames']} frames) |"
            )
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
                f"{glide['latency']:.2f} s (promised {glide['heard_in']:.2f}); underruns from the "
                f"POST to the glide's end: {glide.get('through', 'not over')}, to the end of the "
                f"run: {h['underruns'] - glide['underruns_before']} |"
            )
        if boundary is not None:
            heard = "never heard" if lag is None else f"heard {lag:+.2f} s after it was due"
            say(f"| scheduled slot boundary ({_hhmm(boundary)} UTC) | {heard} |")
        return _per_station(n, rtfs, buffers, underruns)
    finally:
        _stop(loops)
        for listener in listeners:
            listener.terminate()
            listener.wait()
        proc.terminate()
        proc.wait(30)
        log.close()


def _stop(loops: list[subprocess.Popen]) -> None:
    for loop in loops:
        loop.kill()
        loop.wait()


def _listen(url: str) -> subprocess.Popen:
    """An ffmpeg listener decoding the stream at `url` (and throwing the audio away)."""
    return subprocess.Popen(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", url, "-f", "null", "-"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _per_station(
    n: int, rtfs: dict[str, list[float]], buffers: dict[str, list[float]], underruns: dict
) -> Result:
    """Every station's row, the total and the verdict: whether all n held real time, with the
    stations' real-time factor (median, min) and underruns."""
    say("")
    say("| station | real-time factor: median, min | buffer ahead: min, median | underruns |")
    say("| --- | --- | --- | --- |")
    for sid in rtfs:
        r, b = rtfs[sid], buffers[sid]
        say(
            f"| {sid} | {statistics.median(r):.2f}, {min(r):.2f} | "
            f"{min(b):.1f} s, {statistics.median(b):.1f} s | {underruns[sid]} |"
        )
    every_rtf = [x for r in rtfs.values() for x in r]
    min_buffer = min(x for b in buffers.values() for x in b)
    total = sum(underruns.values())
    say(
        f"| total ({n} station{'s' if n > 1 else ''}) | min {min(every_rtf):.2f} | "
        f"min {min_buffer:.1f} s | {total} |"
    )
    held, line = verdict(n, total, min_buffer)
    say("")
    say(line)
    every = f"{statistics.median(every_rtf):.2f}, {min(every_rtf):.2f}"
    return Result(held, f"{every} | {total}")


def _post_change(base: str, changes: list[dict], n: int, h: dict) -> None:
    """Post the next of `n` plain prompt changes once the one before was heard."""
    if changes and "prefill" not in changes[-1]:
        changes[-1].update(_heard(base, changes[-1], wait=15))
        h = health(base)
    text = CHANGE_PROMPTS[len(changes) % len(CHANGE_PROMPTS)]
    changes.append(_change(base, {"prompt": text}, h))
    say(
        f"  prompt posted ({len(changes)} of {n}): to be heard {changes[-1]['heard_in']:.2f} s after the POST"
    )


def _change(base: str, body: dict, h: dict) -> dict:
    """Post a prompt change as the admin (answered after its prefill); what to follow it by."""
    posted = time.monotonic()
    status, _, answer = post_json(
        f"{base}/api/stations/main/prompt", body, {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    if status != 202:
        raise RuntimeError(f"the prompt change was refused: {answer}")
    heard_in = time.monotonic() - posted + answer["heard_in_seconds"]
    return {
        "posted": posted,
        "heard_in": heard_in,
        "underruns_before": h["underruns"],
        "holds_before": h["holds"],
        "heard_before": h["prompts_heard"],
    }


def _heard(base: str, change: dict, wait: float = 0.0) -> dict:
    """Once the change is heard: its latency and its prefill as the server measured them ({}
    while it is not heard yet; after `wait` s of waiting, an error)."""
    deadline = time.monotonic() + wait
    while True:
        h = health(base)
        if h["prompts_heard"] > change["heard_before"]:
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
