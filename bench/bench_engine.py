"""Engine vs the reference (`transformers` `generate`) on the same random weights, in one run.

    python bench/bench_engine.py                  # musicgen-small shapes (the real cost), ~8 min
    python bench/bench_engine.py --size tiny --seconds 2 --float32-steps 20 --realtime-seconds 3  # CI smoke run
    python bench/bench_engine.py --realtime-only --modes int8,int8-kv4,int4-kv4 --realtime-seconds 60 --hunt-minutes 45
        # issue 15's item 0: the modes in turns, then on until a slow minute (29 GB/s) is caught

Random-weight models are built once into ./models (or $BENCH_MODELS).

Prints steps per second and real-time factor (seconds of audio per second of wall time) for:
the engine end to end (decoder steps, window re-prefills, streaming codec decode) in each
precision mode (int8 weights with an int8 or an int4 KV cache, bfloat16), and `generate` (CFG on, batch 1, sampling with top-k 250) in float32 and bfloat16; the
prefill time of a 500-frame context; the codec's decode cost per second of audio; 1 vs 4
stations batched, over a whole window; a long real-time run of the first mode (60 s of audio,
window restarts included); and the ratios. Absolute times on a shared machine are noise; the ratios are the result.
`--realtime-only` runs the modes in turns with a plain read between turns and ends with each
mode's real-time factor by the plain read around its turns (`--hunt-minutes`: on until some of
them are slow).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine.kernels as kernels  # noqa: E402
import engine.memory as memory  # noqa: E402
from engine import LoadOptions, ModelLoadError, MusicModel, SamplingOptions, WindowOptions  # noqa: E402
from engine.tiny import build_tiny_model  # noqa: E402

PROMPT = "slow rainy-day jazz with a soft piano"
SLOW_READ = 29.0  # GB/s: the issue's slow minute (a plain read at this or less)
PROGRESS_SECONDS = 60.0  # a line of progress this often in the long real-time runs


def say(message: str) -> None:
    print(message, flush=True)


def model_dir(size: str) -> Path:
    path = Path(os.environ.get("BENCH_MODELS", ROOT / "models")) / f"bench-{size}"
    if not (path / "model.safetensors").exists():
        say(f"building random-weight {size} MusicGen in {path} (once) ...")
        build_tiny_model(path, size=size, seed=0)
    return path


@torch.inference_mode()
def bench_generate(path: Path, dtype: str, steps: int) -> dict:
    from transformers import AutoProcessor, MusicgenForConditionalGeneration

    model = MusicgenForConditionalGeneration.from_pretrained(
        path, dtype=getattr(torch, dtype)
    ).eval()
    processor = AutoProcessor.from_pretrained(path)
    inputs = processor(text=[PROMPT], return_tensors="pt", padding=True)
    kwargs = dict(do_sample=True, guidance_scale=3.0, top_k=250)
    model.generate(**inputs, **kwargs, max_new_tokens=4)  # warm-up
    began = time.perf_counter()
    model.generate(**inputs, **kwargs, max_new_tokens=steps)
    seconds = time.perf_counter() - began
    frames = steps - model.decoder.config.num_codebooks + 1
    return {
        "steps_per_s": steps / seconds,
        "rtf": frames / 50 / seconds,
        "wall_s": seconds,
        "steps": steps,
    }


MODES = ("float32", "bfloat16", "int8", "int8-kv4", "int4", "int4-kv4", "int4-ffn")


def load_options(path: Path, mode: str) -> LoadOptions:
    """A precision mode name as load options: "float32", "bfloat16", "int8" (int8 weights, int8
    KV cache: the CPU default), "int8-kv4" (int8 weights, int4 KV cache: heads of 64), "int4"
    (int4 weights, int8 KV cache), "int4-kv4" (int4 weights and cache) or "int4-ffn" (int4
    fc1/fc2, int8 for the rest; int8 KV cache). A quantized cache needs our AVX-512 kernels
    today; without them the cache is float32 (the engine's "auto")."""
    if mode not in MODES:
        raise SystemExit(f"--modes: {mode!r} is not one of {', '.join(MODES)}")
    if mode.startswith("int"):
        quantize, _, kv = mode.partition("-kv")
        return LoadOptions(
            model=str(path),
            device="cpu",
            dtype="float32",
            quantize=quantize,
            kv_cache="int4" if kv == "4" else "auto",
        )
    return LoadOptions(model=str(path), device="cpu", dtype=mode)


def weight_bytes(decoder) -> float:
    """Bytes of projection weights a decode step reads (our packed layouts, or dense)."""
    return decoder.read_per_step()[0]


def kv_bytes_per_position(decoder) -> float:
    """Bytes of self-attention keys and values one decoder row reads per cached position, all
    layers (an int8 cache: 24 layers x 16 heads x 136 B for musicgen-small, int4 half that)."""
    return decoder.read_per_step()[1]


@torch.inference_mode()
def bench_realtime(
    path: Path,
    modes: list[str],
    seconds: float,
    window: WindowOptions,
    cold: bool = False,
    unfolded: bool = False,
    vnni: bool = False,
    small_pages: str = "",
    float32_codec: bool = False,
    hunt_minutes: float = 0.0,
    slow_read: float = SLOW_READ,
    slow_seconds: float = 10.0,
) -> None:
    """The end-to-end real-time run of each mode, the modes taking turns 25 frames at a time
    (with a plain read of 400 MB between turns, this machine's bandwidth meanwhile), so that
    they share whatever a shared machine does; each mode's real-time factor counts its own
    turns' wall time. `cold`: each mode also runs with prefilled window restarts
    (`warm_restarts` off), as "<mode> cold". `unfolded`: each mode also on a model of its own
    whose fused step runs the cross-attention's projections every step instead of reading them
    folded into the text (`Decoder.fold_cross` off), as "<mode> unfolded". `vnni`: where the int8
    products run on AMX tiles, each mode also on a model of its own with them on VNNI (the tiles
    off around its turns), as "<mode> vnni". `small_pages`: each mode also on a model of its own
    whose weights stay in 4 KB pages (`engine.memory.huge_pages` off while it loads), as
    "<mode> 4k", loaded "after" the others or "before" them (in one process the copy loaded
    later has run up to x1.05 faster on a VM with identical weights: the two orders' ratios
    bracket the pages' effect). `float32_codec`: where the settings run the codec's upsampling
    stack in bfloat16, each mode also with a float32 one (on the same model), as "<mode> codec32".

    `hunt_minutes`: after `seconds` of audio, the turns go on (the streams' windows restarting,
    as in a steady stream) until every mode has `slow_seconds` of audio in turns between two
    plain reads of `slow_read` GB/s or less (the issue's slow minute), or that many minutes have
    passed. Every run ends with each mode's real-time factor by the plain read around its turns."""
    small: dict[str, MusicModel] = {}

    def load_small_pages() -> None:
        memory.set_huge_pages(False)
        try:
            for m in modes:
                with contextlib.suppress(ModelLoadError):  # said where the mode itself loads
                    small[m] = MusicModel.load(load_options(path, m))
        finally:
            memory.set_huge_pages(True)

    if small_pages == "before":
        load_small_pages()
    loaded = {}
    for m in modes:
        try:
            loaded[m] = MusicModel.load(load_options(path, m))
        except ModelLoadError as err:  # e.g. an int4 cache on the tiny model's 16-wide heads
            say(f"  {m} skipped: {err}")
    if small_pages == "after":
        load_small_pages()
    runs = {m: (model, window) for m, model in loaded.items()}
    if cold:
        unwarmed = dataclasses.replace(window, warm_restarts=False)
        runs |= {f"{m} cold": (model, unwarmed) for m, model in loaded.items()}
    if unfolded:
        for m in list(loaded):
            model = MusicModel.load(load_options(path, m))
            model.decoder.fold_cross = False
            runs[f"{m} unfolded"] = (model, window)
    amx = kernels.amx_rows()
    if vnni and not amx:
        say("  --vnni-too: the int8 products do not run on AMX tiles here, nothing to compare")
    elif vnni:
        for m in list(loaded):
            runs[f"{m} vnni"] = (MusicModel.load(load_options(path, m)), window)
    for m in loaded:
        if m in small:
            made = loaded[m].decoder.weight_pages.made >> 20
            say(f"  {m}: {made} MB of weights in 2 MB pages, {m} 4k: none ({small_pages})")
            runs[f"{m} 4k"] = (small[m], window)
    codec32 = set()
    if float32_codec:
        for m, model in loaded.items():
            if model.loaded.settings.codec != "bfloat16":
                say(f"  --float32-codec-too: {m}'s codec is {model.loaded.settings.codec} already")
                continue
            runs[f"{m} codec32"] = (model, window)
            codec32.add(f"{m} codec32")
    on_vnni = {label for label in runs if label.endswith(" vnni")}
    models = {label: model for label, (model, _) in runs.items()}
    modes = list(runs)
    streams = {
        label: model.open_stream(PROMPT, SamplingOptions(seed=0), w)
        for label, (model, w) in runs.items()
    }
    for label in codec32:
        streams[label].codec = models[label].new_codec("float32")
    for stream in streams.values():
        stream.read(5)  # warm-up
    data = torch.randn(100_000_000)
    frames = round(seconds * 50)
    wall, reads = dict.fromkeys(modes, 0.0), []
    steps0 = {m: s.tokens.steps for m, s in streams.items()}
    gen0 = {m: s.generate_seconds for m, s in streams.items()}
    dec0 = {m: s.decode_seconds for m, s in streams.items()}
    load = os.getloadavg()[0]
    positions: dict[str, list[float]] = {m: [] for m in modes}  # each turn's mean position
    turns: dict[str, list[tuple[float, int]]] = {m: [] for m in modes}  # each turn's wall, frames
    cross: dict[str, list[tuple[int, bool]]] = {m: [] for m in modes}  # each turn's cross read

    def take_turns(n: int) -> None:
        """Each stream reads n frames, then the plain read."""
        for m, stream in streams.items():
            if m in on_vnni:
                kernels.set_amx_rows(0)
            at, began = stream.tokens.position, time.perf_counter()
            stream.read(n)
            spent = time.perf_counter() - began
            if m in on_vnni:
                kernels.set_amx_rows(amx)
            wall[m] += spent
            turns[m].append((spent, n))
            end = stream.tokens.position
            positions[m].append((at + end) / 2 if end >= at else end / 2)  # (a window restart)
            cross[m].append(stream.tokens.cross_read)
        began = time.perf_counter()
        data.max()
        reads.append(data.nbytes / (time.perf_counter() - began) / 1e9)

    def slow_audio() -> float:
        """The audio seconds each mode made in slow turns (the least of the modes)."""
        slow = slow_turns(reads, slow_read)
        return min(sum(turns[m][i][1] for i in slow) / 50 for m in modes)

    last = time.monotonic()
    for done in range(0, frames, 25):
        take_turns(min(25, frames - done))
        if time.monotonic() - last >= PROGRESS_SECONDS:
            last = time.monotonic()
            say(
                f"  {(done + 25) / 50:.0f} of {frames / 50:.0f} s of audio per mode, "
                f"plain read now {reads[-1]:.1f} GB/s"
            )
    if hunt_minutes > 0:
        say(
            f"hunting a slow minute (plain read {slow_read:.0f} GB/s or less) for up to "
            f"{hunt_minutes:g} min, until each mode has {slow_seconds:g} s of audio in it ..."
        )
        began = last = time.monotonic()
        try:
            while slow_audio() < slow_seconds and time.monotonic() - began < hunt_minutes * 60:
                take_turns(25)
                frames += 25
                if time.monotonic() - last >= PROGRESS_SECONDS:
                    last = time.monotonic()
                    say(
                        f"  {(last - began) / 60:.0f} min: plain read now {reads[-1]:.1f} GB/s "
                        f"(lowest {min(reads):.1f}), {slow_audio():.1f} s of audio in slow turns"
                    )
        except KeyboardInterrupt:  # Ctrl-C ends the hunt, not the run: the figures so far
            for m in modes:  # a round cut short is left out (its steps are still counted)
                del turns[m][len(reads) :], positions[m][len(reads) :], cross[m][len(reads) :]
            frames = sum(n for _, n in turns[modes[0]])
            wall = {m: sum(spent for spent, _ in turns[m]) for m in modes}
            say("  hunt stopped (Ctrl-C): the figures of the rounds so far")
    gbs = sorted(reads)[len(reads) // 2]
    say(f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}; plain read median {gbs:.1f} GB/s")
    for m, stream in streams.items():
        steps = stream.tokens.steps - steps0[m]
        rtf = frames / 50 / wall[m]
        decoder = models[m].decoder
        cross_mb = statistics.mean(b for b, _ in cross[m]) / 1e6
        folded = sum(f for _, f in cross[m]) / len(cross[m])
        step_mb = (weight_bytes(decoder) - decoder.cross_weight_bytes()) / 1e6 + cross_mb
        position = statistics.mean(positions[m])
        kv_mb = kv_bytes_per_position(models[m].decoder) * stream.tokens.rows * position / 1e6
        read_gb = (step_mb + kv_mb) * steps / (frames / 50) / 1e3  # per audio second
        say(
            f"real time, {m}, one station, {frames / 50:.0f} s of audio end to end "
            f"({stream.tokens.prefills} prefills, {stream.tokens.warm_restarts} warm restarts; "
            f"{models[m].decoder.kv_cache} KV cache): "
            f"real-time factor {rtf:.3f}, decoder "
            f"{steps / max(stream.generate_seconds - gen0[m], 1e-9):.1f} steps/s, codec "
            f"{1000 * (stream.decode_seconds - dec0[m]) / (frames / 50):.0f} ms per audio s; "
            f"read per step: weights {step_mb:.3g} MB (cross-attention {cross_mb:.3g} MB, folded "
            f"into the text in {folded:.0%} of the turns) + KV cache {kv_mb:.3g} MB ({stream.tokens.rows}"
            f" rows at mean position {position:.0f}; warm rows not counted), {read_gb:.1f} GB per "
            f"audio s, so {read_gb * rtf:.1f} GB/s read ({read_gb * rtf / gbs:.0%} of the plain read);"
            f" RTF per 10 GB/s of plain read {rtf / gbs * 10:.3f}"
        )
    # the issue's figure on a slow minute: the turns between two plain reads of `slow_read` GB/s
    # or less (slow moments are often shorter than a run)
    slow = slow_turns(reads, slow_read)
    for m in modes:
        if not slow:
            say(f"  {m}: no turn between plain reads of {slow_read:.0f} GB/s or less")
            continue
        spent = sum(turns[m][i][0] for i in slow)
        made = sum(turns[m][i][1] for i in slow) / 50
        say(
            f"  {m}: in the {len(slow)} of {len(reads)} turns between plain reads of "
            f"{slow_read:.0f} GB/s or less ({made:.1f} s of audio): real-time factor "
            f"{made / spent:.3f}"
        )
    say_bands(modes, turns, reads, slow_read)
    if len(modes) > 1:
        first = modes[0]
        for m in modes[1:]:
            say(f"  {m}'s real-time factor: x{wall[first] / wall[m]:.2f} {first}'s (same turns)")


def slow_turns(reads: list[float], slow_read: float) -> list[int]:
    """The rounds of turns between two plain reads of `slow_read` GB/s or less (read i follows
    round i; the first round counts the read after it alone)."""
    return [
        i for i, r in enumerate(reads) if r <= slow_read and (i == 0 or reads[i - 1] <= slow_read)
    ]


def say_bands(
    modes: list[str],
    turns: dict[str, list[tuple[float, int]]],
    reads: list[float],
    slow_read: float,
) -> None:
    """Each mode's real-time factor over its turns grouped by the plain read around them (the
    higher of the reads before and after a round), as a table: how the engine's speed follows
    the machine's bandwidth within one run."""
    edges = [slow_read] + [e for e in (35.0, 45.0) if e > slow_read]
    labels = [f"<= {edges[0]:g}"]
    labels += [f"{a:g}-{b:g}" for a, b in itertools.pairwise(edges)] + [f"> {edges[-1]:g}"]
    around = [max(r, reads[i - 1]) if i else r for i, r in enumerate(reads)]
    band = [sum(a > e for e in edges) for a in around]
    say("")
    say("| mode | " + " | ".join(f"plain read {label} GB/s" for label in labels) + " |")
    say("| --- |" + " --- |" * len(labels))
    for m in modes:
        cells = []
        for b in range(len(labels)):
            rounds = [i for i in range(len(reads)) if band[i] == b]
            if not rounds:
                cells.append("-")
                continue
            spent = sum(turns[m][i][0] for i in rounds)
            made = sum(turns[m][i][1] for i in rounds) / 50
            gbs = statistics.median(around[i] for i in rounds)
            cells.append(
                f"RTF {made / spent:.3f} over {made:.0f} s ({gbs:.1f} GB/s: "
                f"{made / spent / gbs * 10:.3f} per 10 GB/s)"
            )
        say(f"| {m} | " + " | ".join(cells) + " |")


@torch.inference_mode()
def bench_engine(path: Path, mode: str, seconds: float, window: WindowOptions) -> dict:
    model = MusicModel.load(load_options(path, mode))
    stream = model.open_stream(PROMPT, SamplingOptions(seed=0), window)
    stream.read(5)  # warm-up
    frames = round(seconds * model.frame_rate)
    steps_before, began = stream.tokens.steps, time.perf_counter()
    done = 0
    while done < frames:
        stream.read(min(25, frames - done))
        done += min(25, frames - done)
        if done % 250 == 0:
            say(f"  engine: {done / model.frame_rate:.0f} s of audio rendered")
    wall = time.perf_counter() - began
    steps = stream.tokens.steps - steps_before
    return {
        "steps_per_s": steps / max(stream.generate_seconds, 1e-9),
        "rtf": frames / model.frame_rate / wall,
        "wall_s": wall,
        "frames": frames,
        "prefills": stream.tokens.prefills,
        "codec_ms_per_audio_s": 1000 * stream.decode_seconds / (frames / model.frame_rate),
        "model": model,
    }


@torch.inference_mode()
def bench_stations(model: MusicModel, window: WindowOptions, steps: int, counts=(1, 4)) -> dict:
    """Mean decoder step time with N stations batched into one step (2N rows), per N.

    Every station starts where a window restart leaves it (a re-prefilled context of
    `window.context` frames), and the steps cover up to `steps` positions of the window from
    there (the whole window by default): the attention's share of a step grows with the
    position, so a short run at one position would not say what a window costs. The counts
    take turns, 25 steps each, so that they cross the window together and share whatever the
    machine's memory bandwidth does meanwhile (on a shared machine it swings by a third)."""
    tokens, spent = {}, {}
    for n in counts:
        prompts = [f"{PROMPT} {i}" for i in range(n)]
        contexts = [torch.randint(0, 2048, (model.num_codebooks, window.context)) for _ in prompts]
        samplings = [SamplingOptions(seed=i) for i in range(n)]
        streams = model.open_streams(prompts, samplings, window, prompt_frames=contexts)
        tokens[n], spent[n] = streams[0].tokens, 0.0
        tokens[n].generate_until(tokens[n].complete + 1)  # warm-up
    # every step until the window is full, not the re-prefill after it (reported on its own)
    steps = min(steps, *(window.window - t.position for t in tokens.values()))
    first = {n: (t.steps, t.prefills) for n, t in tokens.items()}
    for done in range(0, steps, 25):
        for n in counts:
            began = time.perf_counter()
            tokens[n].generate_until(tokens[n].complete + min(25, steps - done))
            spent[n] += time.perf_counter() - began
    assert all(t.prefills == first[n][1] for n, t in tokens.items()), "a window restart was timed"
    times = {str(n): spent[n] / (tokens[n].steps - first[n][0]) for n in counts}
    for n in counts:
        say(f"  {n} station(s): {times[str(n)] * 1000:.1f} ms per step over {steps} steps")
    return times, steps


def bench_prefill(model: MusicModel, window: WindowOptions) -> float:
    """A whole context's prefill (the first call warms up), as `radio serve` measures it."""
    model.measure_prefill(window)
    return model.measure_prefill(window)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("small", "tiny"), default="small")
    parser.add_argument(
        "--seconds", type=float, default=24.0, help="audio the engine renders (>= 20 s)"
    )
    parser.add_argument(
        "--float32-steps",
        type=int,
        default=150,
        help="steps of the float32 generate run (slow); the --dtype run renders --seconds like the engine",
    )
    parser.add_argument(
        "--dtype", default="bfloat16", help="dtype of the main reference (and the engine)"
    )
    parser.add_argument(
        "--modes",
        default="int8,int8-kv4,bfloat16",
        help="engine precision modes: float32, bfloat16, int8, int8-kv4 (int8 weights, int4 KV "
        "cache; heads of 64), int4 (int4 weights, our AVX2 kernel), int4-kv4, int4-ffn (int4 "
        "fc1/fc2); the first also runs the real-time run",
    )
    parser.add_argument(
        "--station-steps",
        type=int,
        default=1000,
        help="steps of the 1-vs-4-stations comparison (default: a whole window from its restart)",
    )
    parser.add_argument("--window", type=int, default=1500)
    parser.add_argument("--context", type=int, default=500)
    parser.add_argument(
        "--realtime-seconds",
        type=float,
        default=60.0,
        help="audio of the long real-time run of the first mode (several windows; 0 skips it)",
    )
    parser.add_argument(
        "--realtime-only",
        action="store_true",
        help="only the real-time run, of every mode in --modes taking turns, in this fresh "
        "process (no references)",
    )
    parser.add_argument(
        "--cold-too",
        action="store_true",
        help="with --realtime-only: each mode also with prefilled window restarts "
        "(generation.warm_restarts off), taking turns with the warm ones",
    )
    parser.add_argument(
        "--unfolded-too",
        action="store_true",
        help="with --realtime-only: each mode also with the cross-attention's projections run "
        "every step (not folded into the text), taking turns with the folded ones",
    )
    parser.add_argument(
        "--vnni-too",
        action="store_true",
        help="with --realtime-only, where the int8 products run on AMX tiles: each mode also "
        "with them on VNNI, taking turns with the AMX ones",
    )
    parser.add_argument(
        "--small-pages-too",
        nargs="?",
        const="after",
        default="",
        choices=("after", "before"),
        help="with --realtime-only: each mode also with its weights in 4 KB pages (not moved "
        "into 2 MB ones), taking turns with the others; loaded after them (default) or before",
    )
    parser.add_argument(
        "--float32-codec-too",
        action="store_true",
        help="with --realtime-only: where the codec's upsampling stack runs in bfloat16 (model."
        "codec auto on a CPU with AMX or AVX-512 BF16), each mode also with a float32 one, "
        "taking turns with the others on the same model",
    )
    parser.add_argument(
        "--hunt-minutes",
        type=float,
        default=0.0,
        help="with --realtime-only: after --realtime-seconds, go on taking turns for up to this "
        "many minutes until each mode has --slow-seconds of audio in turns between two plain "
        "reads of --slow-read GB/s or less (a slow minute of a shared machine)",
    )
    parser.add_argument(
        "--slow-read",
        type=float,
        default=SLOW_READ,
        help="GB/s: a plain read at this or less is a slow minute (issue 15's 29)",
    )
    parser.add_argument(
        "--slow-seconds", type=float, default=10.0, help="with --hunt-minutes: audio to find"
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    window = WindowOptions(window=args.window, context=args.context)

    path = model_dir(args.size)
    say(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"our CPU kernels: {kernels.isa() or 'none (' + str(kernels.unavailable_reason()) + ')'}"
    )
    results = {}
    if args.realtime_only:
        modes = args.modes.split(",")
        say(f"engine ({', '.join(modes)}): real-time run over {args.realtime_seconds:.0f} s ...")
        bench_realtime(
            path,
            modes,
            args.realtime_seconds,
            window,
            cold=args.cold_too,
            unfolded=args.unfolded_too,
            vnni=args.vnni_too,
            small_pages=args.small_pages_too,
            float32_codec=args.float32_codec_too,
            hunt_minutes=args.hunt_minutes,
            slow_read=args.slow_read,
            slow_seconds=args.slow_seconds,
        )
        return 0
    modes = args.modes.split(",")
    for mode in list(modes):
        say(f"engine ({mode}): rendering {args.seconds:.0f} s of audio end to end ...")
        try:
            run = bench_engine(path, mode, args.seconds, window)
        except ModelLoadError as err:  # e.g. an int4 cache on the tiny model's 16-wide heads
            say(f"  skipped: {err}")
            modes.remove(mode)
            continue
        model = run.pop("model")
        run["prefill_s"] = bench_prefill(model, window)
        run["station_step_s"], run["station_steps"] = bench_stations(
            model, window, args.station_steps
        )
        run["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        del model
        results[f"engine_{mode}"] = run
    first_mode = modes[0]
    if args.realtime_seconds > 0:
        say(f"engine ({first_mode}): real-time run over {args.realtime_seconds:.0f} s of audio ...")
        run = bench_engine(path, first_mode, args.realtime_seconds, window)
        del run["model"]
        results["realtime"] = run
    for dtype in ("float32", args.dtype) if args.dtype != "float32" else ("float32",):
        steps = args.float32_steps if dtype == "float32" else round(args.seconds * 50) + 4
        say(f"transformers generate ({dtype}): {steps} steps ...")
        results[f"generate_{dtype}"] = bench_generate(path, dtype, steps)

    ref = results[f"generate_{args.dtype}"]
    ref32 = results["generate_float32"]
    window_audio_s = (args.window - args.context) / 50
    say("")
    say(
        f"| what ({args.size} shapes, CFG on, batch 1) | steps/s | real-time factor | "
        f"vs generate {args.dtype} | vs generate float32 | prefill {args.context} frames | "
        "prefill / window audio | codec ms per audio s |"
    )
    say("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode in modes:
        r = results[f"engine_{mode}"]
        say(
            f"| engine, {mode}, end to end | {r['steps_per_s']:.1f} | {r['rtf']:.3f} | "
            f"x{r['rtf'] / ref['rtf']:.2f} | x{r['rtf'] / ref32['rtf']:.2f} | "
            f"{r['prefill_s']:.2f} s | {r['prefill_s'] / window_audio_s:.1%} | "
            f"{r['codec_ms_per_audio_s']:.0f} |"
        )
    for dtype in dict.fromkeys(("float32", args.dtype)):
        r = results[f"generate_{dtype}"]
        say(
            f"| transformers generate, {dtype} | {r['steps_per_s']:.1f} | {r['rtf']:.3f} | | | | | |"
        )
    if "realtime" in results:
        r = results["realtime"]
        say("")
        say(
            f"real time, {first_mode}, one station, {r['frames'] / 50:.0f} s of audio end to end "
            f"({r['prefills']} prefills: start and window restarts): real-time factor "
            f"{r['rtf']:.3f}, decoder {r['steps_per_s']:.1f} steps/s, codec "
            f"{r['codec_ms_per_audio_s']:.0f} ms per audio s"
        )
    say("")
    steps = results[f"engine_{modes[0]}"]["station_steps"]
    say(f"Stations batched, mean decoder step over {steps} steps from a window restart:")
    say("")
    say("| mode | decoder step, 1 station | 4 stations in one batched step | 4 vs 1 | peak RSS |")
    say("| --- | --- | --- | --- | --- |")
    for mode in modes:
        r = results[f"engine_{mode}"]
        one, four = r["station_step_s"]["1"], r["station_step_s"]["4"]
        say(
            f"| {mode} | {one * 1000:.1f} ms | {four * 1000:.1f} ms | x{four / one:.2f} | "
            f"{r['peak_rss_gb']:.1f} GB |"
        )
    if args.json:
        results["measured_at"] = datetime.now(UTC).isoformat()
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
