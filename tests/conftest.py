"""Shared fixtures: tiny random-weight models built once per session, and radios on the tiny
model (in-process, or a `radio serve` process shared by a module). What is not a fixture
(starting a radio, talking to it, `require_tool` for real external parts) is tests/helpers.py."""

from __future__ import annotations

import os

# Under pytest-xdist (`-n auto`, the default in pyproject.toml) each worker, and every radio or
# benchmark it starts, decodes with its share of the cores: two workers with two OpenMP threads
# each on two cores would stall each other's every parallel region. Set before torch is imported.
if (_workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))) > 1:
    _share = max(1, len(os.sched_getaffinity(0)) // _workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

# The packed int4 weights' disk cache (engine.int4_cache) of this run only, for every radio and
# benchmark it starts too: tests quantize afresh and leave nothing in the user's cache.
if "ENDLESS_RADIO_CACHE" not in os.environ:
    import tempfile

    os.environ["ENDLESS_RADIO_CACHE"] = tempfile.mkdtemp(prefix="endless-radio-test-cache-")

import pytest  # noqa: E402

from tests.helpers import InProcessRadio, start_radio_serve, wait_healthy  # noqa: E402


def pytest_collection_modifyitems(config, items) -> None:
    """The benchmarks' smoke runs (the longest tests, each its own process) go first, so that
    parallel workers start on them and finish on short tests instead of one waiting for the other.
    Tests marked `gpu` skip on a machine without CUDA (also in CI, which has no GPU)."""
    items.sort(key=lambda item: item.path.name != "test_bench.py")  # stable: the rest keep order
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from engine.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-mono")
    build_tiny_model(path, seed=0)
    return str(path)


@pytest.fixture(scope="session")
def tiny_head64_dir(tmp_path_factory) -> str:
    """The tiny MusicGen with heads of 64 (2 heads of a hidden 128), as every real MusicGen has:
    the int4 KV cache holds only those."""
    from engine.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-head64")
    build_tiny_model(path, seed=0, decoder_config={"hidden_size": 128, "num_attention_heads": 2})
    return str(path)


@pytest.fixture(scope="session")
def tiny_stereo_dir(tmp_path_factory) -> str:
    from engine.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-stereo")
    build_tiny_model(path, stereo=True, seed=1)
    return str(path)


# ---- the radio service: in-process (same model for every test) or as a `radio serve` process --


@pytest.fixture(scope="session")
def radio_model(tiny_model_dir):
    """The tiny MusicGen loaded once (float32 on CPU), shared by the in-process radios."""
    from engine import LoadOptions, MusicModel

    return MusicModel.load(LoadOptions(model=tiny_model_dir, device="cpu", dtype="float32"))


@pytest.fixture
def radio_factory(radio_model):
    """make(faults=None, **sections) -> a running `InProcessRadio` whose config has those
    sections changed, e.g. make(security={"admin_token": "..."}); waits until it is on air;
    closed afterwards. `faults`: a `radio.testing.FaultInjector` the test arms."""
    from radio.config import parse_config

    made: list[InProcessRadio] = []

    def make(faults=None, **sections) -> InProcessRadio:
        data = {"server": {"host": "127.0.0.1"}, **sections}
        data.setdefault("generation", {}).setdefault("seed", 1)
        r = InProcessRadio(parse_config(data, env={}), radio_model, faults=faults)
        made.append(r)
        wait_healthy(r.base_url)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture(scope="module")
def radio_serve_process(tiny_model_dir, tmp_path_factory):
    """A `radio serve` process shared by a test module: yields (Popen, base URL, log path),
    then stops it (a test may already have stopped it, e.g. with SIGINT)."""
    import subprocess

    tmp = tmp_path_factory.mktemp("radio-serve")
    extra = (
        '[generation]\nseed = 3\n[security]\nprompt_rate_limit = "100 per 1 s"\n'
        "[hls]\nsegment_seconds = 1.0\nplaylist_segments = 4\n"
    )
    proc, base_url = start_radio_serve(tiny_model_dir, tmp, extra)
    yield proc, base_url, tmp / "radio-serve.log"
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def radio_serve(radio_serve_process) -> str:
    """The base URL of the module's `radio serve` process."""
    return radio_serve_process[1]
