"""The state file: what the radio must remember across a restart or an upgrade.

`StateStore` reads and writes one small JSON document. Writes are atomic (a temp file in the
same folder, fsync, `os.replace`, fsync of the folder), so a crash or a power cut leaves either
the old file or the new one, never half of one. A file that cannot be used (corrupt JSON, not
readable, written by a newer version) is moved aside to `<name>.corrupt-<timestamp>` with one
clear log line and the radio starts fresh: a bad state file never stops the service.

What goes in is the service's business (`radio.restarts` fills it); `StationState` is a typed
record for one station (current prompt, prompt history of `radio.history.PromptRecord`,
settings changed live, next HLS media sequence, the programme director's state) with
`stations_to_state` / `stations_from_state` to put a set of them in and out of the document,
and `StationState.resume_sequence` to restart HLS numbering where no player can have been.

File layout:
    {"version": 1, "saved_at": "2026-11-22T01:50:00+00:00", "state": {...}}
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from radio.history import PromptRecord

log = logging.getLogger(__name__)

STATE_VERSION = 1


class StateStore:
    """Load and atomically save one JSON state document at `path`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, Any]:
        """The saved state; {} when there is none or when the file had to be moved aside."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            self._move_aside(f"cannot be read ({exc.strerror or exc})")
            return {}
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._move_aside(f"is not valid JSON ({exc})")
            return {}
        problem = _check_document(doc)
        if problem:
            self._move_aside(problem)
            return {}
        return doc["state"]

    def save(self, state: Mapping[str, Any]) -> None:
        """Write `state` atomically. Raises OSError (the old file stays as it was) on failure."""
        doc = {
            "version": STATE_VERSION,
            "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "state": state,
        }
        data = json.dumps(doc, ensure_ascii=False, indent=1, sort_keys=True).encode("utf-8")
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                _write_all(f.fileno(), data)
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(folder)

    def _move_aside(self, why: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            os.replace(self.path, aside)
        except OSError as exc:
            log.error(
                "state file %s %s and could not be moved aside (%s); starting with a fresh state",
                self.path,
                why,
                exc.strerror or exc,
            )
            return
        log.error(
            "state file %s %s; moved it to %s and starting with a fresh state",
            self.path,
            why,
            aside.name,
        )

    def _remove_stale_temps(self) -> None:
        """Temp files left by a crash in the middle of an earlier save."""
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()


def _check_document(doc: Any) -> str | None:
    """Why `doc` is not a state document we can use, or None when it is."""
    if not isinstance(doc, dict) or not isinstance(doc.get("state"), dict):
        return "does not hold a state object"
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        return "has no version number"
    if version > STATE_VERSION:
        return f"was written by a newer version of the radio (format {version}, we read {STATE_VERSION})"
    return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass(frozen=True)
class StationState:
    """What one station keeps across a restart."""

    prompt: str = ""  # current prompt
    prompt_since: float | None = None  # when it became current, Unix seconds
    history: tuple[PromptRecord, ...] = ()  # recent prompts, oldest first
    settings: Mapping[str, Any] = field(default_factory=dict)  # settings changed live (JSON values)
    hls_next_sequence: int = 0  # EXT-X-MEDIA-SEQUENCE of the next segment to write
    saved_at: float | None = None  # Unix time this record was taken (for resume_sequence)
    programme: Mapping[str, Any] | None = None  # `Director.to_state()` (checked when restored)

    def resume_sequence(self, now: float, segment_seconds: float) -> int:
        """The media sequence to start from after a restart: never one a player may have seen.

        The service saves now and then, not at every segment, and a crash loses what came
        after the last save; at most one segment per `segment_seconds` can have been published
        since `saved_at`, so skipping that many (plus one) is always safe. Players take a
        forward jump (with the EXT-X-DISCONTINUITY a restart adds); a step back stalls them.
        """
        if self.saved_at is None:
            return self.hls_next_sequence
        elapsed = max(0.0, now - self.saved_at)
        return self.hls_next_sequence + math.ceil(elapsed / segment_seconds) + 1

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "prompt_since": self.prompt_since,
            "history": [{"prompt": h.prompt, "at": h.at, "source": h.source} for h in self.history],
            "settings": dict(self.settings),
            "hls_next_sequence": self.hls_next_sequence,
            "saved_at": self.saved_at,
            "programme": None if self.programme is None else dict(self.programme),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "station") -> StationState:
        """Parse a record; ValueError naming the bad key (`where.key`)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected an object")
        prompt = _typed(data, "prompt", str, "", where)
        since = data.get("prompt_since")
        if since is not None and not _is_number(since):
            raise ValueError(f"{where}.prompt_since: expected a number or null")
        history_raw = _typed(data, "history", list, [], where)
        history = []
        for i, item in enumerate(history_raw):
            if (
                not isinstance(item, Mapping)
                or not isinstance(item.get("prompt"), str)
                or not _is_number(item.get("at"))
            ):
                raise ValueError(f"{where}.history[{i}]: expected {{prompt: str, at: number}}")
            source = item.get("source", "")
            history.append(PromptRecord(item["prompt"], float(item["at"]), str(source)))
        settings = _typed(data, "settings", dict, {}, where)
        seq = _typed(data, "hls_next_sequence", int, 0, where)
        if isinstance(seq, bool) or seq < 0:
            raise ValueError(f"{where}.hls_next_sequence: expected a non-negative integer")
        saved_at = data.get("saved_at")
        if saved_at is not None and not _is_number(saved_at):
            raise ValueError(f"{where}.saved_at: expected a number or null")
        programme = data.get("programme")
        if programme is not None and not isinstance(programme, Mapping):
            raise ValueError(f"{where}.programme: expected an object or null")
        return cls(
            prompt=prompt,
            prompt_since=None if since is None else float(since),
            history=tuple(history),
            settings=settings,
            hls_next_sequence=seq,
            saved_at=None if saved_at is None else float(saved_at),
            programme=programme,
        )


def stations_to_state(stations: Mapping[str, StationState]) -> dict[str, Any]:
    """The document part holding every station, keyed by station id."""
    return {"stations": {sid: st.to_json() for sid, st in stations.items()}}


def stations_from_state(state: Mapping[str, Any]) -> dict[str, StationState]:
    """Station records from a loaded state; a bad record is logged and skipped, not fatal."""
    raw = state.get("stations", {})
    if not isinstance(raw, Mapping):
        log.error("state file: 'stations' is not an object; ignoring it")
        return {}
    out = {}
    for sid, data in raw.items():
        try:
            out[sid] = StationState.from_json(data, where=f"stations.{sid}")
        except ValueError as exc:
            log.error("state file: %s; station %s starts fresh", exc, sid)
    return out


def _typed(data: Mapping[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    value = data.get(key, default)
    if not isinstance(value, kind):
        raise ValueError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
