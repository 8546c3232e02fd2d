"""The state file survives crashes and never stops the radio: round trip, atomic save, a corrupt
or unreadable file moved aside with one log line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from radio import statefile as state_mod
from radio.history import PromptRecord
from radio.statefile import (
    StateStore,
    StationState,
    stations_from_state,
    stations_to_state,
)

OLD = {"stations": {"main": {"prompt": "slow jazz"}}}
NEW = {"stations": {"main": {"prompt": "fast techno " * 10_000}}}


def _aside_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("state.json.corrupt-*"))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "state.json")


def test_missing_file_is_empty_state(tmp_path: Path) -> None:
    assert StateStore(tmp_path / "state.json").load() == {}


def test_round_trip_with_unicode_and_version(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"
    store = StateStore(path)
    stations = {
        "main": StationState(
            prompt='rainy "café" jazz ☔',
            prompt_since=1700000000.5,
            history=(
                PromptRecord("lofi", 1699999000.0, "config"),
                PromptRecord('rainy "café" jazz ☔', 1.5, "listener"),
            ),
            settings={"temperature": 0.8, "top_k": 200},
            hls_next_sequence=1234,
        ),
        "night": StationState(),
    }
    store.save(stations_to_state(stations))
    doc = json.loads(path.read_text("utf-8"))
    assert doc["version"] == state_mod.STATE_VERSION
    assert "saved_at" in doc
    assert stations_from_state(StateStore(path).load()) == stations
    assert _leftovers(path.parent) == []


def test_failure_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch) -> None:
    path = tmp_path / "state.json"
    store = StateStore(path)
    store.save(OLD)
    before = path.read_bytes()

    real_write = os.write

    def half_then_fail(fd: int, data) -> int:
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_mod.os, "write", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        store.save(NEW)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []
    assert store.load() == OLD


def test_process_killed_mid_save_keeps_old_file(tmp_path: Path) -> None:
    """A real crash: the saving process dies after writing half the data, before the rename."""
    path = tmp_path / "state.json"
    StateStore(path).save(OLD)
    script = textwrap.dedent(
        f"""
        import os
        from radio import statefile as state
        real_write = os.write
        def crash(fd, data):
            real_write(fd, bytes(data[: len(data) // 2]))
            os._exit(9)
        state.os.write = crash
        state.StateStore({str(path)!r}).save({NEW!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert proc.returncode == 9
    assert len(_leftovers(tmp_path)) == 1  # the half-written temp file the crash left
    store = StateStore(path)
    assert store.load() == OLD
    store.save(NEW)  # the next save cleans the leftover up
    assert _leftovers(tmp_path) == []
    assert store.load() == NEW


@pytest.mark.parametrize(
    "content, why",
    [
        (b'{"version": 1, "state": {"stations": {"main": {"prom', "is not valid JSON"),
        (b"\xff\xfe garbage", "is not valid JSON"),
        (b'["a", "list"]', "does not hold a state object"),
        (b'{"version": 99, "state": {}}', "newer version"),
    ],
)
def test_corrupt_file_moved_aside_once(tmp_path, caplog, content: bytes, why: str) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    store = StateStore(path)
    with caplog.at_level(logging.ERROR, logger="radio.statefile"):
        assert store.load() == {}
    assert not path.exists()
    [aside] = _aside_files(tmp_path)
    assert aside.read_bytes() == content  # kept for a human to look at
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert why in lines[0] and aside.name in lines[0] and "fresh state" in lines[0]
    store.save(OLD)  # the radio goes on and saves normally
    assert store.load() == OLD


def test_unreadable_file_moved_aside(tmp_path, caplog, monkeypatch) -> None:
    path = tmp_path / "state.json"
    StateStore(path).save(OLD)
    if os.geteuid() == 0:
        # chmod does not stop root: make the read itself fail the way it does for a normal user.
        def denied(self) -> bytes:
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "read_bytes", denied)
    else:
        path.chmod(0)
    with caplog.at_level(logging.ERROR, logger="radio.statefile"):
        assert StateStore(path).load() == {}
    monkeypatch.undo()
    [line] = [r.getMessage() for r in caplog.records]
    assert "cannot be read (Permission denied)" in line
    [aside] = _aside_files(tmp_path)
    assert not path.exists()
    aside.chmod(0o600)
    assert json.loads(aside.read_text())["state"] == OLD


def test_bad_station_record_is_skipped_not_fatal(caplog) -> None:
    state = {
        "stations": {
            "good": {"prompt": "ambient", "hls_next_sequence": 7},
            "bad": {"prompt": "x", "hls_next_sequence": "seven"},
        }
    }
    with caplog.at_level(logging.ERROR, logger="radio.statefile"):
        out = stations_from_state(state)
    assert out == {"good": StationState(prompt="ambient", hls_next_sequence=7)}
    assert "stations.bad.hls_next_sequence" in caplog.text


def test_resume_sequence_never_goes_back() -> None:
    never_timed = StationState(hls_next_sequence=40)
    assert never_timed.resume_sequence(now=1e9, segment_seconds=2.0) == 40
    saved = StationState(hls_next_sequence=40, saved_at=1000.0)
    # clean restart right after the save: one extra step of margin
    assert saved.resume_sequence(now=1000.0, segment_seconds=2.0) == 41
    # crashed 10 s after the last save: up to 5 segments may have gone out since
    assert saved.resume_sequence(now=1010.0, segment_seconds=2.0) == 46
    assert saved.resume_sequence(now=1009.0, segment_seconds=2.0) == 46
    # a clock that went backwards does not make it go back either
    assert saved.resume_sequence(now=900.0, segment_seconds=2.0) == 41
    round_trip = StationState.from_json(saved.to_json())
    assert round_trip == saved
