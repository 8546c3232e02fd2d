"""The systemd units docs/healing.md gives are well formed, and its health check does what the
page says: nothing while /healthz answers 200, a restart after three failed checks in a row.

The check's shell runs for real with curl against a small HTTP server; only `systemctl restart`
(replaced by writing a file) and the 20 s pauses (0 s) are changed.
"""

from __future__ import annotations

import configparser
import re
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.helpers import require_tool

DOC = Path(__file__).resolve().parent.parent / "docs" / "healing.md"


def units() -> dict[str, configparser.ConfigParser]:
    """docs/healing.md's ```ini block, split at its `# /etc/systemd/system/NAME` comments."""
    block = re.search(r"```ini\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/healing.md has no ```ini block"
    found: dict[str, configparser.ConfigParser] = {}
    for part in re.split(r"^# /etc/systemd/system/", block.group(1), flags=re.M)[1:]:
        name, _, body = part.partition("\n")
        parser = configparser.ConfigParser(interpolation=None, strict=True)
        parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
        parser.read_string(body)
        found[name.split(":")[0].strip()] = parser
    return found


def test_the_units_are_complete() -> None:
    found = units()
    assert set(found) == {"radio.service", "radio-health.service", "radio-health.timer"}
    radio = found["radio.service"]["Service"]
    assert radio["Restart"] == "always"
    assert radio["ExecStart"].split()[1:3] == ["serve", "--config"]
    assert found["radio-health.service"]["Service"]["Type"] == "oneshot"
    timer = found["radio-health.timer"]
    assert timer["Install"]["WantedBy"] == "timers.target"
    assert timer["Timer"]["OnUnitActiveSec"] and timer["Timer"]["OnActiveSec"]


@contextmanager
def healthz(statuses: list[int]) -> Iterator[tuple[str, list[int]]]:
    """A server whose /healthz answers the given statuses in turn (the last one from then on)."""
    answered: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            status = statuses[min(len(answered), len(statuses) - 1)]
            answered.append(status)
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", answered
    finally:
        server.shutdown()


def run_check(base: str, tmp_path: Path) -> bool:
    """Run the health unit's ExecStart; True when it would have restarted the radio."""
    require_tool("curl")
    command = units()["radio-health.service"]["Service"]["ExecStart"]
    shell = re.fullmatch(r"/bin/sh -c '(.*)'", command)
    assert shell, command
    marker = tmp_path / "restarted"
    script = shell.group(1)
    for old, new in (
        ("http://127.0.0.1:8000", base),
        ("sleep 20", "sleep 0"),
        ("systemctl restart radio", f"touch {marker}"),
    ):
        assert old in script, f"the health check no longer contains {old!r}"
        script = script.replace(old, new)
    subprocess.run(["/bin/sh", "-c", script], check=True, timeout=60)
    return marker.exists()


def test_a_healthy_radio_is_left_alone(tmp_path: Path) -> None:
    with healthz([200]) as (base, answered):
        assert not run_check(base, tmp_path)
    assert answered == [200]


def test_one_failed_check_is_not_enough(tmp_path: Path) -> None:
    with healthz([503, 200]) as (base, answered):
        assert not run_check(base, tmp_path)
    assert answered == [503, 200]


def test_three_failed_checks_restart_the_radio(tmp_path: Path) -> None:
    with healthz([503]) as (base, answered):
        assert run_check(base, tmp_path)
    assert answered == [503, 503, 503]
