"""Seeding from a clip: what an uploaded file costs to decode and encode, and what encoding it
does to a stream generating at the same time.

    python bench/bench_clip.py                    # musicgen-small shapes (random weights), ~5 min
    python bench/bench_clip.py --size tiny --lengths 1.5 --stream-seconds 1.5 --rounds 1 \
        --repeats 1 --alone-frames 10                                               # smoke run
    python bench/bench_clip.py --tables 1 --threads 1 --lengths 10 --repeats 1    # CPU cost

Random-weight models are built once into ./models (or $BENCH_MODELS), as by bench_engine.py.

Prints two tables:
1. cost of one clip by length (an MP3, 44.1 kHz stereo, for the mono model): PyAV decode and
   resample to 32 kHz, then EnCodec's encoder (a stereo model encodes each side: twice that);
2. a stream's decoder throughput (frames of audio per second of wall time, `AudioStream.read`
   in the calling thread, the radio's generator) alone, and while one clip is encoded in a fresh
   thread with an OpenMP team of its own at nice 0 and +10, and on one thread at nice +10 (what
   `radio.uploads` does), the stream alone measured before and after each; the ratio to alone.
   On a shared machine only the ratios compare (and an oversubscribed one makes torch's
   OpenMP teams thrash: compare on a quiet machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_engine import model_dir, say  # noqa: E402
from engine import LoadOptions, MusicModel  # noqa: E402
from engine.clip import ClipLimits, decode_clip, encode_pcm  # noqa: E402
from radio.uploads import ENCODE_NICE, _lower_priority  # noqa: E402


def mp3_clip(seconds: float) -> bytes:
    """A stereo MP3 of a few chords with a pulse, 44.1 kHz, 192 kbit/s."""
    import io

    rate = 44100
    t = np.arange(round(rate * seconds)) / rate
    pulse = 0.6 + 0.4 * (np.sin(2 * np.pi * 2 * t) > 0)
    chord = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6))
    pcm = (0.15 * pulse * np.stack([chord, np.roll(chord, 300)])).astype(np.float32)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3") as out:
        stream = out.add_stream("libmp3lame", rate=rate, layout="stereo")
        stream.codec_context.bit_rate = 192_000
        frame = av.AudioFrame.from_ndarray(pcm, format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = rate, 0
        resampler = av.AudioResampler(
            format="s16p", layout="stereo", rate=rate, frame_size=1152, threads=1
        )
        for f in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(f):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def table_cost(model: MusicModel, lengths: list[float], repeats: int) -> None:
    say("\n1. cost of one clip (MP3 44.1 kHz stereo -> mono model), median of runs")
    say("| clip | file | decode + resample | EnCodec encode (CPU time) | total | x real time |")
    say("| --- | --- | --- | --- | --- | --- |")
    limits = ClipLimits(max_seconds=30.0)
    for seconds in lengths:
        data = mp3_clip(seconds)
        decode, encode, cpu = [], [], []
        for _ in range(repeats):
            began = time.perf_counter()
            audio = decode_clip(
                data, sample_rate=model.sample_rate, channels=1, hop=model.hop, limits=limits
            )
            decoded, cpu_began = time.perf_counter(), time.process_time()
            encode_pcm(model.musicgen.audio_encoder, audio.pcm)
            encode.append(time.perf_counter() - decoded)
            cpu.append(time.process_time() - cpu_began)
            decode.append(decoded - began)
        d, e, c = statistics.median(decode), statistics.median(encode), statistics.median(cpu)
        say(
            f"| {seconds:g} s | {len(data) / 1e3:.0f} KB | {d * 1e3:.0f} ms | {e:.2f} s "
            f"({c:.2f} s CPU) | {d + e:.2f} s | {seconds / (d + e):.1f} |"
        )
        assert audio.pcm.shape[1] // model.hop == round(seconds * model.frame_rate)


def frames_per_second(stream, until) -> float:
    """Frames of audio `stream` produces per wall second, in reads of 10 frames, until
    `until(frames so far)` is true (at least one read)."""
    began, frames = time.perf_counter(), 0
    while frames == 0 or not until(frames):
        stream.read(10)
        frames += 10
    return frames / (time.perf_counter() - began)


MODES = {  # table 2: how the clip's thread runs -> (niced, single_thread)
    "team of its own, nice 0": (False, False),
    f"team of its own, nice +{ENCODE_NICE}": (True, False),
    f"one thread, nice +{ENCODE_NICE} (the radio's)": (True, True),
}


def rate_while_encoding(
    model: MusicModel, stream, data: bytes, nice: bool, single: bool
) -> tuple[float, float]:
    """(the stream's frames/s, seconds the encode took) while `data` encodes in a fresh thread."""
    done = threading.Event()
    spent: list[float] = []

    def encode() -> None:
        if nice:
            _lower_priority()
        began = time.perf_counter()
        model.encode_clip(data, single_thread=single)
        spent.append(time.perf_counter() - began)
        done.set()

    thread = threading.Thread(target=encode, name="clip-encode")
    thread.start()
    rate = frames_per_second(stream, lambda frames: done.is_set())
    thread.join()
    return rate, spent[0]


def table_stream(model: MusicModel, seconds: float, rounds: int, alone_frames: int) -> None:
    say(
        f"\n2. a stream's throughput while one {seconds:g} s clip encodes in another thread "
        f"(frames/s; {rounds} rounds, the stream alone measured over {alone_frames} frames before "
        "and after each mode; median)"
    )
    data = mp3_clip(seconds)
    stream = model.open_stream("calm lofi beat with piano")
    stream.read(2 * alone_frames)  # warm up: prefill, codec plans
    alone: list[float] = []
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    took: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(rounds):
        modes = list(MODES)[r % len(MODES) :] + list(MODES)[: r % len(MODES)]
        for mode in modes:
            alone.append(frames_per_second(stream, lambda frames: frames >= alone_frames))
            rate, spent = rate_while_encoding(model, stream, data, *MODES[mode])
            rates[mode].append(rate)
            took[mode].append(spent)
        alone.append(frames_per_second(stream, lambda frames: frames >= alone_frames))
    base = statistics.median(alone)
    say("| clip thread | stream frames/s | vs alone | clip encode took |")
    say("| --- | --- | --- | --- |")
    say(f"| alone | {base:.1f} | x1.00 | - |")
    for mode, values in rates.items():
        rate = statistics.median(values)
        say(f"| {mode} | {rate:.1f} | x{rate / base:.2f} | {statistics.median(took[mode]):.1f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "tiny"), default="small")
    parser.add_argument("--lengths", type=float, nargs="+", default=[10.0, 30.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream-seconds", type=float, default=10.0, help="clip of table 2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument("--tables", default="12", help="which tables to print, e.g. 1 or 12")
    parser.add_argument("--alone-frames", type=int, default=50, help="table 2's alone windows")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = MusicModel.load(LoadOptions(model=str(model_dir(args.size))))
    load = os.getloadavg()
    say(f"# bench_clip: {args.size}, {torch.get_num_threads()} torch threads, load {load[0]:.1f}")
    if "1" in args.tables:
        table_cost(model, args.lengths, args.repeats)
    if "2" in args.tables:
        table_stream(model, args.stream_seconds, args.rounds, args.alone_frames)
    say(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
