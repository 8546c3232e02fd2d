"""The engine beside other busy processes: no cliff when the machine is shared.

    python bench/contention.py                      # musicgen-small shapes, int8, ~4 min
    python bench/contention.py --size tiny --seconds 1 --rounds 1   # CI smoke run

One station renders audio end to end (decoder steps and the streaming codec) in one process,
under each condition in turn, the conditions taking turns in rounds so that all of them see the
same minutes of a shared machine. Each measurement opens the stream afresh (its prefill not
timed), so every condition renders the same positions of a window (a step's cost grows with its
position, and a window restart landing in one condition's turn would weigh on that one alone):

- `quiet, N threads`: the engine's default thread count (the cores), nothing else running;
- `quiet, 1 thread`: one decoder thread alone (the floor the engine must keep);
- `1 busy process`, `2 busy processes`: the default threads with that many single-threaded busy
  loops (`while True: pass`, separate processes) running beside it; `1 busy process, 1 thread`:
  one thread beside one (what the floor becomes when the neighbour takes the other core);
- `..., adaptive`: the same, the thread count chosen per chunk by `engine.threads.ThreadTuner`
  (what `radio serve` does; one tuner per condition, kept across rounds).

Prints the real-time factor of each condition (seconds of audio per second of wall time, the
median of the rounds) and its ratio to one thread alone, and this machine's plain read before
and after (`bench_kernels.py`'s). Start it on an otherwise idle machine: the busy loops are the
only competition it should meet.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_engine import PROMPT, load_options, model_dir, say  # noqa: E402
from bench.bench_kernels import plain_read  # noqa: E402
from engine import MusicModel, SamplingOptions, WindowOptions  # noqa: E402
from engine.threads import ThreadTuner  # noqa: E402

BUSY = [sys.executable, "-c", "while True: pass"]


def render(stream, frames: int, tuner: ThreadTuner | None) -> float:
    """Seconds of audio per second of wall time over `frames` frames, read 10 at a time (the
    radio's chunk), through `tuner` when given (as the radio's generator reads)."""
    began = time.perf_counter()
    for _ in range(0, frames, 10):
        if tuner is None:
            stream.read(10)
        else:  # a chunk that prefilled a window is not measured, as in the radio; chunks
            # with warm rows are (the radio leaves them out: left out here, a whole condition
            # measured nothing)
            prefills = stream.tokens.prefills
            tuner.run(
                lambda: stream.read(10),
                units=10,
                typical=lambda n=prefills: stream.tokens.prefills == n,
            )
    return frames / 50 / (time.perf_counter() - began)


@torch.inference_mode()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("small", "tiny"), default="small")
    parser.add_argument("--mode", default="int8", help="engine precision mode (bench_engine.py)")
    parser.add_argument("--seconds", type=float, default=8.0, help="audio per condition per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all the conditions")
    args = parser.parse_args()
    if args.seconds <= 0 or args.rounds < 1:
        raise SystemExit("--seconds must be > 0 and --rounds at least 1")
    threads = torch.get_num_threads()
    model = MusicModel.load(load_options(model_dir(args.size), args.mode))
    model.open_stream(PROMPT, SamplingOptions(seed=0), WindowOptions()).read(25)  # warm-up
    frames = max(10, round(args.seconds * 50) // 10 * 10)
    conditions = [
        (f"quiet, {threads} threads", threads, 0),
        ("quiet, 1 thread", 1, 0),
        (f"1 busy process, {threads} threads", threads, 1),
        (f"2 busy processes, {threads} threads", threads, 2),
        ("1 busy process, 1 thread", 1, 1),
        ("quiet, adaptive", 0, 0),
        ("1 busy process, adaptive", 0, 1),
        ("2 busy processes, adaptive", 0, 2),
    ]
    tuners = {name: ThreadTuner(threads) for name, n, _ in conditions if n == 0}
    before = plain_read(3)  # (with every thread, nothing else running)
    rtfs: dict[str, list[float]] = {name: [] for name, _, _ in conditions}
    for r in range(args.rounds):
        for name, n_threads, busy in conditions:
            if n_threads:
                torch.set_num_threads(n_threads)
            stream = model.open_stream(PROMPT, SamplingOptions(seed=0), WindowOptions())
            stream.read(10)  # the codec's first chunk
            loops = [subprocess.Popen(BUSY) for _ in range(busy)]
            try:
                time.sleep(0.2 if busy else 0)  # the loops running before the engine starts
                rtfs[name].append(render(stream, frames, tuners.get(name)))
            finally:
                for loop in loops:
                    loop.kill()
                    loop.wait()
            chosen = f" ({tuners[name].describe()})" if name in tuners else ""
            say(f"  round {r + 1}, {name}: real-time factor {rtfs[name][-1]:.3f}{chosen}")
    torch.set_num_threads(threads)
    after = plain_read(3)
    floor = statistics.median(rtfs["quiet, 1 thread"])
    say("")
    say(f"| {args.size} shapes, {args.mode}, one station | real-time factor | vs 1 thread alone |")
    say("| --- | --- | --- |")
    for name, _, _ in conditions:
        rtf = statistics.median(rtfs[name])
        say(f"| {name} | {rtf:.3f} | x{rtf / floor:.2f} |")
    say(f"plain read: {before:.1f} GB/s before, {after:.1f} GB/s after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
