"""Streaming EnCodec decode: accuracy against the one-shot decode, and cost per second of audio.

    python bench/bench_codec.py --threads 1      # musicgen-small-shaped random EnCodec (~4 min)
    python bench/bench_codec.py --size tiny      # the test model's shape (seconds)
    python bench/bench_codec.py --threads 2 --tables 45 --repeats 7   # cost and where it goes
    git worktree add /tmp/main main     # or: git archive main | tar -x -C /tmp/main
    python bench/bench_codec.py --tables 4 --against /tmp/main   # A/B with another checkout

The codec is prepared as the engine runs it (weight norm frozen, LSTM recurrent weights rounded
to float16: `engine.codec.prepare_codec`); a copy keeps the original float32 LSTM weights.
Prints six tables:
0. what rounding the LSTM weights to float16 costs: one-shot decode of the rounded codec vs
   the original float32 one, SNR dB;
1. `StreamingDecoder` vs `audio_encoder.decode` of the same tokens and weights (SNR, dB) per
   chunk size, LSTM float16 and float32;
2. why it carries the LSTM state: plain overlap decoding (each chunk decoded alone with `ctx`
   frames before and `la` after, trimmed) vs one-shot, SNR by left context x lookahead;
3. a fresh start away from frame 0 (LSTM warmed up from zeros) by `context`;
4. decode cost in ms per second of audio, streamed (LSTM float16, the default, and float32;
   and the upsampling stack in bfloat16, `model.codec` auto on a CPU with AMX) at the
   radio's chunk size and at 10/25/50 frames, and one-shot; the SNR of the
   float32-stack and bfloat16-stack streams against the one-shot decode; and, for scale, how
   far the radio's own 128 kbit/s MP3 of the mono stream is from it; `--against DIR` adds the streamed cost of another
   checkout's `StreamingDecoder` (DIR holds its `engine/`; an older single-file
   `engine/codec.py` may be given too) on the original float32 weights, measured interleaved
   with this one in the same process: on a shared machine only such side-by-side figures
   compare;
5. where a streamed second goes at the radio's chunk size: wall ms per stage;
6. stations on one codec: 1, 2 and 4 mono streams at the radio's chunk size decoded together
   (`decode_together`) vs each alone, wall ms per second of audio per station; and together
   with the upsampling stack in bfloat16.

Random-init EnCodec codebooks are all zeros (the audio would not depend on the tokens), so the
codebooks are filled with N(0, std^2); the "different tokens" line shows how much the tokens
change the audio, the scale against which the SNRs mean something.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import io
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import av
import numpy as np
import torch
from transformers import EncodecModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.codec import (  # noqa: E402
    HOP,
    StreamingDecoder,
    decode_full,
    decode_together,
    prepare_codec,
)
from engine.tiny import _configs  # noqa: E402
from radio.config import GenerationConfig  # noqa: E402
from radio.encoders import Mp3Encoder  # noqa: E402
from tests.helpers import snr_db  # noqa: E402

RADIO_CHUNK = round(GenerationConfig().chunk_for(1) * 50)  # frames per AudioStream.read()
LSTMS = ("float16", "float32")  # the engine's default (rounded LSTM weights), the original


def build_codec(size: str, std: float, *, lstm_float16: bool) -> EncodecModel:
    """A random EnCodec as `MusicModel` runs it: weight norm frozen (else every conv recomputes
    its weight on every call), LSTM weights rounded to float16 unless `lstm_float16` is off."""
    torch.manual_seed(0)
    codec = EncodecModel(_configs(size, False)[1]).eval()
    with torch.no_grad():
        for layer in codec.quantizer.layers:
            layer.codebook.embed.normal_(0.0, std)
    prepare_codec(codec, lstm_float16=lstm_float16)
    return codec


def table_rounding(codecs: dict, frames: int = 250) -> None:
    print(
        "\n0. LSTM weights rounded to float16 vs the original float32: SNR dB of the LSTM's "
        "output (top layer, before the skip) and of the one-shot decode"
    )
    print("| channels | frames | LSTM output | audio |")
    print("| --- | --- | --- | --- |")
    for channels in (1, 2):
        codes = torch.randint(0, 2048, (4 * channels, frames))
        lstm = [_lstm_output(codecs[name], codes[:4]) for name in ("float32", "float16")]
        ref = decode_full(codecs["float32"], codes, channels)
        out = decode_full(codecs["float16"], codes, channels)
        print(f"| {channels} | {frames} | {snr_db(*lstm):.1f} | {snr_db(ref, out):.1f} |")


@torch.inference_mode()
def _lstm_output(codec, codes: torch.Tensor) -> np.ndarray:
    """The decoder LSTM's output for mono codes [K, T] (embeddings, first conv, LSTM)."""
    x = codec.decoder.layers[0](codec.quantizer.decode(codes[:, None]))  # [1, D, T]
    return codec.decoder.layers[1].lstm(x.permute(2, 0, 1))[0].numpy()  # [T, 1, D]


def stream(dec: StreamingDecoder, codes: torch.Tensor, bounds: list[int]) -> np.ndarray:
    out = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        offset = max(0, start - dec.context)
        out.append(dec.decode(codes[:, offset : stop + dec.lookahead], offset, start, stop))
    return np.concatenate(out, axis=1)


def chunk_bounds(chunk: int | list[int], frames: int) -> list[int]:
    sizes = chunk if isinstance(chunk, list) else [chunk] * (frames // chunk)
    return [0, *np.cumsum(sizes).tolist()]


def table_streaming(codecs: dict, frames: int) -> None:
    print("\n1. StreamingDecoder vs one-shot of the same weights (SNR dB)")
    print("| LSTM | channels | chunk | frames | SNR |")
    print("| --- | --- | --- | --- | --- |")
    irregular = [1, 7, 30, 3, 50, 13, 2, 64, 20, 10]  # 200 frames
    for lstm, codec in codecs.items():
        for channels in (1, 2):
            codes = torch.randint(0, 2048, (4 * channels, frames + 10))
            ref = decode_full(codec, codes, channels)
            for chunk in (10, 25, 50, irregular):
                bounds = chunk_bounds(chunk, frames)
                dec = StreamingDecoder(codec, audio_channels=channels)
                out = stream(dec, codes, bounds)
                name = "irregular 1..64" if isinstance(chunk, list) else chunk
                snr = snr_db(ref[:, : out.shape[1]], out)
                print(f"| {lstm} | {channels} | {name} | {bounds[-1]} | {snr:.1f} |")


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
    """`StreamingDecoder` of another checkout (for A/B runs): DIR holding its `engine/`, or a
    single-file `engine/codec.py`. The other `engine` package is imported under its own name
    for the time of the import, then this checkout's modules are put back."""
    if path.endswith(".py"):
        spec = importlib.util.spec_from_file_location("codec_against", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module.StreamingDecoder
    if not (Path(path) / "engine" / "codec").exists() and not (Path(path) / "engine").exists():
        raise SystemExit(f"--against {path}: no engine/ there")
    ours = {name: m for name, m in sys.modules.items() if name.split(".")[0] == "engine"}
    for name in ours:
        del sys.modules[name]
    sys.path.insert(0, str(Path(path).resolve()))
    try:
        return importlib.import_module("engine.codec").StreamingDecoder
    finally:
        sys.path.pop(0)
        for name in [n for n in sys.modules if n.split(".")[0] == "engine"]:
            del sys.modules[name]
        sys.modules.update(ours)


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


def table_cost(codecs: dict, seconds: int, repeats: int, against: str | None) -> None:
    print(
        f"\n4. decode cost, wall ms per second of audio ({seconds} s streams, median of "
        f"{repeats} interleaved repeats; CPU ms of the process in brackets), SNR of the "
        "float16 stream vs one-shot of the same weights (float32 and bfloat16 upsampling)"
    )
    other = _load_decoder_class(against) if against else None
    head = (
        "| channels | chunk | streamed | LSTM float32 | ratio | bfloat16 stack | ratio | "
        "one-shot | SNR dB | bfloat16 stack SNR dB |"
    )
    if other:
        head += f" {Path(against).name} (float32) | ratio |"
    print(head)
    print("| --- " * (head.count("|") - 1) + "|")
    frames = seconds * 50
    codec = codecs["float16"]
    mono = np.zeros(0, np.float32)  # a mono stream's audio, for the MP3's scale
    for channels in (1, 2):
        codes = torch.randint(0, 2048, (4 * channels, frames + 10))
        ref = decode_full(codec, codes, channels)[:, : frames * HOP]
        for chunk in sorted({RADIO_CHUNK, 10, 25, 50}):
            bounds = chunk_bounds(chunk, frames)
            dec = StreamingDecoder(codec, audio_channels=channels)
            streamed = stream(dec, codes, bounds)
            snr = snr_db(ref, streamed)
            if channels == 1:
                mono = streamed[0]  # the MP3's scale, below
            dec32 = StreamingDecoder(codecs["float32"], audio_channels=channels)
            bf16 = StreamingDecoder(codec, audio_channels=channels, upsample_dtype=torch.bfloat16)
            snr_bf16 = snr_db(ref, stream(bf16, codes, bounds))
            runs = {
                "streamed": partial(_restream, dec, codes, bounds),
                "float32": partial(_restream, dec32, codes, bounds),
                "bfloat16": partial(_restream, bf16, codes, bounds),
                "one-shot": partial(decode_full, codec, codes[:, :frames], channels),
            }
            if other:
                old = other(codecs["float32"], audio_channels=channels)
                runs["against"] = partial(_restream, old, codes, bounds)
            cost = _cost(runs, seconds, repeats)
            cells = {n: f"{cost[n][1]:.0f} ({cost[n][0]:.0f})" for n in runs}
            name = f"{chunk} (radio)" if chunk == RADIO_CHUNK else str(chunk)
            ratio = cost["streamed"][1] / cost["float32"][1]
            ratio_bf16 = cost["bfloat16"][1] / cost["streamed"][1]
            row = (
                f"| {channels} | {name} | {cells['streamed']} | {cells['float32']} | "
                f"{ratio:.2f} | {cells['bfloat16']} | {ratio_bf16:.2f} | {cells['one-shot']} | "
                f"{snr:.1f} | {snr_bf16:.1f} |"
            )
            if other:
                row += f" {cells['against']} | {cost['streamed'][1] / cost['against'][1]:.2f} |"
            print(row)
    print(
        f"for scale: the radio's 128 kbit/s MP3 (its own encoder) of the mono stream is "
        f"{mp3_snr(mono):.1f} dB from it"
    )


def mp3_snr(audio: np.ndarray, sample_rate: int = 32000) -> float:
    """SNR (dB) of the radio's 128 kbit/s MP3 of `audio` [N] against it, decoded by FFmpeg and
    aligned by correlation (raw MP3 frames carry no delay header)."""
    audio = (audio / np.abs(audio).max() * 0.5).astype(np.float32)  # room below full scale
    encoder = Mp3Encoder(sample_rate, 1, 128)
    data = encoder.encode(audio[None]) + encoder.flush()
    with av.open(io.BytesIO(data), format="mp3") as container:
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]
    decoded = np.concatenate(frames).astype(np.float64)
    decoded = np.concatenate([decoded, np.zeros(max(0, len(audio) + 3000 - len(decoded)))])
    edge = len(audio) // 8  # the encoder's first and last (padded) frames left out
    part = audio[edge:-edge].astype(np.float64)
    delay = max(
        range(3000), key=lambda d: float(np.dot(part, decoded[edge + d : d - edge + len(audio)]))
    )
    return snr_db(part, decoded[edge + delay : len(audio) - edge + delay])


def _timed_stages(dec: StreamingDecoder, spent: collections.Counter) -> None:
    """Wrap the decoder's stages to add their wall time to `spent` (private internals: this is
    a measurement, not an API)."""

    def timed(name: str, fn):
        def run(*args, **kwargs):
            began = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[name] += time.perf_counter() - began
            return out

        return run

    dec._first_conv = timed("codebook embeddings + first conv", dec._first_conv)
    dec._lstm.run = timed("LSTM (2 layers, per frame)", dec._lstm.run)
    layers = dec._upsample.layers
    for i, layer in enumerate(layers):
        layers[i] = timed(f"upsampling {i:2d}: {type(layer).__name__}", layer)


def table_stages(codecs: dict, seconds: int, repeats: int) -> None:
    """Wall time per stage of a mono stream at the radio's chunk size, LSTM float16 and
    float32, interleaved."""
    print(
        f"\n5. where a streamed second goes: {RADIO_CHUNK}-frame calls, mono, wall ms per "
        f"second of audio (median of {repeats} interleaved repeats)"
    )
    frames = seconds * 50
    codes = torch.randint(0, 2048, (4, frames + 10))
    bounds = chunk_bounds(RADIO_CHUNK, frames)
    per: dict = {lstm: collections.defaultdict(list) for lstm in codecs}
    decoders = {}
    for lstm, codec in codecs.items():
        spent: collections.Counter = collections.Counter()
        decoders[lstm] = StreamingDecoder(codec, audio_channels=1), spent
        _timed_stages(*decoders[lstm])
    for round_ in range(repeats + 1):
        for lstm, (dec, spent) in decoders.items():
            dec.reset()
            spent.clear()
            began = time.perf_counter()
            stream(dec, codes, bounds)
            total = time.perf_counter() - began
            if round_:
                for name, t in spent.items():
                    per[lstm][name].append(t)
                per[lstm]["rest (crossfade, copies, Python)"].append(total - sum(spent.values()))
                per[lstm]["total"].append(total)
    names = list(per["float16"])
    print("| stage | " + " | ".join(f"LSTM {lstm}: ms / s of audio | share" for lstm in per) + " |")
    print("| --- " * (1 + 2 * len(per)) + "|")
    for name in names:
        cells = []
        for lstm in per:
            ms = statistics.median(per[lstm][name])
            cells.append(
                f"{ms * 1000 / seconds:.1f} | {ms / statistics.median(per[lstm]['total']):.0%}"
            )
        print(f"| {name} | " + " | ".join(cells) + " |")


def _stream_together(decoders: list, codes: list, bounds: list[int]) -> None:
    for dec in decoders:
        dec.reset()
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        offset = max(0, start - decoders[0].context)
        end = stop + decoders[0].lookahead
        decode_together(
            [
                (d, c[:, offset:end], offset, start, stop)
                for d, c in zip(decoders, codes, strict=True)
            ]
        )


def table_together(codec, seconds: int, repeats: int) -> None:
    print(
        f"\n6. N mono streams decoded together at {RADIO_CHUNK}-frame chunks: wall ms per second "
        f"of audio per station (median of {repeats} interleaved repeats)"
    )
    print(
        "| streams | together | each alone | ratio | per station vs 1 stream alone | together, "
        "bfloat16 stack | vs float32 together |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    frames = seconds * 50
    bounds = chunk_bounds(RADIO_CHUNK, frames)
    base = None
    for n in (1, 2, 4):
        codes = [torch.randint(0, 2048, (4, frames + 10)) for _ in range(n)]
        together = [StreamingDecoder(codec, audio_channels=1) for _ in range(n)]
        alone = [StreamingDecoder(codec, audio_channels=1) for _ in range(n)]
        bf16 = [
            StreamingDecoder(codec, audio_channels=1, upsample_dtype=torch.bfloat16)
            for _ in range(n)
        ]

        def each_alone(alone=alone, codes=codes):
            for dec, c in zip(alone, codes, strict=True):
                _restream(dec, c, bounds)

        runs = {
            "together": partial(_stream_together, together, codes, bounds),
            "alone": each_alone,
            "bfloat16": partial(_stream_together, bf16, codes, bounds),
        }
        cost = _cost(runs, seconds * n, repeats)  # per second of one station's audio
        base = base or cost["alone"][1]
        print(
            f"| {n} | {cost['together'][1]:.0f} | {cost['alone'][1]:.0f} | "
            f"{cost['together'][1] / cost['alone'][1]:.2f} | {cost['together'][1] / base:.2f} | "
            f"{cost['bfloat16'][1]:.0f} | {cost['bfloat16'][1] / cost['together'][1]:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "small"), default="small")
    parser.add_argument("--std", type=float, default=None, help="codebook std (default by size)")
    parser.add_argument("--seconds", type=int, default=4, help="stream length for the cost table")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--tables", default="0123456", help="which tables to print, e.g. 45")
    parser.add_argument(
        "--against", default=None, help="another checkout (its root) to A/B with in table 4"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    std = args.std if args.std is not None else (30.0 if args.size == "tiny" else 1.0)
    codecs = {lstm: build_codec(args.size, std, lstm_float16=lstm == "float16") for lstm in LSTMS}
    codec = codecs["float16"]
    dec = StreamingDecoder(codec, audio_channels=1)
    print(
        f"EnCodec {args.size}-shaped, random weights, codebook std {std}, "
        f"{torch.get_num_threads()} torch threads, LSTM float16 kernel: {dec.lstm_float16}"
    )
    a = decode_full(codec, torch.randint(0, 2048, (4, 100)), 1)
    b = decode_full(codec, torch.randint(0, 2048, (4, 100)), 1)
    print(f"different tokens: SNR {snr_db(a, b):.1f} dB (how much the tokens change the audio)")
    print(
        f"defaults: context {dec.context}, lookahead {dec.lookahead} frames, "
        f"crossfade {dec.crossfade} samples, history {dec.history} frames"
    )
    if "0" in args.tables:
        table_rounding(codecs)
    if "1" in args.tables:
        table_streaming(codecs, frames=200)
    if "2" in args.tables:
        table_overlap(codec)
    if "3" in args.tables:
        table_fresh(codec)
    if "4" in args.tables:
        table_cost(codecs, args.seconds, args.repeats, args.against)
    if "5" in args.tables:
        table_stages(codecs, args.seconds, args.repeats)
    if "6" in args.tables:
        table_together(codec, args.seconds, args.repeats)


if __name__ == "__main__":
    main()
