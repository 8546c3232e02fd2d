"""Where a batch of stations spends its time, chunk by chunk, across window restarts.

    python bench/timeline.py --stations 2 --mode int4-kv4 --seconds 80 --context 125
    python bench/timeline.py --size tiny --stations 2 --seconds 4 --window 150 --context 40  # CI

The engine alone (no server), every station opened together and read together as the radio
reads them (`read_together`: one decoder step and one codec decode for all), 0.5 s of audio a
chunk. Prints the real-time factor per station over the run, per 2.5 s of audio, and the
slowest chunks: a window restart (its warm rows coming, then taking the rows' place) that
stalls the generator shows up as a chunk several times the others.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import MODES, PROMPT, load_options, model_dir, say  # noqa: E402

from engine import MusicModel, SamplingOptions, WindowOptions  # noqa: E402
from engine.model import read_together  # noqa: E402

CHUNK = 25  # frames per read (0.5 s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("small", "tiny"), default="small")
    parser.add_argument("--mode", default="int4-kv4", help=f"one of {', '.join(MODES)}")
    parser.add_argument("--stations", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=80.0, help="audio per station")
    parser.add_argument("--window", type=int, default=WindowOptions.window)
    parser.add_argument("--context", type=int, default=WindowOptions.context)
    args = parser.parse_args()
    if args.stations < 1:
        raise SystemExit("--stations: at least 1")
    window = WindowOptions(window=args.window, context=args.context)
    say(f"loading the {args.size} model ({args.mode}) ...")
    model = MusicModel.load(load_options(model_dir(args.size), args.mode))
    rate = model.frame_rate
    streams = model.open_streams(
        [f"{PROMPT} {i}" for i in range(args.stations)],
        [SamplingOptions(seed=i) for i in range(args.stations)],
        window,
    )
    read_together(streams, 5)  # the first steps' one-off costs
    chunks = max(1, round(args.seconds * rate / CHUNK))
    say(f"{args.stations} station(s), {chunks * CHUNK / rate:.0f} s of audio each ...")
    spent = []
    with torch.inference_mode():
        for i in range(chunks):
            began = time.perf_counter()
            read_together(streams, CHUNK)
            spent.append(time.perf_counter() - began)
            if (i + 1) % 20 == 0:
                say(f"  {(i + 1) * CHUNK / rate:.0f} s of audio")
    audio = CHUNK / rate
    say(f"real-time factor per station: {len(spent) * audio / sum(spent):.3f}")
    groups = [spent[i : i + 5] for i in range(0, len(spent), 5)]
    say("per 2.5 s: " + " ".join(f"{len(g) * audio / sum(g):.2f}" for g in groups))
    median = statistics.median(spent)
    slow = [(i, t) for i, t in enumerate(spent) if t > 1.5 * median]
    say(
        f"chunks: median {median * 1e3:.0f} ms; over 1.5x the median: "
        + (", ".join(f"#{i} {t * 1e3:.0f} ms" for i, t in slow) or "none")
    )
    restarts = sum(s.tokens.warm_restarts + s.tokens.prefills for s in streams)
    say(f"window starts (warm or prefilled) over all stations: {restarts}")


if __name__ == "__main__":
    main()
