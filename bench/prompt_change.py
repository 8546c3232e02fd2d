"""What a prompt change costs the engine, part by part, with each kind of text products taking
turns in one run.

    python bench/prompt_change.py                     # musicgen-small shapes, int8 (~1 min)
    python bench/prompt_change.py --size tiny --changes 4   # CI smoke run

One stream of the CPU default (int8 weights and cache), as the radio runs it (freed memory kept:
`engine.memory`). Each round reads 0.5 s of music, then changes to a text not seen before
(`AudioStream.set_prompt`); rounds alternate between the decoder's three `text_products` (the
T5 encoder, the cross-attention's keys and values and their fold): float32, bfloat16 (PyTorch's
maths: what a CPU with native bfloat16 maths gets) and bfloat16-weights (our kernel: bfloat16
weights, float32 maths; what other CPUs with our kernels get). Per kind: the median wall time of the text's encoding, the
decoder's prefill of `generation.prompt_context` (25 frames), the rest (the cross-attention
inputs, the cache's rewind), the whole change, and the page faults a change took; and this
machine's plain read (`bench/bench_kernels.py`) before and after. The first
rounds (one per kind) warm up and are left out. The radio's auto horizon places a change
`1.5 x (its cost + a chunk)` ahead, at least 0.5 s (`radio/timing.py`).

Then a change's prefill by its rows, in turns: 1 (a lone stream without guidance, or guidance
dropped), 2 (a plain prompt) and 4 (a blend of three texts), against what `Prefill.at_rows`
makes of the 2-row figure, and the part of a prefill that does not grow with its rows, fitted
(in row-frames: `engine.lane.FIXED_ROW_FRAMES`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_engine import PROMPT, load_options, model_dir, say  # noqa: E402
from bench.bench_kernels import plain_read  # noqa: E402
from engine import MusicModel, SamplingOptions  # noqa: E402
from engine.blend import Blend  # noqa: E402
from engine.lane import FIXED_ROW_FRAMES, Prefill, prefill_since, prefilled_since  # noqa: E402
from engine.memory import keep_freed_memory  # noqa: E402

KINDS = ("float32", "bfloat16", "bfloat16-weights")
WORDS = ("drums", "strings", "rain", "bass", "piano", "choir", "synth", "guitar", "brass", "harp")


def text(i: int) -> str:
    """A prompt of ~15 T5 tokens no earlier round used (the engine keeps no cache of texts)."""
    return f"{WORDS[i % 10]} and {WORDS[(i // 10 + 3) % 10]} in a slow song, take {i}"


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


TEXT_WEIGHTS: dict[str, object] = {}  # per kind, the decoder's copies (built at its first change)


@torch.inference_mode()
def change(stream, products: str, prompt: str) -> dict[str, float]:
    """One prompt change with the decoder's text products set to `products`, its parts."""
    decoder = stream.model.decoder
    saved = decoder.settings
    decoder.settings = dataclasses.replace(saved, text_products=products)
    decoder._text = TEXT_WEIGHTS.get(products)
    try:
        stream.read(25)
        began = time.perf_counter()
        stream.model.encode_prompt(prompt)  # timed alone; the change encodes it again
        encoded = time.perf_counter() - began
        before, f0 = stream.tokens.last_prefill, faults()
        began = time.perf_counter()
        stream.set_prompt(prompt)
        whole = time.perf_counter() - began
        prefilled = prefilled_since(stream.tokens.last_prefill, before)
        return {
            "text": encoded,
            "prefill": prefilled,
            "rest": whole - encoded - prefilled,
            "whole": whole,
            "faults": faults() - f0,
        }
    finally:
        TEXT_WEIGHTS[products] = decoder._text
        decoder.settings = saved


@torch.inference_mode()
def prefill_by_rows(model: MusicModel, rounds: int) -> dict[int, Prefill]:
    """Per row count, the median prefill of `rounds` prompt changes (the first left out), the
    counts in turns."""
    streams = {
        1: model.open_stream(PROMPT, SamplingOptions(seed=0, guidance_scale=1.0)),
        2: model.open_stream(PROMPT, SamplingOptions(seed=0)),
        4: model.open_stream(PROMPT, SamplingOptions(seed=0)),
    }
    ran: dict[int, list[Prefill]] = {rows: [] for rows in streams}
    for i in range(rounds):
        for rows, stream in streams.items():
            prompt: str | Blend = text(1000 + 3 * i)
            if rows == 4:  # three texts and the null row
                prompt = Blend.weighted((text(1000 + 3 * i + j), 1.0) for j in range(3))
            stream.read(25)
            before = stream.tokens.last_prefill
            stream.set_prompt(prompt)
            prefill = prefill_since(stream.tokens.last_prefill, before)
            assert prefill is not None and prefill.rows == rows, (rows, prefill)
            ran[rows].append(prefill)
    return {
        rows: Prefill(statistics.median(p.seconds for p in ps[1:]), rows, ps[0].frames)
        for rows, ps in ran.items()
    }


def say_rows(prefills: dict[int, Prefill]) -> None:
    plain = prefills[2]
    say(f"\na change's prefill ({plain.frames} frames) by its rows, in turns; medians:\n")
    say("| rows | prefill | in proportion to 2 rows | `Prefill.at_rows` of 2 rows |")
    say("| --- | --- | --- | --- |")
    for rows, p in prefills.items():
        say(
            f"| {rows} | {1e3 * p.seconds:.0f} ms | {1e3 * plain.seconds * rows / 2:.0f} ms | "
            f"{1e3 * plain.at_rows(rows):.0f} ms |"
        )
    # seconds = a + b * rows (least squares over the counts): a / b rows of `frames` each
    b, a = statistics.linear_regression(list(prefills), [p.seconds for p in prefills.values()])
    fixed = a / b * plain.frames if b > 0 else float("nan")
    say(
        f"the part that does not grow with the rows, fitted: {fixed:.0f} row-frames "
        f"(engine.lane.FIXED_ROW_FRAMES = {FIXED_ROW_FRAMES})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("small", "tiny"), default="small")
    parser.add_argument("--changes", type=int, default=12, help="changes per kind (>= 2)")
    parser.add_argument(
        "--no-keep",
        action="store_true",
        help="freed memory goes back to the system as glibc decides (what the radio did before "
        "engine.memory): the page faults that costs",
    )
    args = parser.parse_args()
    if args.changes < 2:
        parser.error("--changes must be at least 2 (the first of each kind warms up)")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    model = MusicModel.load(load_options(model_dir(args.size), "int8"))
    if model.decoder.kernels is None:
        say("our CPU kernels do not run here: text products are float32 only; nothing to compare")
        return 0
    kept = not args.no_keep and keep_freed_memory()
    stream = model.open_stream(PROMPT, SamplingOptions(seed=0))
    stream.read(25)
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
    read_before = plain_read(3)
    for i in range(args.changes * len(KINDS)):
        kind = KINDS[i % len(KINDS)]
        runs[kind].append(change(stream, kind, text(i)))
        if (i + 1) % 8 == 0:
            say(f"  {i + 1} of {args.changes * len(KINDS)} changes ...")
    read_after = plain_read(3)
    say(
        f"\nprompt changes, {args.size} shapes, int8, one stream, {args.changes} each in turns"
        f" (the first of each left out; freed memory kept: {kept}; plain read {read_before:.1f}"
        f" GB/s before, {read_after:.1f} after); medians:\n"
    )
    say(
        "| text products | text encoding | prefill (25 frames) | the rest | whole change | page faults |"
    )
    say("| --- | --- | --- | --- | --- | --- |")
    medians = {}
    for kind in KINDS:
        rows = runs[kind][1:]
        m = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        medians[kind] = m
        say(
            f"| {kind} | {1e3 * m['text']:.0f} ms | {1e3 * m['prefill']:.0f} ms | "
            f"{1e3 * m['rest']:.0f} ms | {1e3 * m['whole']:.0f} ms | {m['faults']:.0f} |"
        )
    for kind in KINDS[1:]:
        ratio = medians["float32"]["whole"] / medians[kind]["whole"]
        say(f"{kind} text products: a change x{ratio:.2f} as fast as with float32 ones")
    say(f"(this machine's own choice: {model.decoder.settings.text_products})")
    say_rows(prefill_by_rows(model, args.changes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
