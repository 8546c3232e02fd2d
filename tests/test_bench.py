"""The benchmarks run (short, on the tiny model) so that they cannot rot."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import require_tool

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, tmp_path: Path, **extra_env: str) -> str:
    env = {
        **os.environ,
        **extra_env,
        "BENCH_MODELS": str(tmp_path),
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONPATH": str(ROOT),  # this checkout's engine/radio, even beside an editable install
    }
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_engine_benchmark_prints_ratios(tmp_path):
    out = _run(
        "bench_engine.py",
        "--size",
        "tiny",
        "--seconds",
        "1",
        "--float32-steps",
        "10",
        "--window",
        "120",
        "--context",
        "60",
        "--realtime-seconds",
        "3",
        tmp_path=tmp_path,
    )
    for row in (
        "engine, int8, end to end",
        "engine, bfloat16, end to end",
        "transformers generate, float32",
    ):
        assert row in out
    assert "4 stations in one batched step" in out and "| x" in out
    assert re.search(r"real time, int8, one station, 3 s of audio end to end \(\d+ prefills", out)


def test_precision_benchmark_prints_the_table(tmp_path):
    out = _run(
        "precision.py", "--size", "tiny", "--steps", "30", "--positions", "40", tmp_path=tmp_path
    )
    for row in (
        "| bfloat16 |",
        "| int8, float32 KV cache |",
        "| int8, int8 KV cache (CPU default) |",
    ):
        assert row in out
    assert re.search(r"guidance off \(float32\): .* mean \d+\.\d+% of their spread", out)


def test_precision_benchmark_without_our_kernels_emulates_int8_and_skips_quantized_caches(tmp_path):
    out = _run(
        "precision.py",
        *("--size", "tiny", "--steps", "10", "--positions", "20", "--modes", "int8"),
        tmp_path=tmp_path,
        ENDLESS_RADIO_KERNELS="0",
    )
    assert "| int8, float32 KV cache (emulated) |" in out
    assert (
        "int8, int8 KV cache (CPU default): skipped (an int8 KV cache is read by our CPU kernels "
        "only: ENDLESS_RADIO_KERNELS=0)"
    ) in out


def test_prompt_change_benchmark_prints_each_kind_of_text_products(tmp_path):
    out = _run("prompt_change.py", "--size", "tiny", "--changes", "2", tmp_path=tmp_path)
    assert "freed memory kept: True" in out
    assert re.search(r"plain read \d+\.\d GB/s before, \d+\.\d after", out)
    rows = re.findall(
        r"^\| (float32|bfloat16|bfloat16-weights) \| (\d+) ms \| (\d+) ms \| (-?\d+) ms \| (\d+) ms \|",
        out,
        re.M,
    )
    assert [r[0] for r in rows] == ["float32", "bfloat16", "bfloat16-weights"], out
    for _, text, prefill, _, whole in rows:
        # the change includes its prefill; its text is timed apart (a second encoding of it, so
        # on a loaded machine the whole may come out under text + prefill: no such check)
        assert int(whole) > 0 and int(whole) >= int(prefill), (text, prefill, whole)
    for kind in ("bfloat16", "bfloat16-weights"):
        assert re.search(rf"^{kind} text products: a change x\d+\.\d\d as fast as", out, re.M)
    assert re.search(r"this machine's own choice: (float32|bfloat16|bfloat16-weights)\)", out)
    # a change's prefill by its rows (the bench asserts each change prefilled that many)
    by_rows = re.findall(r"^\| ([124]) \| (\d+) ms \| (\d+) ms \| (\d+) ms \|$", out, re.M)
    assert [r[0] for r in by_rows] == ["1", "2", "4"], out
    assert by_rows[1][1] == by_rows[1][2] == by_rows[1][3]  # 2 rows: itself
    assert re.search(r"does not grow with the rows, fitted: (-?\d+|nan) row-frames", out)


def test_codec_benchmark_prints_cost_and_stages(tmp_path):
    out = _run(  # A/B against this checkout itself: exercises the --against path
        "bench_codec.py",
        *("--size", "tiny", "--tables", "0456", "--seconds", "1", "--repeats", "1"),
        *("--threads", "1", "--against", str(ROOT)),
        tmp_path=tmp_path,
    )
    assert re.search(r"\| 1 \| 250 \| [\d.]+ \|", out)  # float16 rounding vs float32
    assert "| 1 | 10 (radio) |" in out and "| 2 | 50 |" in out
    assert "LSTM (2 layers, per frame)" in out and "| total |" in out
    assert re.search(r"\| 4 \| \d+ \| \d+ \| [\d.]+ \| [\d.]+ \|", out)  # 4 streams together
    assert re.search(r"128 kbit/s MP3 \(its own encoder\) of the mono stream is [\d.]+ dB", out)


def test_serve_benchmark_listens_and_reports(tmp_path):
    out = _run(
        "bench_serve.py",
        *("--size", "tiny", "--seconds", "6", "--every", "2", "--transition", "2"),
        *("--busy", "1", "--busy-for", "2"),  # a neighbour for its first 2 s
        tmp_path=tmp_path,
    )
    assert "1 busy process(es) beside the radio from now on" in out
    assert "the busy process(es) stopped after 2 s" in out
    assert "| beside | 1 single-threaded busy process(es), the first 2 s |" in out
    assert "| generator real-time factor | median" in out
    assert re.search(r"\| underruns \| \d+ \|", out)
    assert re.search(
        r"\| holds \(a change's first audio late: the old music played on\) \| \d+, [\d.]+ s in all \|",
        out,
    )
    assert re.search(
        r"\| prompt change \| promised [\d.]+ s after the POST, heard after [\d.]+ s", out
    )
    assert re.search(r"\| its prefill \| [\d.]+ s \(2 rows, \d+ frames\) \|", out)
    assert re.search(
        r"\| transition over 2 s \| prefill [\d.]+ s \(3 rows, \d+ frames\), [+-][\d.]+ s "
        r"\([\d.]+x\) against the plain change's; heard after [\d.]+ s",
        out,
    )
    assert re.search(
        r"underruns from the POST to the glide's end: \d+, to the end of the run: \d+", out
    )
    assert re.search(r"^plain read: [\d.]+ GB/s before, [\d.]+ GB/s after$", out, re.MULTILINE)


def test_serve_benchmark_runs_two_stations_with_a_listener_each(tmp_path):
    require_tool("ffmpeg")
    out = _run(
        "bench_serve.py",
        *("--size", "tiny", "--seconds", "6", "--every", "2", "--stations", "2"),
        *("--model-setting", 'quantize="int4"'),  # the fused int4 step, batched, in the radio
        *("--changes", "2"),
        tmp_path=tmp_path,
    )
    assert '| settings | `[model]` quantize="int4", the rest defaults |' in out
    assert "listeners: ffmpeg decoding /main.mp3, /s2.mp3" in out
    assert "| listened | 6 s (an ffmpeg listener on each of the 2 stations) |" in out
    for sid in ("main", "s2"):
        assert re.search(rf"\| {sid} \| [\d.]+, [\d.]+ \| [\d.]+ s, [\d.]+ s \| \d+ \|", out), out
    assert re.search(r"\| total \(2 stations\) \| min [\d.]+ \| min [\d.]+ s \| \d+ \|", out)
    assert re.search(r"^2 stations hold real time: (yes|no)$", out, re.MULTILINE)
    assert re.search(  # main's, as with one station
        r"\| 2 prompt changes \| heard after median [\d.]+ s, max [\d.]+ s \(promised median "
        r"[\d.]+, max [\d.]+\); underruns from the first POST on: \d+, holds \d+ \|",
        out,
    )
    assert re.search(
        r"\| their prefills \| median [\d.]+ s, max [\d.]+ s \(2 rows, 25 frames\)", out
    )


def test_serve_benchmark_finds_the_most_stations_and_tables_every_count(tmp_path):
    """`--find-max`: 1, 2 ... stations, each a `radio serve` of its own, until one fails or
    `--max-stations`; then one row per count run (their figures scroll past in between) and
    the largest count that held."""
    require_tool("ffmpeg")
    out = _run(
        "bench_serve.py",
        *("--size", "tiny", "--seconds", "4", "--every", "2", "--find-max"),
        *("--max-stations", "2"),
        tmp_path=tmp_path,
    )
    table = "| stations | real-time factor: median, min | underruns | plain read before / after | held |"
    assert table in out, out
    rows = re.findall(
        r"^\| (\d) \| [\d.]+, [\d.]+ \| (\d+) \| [\d.]+ / [\d.]+ GB/s \| (yes|no) \|$",
        out,
        re.MULTILINE,
    )
    assert [n for n, _, _ in rows] == ["1", "2"][: len(rows)] and rows, out
    assert all((held == "yes") == (underruns == "0") for _, underruns, held in rows[:-1]), rows
    held = [int(n) for n, _, h in rows if h == "yes"]
    most = max(held, default=0)
    expected = f"at least {most} (--max-stations)" if most == 2 else str(most)
    assert f"largest station count that holds real time: {expected}" in out, out


def test_engine_benchmark_hunts_a_slow_minute(tmp_path):
    """`--hunt-minutes` goes on taking turns until the slow turns hold `--slow-seconds` of
    audio: with every plain read counted slow (`--slow-read 1000`), 1 s of audio becomes 3 s,
    all of it in slow turns, and the bands table puts every turn in its first column (the bands: <= 1000, > 1000)."""
    out = _run(
        "bench_engine.py",
        *("--size", "tiny", "--realtime-only", "--modes", "int8", "--realtime-seconds", "1"),
        *("--hunt-minutes", "5", "--slow-read", "1000", "--slow-seconds", "3"),
        tmp_path=tmp_path,
    )
    assert "real time, int8, one station, 3 s of audio end to end" in out, out
    slow = re.search(
        r"int8: in the (\d+) of (\d+) turns between plain reads of 1000 GB/s or less "
        r"\(3\.0 s of audio\): real-time factor ([\d.]+)",
        out,
    )
    assert slow and slow[1] == slow[2] == "6" and float(slow[3]) > 0, out
    row = re.search(
        r"\| int8 \| RTF ([\d.]+) over 3 s \(([\d.]+) GB/s: [\d.]+ per 10 GB/s\) \| - \|",
        out,
    )
    assert row and row[1] == slow[3], out


def test_engine_benchmark_hunt_ends_on_ctrl_c_with_its_figures(tmp_path):
    """A hunt that finds nothing (`--slow-read 0`) stopped with Ctrl-C (SIGINT) still prints
    every figure of the rounds so far, and exits 0."""
    env = {**os.environ, "BENCH_MODELS": str(tmp_path), "PYTHONPATH": str(ROOT)}
    args = ("--size", "tiny", "--realtime-only", "--modes", "int8", "--realtime-seconds", "1")
    hunt = ("--hunt-minutes", "10", "--slow-read", "0")  # (never slow: only Ctrl-C ends it)
    hunt = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "bench_engine.py"), *args, *hunt],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**env, "TRANSFORMERS_VERBOSITY": "error"},
    )
    assert hunt.stdout is not None
    lines = []
    for line in hunt.stdout:  # the hunt has begun: stop it a moment later
        lines.append(line)
        if line.startswith("hunting a slow minute"):
            break
    time.sleep(2)
    hunt.send_signal(signal.SIGINT)
    out = "".join(lines) + hunt.stdout.read()
    assert hunt.wait(timeout=60) == 0, out
    assert "hunt stopped (Ctrl-C)" in out, out
    made = re.search(r"real time, int8, one station, (\d+) s of audio end to end", out)
    assert made and int(made[1]) > 1, out  # the hunt's rounds counted
    assert re.search(r"\| int8 \| (-|RTF [\d.]+ over \d+ s.*?) \|", out), out


def test_engine_benchmark_realtime_only(tmp_path):
    """Warm and prefilled window restarts taking turns: 6 s of audio cross 2 window restarts
    (window 150, context 40: 107 new frames per window); the cross-attention unfolded and the
    weights in 4 KB pages taking turns as well."""
    out = _run(
        "bench_engine.py",
        *("--size", "tiny", "--realtime-only", "--realtime-seconds", "6", "--cold-too"),
        *("--unfolded-too", "--small-pages-too"),
        *("--window", "150", "--context", "40"),
        tmp_path=tmp_path,
    )
    line = (
        r"real time, int8, one station, 6 s of audio end to end \(1 prefills, (\d+) warm restarts"
    )
    assert (warm := re.search(line, out)) and int(warm.group(1)) >= 2, out
    line = r"real time, int8 cold, one station, 6 s of audio end to end \((\d+) prefills, 0 warm"
    assert (cold := re.search(line, out)) and int(cold.group(1)) >= 3, out
    assert re.search(r"real-time factor [\d.]+", out)
    read = re.search(
        r"read per step: weights ([\d.]+) MB \(cross-attention ([\d.]+) MB, folded into the text "
        r"in (\d+)% of the turns\) \+ KV cache ([\d.]+) MB \(2 rows at mean position "
        r"(\d+);.*\), ([\d.]+) GB per audio s, so ([\d.]+) GB/s read \((\d+)% of the plain",
        out,
    )
    assert read, out
    weights, cross, kv, position = float(read[1]), float(read[2]), float(read[4]), int(read[5])
    assert weights > cross > 0 and kv > 0 and 0 < position < 150  # within a window of 150
    assert float(read[7]) > 0 and 0 < int(read[8]) < 200
    assert re.search(r"int8 cold's real-time factor: x[\d.]+ int8's \(same turns\)", out), out
    slow = (
        r"  int8: (no turn between plain reads of 29 GB/s or less|in the \d+ of \d+ turns "
        r"between plain reads of 29 GB/s or less \([\d.]+ s of audio\): real-time factor [\d.]+)\n"
    )
    assert re.search(slow, out), out
    unfolded = r"real time, int8 unfolded, .* folded into the text in 0% of the turns"
    assert re.search(unfolded, out), out
    assert re.search(r"int8 unfolded's real-time factor: x[\d.]+ int8's \(same turns\)", out)
    assert re.search(r"  int8: \d+ MB of weights in 2 MB pages, int8 4k: none \(after\)\n", out), (
        out
    )
    assert re.search(r"int8 4k's real-time factor: x[\d.]+ int8's \(same turns\)", out), out


def test_kernels_benchmark_prints_each_kernel(tmp_path):
    from engine import kernels

    if kernels.unavailable_reason() is not None:
        pytest.skip(f"our CPU kernels cannot run here: {kernels.unavailable_reason()}")
    out = _run(
        "bench_kernels.py",
        *("--rows", "8", "--layers", "2", "--positions", "64", "--repeat", "1"),
        *("--prefill-rows", "40"),
        tmp_path=tmp_path,
    )
    assert f"our kernels: {kernels.isa()}" in out
    assert re.search(r"plain read of \d+ MB: [\d.]+ GB/s", out)
    assert re.search(
        r"streaming read \(ours, 2 KB ahead into L1\), as many bytes: [\d.]+ GB/s", out
    )
    assert "projections, 2 layers, 8 rows" in out
    for row in ("linear_int8 (ours", "attend_step_q8, int8 cache", "attend_step_q4, int4 cache"):
        assert re.search(re.escape(row) + r".* ms .* GB/s .*% of read", out), row
    assert re.search(r"linear_int8 \(ours\) .* ms .* GMAC/s", out)
    # the radio's cheaper-cache rung: the cache changing kind, into new memory and kept buffers
    assert re.search(
        r"the cache changing kind \(4 rows with the warm ones, every position\): into new "
        r"memory int8 -> int4 \d+ ms, int4 -> int8 \d+ ms; into buffers kept or prepared \d+ / \d+ ms",
        out,
    ), out


def test_clip_benchmark_prints_cost_and_stream_tables(tmp_path):
    out = _run(
        "bench_clip.py",
        *("--size", "tiny", "--lengths", "1.5", "--repeats", "1"),
        *("--stream-seconds", "1.5", "--rounds", "1", "--alone-frames", "10"),
        tmp_path=tmp_path,
    )
    assert re.search(r"\| 1\.5 s \| \d+ KB \| \d+ ms \| [\d.]+ s \([\d.]+ s CPU\) \|", out), out
    for row in (
        "| alone |",
        "| team of its own, nice 0 |",
        "| one thread, nice +10 (the radio's) |",
    ):
        assert row in out, out


def test_gpu_check_says_so_and_exits_0_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: `python bench/gpu.py` runs the real check")
    out = _run("gpu.py", tmp_path=tmp_path)
    assert out.strip() == (
        "bench/gpu.py: no CUDA device here (torch.cuda.is_available() is False); nothing to do"
    )


def test_the_gpu_checks_tests_run_in_one_process_over_the_files_that_hold_them():
    """bench/gpu.py's first part: the `gpu`-marked tests' files (found, not listed by hand) in
    one pytest process without the project's xdist workers. Here, without CUDA, the command
    runs and skips them all; on a GPU box it is what runs them."""
    from bench.gpu import gpu_test_command, gpu_test_files

    files = gpu_test_files()
    assert "tests/engine/test_static_step.py" in files
    assert all("pytest.mark.gpu" in (ROOT / f).read_text() for f in files)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    done = subprocess.run(
        gpu_test_command(), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    import torch

    if not torch.cuda.is_available():
        skipped = re.search(r"\b(\d+) skipped\b", out)
        assert skipped and int(skipped[1]) >= 2 and "deselected" in out, out
        assert "needs a CUDA device" in out, out  # (-ra: each skip's reason)


@pytest.mark.slow
def test_the_gpu_checks_station_run_takes_a_transition_without_a_compile(tiny_model_dir):
    """bench/gpu.py's per-count run, here on the CPU with the step compiled as on a GPU (the
    tiny model): two stations timed, then a transition on one, which compiles nothing."""
    import torch

    from bench.gpu import bench_engine
    from engine import LoadOptions, MusicModel

    model = MusicModel.load(
        LoadOptions(model=tiny_model_dir, device="cpu", dtype="float32", compile="compile")
    )
    torch._dynamo.reset()
    try:
        row = bench_engine(model, 2, 0.4)
    finally:
        torch._dynamo.reset()
    assert row["steps_per_s"] > 0 and row["rtf"] > 0
    assert row["transition_compiles"] == 0, row
    assert row["transition_slowest_chunk_ms"] > 0 and row["peak_memory_gb"] is None


def test_first_sound_benchmark_times_a_fresh_start(tmp_path):
    out = _run("first_sound.py", "--size", "tiny", "--runs", "1", tmp_path=tmp_path)
    times = re.search(r"port open ([\d.]+) s, healthy ([\d.]+) s, first MP3 byte ([\d.]+) s", out)
    assert times, out
    port, healthy, first = (float(t) for t in times.groups())
    assert 0 < port <= healthy <= first
    assert "log: " in out and "on air" in out
    # the phases come from the radio's log times and add up to the first byte (to log rounding)
    phases = re.search(r"where the seconds went \(median\): (.*)", out)
    assert phases, out
    seconds = dict(re.findall(r"(\w+) (-?[\d.]+) s", phases[1]))
    assert list(seconds) == ["imports", "weights", "engine", "listen", "music", "deliver"]
    assert all(float(v) >= 0 for v in seconds.values())
    assert abs(sum(float(v) for v in seconds.values()) - first) < 0.05
    assert re.search(r"start to first sound, tiny shapes, .*: median [\d.]+ s over 1 run", out)


def test_contention_benchmark_prints_each_condition(tmp_path):
    out = _run(
        "contention.py", "--size", "tiny", "--seconds", "1", "--rounds", "1", tmp_path=tmp_path
    )
    for condition in (
        r"quiet, \d+ threads",
        r"quiet, 1 thread",
        r"1 busy process, \d+ threads",
        r"2 busy processes, \d+ threads",
        r"1 busy process, 1 thread",
        r"1 busy process, adaptive",
    ):
        assert re.search(rf"\| {condition} \| [\d.]+ \| x[\d.]+ \|", out), condition
    assert re.search(r"plain read: [\d.]+ GB/s before, [\d.]+ GB/s after", out)


def test_load_benchmark_serves_every_client(tmp_path):
    out = _run("load.py", "--mp3", "20", "--hls", "3", "--seconds", "5", tmp_path=tmp_path)
    assert re.search(r"\| server CPU, no clients \| [\d.]+ cores \|", out)
    assert re.search(r"\| serving cost \(the difference\) \| -?[\d.]+ cores \|", out)
    assert "| MP3 listeners dropped | 0 of 20 |" in out
    fetched, errors = map(
        int, re.search(r"HLS segments fetched / errors \| (\d+) / (\d+)", out).groups()
    )
    assert fetched > 0 and errors == 0
    lagging, stalled = map(int, re.search(r"lagging / stalled .*\| (\d+) / (\d+) \|", out).groups())
    assert lagging <= 1 and stalled == 0  # at most the slow listener (5 s may be too short for it)


def test_soak_benchmark_samples_and_hears_prompts(tmp_path):
    out = _run(
        "soak.py",
        *("--size", "tiny", "--minutes", "0.25", "--every", "3", "--prompt-every", "0.1"),
        tmp_path=tmp_path,
    )
    assert re.search(r"\| RSS first / last / peak sample \| \d+ / \d+ / \d+ MB \|", out)
    assert re.search(r"\| real-time factor, median / min of \d+ samples \| [\d.]+ / [\d.]+ \|", out)
    assert re.search(
        r"\| prompt changes heard, median / max of [1-9]\d* \| [\d.]+ / [\d.]+ s \|", out
    )


def test_timeline_benchmark_reads_stations_across_window_restarts(tmp_path):
    out = _run(
        "timeline.py",
        "--size", "tiny", "--mode", "int8", "--stations", "2", "--seconds", "8",
        "--window", "150", "--context", "40", "--parts",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert re.search(r"real-time factor per station: \d+\.\d{3}", out)
    # where the steps' time went: every part of a layer, the products with their reads
    parts = re.findall(r"^\| ([a-z][^|]*?) \| ([\d.]+) \| ([\d.]+)% \|", out, re.M)
    names = [name for name, _, _ in parts]
    assert {"embeddings", "qkv", "cache writes", "self-attention", "fc1", "fc2", "heads"} <= set(
        names
    )
    assert names.index("qkv") < names.index("self-attention") < names.index("fc2")
    step = float(re.search(r"over \d+ steps \(([\d.]+) ms a step\)", out).group(1))
    assert sum(float(ms) for _, ms, _ in parts) == pytest.approx(step, rel=0.01, abs=0.01)
    assert sum(float(share) for _, _, share in parts) == pytest.approx(100, abs=1)
    assert re.search(
        r"^\| fc1 \| [\d.]+ \| [\d.]+% \| [\d.]+ MB of weights at [\d.]+ GB/s \|", out, re.M
    )
    assert re.search(
        r"^\| self-attention \| [\d.]+ \| [\d.]+% \| [\d.]+ MB of cache at [\d.]+ GB/s \|",
        out,
        re.M,
    )
    assert re.search(r"plain read now .*: [\d.]+ GB/s", out)
    assert re.search(r"streaming read now \(ours, 2 KB ahead into L1\): [\d.]+ GB/s", out)
    assert len(re.search(r"per 2\.5 s: (.*)", out).group(1).split()) == 4
    assert "chunks: median" in out
    # 8 s at 150-frame windows from 40 frames: 2 windows or more per station
    assert int(re.search(r"window starts .*: (\d+)", out).group(1)) >= 2 * 3


def test_no_bench_script_shadows_an_installed_module():
    """`python bench/X.py` puts bench/ first on sys.path, so a script named like a module some
    library imports replaces it there (transformers 5.25 imports the `kernels` package when it is
    installed: bench/kernels.py broke every benchmark until it became bench_kernels.py)."""
    import importlib.util

    bench = (ROOT / "bench").resolve()
    outside = [p for p in sys.path if p and Path(p).resolve() != bench]
    for script in sorted(bench.glob("*.py")):
        if script.stem == "__init__":
            continue
        saved = sys.path[:]
        try:
            sys.path[:] = outside
            spec = importlib.util.find_spec(script.stem)
        finally:
            sys.path[:] = saved
        assert spec is None, f"bench/{script.name} shadows the installed {spec.origin}"


def test_kernel_ab_times_two_builds_in_turns(tmp_path):
    """A copy of the kernels' folder is built as B beside this checkout's A (its own module),
    and every part, the parts of a step (the folded cross-attention among them) and two whole
    streams (one model loaded on each build), prints both medians and B / A; a folder without
    the sources is refused."""
    import shutil

    from engine import kernels

    if kernels.unavailable_reason() is not None:
        pytest.skip(f"our CPU kernels cannot run here: {kernels.unavailable_reason()}")
    b = tmp_path / "kernels"
    shutil.copytree(ROOT / "engine" / "kernels", b)
    out = _run(
        "kernel_ab.py",
        *("--b", str(b), "--layers", "2", "--positions", "64", "--text", "5", "--rounds", "3"),
        *("--build-dir", str(tmp_path / "builds")),  # B's build goes with the test's folder
        *(
            "--parts",
            "int8,int4,attention-q8,attention-q4,folded,stream-int8,stream-int4",
            "--size",
            "tiny",
        ),
        tmp_path=tmp_path,
    )
    names = re.search(r"A: (endless_radio_cpu_\w+) .*, B: (endless_radio_ab_cpu_\w+) ", out)
    assert names and names[1] != names[2], out
    assert list((tmp_path / "builds").glob(f"{names[2]}/*.so")), "B was not built in --build-dir"
    parts = ("int8", "int4", "attention-q8", "attention-q4", "folded", "stream-int8", "stream-int4")
    for part in parts:
        assert re.search(
            rf"\| {part} \| [\d.]+ \| [\d.]+ \| \*\*[\d.]+\*\* \| [\d.]+-[\d.]+ \|", out
        ), out
    refused = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernel_ab.py"), "--b", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
        cwd=ROOT,
    )
    assert refused.returncode != 0
    assert "no cpu.cpp there" in refused.stderr, refused.stderr[-2000:]


def test_attention_step_benchmark_times_the_attention_in_the_step_and_alone(tmp_path):
    out = _run(
        "attention_step.py",
        *("--size", "tiny", "--positions", "100", "--window", "150", "--rounds", "2"),
        tmp_path=tmp_path,
    )
    rounds = re.findall(
        r"^  round \d: a step ([\d.]+) ms, its self-attention ([\d.]+) ms \([\d.]+ GB/s\), "
        r"alone ([\d.]+) ms \([\d.]+ GB/s\)$",
        out,
        re.M,
    )
    assert len(rounds) == 2
    assert all(float(attention) <= float(step) for step, attention, _ in rounds)
    # 2 rows x 100 positions x the tiny model's heads, keys and values with their scales
    medians = re.search(
        r"^medians: a step [\d.]+ ms; the self-attention [\d.]+ ms in it, [\d.]+ ms alone "
        r"\(([\d.]+) MB of cache a step\): x[\d.]+ the time in the step$",
        out,
        re.M,
    )
    decoder = json.loads((tmp_path / "bench-tiny" / "config.json").read_text())["decoder"]
    layers, heads = decoder["num_hidden_layers"], decoder["num_attention_heads"]
    vector = decoder["hidden_size"] // heads + 4  # int8 dims and a float32 scale
    assert float(medians.group(1)) == pytest.approx(
        layers * 2 * heads * 100 * 2 * vector / 1e6, abs=0.005
    )
    with pytest.raises(AssertionError, match="--positions <= --window"):
        _run("attention_step.py", "--size", "tiny", "--positions", "200", "--window", "150",
             tmp_path=tmp_path)  # fmt: skip
