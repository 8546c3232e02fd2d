"""What several test files (and bench/) need: start a radio, talk to it, read what it sends.

- Real external parts: `require_tool` (skips without it, fails in CI).
- A radio: `InProcessRadio` (`init_app` on its own event-loop thread and a free port) and
  `start_radio_serve` (a `radio serve` process); `wait_healthy` waits for /healthz 200.
- Talking to it: `call`, `post_json`, `post_prompt`, `get_json`; reading: `read_exactly`,
  `read_event` (SSE), `IcyReader` (ICY metadata, byte by byte, as a real player reads it).
- Numbers: `snr_db`, `wait_until`.

Start-up waits are generous (`STARTUP_SECONDS`): they return as soon as the radio is up, and a
machine busy with other work may take long to load a model. Waits that measure real time stay
tight in the tests themselves.

No pytest at import time: bench/ imports this module too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from radio.icy import parse_stream_title

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
STARTUP_SECONDS = float(os.environ.get("RADIO_TEST_STARTUP_SECONDS", "180"))


def require_tool(name: str) -> str:
    """Path of an external program; skips without it, except in CI where it must be there."""
    import pytest

    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI but is not installed (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return path


# ---- waiting ----------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll `predicate()` until it is truthy (and return it); AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(every)
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(
    base_url: str, timeout: float = STARTUP_SECONDS, proc: subprocess.Popen | None = None
) -> None:
    """Poll /healthz until it says 200 (the stations are on air)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"radio serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base_url + "/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = e.read().decode(errors="replace")
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise TimeoutError(f"{base_url} not healthy after {timeout} s: {last}")


# ---- a radio -----------------------------------------------------------------------------------


class InProcessRadio:
    """`init_app` served by an AppRunner on its own event-loop thread, on a free port.

    `faults`: a `radio.testing.FaultInjector` the test arms (the generator applies it);
    `programme_clock`: the stations' programme clock (e.g. `radio.testing.ShiftedClock`)."""

    def __init__(
        self, config: Any, model: Any, faults: Any = None, programme_clock: Any = None
    ) -> None:
        from aiohttp import web

        from radio.app import init_app
        from radio.service import RADIO

        clock = {"programme_clock": programme_clock} if programme_clock is not None else {}
        self.app = init_app(config, model=model, faults=faults, **clock)
        self.radio = self.app[RADIO]
        self.faults = faults
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(self.app, shutdown_timeout=2.0, access_log=None)
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"

        async def start() -> None:
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", port).start()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(STARTUP_SECONDS)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the radio's event loop and return its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return fut.result(30)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def serving(
    data: dict[str, Any], model: Any, timeout: float = STARTUP_SECONDS, **options: Any
) -> Iterator[InProcessRadio]:
    """An `InProcessRadio` of the config `data` (a parsed TOML dict), healthy within `timeout`
    seconds, closed after."""
    from radio.config import parse_config

    radio = InProcessRadio(parse_config(data, env={}), model, **options)
    try:
        wait_healthy(radio.base_url, timeout=timeout)
        yield radio
    finally:
        radio.close()


def start_radio_serve(
    model_dir: str, tmp_path: Path, extra_toml: str = ""
) -> tuple[subprocess.Popen, str]:
    """A `radio serve` subprocess on a free port with a temp config (log in
    tmp_path/radio-serve.log); returns (proc, base_url) once it is healthy."""
    port = free_port()
    config = tmp_path / "radio.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nshutdown_seconds = 2.0\n'
        f'[model]\nid = "{model_dir}"\ndevice = "cpu"\ndtype = "float32"\n' + extra_toml
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
        wait_healthy(base_url, proc=proc)
    except BaseException:
        proc.kill()
        proc.wait()
        print((tmp_path / "radio-serve.log").read_text(errors="replace"))
        raise
    return proc, base_url


# ---- talking to it -----------------------------------------------------------------------------


def call(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, parsed JSON body) of one request; an error must be JSON."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        assert e.headers.get_content_type() == "application/json", raw[:200]
        return e.code, e.headers, json.loads(raw)


def post_json(url: str, data: Any, headers: dict | None = None):
    """(status, headers, parsed body) of a POST of `data` (bytes as they are, else JSON)."""
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    return call("POST", url, body, {"Content-Type": "application/json", **(headers or {})})


def post_prompt(base: str, prompt: str, token: str | None = None, station: str = "main") -> dict:
    """The 202 answer to a prompt change (AssertionError for any other status)."""
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    status, _, body = post_json(f"{base}/api/stations/{station}/prompt", {"prompt": prompt}, auth)
    assert status == 202, (status, body)
    return body


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def read_exactly(stream: Any, n: int, timeout: float = 10.0) -> bytes:
    """n bytes from a streaming response (`read1`), failing if it stalls or ends."""
    out = b""
    deadline = time.monotonic() + timeout
    while len(out) < n:
        assert time.monotonic() < deadline, f"stream stalled after {len(out)} of {n} bytes"
        chunk = stream.read1(n - len(out))
        assert chunk, "stream ended"
        out += chunk
    return out


def read_event(stream: Any) -> tuple[str, Any]:
    """The next `event:`/`data:` block of an SSE stream (comments and retry skipped)."""
    name, data = "", None
    while True:
        line = stream.readline().decode()
        assert line, "event stream ended"
        line = line.rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
        elif line == "" and name:
            return name, data


class IcyReader:
    """Byte-level ICY parser: feed(bytes) -> (audio bytes, titles of the full blocks completed)."""

    def __init__(self, metaint: int) -> None:
        if metaint <= 0:
            raise ValueError(f"metaint must be positive, got {metaint}")
        self.metaint = metaint
        self._audio_left = metaint  # audio bytes before the next length byte
        self._meta_left = -1  # metadata bytes still to read; -1 = not inside a block
        self._meta = bytearray()
        self.blocks = 0  # metadata blocks read (L=0 ones included)
        self.audio_bytes = 0  # audio bytes read so far

    def feed(self, data: bytes) -> tuple[bytes, list[str]]:
        audio, titles, i = bytearray(), [], 0
        while i < len(data):
            if self._meta_left < 0 and self._audio_left > 0:
                take = min(self._audio_left, len(data) - i)
                audio += data[i : i + take]
                self._audio_left -= take
                i += take
            elif self._meta_left < 0:  # the length byte
                self._meta_left = 16 * data[i]
                self._meta.clear()
                i += 1
            else:
                take = min(self._meta_left, len(data) - i)
                self._meta += data[i : i + take]
                self._meta_left -= take
                i += take
            if self._meta_left == 0:
                self.blocks += 1
                if self._meta:
                    title = parse_stream_title(bytes(self._meta))
                    if title is not None:
                        titles.append(title)
                self._meta_left = -1
                self._audio_left = self.metaint
        self.audio_bytes += len(audio)
        return bytes(audio), titles


# ---- numbers -----------------------------------------------------------------------------------


def snr_db(ref: np.ndarray, x: np.ndarray) -> float:
    """Signal-to-noise ratio of `x` against `ref`, in dB (about 300 when they are equal)."""
    noise = float(((ref - x) ** 2).sum())
    return 10 * np.log10(float((ref**2).sum()) / max(noise, 1e-30))
