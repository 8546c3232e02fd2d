"""The self-attention over an int8 KV cache in the fused decode step, against the same kernel
alone, at one fixed position, in turns in one process.

    python bench/attention_step.py --positions 838 --rounds 6
    python bench/attention_step.py --size tiny --positions 100 --rounds 2  # CI

One station (2 rows with guidance) of the `--size` model, int8 weights and cache, its cache a
window of `--window` slots holding random keys and values. Each round runs `--steps` fused
decode steps at `--positions` (the step's clock on: the self-attention's part and the cache bytes
it read, `Decoder.part_times`), then as many passes of `attend_step_q8` alone over every layer
of the same cache at the same positions. Prints each round and the medians: what the step
around it costs the attention (the cache writes, the products before and after), apart from the
minute the machine is having.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import PROMPT, load_options, model_dir, say  # noqa: E402

from engine import MusicModel, kernels  # noqa: E402
from engine.conditioning import batch_conditions  # noqa: E402


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("small", "tiny"), default="small")
    parser.add_argument("--positions", type=int, default=838, help="positions each row attends")
    parser.add_argument("--window", type=int, default=1500, help="the cache's slots per row")
    parser.add_argument("--steps", type=int, default=10, help="steps (and passes alone) a round")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    if not 1 <= args.positions <= args.window or args.steps < 1 or args.rounds < 1:
        parser.error("need 1 <= --positions <= --window, --steps and --rounds >= 1")
    k = kernels.get()
    if k is None:
        raise SystemExit(f"our CPU kernels do not run here: {kernels.unavailable_reason()}")
    model = MusicModel.load(load_options(model_dir(args.size), "int8"))
    decoder = model.decoder
    if args.window > decoder.max_positions:
        parser.error(f"--window: at most the model's {decoder.max_positions} positions")
    g = torch.Generator().manual_seed(0)
    cross = decoder.cross_kv(*batch_conditions([model.encode_prompt(PROMPT)], guidance=True))
    cache = decoder.new_cache(2, args.window)
    keys, key_scales, values, value_scales = cache.tensors()
    keys.copy_(torch.randint(-127, 128, keys.shape, dtype=torch.int8, generator=g))
    values.copy_(torch.randint(-127, 128, values.shape, dtype=torch.int8, generator=g))
    key_scales.fill_(0.01), value_scales.fill_(0.01)
    at = [args.positions - 1] * 2
    ids = torch.randint(0, decoder.vocab, (2, decoder.num_codebooks), generator=g)
    qkv = torch.randn(2, 3 * decoder.hidden, generator=g)
    positions = torch.tensor(at)
    layers = keys.shape[0]
    scale = decoder.head_dim**-0.5
    say(
        f"{args.size} model, 2 rows at {args.positions} positions of {args.window} slots, "
        f"{layers} layers, {args.steps} steps a round, {torch.get_num_threads()} thread(s)"
    )

    def in_step() -> tuple[float, float, int]:
        decoder.clock_parts(True)
        decoder.part_times()  # from here
        began = time.perf_counter()
        for _ in range(args.steps):
            decoder.decode_one_step(ids, cache, cross, at)
        wall = time.perf_counter() - began
        parts = {name: (s, b) for name, s, _, b in decoder.part_times()}
        decoder.clock_parts(False)
        seconds, read = parts["self-attention"]
        return wall / args.steps, seconds / args.steps, read // args.steps

    def alone() -> float:
        began = time.perf_counter()
        for _ in range(args.steps):
            for i in range(layers):
                k.attend_step_q8(
                    qkv, keys[i], key_scales[i], values[i], value_scales[i], positions, scale
                )
        return (time.perf_counter() - began) / args.steps

    rows = []
    for r in range(args.rounds):
        step, attention, read = in_step()
        by_itself = alone()
        rows.append((step, attention, by_itself))
        say(
            f"  round {r + 1}: a step {1e3 * step:.2f} ms, its self-attention {1e3 * attention:.2f}"
            f" ms ({read / attention / 1e9:.1f} GB/s), alone {1e3 * by_itself:.2f} ms "
            f"({read / by_itself / 1e9:.1f} GB/s)"
        )
    step, attention, by_itself = (statistics.median(c) for c in zip(*rows, strict=True))
    say(
        f"medians: a step {1e3 * step:.2f} ms; the self-attention {1e3 * attention:.2f} ms in it, "
        f"{1e3 * by_itself:.2f} ms alone ({read / 1e6:.2f} MB of cache a step): "
        f"x{attention / by_itself:.2f} the time in the step"
    )


if __name__ == "__main__":
    main()
