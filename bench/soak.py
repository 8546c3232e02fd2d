"""A long run of `radio serve`: memory, underruns, real-time factor and prompt changes over time.

    python bench/soak.py --minutes 60                   # musicgen-small shapes, an hour
    python bench/soak.py --size tiny --minutes 10       # the tiny model
    python bench/soak.py --size tiny --minutes 0.3 --every 5 --prompt-every 0.1   # CI smoke run

Starts `radio serve --model DIR` with its defaults and an ffmpeg listener on the MP3 mount (when
ffmpeg is installed), then every `--every` seconds records the process's resident memory
(VmRSS), the generator's real-time factor, the audio buffered ahead and the underruns, and every
`--prompt-every` minutes posts a new prompt and records when it was heard. Prints one line per
sample as it goes and a summary table at the end: RSS at the start and the end (a leak shows as
growth), underruns and bridged seconds, the real-time factor's median and minimum, and the
prompt changes' heard-in times.
"""

from __future__ import annotations

import argparse
import os
import secrets
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
from tests.helpers import free_port, get_json, post_prompt, wait_healthy  # noqa: E402

PROMPTS = (
    "slow rainy-day jazz",
    "warm lofi beat with vinyl crackle",
    "gentle acoustic guitar, morning light",
    "mellow neo-soul with rhodes",
)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("small", "tiny"), default="small")
    parser.add_argument("--minutes", type=float, default=60.0, help="how long to run")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--prompt-every", type=float, default=5.0, help="minutes between prompts")
    args = parser.parse_args()
    if args.minutes <= 0 or args.every <= 0 or args.prompt_every <= 0:
        raise SystemExit("--minutes, --every and --prompt-every must be > 0")
    path = model_dir(args.size)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    logfile = Path(tempfile.mkdtemp(prefix="bench-soak-")) / "radio-serve.log"
    token = secrets.token_hex(16)  # admin: prompt changes beyond the listeners' rate limit
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT),
        "RADIO_ADMIN_TOKEN": token,
    }
    cmd = [sys.executable, "-m", "radio.cli", "serve", "--model", str(path)]
    log = open(logfile, "wb")  # noqa: SIM115 - closed at the end
    proc = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=log, env=env
    )
    listener = None
    samples, prompts = [], []
    try:
        say(f"radio serve --model {path} (log: {logfile}) for {args.minutes:g} minutes ...")
        wait_healthy(base, timeout=300, proc=proc)
        if shutil.which("ffmpeg"):
            listener = subprocess.Popen(
                ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", f"{base}/main.mp3"]
                + ["-f", "null", "-"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        began = time.monotonic()
        next_prompt = began + args.prompt_every * 60
        pending = None  # (prompt, posted at) waiting to be heard
        while (elapsed := time.monotonic() - began) < args.minutes * 60:
            time.sleep(min(args.every, max(0.1, args.minutes * 60 - elapsed)))
            station = get_json(f"{base}/api/stations/main")
            h = station["health"]
            if pending and station["prompt"] == pending[0] and h["prompt_latency_seconds"]:
                prompts.append(h["prompt_latency_seconds"])
                pending = None
            sample = {
                "t": time.monotonic() - began,
                "rss": rss_mb(proc.pid),
                "rtf": h["realtime_factor"],
                "buffer": h["buffer_seconds"],
                "underruns": h["underruns"],
            }
            samples.append(sample)
            say(
                f"  {sample['t'] / 60:6.1f} min: RSS {sample['rss']:7.0f} MB, real-time factor "
                f"{sample['rtf']:.2f}, buffer {sample['buffer']:.1f} s, underruns "
                f"{sample['underruns']}"
            )
            if time.monotonic() >= next_prompt and pending is None:
                text = PROMPTS[len(prompts) % len(PROMPTS)] + f" {len(prompts)}"
                post_prompt(base, text, token=token)
                pending = (text, time.monotonic())
                next_prompt += args.prompt_every * 60
        metrics = get_json_metrics(base)
    finally:
        if listener is not None:
            listener.terminate()
            listener.wait(timeout=10)
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    if not samples:
        raise SystemExit("no sample taken: raise --minutes above --every")
    rtfs = [s["rtf"] for s in samples]
    say("")
    say(f"| soak, {args.size} shapes, {args.minutes:g} min | figure |")
    say("| --- | --- |")
    say(
        f"| RSS first / last / peak sample | {samples[0]['rss']:.0f} / {samples[-1]['rss']:.0f} / {max(s['rss'] for s in samples):.0f} MB |"
    )
    say(
        f"| underruns | {samples[-1]['underruns'] - samples[0]['underruns']} (bridged {metrics:.1f} s in all) |"
    )
    say(
        f"| real-time factor, median / min of {len(rtfs)} samples | {statistics.median(rtfs):.2f} / {min(rtfs):.2f} |"
    )
    heard = f"{statistics.median(prompts):.2f} / {max(prompts):.2f} s" if prompts else "none heard"
    say(f"| prompt changes heard, median / max of {len(prompts)} | {heard} |")
    return 0


def get_json_metrics(base: str) -> float:
    """Seconds bridged so far (radio_bridge_seconds_total of the main station)."""
    import urllib.request

    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("radio_bridge_seconds_total") and 'station="main"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


if __name__ == "__main__":
    sys.exit(main())
