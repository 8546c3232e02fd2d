"""Streaming EnCodec decode: accuracy against the one-shot decode, and cost per second of audio.

    python bench/bench_codec.py --threads 1      # musicgen-small-shaped random EnCodec (~4 min)
    python bench/bench_codec.py --size tiny      # the test model's shape (seconds)
    python bench/bench_codec.py --threads 1 --tables 45 --repeats 7   # cost and where it goes
    git show main:engine/codec.py > /tmp/codec_main.py
    python bench/bench_codec.py --threads 1 --tables 4 --against /tmp/codec_main.py   # A/B

Prints five tables:
1. `StreamingDecoder` vs `audio_encoder.decode` of the same tokens (SNR, dB) per chunk size;
2. why it carries the LSTM state: plain overlap decoding (each chunk decoded alone with `ctx`
   frames before and `la` after, trimmed) vs one-shot, SNR by left context x lookahead;
3. a fresh start away from frame 0 (LSTM warmed up from zeros) by `context`;
4. decode cost in ms of CPU per second of audio, streamed at the radio's chunk size and at
   10/25/50 frames, and one-shot; the SNR of each stream against the one-shot decode.
   `--against FILE` adds the streamed cost of another `engine/codec.py` (an older version),
   measured interleaved with this one in the same process: on a shared machine only such
   side-by-side figures compare;
5. where a streamed second goes at the radio's chunk size: CPU ms per stage.

Random-init EnCodec codebooks are all zeros (the audio would not depend on the tokens), so the
codebooks are filled with N(0, std^2); the "different tokens" line shows how much the tokens
change the audio, the scale against which the SNRs mean something.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import EncodecModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.codec import HOP, StreamingDecoder, decode_full, freeze_weight_norm  # noqa: E402
from engine.tiny import _configs  # noqa: E402
from radio.config import GenerationConfig  # noqa: E402
from tests.helpers import snr_db  # noqa: E402

RADIO_CHUNK = round(GenerationConfig().chunk_seconds * 50)  # frames per AudioStream.read()


def build_codec(size: str, std: float) -> EncodecModel:
    """A random EnCodec as `MusicModel` runs it: weight norm frozen (else every conv recomputes
    its weight on every call, ~20 ms a call that the radio never pays)."""
    torch.manual_seed(0)
    codec = EncodecModel(_configs(size, False)[1]).eval()
    with torch.no_grad():
        for layer in codec.quantizer.layers:
            layer.codebook.embed.normal_(0.0, std)
    freeze_weight_norm(codec)
    return codec


def stream(dec: StreamingDecoder, codes: torch.Tensor, bounds: list[int]) -> np.ndarray:
    out = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        offset = max(0, start - dec.context)
        out.append(dec.decode(codes[:, offset : stop + dec.lookahead], offset, start, stop))
    return np.concatenate(out, axis=1)


def chunk_bounds(chunk: int | list[int], frames: int) -> list[int]:
    sizes = chunk if isinstance(chunk, list) else [chunk] * (frames // chunk)
    return [0, *np.cumsum(sizes).tolist()]


def table_streaming(codec, frames: int) -> None:
    print("\n1. StreamingDecoder vs one-shot (SNR dB)")
    print("| channels | chunk | frames | SNR |")
    print("| --- | --- | --- | --- |")
    irregular = [1, 7, 30, 3, 50, 13, 2, 64, 20, 10]  # 200 frames
    for channels in (1, 2):
        codes = torch.randint(0, 2048, (4 * channels, frames + 10))
        ref = decode_full(codec, codes, channels)
        for chunk in (10, 25, 50, irregular):
            bounds = chunk_bounds(chunk, frames)
            dec = StreamingDecoder(codec, audio_channels=channels)
            out = stream(dec, codes, bounds)
            name = "irregular 1..64" if isinstance(chunk, list) else chunk
            snr = snr_db(ref[:, : out.shape[1]], out)
            print(f"| {channels} | {name} | {bounds[-1]} | {snr:.1f} |")


def table_overlap(codec, start: int = 100, stop: int = 150) -> None:
    print("\n2. plain overlap decode of frames [100, 150), no carried state (SNR dB)")
    contexts, lookaheads = (0, 2, 4, 8, 16, 32), (0, 1, 2, 3, 4, 5)
    print("| ctx \\ la | " + " | ".join(map(str, lookaheads)) + " |")
    print("| --- " * (len(lookaheads) + 1) + "|")
    codes = torch.randint(0, 2048, (4, stop + 40))
    ref = decode_full(codec, codes, 1)[:, start * HOP : stop * HOP]
    with torch.inference_mode():
        for ctx in contexts:
            row = []
            for la in lookaheads:
                part = codes[None, None, :, start - ctx : stop + la]
                audio = codec.decode(part, [None]).audio_values[0, :, ctx * HOP :]
                row.append(f"{snr_db(ref, audio[:, : ref.shape[1]].numpy()):.1f}")
            print(f"| {ctx} | " + " | ".join(row) + " |")


def table_fresh(codec, start: int = 150) -> None:
    print("\n3. fresh start at frame 150 (no saved LSTM state): SNR dB by context")
    print("| context | SNR |")
    print("| --- | --- |")
    codes = torch.randint(0, 2048, (4, start + 110))
    ref = decode_full(codec, codes, 1)[:, start * HOP : (start + 100) * HOP]
    for context in (6, 12, 25, 50, 100):
        dec = StreamingDecoder(codec, audio_channels=1, context=context)
        out = stream(dec, codes, [start, start + 25, start + 50, start + 75, start + 100])
        print(f"| {context} | {snr_db(ref, out):.1f} |")


def _restream(dec, codes: torch.Tensor, bounds: list[int]) -> None:
    dec.reset()
    stream(dec, codes, bounds)


def _load_decoder_class(path: str) -> type:
    """`StreamingDecoder` from another copy of engine/codec.py (for A/B runs)."""
    spec = importlib.util.spec_from_file_location("codec_against", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.StreamingDecoder


def _cost(runs: dict, seconds: int, repeats: int) -> dict:
    """Median CPU (process) and wall ms per audio second of each run, interleaved, after one
    warm-up round."""
    cpu: dict = collections.defaultdict(list)
    wall: dict = collections.defaultdict(list)
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            c, w = time.process_time(), time.perf_counter()
            run()
            if round_:
                cpu[name].append((time.process_time() - c) * 1000 / seconds)
                wall[name].append((time.perf_counter() - w) * 1000 / seconds)
    return {n: (statistics.median(cpu[n]), statistics.median(wall[n])) for n in runs}


def table_cost(codec, seconds: int, repeats: int, against: str | None) -> None:
    print(
        f"\n4. decode cost, CPU ms per second of audio ({seconds} s streams, median of "
        f"{repeats} interleaved repeats; wall ms in brackets), SNR of the stream vs one-shot"
    )
    other = _load_decoder_class(against) if against else None
    head = "| channels | chunk | streamed | one-shot | SNR dB |"
    if other:
        head += f" streamed, {Path(against).name} | ratio |"
    print(head)
    print("| --- " * (head.count("|") - 1) + "|")
    frames = seconds * 50
    for channels in (1, 2):
        codes = torch.randint(0, 2048, (4 * channels, frames + 10))
        ref = decode_full(codec, codes, channels)[:, : frames * HOP]
        for chunk in sorted({RADIO_CHUNK, 10, 25, 50}):
            bounds = chunk_bounds(chunk, frames)
            dec = StreamingDecoder(codec, audio_channels=channels)
            snr = snr_db(ref, stream(dec, codes, bounds))
            runs = {
                "streamed": partial(_restream, dec, codes, bounds),
                "one-shot": partial(decode_full, codec, codes[:, :frames], channels),
            }
            if other:
                old = other(codec, audio_channels=channels)
                runs["against"] = partial(_restream, old, codes, bounds)
            cost = _cost(runs, seconds, repeats)
            cells = [f"{cost[n][0]:.0f} ({cost[n][1]:.0f})" for n in runs]
            name = f"{chunk} (radio)" if chunk == RADIO_CHUNK else str(chunk)
            row = f"| {channels} | {name} | {cells[0]} | {cells[1]} | {snr:.1f} |"
            if other:
                row += f" {cells[2]} | {cost['streamed'][0] / cost['against'][0]:.2f} |"
            print(row)


def table_stages(codec, seconds: int, repeats: int) -> None:
    """CPU time per stage of a mono stream at the radio's chunk size. Wraps the decoder's
    internals (private: this is a measurement, not an API)."""
    print(
        f"\n5. where a streamed second goes: {RADIO_CHUNK}-frame calls, mono, CPU ms per "
        f"second of audio (median of {repeats})"
    )
    dec = StreamingDecoder(codec, audio_channels=1)
    spent: collections.Counter = collections.Counter()

    def timed(name: str, fn):
        def run(*args, **kwargs):
            began = time.process_time()
            out = fn(*args, **kwargs)
            spent[name] += time.process_time() - began
            return out

        return run

    dec._first_conv = timed("codebook embeddings + first conv", dec._first_conv)
    dec._lstm.run = timed("LSTM (2 layers, per frame)", dec._lstm.run)
    layers = dec._upsample.layers
    names = []
    for i, layer in enumerate(layers):
        kind = type(layer).__name__
        kind = f"{kind[1:]} (engine.codec's form)" if kind.startswith("_") else kind
        names.append(f"upsampling {i:2d}: {kind}")
        layers[i] = timed(names[-1], layer)
    frames = seconds * 50
    codes = torch.randint(0, 2048, (4, frames + 10))
    bounds = chunk_bounds(RADIO_CHUNK, frames)
    per: dict = collections.defaultdict(list)
    for round_ in range(repeats + 1):
        dec.reset()
        spent.clear()
        began = time.process_time()
        stream(dec, codes, bounds)
        total = time.process_time() - began
        if round_:
            for name, t in spent.items():
                per[name].append(t)
            per["rest (crossfade, copies, Python)"].append(total - sum(spent.values()))
            per["total"].append(total)
    total = statistics.median(per["total"])
    print("| stage | ms / s of audio | share |")
    print("| --- | --- | --- |")
    for name in per:
        ms = statistics.median(per[name])
        print(f"| {name} | {ms * 1000 / seconds:.1f} | {ms / total:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "small"), default="small")
    parser.add_argument("--std", type=float, default=None, help="codebook std (default by size)")
    parser.add_argument("--seconds", type=int, default=4, help="stream length for the cost table")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--tables", default="12345", help="which tables to print, e.g. 45")
    parser.add_argument("--against", default=None, help="another engine/codec.py to A/B in 4")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    std = args.std if args.std is not None else (30.0 if args.size == "tiny" else 1.0)
    torch.manual_seed(0)
    codec = build_codec(args.size, std)
    print(
        f"EnCodec {args.size}-shaped, random weights, codebook std {std}, "
        f"{torch.get_num_threads()} torch threads"
    )
    a = decode_full(codec, torch.randint(0, 2048, (4, 100)), 1)
    b = decode_full(codec, torch.randint(0, 2048, (4, 100)), 1)
    print(f"different tokens: SNR {snr_db(a, b):.1f} dB (how much the tokens change the audio)")
    dec = StreamingDecoder(codec, audio_channels=1)
    print(
        f"defaults: context {dec.context}, lookahead {dec.lookahead} frames, "
        f"crossfade {dec.crossfade} samples, history {dec.history} frames"
    )
    if "1" in args.tables:
        table_streaming(codec, frames=200)
    if "2" in args.tables:
        table_overlap(codec)
    if "3" in args.tables:
        table_fresh(codec)
    if "4" in args.tables:
        table_cost(codec, args.seconds, args.repeats, args.against)
    if "5" in args.tables:
        table_stages(codec, args.seconds, args.repeats)


if __name__ == "__main__":
    main()
