"""Streaming EnCodec decode: accuracy against the one-shot decode, and cost per second of audio.

    python bench/bench_codec.py --threads 1      # musicgen-small-shaped random EnCodec (~4 min)
    python bench/bench_codec.py --size tiny      # the test model's shape (seconds)

Prints four tables:
1. `StreamingDecoder` vs `audio_encoder.decode` of the same tokens (SNR, dB) per chunk size;
2. why it carries the LSTM state: plain overlap decoding (each chunk decoded alone with `ctx`
   frames before and `la` after, trimmed) vs one-shot, SNR by left context x lookahead;
3. a fresh start away from frame 0 (LSTM warmed up from zeros) by `context`;
4. decode cost in ms per second of audio, streamed per chunk size and one-shot.

Random-init EnCodec codebooks are all zeros (the audio would not depend on the tokens), so the
codebooks are filled with N(0, std^2); the "different tokens" line shows how much the tokens
change the audio, the scale against which the SNRs mean something.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
import torch
from transformers import EncodecModel

from engine.codec import HOP, StreamingDecoder, decode_full, freeze_weight_norm
from engine.tiny import _configs


def snr_db(ref: np.ndarray, x: np.ndarray) -> float:
    noise = float(((ref - x) ** 2).sum())
    return 10 * np.log10(float((ref**2).sum()) / max(noise, 1e-30))


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


def _restream(dec: StreamingDecoder, codes: torch.Tensor, bounds: list[int]) -> None:
    dec.reset()
    stream(dec, codes, bounds)


def table_cost(codec, seconds: int, repeats: int) -> None:
    print(f"\n4. decode cost, ms per second of audio ({seconds} s streams, best of {repeats});")
    print("   CPU time of this process (robust on a shared box), wall time in brackets")
    print("| channels | chunk | streamed | one-shot of the same span |")
    print("| --- | --- | --- | --- |")
    frames = seconds * 50

    def best(run) -> str:
        cpu, wall = float("inf"), float("inf")
        for _ in range(repeats):
            c, w = time.process_time(), time.perf_counter()
            run()
            cpu = min(cpu, time.process_time() - c)
            wall = min(wall, time.perf_counter() - w)
        return f"{cpu * 1000 / seconds:.0f} ({wall * 1000 / seconds:.0f})"

    for channels in (1, 2):
        codes = torch.randint(0, 2048, (4 * channels, frames + 10))
        full = best(partial(decode_full, codec, codes[:, :frames], channels))
        for chunk in (10, 25, 50):
            bounds = chunk_bounds(chunk, frames)
            dec = StreamingDecoder(codec, audio_channels=channels)
            streamed = best(partial(_restream, dec, codes, bounds))
            print(f"| {channels} | {chunk} | {streamed} | {full} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "small"), default="small")
    parser.add_argument("--std", type=float, default=None, help="codebook std (default by size)")
    parser.add_argument("--seconds", type=int, default=4, help="stream length for the cost table")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--tables", default="1234", help="which tables to print, e.g. 4")
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
        table_cost(codec, args.seconds, args.repeats)


if __name__ == "__main__":
    main()
