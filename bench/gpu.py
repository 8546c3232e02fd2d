"""One command to verify a GPU: the `gpu` tests, then stations per GPU against `generate`.

    python bench/gpu.py                                  # musicgen-small from the hub (or cache)
    python bench/gpu.py --model /path/to/musicgen-small  # a local folder
    python bench/gpu.py --size small                     # random weights in the exact shape (offline)
    python bench/gpu.py --stations 1,8 --seconds 5       # a quicker look

On a machine without CUDA it says so in one line and exits 0. On one, within a few minutes:

1. runs the tests marked `gpu` (`python -m pytest -q -m gpu` over the files that hold them, in
   one process: CUDA graphs against the eager step, alone and batched);
2. for 1, 8, 32 and 64 stations, renders `--seconds` of audio per station with the engine as
   `radio serve` runs it on a GPU (bfloat16, the compiled static step replayed as a CUDA graph,
   the streaming codec: `read_together`), and the same number of prompts with
   `transformers` `generate` in bfloat16 on the same weights (CFG on, sampling with top-k 250,
   batch = stations);
3. after each count's timed run, starts a transition on one station (a new row layout, as a
   programme's change makes) and reads on through it: the compiles it took (0 expected: the
   step compiled before on air serves every layout) and its slowest chunk of 10 frames;
4. prints one table (decoder steps per second per station, real-time factor per station, the
   engine against `generate`, the peak GPU memory, the transition) and writes it as JSON
   (`--json`, default `gpu-bench.json`), row by row as they come; a count that runs out of GPU
   memory is a row that says so, and the larger ones are skipped.

A station holds real time while its real-time factor is at least 1; the largest count that
does is the stations this GPU carries with these settings.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_engine import PROMPT, model_dir, say  # noqa: E402

FRAME_RATE = 50  # MusicGen's EnCodec: 50 frames per second of audio


def gpu_test_files() -> list[str]:
    """The test files that hold `gpu`-marked tests: only they are collected, so that a module
    needing what a GPU box may lack (a browser, Icecast2) cannot stop the run."""
    tests = sorted((ROOT / "tests").rglob("test_*.py"))
    return [str(p.relative_to(ROOT)) for p in tests if "pytest.mark.gpu" in p.read_text()]


def gpu_test_command() -> list[str]:
    """The `gpu` tests in one process (the project's addopts ask for pytest-xdist's workers,
    which the GPU's tests would share), run from the repository's root."""
    return [sys.executable, "-m", "pytest", "-q", "-o", "addopts=-ra", "-m", "gpu"] + (
        gpu_test_files()
    )


def run_gpu_tests() -> int:
    command = gpu_test_command()
    say(f"gpu tests: {' '.join(command[1:])} ...")
    return subprocess.run(command, cwd=ROOT).returncode


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def bench_engine(model, stations: int, seconds: float) -> dict:
    """Steps per second and RTF per station over `seconds` of audio each, then a transition on
    the first station (its glide rows: a new row layout, as a programme's change makes): the
    compiles it took (0: the step compiled before on air serves it), its slowest chunk of 10
    frames in ms, and the peak memory of the device in GB (None on a CPU)."""
    from torch._dynamo.utils import counters

    from engine import SamplingOptions, WindowOptions, read_together

    device = model.decoder.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prompts = [f"{PROMPT} {i}" for i in range(stations)]
    samplings = [SamplingOptions(seed=i) for i in range(stations)]
    streams = model.open_streams(prompts, samplings, WindowOptions())
    read_together(streams, 10)  # warm-up: compile and capture
    _sync(device)
    frames = round(seconds * FRAME_RATE)
    began = time.perf_counter()
    for _ in range(0, frames, 10):
        read_together(streams, 10)
    _sync(device)
    wall = time.perf_counter() - began
    done = -(-frames // 10) * 10
    graphs = counters["stats"]["unique_graphs"]
    streams[0].set_prompt(f"{PROMPT}, now with bells", transition_seconds=1.0)
    slowest = 0.0
    for _ in range(0, FRAME_RATE + 20, 10):  # the glide and its end
        began = time.perf_counter()
        read_together(streams, 10)
        _sync(device)
        slowest = max(slowest, time.perf_counter() - began)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return {
        "steps_per_s": done / wall,
        "rtf": done / FRAME_RATE / wall,
        "transition_compiles": counters["stats"]["unique_graphs"] - graphs,
        "transition_slowest_chunk_ms": slowest * 1000,
        "peak_memory_gb": peak,
    }


@torch.inference_mode()
def bench_generate(hf, processor, stations: int, seconds: float) -> dict:
    inputs = processor(
        text=[f"{PROMPT} {i}" for i in range(stations)], return_tensors="pt", padding=True
    ).to("cuda")
    kwargs = dict(do_sample=True, guidance_scale=3.0, top_k=250)
    hf.generate(**inputs, **kwargs, max_new_tokens=8)  # warm-up
    steps = round(seconds * FRAME_RATE)
    torch.cuda.synchronize()
    began = time.perf_counter()
    hf.generate(**inputs, **kwargs, max_new_tokens=steps)
    torch.cuda.synchronize()
    wall = time.perf_counter() - began
    frames = steps - hf.decoder.config.num_codebooks + 1
    return {"steps_per_s": steps / wall, "rtf": frames / FRAME_RATE / wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="facebook/musicgen-small", help="hub id or folder")
    parser.add_argument(
        "--size", choices=("small", "tiny"), default=None, help="random weights of this shape"
    )
    parser.add_argument("--stations", default="1,8,32,64", help="station counts, e.g. 1,8,32,64")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio rendered per station")
    parser.add_argument("--skip-tests", action="store_true", help="only the measurements")
    parser.add_argument("--json", default="gpu-bench.json", help="where to write the table")
    args = parser.parse_args()
    try:
        counts = [int(n) for n in args.stations.split(",")]
    except ValueError:
        raise SystemExit(
            f"--stations: a list of counts like 1,8,32,64, got {args.stations!r}"
        ) from None
    if not counts or min(counts) < 1:
        raise SystemExit(f"--stations: counts must be at least 1, got {args.stations!r}")
    if not torch.cuda.is_available():
        say("bench/gpu.py: no CUDA device here (torch.cuda.is_available() is False); nothing to do")
        return 0

    from transformers import AutoProcessor, MusicgenForConditionalGeneration

    from engine import LoadOptions, MusicModel

    tests = 0 if args.skip_tests else run_gpu_tests()
    path = str(model_dir(args.size)) if args.size else args.model
    say(f"loading {path} on {torch.cuda.get_device_name()} ...")
    model = MusicModel.load(LoadOptions(model=path, device="cuda", dtype="bfloat16"))
    hf = MusicgenForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    processor = AutoProcessor.from_pretrained(path)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": path,
        "seconds": args.seconds,
        "gpu_tests_exit_code": tests,
        "rows": [],
    }
    rows = report["rows"]
    for n in counts:
        row: dict = {"stations": n}
        try:
            say(f"{n} station(s): engine, {args.seconds:.0f} s of audio each ...")
            row["engine"] = bench_engine(model, n, args.seconds)
            say(f"{n} station(s): transformers generate, bfloat16 ...")
            row["generate"] = bench_generate(hf, processor, n, args.seconds)
        except torch.cuda.OutOfMemoryError as err:
            first = (str(err).strip().splitlines() or [""])[0]
            row["error"] = f"out of GPU memory: {first}"
            say(f"{n} station(s): {row['error']}; the larger counts are skipped")
        rows.append(row)
        torch.cuda.empty_cache()
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")  # (each row as it comes)
        if "error" in row:
            break

    say("")
    say(
        "| stations | engine steps/s | engine RTF per station | generate steps/s | generate RTF "
        "| engine vs generate | peak GB | a transition: compiles, slowest chunk ms |"
    )
    say("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        e, g = row.get("engine"), row.get("generate")
        ours = f"{e['steps_per_s']:.1f} | {e['rtf']:.2f}" if e else "- | -"
        ref = f"{g['steps_per_s']:.1f} | {g['rtf']:.2f}" if g else "- | -"
        ratio = f"x{e['rtf'] / g['rtf']:.2f}" if e and g else row.get("error", "-")
        peak = f"{e['peak_memory_gb']:.1f}" if e and e["peak_memory_gb"] is not None else "-"
        change = f"{e['transition_compiles']}, {e['transition_slowest_chunk_ms']:.0f}" if e else "-"
        say(f"| {row['stations']} | {ours} | {ref} | {ratio} | {peak} | {change} |")
    holding = [r["stations"] for r in rows if "engine" in r and r["engine"]["rtf"] >= 1.0]
    say(f"stations in real time (RTF >= 1): {max(holding) if holding else 0} of those measured")
    say(f"wrote {args.json}")
    return 1 if tests not in (0, 5) else 0  # 5: pytest collected no gpu tests


if __name__ == "__main__":
    sys.exit(main())
