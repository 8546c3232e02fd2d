"""How far each precision mode strays from float32, on the same weights, in one run.

    python bench/precision.py                       # musicgen-small shapes, ~3 min
    python bench/precision.py --size tiny --steps 60    # CI smoke run

For bfloat16 and int8 (int8 weights, float32 activations; with each KV cache kind, int4 where
the heads are 64 wide) against float32:
- teacher-forced logits over the same token sequence: max and mean absolute difference, and how
  often the argmax agrees (per position and codebook);
- greedy decoding for `--steps` steps: the fraction of tokens that agree and the first step at
  which the streams part (after that they are different music, so agreement falls to chance).
Also the decode step time of each mode, as a ratio to float32.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_engine import PROMPT, model_dir, say  # noqa: E402
from engine.conditioning import batch_conditions, encode_prompt  # noqa: E402
from engine.decoder import Decoder  # noqa: E402
from engine.delay import codebook_delays, delayed_layout  # noqa: E402
from engine.options import SamplingOptions, WindowOptions  # noqa: E402
from engine.token_stream import TokenStream  # noqa: E402

# name: (weights dtype, linear precision, KV cache); "auto" KV is bfloat16 for the bfloat16
# decoder and int8 for the int8 one where our CPU kernels run (float32 where they do not).
MODES = {
    "float32": (torch.float32, "dense", "float32"),
    "bfloat16": (torch.bfloat16, "dense", "auto"),
    "int8, float32 KV cache": (torch.float32, "int8", "float32"),
    "int8, bfloat16 KV cache": (torch.float32, "int8", "bfloat16"),
    "int8, int8 KV cache (CPU default)": (torch.float32, "int8", "auto"),
    "int8, int4 KV cache (stations)": (torch.float32, "int8", "int4"),
}


@torch.inference_mode()
def teacher_forced_logits(model, processor, decoder: Decoder, ids: torch.Tensor) -> torch.Tensor:
    """ids: [K, T] delayed layout -> guided-row-0 logits [T, K, V] float32, step by step."""
    states, mask = batch_conditions([encode_prompt(model, processor, PROMPT)], guidance=True)
    cross = decoder.cross_kv(states, mask)
    cache = decoder.new_cache(2, ids.shape[1] + 1)
    rows = [decoder.prefill(ids[None, :, :1].expand(2, -1, -1), cache, cross)]
    for p in range(1, ids.shape[1]):
        rows.append(decoder.decode_one_step(ids[None, :, p].expand(2, -1), cache, cross))
    return torch.stack(rows)[:, 0]


@torch.inference_mode()
def greedy_tokens(model, processor, decoder: Decoder, frames: int) -> tuple[torch.Tensor, float]:
    channels = model.decoder.config.audio_channels
    stream = TokenStream(
        decoder,
        encode_prompt(model, processor, PROMPT),
        SamplingOptions(greedy=True),
        WindowOptions(window=max(frames + 16, 560), context=500),
        audio_channels=channels,
    )
    began = time.perf_counter()
    stream.generate_until(frames)
    return stream.history()[0][:, :frames], (time.perf_counter() - began) / max(stream.steps, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("small", "tiny"), default="small")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument(
        "--positions", type=int, default=300, help="teacher-forced positions (attention length)"
    )
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoProcessor, MusicgenForConditionalGeneration

    path = model_dir(args.size)
    processor = AutoProcessor.from_pretrained(path)
    torch.manual_seed(0)
    results = {}
    for name, (dtype, precision, kv_cache) in MODES.items():
        model = MusicgenForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
        try:
            decoder = Decoder(model.decoder, precision, kv_cache)
        except ValueError as err:  # a KV cache this machine cannot run (no CPU kernels)
            say(f"{name}: skipped ({err})")
            continue
        say(f"{name}: teacher-forced logits and {args.steps} greedy steps ...")
        k = model.decoder.config.num_codebooks
        n = args.positions
        frames = torch.randint(0, 2048, (k, n + 3), generator=torch.Generator().manual_seed(0))
        ids = delayed_layout(frames, codebook_delays(k, model.decoder.config.audio_channels), n)
        logits = teacher_forced_logits(model, processor, decoder, ids)
        tokens, step_s = greedy_tokens(model, processor, decoder, args.steps)
        results[name] = (logits, tokens, step_s)

    ref_logits, ref_tokens, ref_step = results["float32"]
    say("")
    say(
        f"| mode vs float32 ({args.size} shapes) | max abs logit diff | mean abs logit diff | "
        f"argmax agreement (teacher-forced, {args.positions} positions) | greedy agreement over {args.steps} steps | "
        "first differing step | step time vs float32 |"
    )
    say("| --- | --- | --- | --- | --- | --- | --- |")
    for name in [m for m in MODES if m != "float32" and m in results]:
        logits, tokens, step_s = results[name]
        diff = (logits - ref_logits).abs()
        argmax = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        agree = (tokens == ref_tokens).float().mean().item()
        differ = (tokens != ref_tokens).any(dim=0).nonzero()
        first = int(differ[0]) if differ.numel() else "none"
        say(
            f"| {name} | {diff.max().item():.4f} | {diff.mean().item():.5f} | {argmax:.1%} | "
            f"{agree:.1%} | {first} | x{ref_step / step_s:.2f} faster |"
        )
    say(f"(logit scale: float32 logits have std {ref_logits.std().item():.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
