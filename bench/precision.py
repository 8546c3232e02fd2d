"""How far each precision mode strays from float32, on the same weights, in one run.

    python bench/precision.py                       # musicgen-small shapes, ~3 min
    python bench/precision.py --size tiny --steps 60    # CI smoke run
    python bench/precision.py --modes "int8, int8;int4, int8" --int4-groups 32,64,128  # a subset
    python bench/precision.py --model facebook/musicgen-small   # the real weights (online)

For bfloat16, int8 (int8 weights, float32 activations; with each KV cache kind, int4 where the
heads are 64 wide) and int4 weights (all projections, or fc1/fc2 only: `int4-ffn`) against
float32:
- teacher-forced logits over the same token sequence: max and mean absolute difference, and how
  often the argmax agrees (per position and codebook);
- greedy decoding for `--steps` steps: the fraction of tokens that agree and the first step at
  which the streams part (after that they are different music, so agreement falls to chance).
Also the decode step time of each mode, as a ratio to float32, and the bytes a decode step
reads per mode: the projections' weights, and one station's (2 rows) KV cache at position 1000.

Where our CPU kernels do not run (a CPU without AVX2, or `ENDLESS_RADIO_KERNELS=0`), the int8
projections are emulated so that the figures are those of the kernels' maths: `linear_int8`'s
exact integer products in float64 (instead of PyTorch's 7-bit fbgemm path); such rows say
"emulated". The int8 and int4 KV caches are read by our kernels only, so their modes are
skipped there, with the reason.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_engine import PROMPT, kv_bytes_per_position, model_dir, say  # noqa: E402
from engine import kernels  # noqa: E402
from engine.checkpoint import fetch  # noqa: E402
from engine.conditioning import batch_conditions, encode_prompt  # noqa: E402
from engine.decoder import PROJECTIONS, Decoder, projection_bytes  # noqa: E402
from engine.delay import codebook_delays, delayed_layout  # noqa: E402
from engine.kv_cache import Q4_HEAD  # noqa: E402
from engine.linear import INT4_GROUP, Int8DynamicLinear  # noqa: E402
from engine.musicgen import MusicGen  # noqa: E402
from engine.options import SamplingOptions, WindowOptions  # noqa: E402
from engine.token_stream import TokenStream  # noqa: E402

# name: (weights dtype, decoder precision, KV cache); "auto" KV is bfloat16 for the bfloat16
# decoder and int8 for the int8 one where our CPU kernels run (float32 where they do not).
HALF_COARSE = (
    "int8, int4 in the last half of the layers, int4 KV cache (the ladder's first coarse rung)"
)
MODES = {
    "float32": (torch.float32, "dense", "float32"),
    "bfloat16": (torch.bfloat16, "dense", "auto"),
    "int8, float32 KV cache": (torch.float32, "int8", "float32"),
    "int8, bfloat16 KV cache": (torch.float32, "int8", "bfloat16"),
    "int8, int8 KV cache (CPU default)": (torch.float32, "int8", "int8"),
    "int8, int4 KV cache (stations)": (torch.float32, "int8", "int4"),
    "int4, int8 KV cache": (torch.float32, "int4", "int8"),
    "int4, int4 KV cache": (torch.float32, "int4", "int4"),
    "int4-ffn, int8 KV cache": (torch.float32, "int4-ffn", "int8"),
    "int4-ffn, int4 KV cache": (torch.float32, "int4-ffn", "int4"),
    HALF_COARSE: (torch.float32, "int8", "int4"),
}
GUIDANCE = SamplingOptions().guidance_scale  # (3: what the radio samples with)
# modes whose int8 decoder then swaps int4 projections into the last share of its layers
# (`Decoder.use_coarse`: the radio's coarse rungs while generation falls behind)
COARSE_SHARES = {HALF_COARSE: 0.5}


class Int8Emulated:
    """`linear_int8`'s maths (engine/kernels/int8_gemm.h) in float64: int8 weights per output
    feature, int8 activations per row, exact integer sums."""

    def __init__(self, weight: torch.Tensor) -> None:
        w = weight.detach().float()
        self.scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        self.q = torch.round(w / self.scales.float()[:, None]).clamp(-127, 127).double()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        r = rows.abs().amax(dim=1) / 127
        r = torch.where(r > 0, r, torch.ones_like(r))
        q = torch.round(rows * (1 / r)[:, None]).double()
        y = (q @ self.q.T) * r.double()[:, None] * self.scales[None]
        return y.float().view(*x.shape[:-1], self.q.shape[0])


def projection_weights(layer) -> dict[str, torch.Tensor]:
    """A transformers decoder layer's projection weights by `LayerWeights` name."""
    attn, cross = layer.self_attn, layer.encoder_attn
    return {
        "qkv": torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
        "out_self": attn.out_proj.weight,
        "q_cross": cross.q_proj.weight,
        "out_cross": cross.out_proj.weight,
        "fc1": layer.fc1.weight,
        "fc2": layer.fc2.weight,
    }


def emulate_kernels(decoder: Decoder, model) -> bool:
    """Where our CPU kernels do not run: int8 projections as `Int8Emulated`. Returns whether
    anything was emulated."""
    if decoder.kernels is not None or kernels.unavailable_reason() is None:
        return False
    emulated = False
    hf_layers = model.decoder.model.decoder.layers
    for w, layer in zip(decoder.layers, hf_layers, strict=True):
        weights = projection_weights(layer)
        for name in PROJECTIONS:
            if isinstance(getattr(w, name), Int8DynamicLinear):
                setattr(w, name, Int8Emulated(weights[name]))
                emulated = True
    if isinstance(decoder.lm_heads, Int8DynamicLinear):
        heads = torch.cat([h.weight for h in model.decoder.lm_heads])
        decoder.lm_heads = Int8Emulated(heads)
        emulated = True
    return emulated


def step_bytes(decoder: Decoder, positions: int = 1000, rows: int = 2) -> tuple:
    """(MB of projection weights, MB of its KV cache) a decode step of `rows` rows reads."""

    def nbytes(lin) -> int:
        if isinstance(lin, Int8Emulated):
            return lin.q.numel() + 4 * lin.q.shape[0]
        return projection_bytes(lin)

    weights = sum(nbytes(getattr(w, n)) for w in decoder.layers for n in PROJECTIONS)
    weights += nbytes(decoder.lm_heads)
    return weights / 1e6, kv_bytes_per_position(decoder) * positions * rows / 1e6


@torch.inference_mode()
def teacher_forced_logits(
    model, decoder: Decoder, ids: torch.Tensor, prefill: int = 1
) -> torch.Tensor:
    """ids: [K, T] delayed layout -> the conditional and null rows' logits [T - prefill + 1, 2,
    K, V] float32: the first `prefill` frames read at once (a prompt change's or a window
    restart's re-read), then step by step."""
    condition = encode_prompt(model, PROMPT, decoder.text_bfloat16, decoder.encoder_products)
    states, mask = batch_conditions([condition], guidance=True)
    cross = decoder.cross_kv(states, mask)
    cache = decoder.new_cache(2, ids.shape[1] + 1)
    rows = [decoder.prefill(ids[None, :, :prefill].expand(2, -1, -1), cache, cross)]
    for p in range(prefill, ids.shape[1]):
        rows.append(decoder.decode_one_step(ids[None, :, p].expand(2, -1), cache, cross))
    return torch.stack(rows)


def guided(rows: torch.Tensor, scale: float = GUIDANCE) -> torch.Tensor:
    """[T, 2, K, V] conditional and null rows -> the logits sampling takes with guidance."""
    return rows[:, 1] + (rows[:, 0] - rows[:, 1]) * scale


@torch.inference_mode()
def greedy_tokens(model, decoder: Decoder, frames: int) -> tuple[torch.Tensor, float]:
    channels = model.decoder.config.audio_channels
    stream = TokenStream(
        decoder,
        encode_prompt(model, PROMPT, decoder.text_bfloat16, decoder.encoder_products),
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
    parser.add_argument(
        "--model",
        default="",
        help="a hub id or a local folder of real weights (default: the random-weight --size model)",
    )
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument(
        "--modes",
        default="",
        help="semicolon-separated prefixes of the mode names to run (float32 always runs)",
    )
    parser.add_argument(
        "--int4-groups",
        default=str(INT4_GROUP),
        help="group sizes of the int4 modes, e.g. 32,64,128 (each its own rows)",
    )
    parser.add_argument(
        "--positions", type=int, default=300, help="teacher-forced positions (attention length)"
    )
    parser.add_argument(
        "--prefill",
        type=int,
        default=1,
        help="of them, frames read at once first (a prompt change re-reads 25, a window restart "
        "500): the prefill's own products, then steps over what it wrote",
    )
    args = parser.parse_args()
    if not 1 <= args.prefill < args.positions:
        parser.error(f"--prefill must be at least 1 and under --positions ({args.positions})")
    folder = fetch(args.model) if args.model else model_dir(args.size)
    torch.manual_seed(0)
    results, notes = {}, {}
    both: torch.Tensor | None = None  # float32's conditional and null rows
    wanted = [m.strip() for m in args.modes.split(";") if m.strip()]
    runs = []
    for name, (dtype, precision, kv_cache) in MODES.items():
        if name != "float32" and wanted and not any(name.startswith(w) for w in wanted):
            continue
        groups = [int(g) for g in args.int4_groups.split(",")] if "int4" in precision else [0]
        for group in groups:
            label = name.replace(precision, f"{precision} g{group}", 1) if group else name
            runs.append((label, dtype, precision, kv_cache, group or INT4_GROUP))
    for name, dtype, precision, kv_cache, group in runs:
        model = MusicGen.load(folder, dtype)
        auto_kv = "auto" if kernels.unavailable_reason() is None else "float32"
        try:
            decoder = Decoder(
                model.decoder,
                precision,
                kv_cache if kv_cache in ("float32", "bfloat16", "auto") else auto_kv,
                int4_group=group,
            )
        except ValueError as err:  # a mode this machine cannot run
            say(f"{name}: skipped ({err})")
            continue
        if kv_cache == "int4" and decoder.head_dim != Q4_HEAD:
            say(f"{name}: skipped (an int4 cache holds heads of {Q4_HEAD})")
            continue
        if kv_cache in ("int8", "int4"):
            if decoder.kernels is None:
                why = kernels.unavailable_reason() or "the decoder runs none"
                say(
                    f"{name}: skipped (an {kv_cache} KV cache is read by our CPU kernels only: {why})"
                )
                continue
            decoder = Decoder(model.decoder, precision, kv_cache, int4_group=group)
        if name in COARSE_SHARES:
            if decoder.coarse_available() is not None:
                say(f"{name}: skipped ({decoder.coarse_available()})")
                continue
            decoder.use_coarse(COARSE_SHARES[name])
        if emulate_kernels(decoder, model):
            name += " (emulated)"
        notes[name] = step_bytes(decoder)
        say(f"{name}: teacher-forced logits and {args.steps} greedy steps ...")
        k = model.decoder.config.num_codebooks
        n = args.positions
        frames = torch.randint(0, 2048, (k, n + 3), generator=torch.Generator().manual_seed(0))
        ids = delayed_layout(frames, codebook_delays(k, model.decoder.config.audio_channels), n)
        rows = teacher_forced_logits(model, decoder, ids, args.prefill)
        if name == "float32":
            both = rows
        tokens, step_s = greedy_tokens(model, decoder, args.steps)
        results[name] = (rows[:, 0], tokens, step_s)

    ref_logits, ref_tokens, ref_step = results["float32"]
    say("")
    spread = ref_logits.std().item()
    weights = args.model or f"{args.size} shapes"
    read = f", the first {args.prefill} read at once" if args.prefill > 1 else ""
    say(
        f"| mode vs float32 ({weights}) | max abs logit diff | mean abs logit diff | "
        f"mean as % of the logit spread | argmax agreement (teacher-forced, {args.positions} "
        f"positions{read}) | greedy agreement over {args.steps} steps | first differing step | "
        "step time vs float32 | weights MB per step | KV cache MB per step (2 rows, position 1000) |"
    )
    say("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in [m for m in results if m != "float32"]:
        logits, tokens, step_s = results[name]
        diff = (logits - ref_logits).abs()
        argmax = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        agree = (tokens == ref_tokens).float().mean().item()
        differ = (tokens != ref_tokens).any(dim=0).nonzero()
        first = int(differ[0]) if differ.numel() else "none"
        weights_mb, cache_mb = notes[name]
        say(
            f"| {name} | {diff.max().item():.4f} | {diff.mean().item():.5f} | "
            f"{diff.mean().item() / spread:.2%} | {argmax:.1%} | {agree:.1%} | {first} | "
            f"x{ref_step / step_s:.2f} faster | {weights_mb:.0f} | {cache_mb:.0f} |"
        )
    say(f"(logit spread: float32 logits have std {spread:.3f}; budget: mean at most 3% of it)")
    # guidance off (the ladder's last rung, `MusicModel.drop_guidance`): sampling takes the
    # conditional row alone in place of the guided logits; in float32, what that moves
    assert both is not None
    reference = guided(both)
    off = (both[:, 0] - reference).abs().mean().item() / reference.std().item()
    agree = (both[:, 0].argmax(-1) == reference.argmax(-1)).float().mean().item()
    say(
        f"guidance off (float32): the conditional row alone against the guided logits (scale "
        f"{GUIDANCE:g}): mean {off:.2%} of their spread, argmax agreement {agree:.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
