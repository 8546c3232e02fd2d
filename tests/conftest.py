"""Shared fixtures: tiny random-weight models built once per session, and real external parts
(ffmpeg, icecast2, chromium) that skip on a developer's box without them but fail in CI."""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """Path of an external program; skips without it, except in CI where it must be there."""
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI but is not installed (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return path


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` skip on a machine without CUDA (also in CI, which has no GPU)."""
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base_url: str, timeout: float = 60.0, proc=None) -> None:
    """Poll /healthz until it says 200 (the stations are on air)."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"radio serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base_url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = e.read().decode(errors="replace")
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise TimeoutError(f"{base_url} not healthy after {timeout} s: {last}")


@pytest.fixture(scope="session")
def radio_model(tiny_model_dir):
    """The tiny MusicGen loaded once (float32 on CPU), shared by the in-process radios."""
    from engine import LoadOptions, MusicModel

    return MusicModel.load(LoadOptions(model=tiny_model_dir, device="cpu", dtype="float32"))


class InProcessRadio:
    """`init_app` served by an AppRunner on its own event-loop thread, on a free port."""

    def __init__(self, config, model) -> None:
        import asyncio
        import threading

        from aiohttp import web

        from radio.app import init_app
        from radio.context import RADIO

        self.app = init_app(config, model=model)
        self.radio = self.app[RADIO]
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(self.app, shutdown_timeout=2.0, access_log=None)
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"

        async def start() -> None:
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", port).start()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)

    def call(self, fn, *args):
        """Run fn(*args) on the radio's event loop and return its result."""
        import concurrent.futures

        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return fut.result(10)

    def close(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def radio_factory(radio_model):
    """make(**sections) -> a running `InProcessRadio` whose config has those sections changed,
    e.g. make(security={"admin_token": "..."}); waits until it is on air; closed afterwards."""
    from radio.config import parse_config

    made: list[InProcessRadio] = []

    def make(**sections) -> InProcessRadio:
        data = {"server": {"host": "127.0.0.1"}, **sections}
        data.setdefault("generation", {}).setdefault("seed", 1)
        r = InProcessRadio(parse_config(data, env={}), radio_model)
        made.append(r)
        wait_healthy(r.base_url, timeout=30)
        return r

    yield make
    for r in made:
        r.close()


def start_radio_serve(tiny_model_dir: str, tmp_path, extra_toml: str = ""):
    """A `radio serve` subprocess on a free port with a temp config; returns (proc, base_url)."""
    import subprocess
    import sys

    port = free_port()
    config = tmp_path / "radio.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nshutdown_seconds = 2.0\n'
        f'[model]\nid = "{tiny_model_dir}"\ndevice = "cpu"\ndtype = "float32"\n' + extra_toml
    )
    log = open(tmp_path / "radio-serve.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "radio.cli", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, timeout=60, proc=proc)
    except BaseException:
        proc.kill()
        proc.wait()
        print((tmp_path / "radio-serve.log").read_text(errors="replace"))
        raise
    return proc, base_url


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
