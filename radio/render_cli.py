"""`radio render`: the endless stream rendered offline to a WAV file, with a progress bar."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from radio.errors import CliError

if TYPE_CHECKING:
    from engine.render import PromptChange


def _change(value: str) -> PromptChange:
    from engine.render import PromptChange

    at, sep, prompt = value.partition(":")
    try:
        seconds = float(at)
    except ValueError:
        seconds = -1.0
    if not sep or seconds < 0:
        raise argparse.ArgumentTypeError(
            f"expected AT_SECONDS:PROMPT (for example 10:fast techno), got {value!r}"
        )
    return PromptChange(seconds, prompt)


def _positive(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {value!r}")
    return seconds


def add_render_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("render", help="render the endless stream offline to a WAV file")
    p.add_argument(
        "--prompt", required=True, help='what to play, for example "slow rainy-day jazz"'
    )
    p.add_argument(
        "--seconds", type=_positive, required=True, help="length of the WAV, exact to the sample"
    )
    p.add_argument("--out", required=True, help="WAV file to write (32-bit float)")
    p.add_argument("--model", default="facebook/musicgen-small", help="hub id or local folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument(
        "--quantize",
        default="auto",
        help="auto (int8 on CPU when --dtype is auto), none, int8, int4 or int4-ffn (CPU)",
    )
    p.add_argument(
        "--compile",
        default="auto",
        help="decoder step: auto (CUDA graphs on GPU, none on CPU), none, compile or graphs",
    )
    p.add_argument(
        "--kv-cache",
        default="auto",
        help="KV cache: auto (int8/bfloat16 with our CPU kernels), float32, bfloat16, int8 or int4",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument(
        "--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3)"
    )
    p.add_argument(
        "--window", type=int, default=1500, help="frames per KV-cache window (default 1500)"
    )
    p.add_argument(
        "--context", type=int, default=500, help="frames re-prefilled at a window end (default 500)"
    )
    p.add_argument(
        "--tokens-out", help="save the frame-aligned tokens [frames, K] to this .npy file"
    )
    p.add_argument(
        "--change",
        type=_change,
        action="append",
        default=[],
        metavar="AT_SECONDS:PROMPT",
        help="switch to PROMPT at AT_SECONDS (repeatable)",
    )
    p.set_defaults(func=run_render)


def run_render(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from engine import LoadOptions, ModelLoadError, MusicModel, SamplingOptions, WindowOptions
    from engine.render import render

    try:
        sampling = SamplingOptions(
            guidance_scale=args.guidance, greedy=args.greedy, seed=args.seed
        ).validate()
        load = LoadOptions(
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            quantize=args.quantize,
            compile=args.compile,
            kv_cache=args.kv_cache,
        ).validate()
        window = WindowOptions(window=args.window, context=args.context)
        model = MusicModel.load(load)
        window.validate(model.max_positions)
    except (ValueError, ModelLoadError) as err:
        raise CliError(str(err)) from None
    stream = model.open_stream(args.prompt, sampling, window)
    frames = round(args.seconds * model.frame_rate)
    with tqdm(total=frames, unit="frame", desc="rendering", leave=True) as bar:
        try:
            result = render(
                stream, args.seconds, args.out, changes=args.change, progress=bar.update
            )
        except ValueError as err:
            raise CliError(str(err)) from None
    if args.tokens_out:
        np.save(args.tokens_out, result.tokens)
    seconds = result.samples / model.sample_rate
    rtf = seconds / max(stream.generate_seconds + stream.decode_seconds, 1e-9)
    print(
        f"wrote {args.out}: {seconds:.3f} s, {model.channels} channel(s), {model.sample_rate} Hz, "
        f"{result.frames} frames, {stream.tokens.prefills} prefills, real time x{rtf:.2f}"
    )
    return 0
