"""Where a batch of stations spends its time, chunk by chunk, across window restarts.

    python bench/timeline.py --stations 2 --mode int4-kv4 --seconds 80 --context 125
    python bench/timeline.py --size tiny --stations 2 --seconds 4 --window 150 --context 40  # CI
    python bench/timeline.py --stations 1 --mode int8 --seconds 20 --parts

The engine alone (no server), every station opened together and read together as the radio
reads them (`read_together`: one decoder step and one codec decode for all), 0.5 s of audio a
chunk. Prints the real-time factor per station over the run, per 2.5 s of audio, and the
slowest chunks: a window restart (its warm rows coming, then taking the rows' place) that
stalls the generator shows up as a chunk several times the others. `--parts`: also where a
decode step's time went, part by part (layer norms and quantizing, each product with the rate
it read its weights at, the cache writes, the attentions), as the calling thread saw it.
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
from bench_kernels import plain_read, streaming_read  # noqa: E402

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
    parser.add_argument(
        "--parts",
        action="store_true",
        help="also where a decode step's time goes, part by part (our fused CPU step)",
    )
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
    if args.parts:
        model.decoder.clock_parts(True)
        model.decoder.part_times()  # from here
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
    if args.parts:
        say_parts(model.decoder.part_times(), model.decoder.projection_bytes())
        say(f"plain read now (bench_kernels.py's): {plain_read(5):.1f} GB/s")
        streaming = streaming_read(5)
        if streaming is not None:  # (the fused step runs on our kernels: always here)
            say(f"streaming read now (ours, 2 KB ahead into L1): {streaming:.1f} GB/s")


# the step's parts that are one projection's product, by the projection's name
PRODUCTS = {"qkv": "qkv", "out": "out_self", "fc1": "fc1", "fc2": "fc2", "heads": "lm_heads"}


def say_parts(times: list[tuple[str, float, int, int]], projection_bytes: dict[str, int]) -> None:
    """A table of where the steps' time went, part by part (`Decoder.part_times`), with the
    rate at which each product read its weights, the self-attention its KV cache and the folded
    cross-attention its text vectors."""
    steps = dict((name, laps) for name, _, laps, _ in times)["heads"]
    total = sum(seconds for _, seconds, _, _ in times)
    if steps == 0 or total == 0:
        say("no fused step ran: no parts to show")
        return
    say(f"a step's parts over {steps} steps ({1e3 * total / steps:.2f} ms a step):")
    say("| part | ms per step | share | read |")
    say("| --- | --- | --- | --- |")
    for name, seconds, _, cache_bytes in times:
        if seconds == 0:
            continue
        read = ""
        if name in PRODUCTS:
            megabytes = projection_bytes[PRODUCTS[name]] / 1e6
            read = f"{megabytes:.1f} MB of weights at {megabytes * steps / seconds / 1e3:.1f} GB/s"
        elif cache_bytes:
            megabytes = cache_bytes / steps / 1e6  # (a step's mean: the positions grow)
            what = "text vectors" if name == "folded cross-attention" else "cache"
            read = f"{megabytes:.1f} MB of {what} at {cache_bytes / seconds / 1e9:.1f} GB/s"
        say(f"| {name} | {1e3 * seconds / steps:.3f} | {100 * seconds / total:.1f}% | {read} |")


if __name__ == "__main__":
    main()
