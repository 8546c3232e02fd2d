"""A station's prompt history: `PromptRecord` (what played from when, and who chose it), and
times written as ISO 8601 for the API.

The live station keeps its records newest first (`radio.station`), the state file oldest first
(`radio.statefile`); both use this one record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a station's history."""

    prompt: str  # the text ("" = unconditional)
    at: float  # when it became current, Unix seconds
    source: str  # who set it: "config", "listener", "admin", "restore" ("" in old state files)

    def to_json(self) -> dict[str, object]:
        return {"prompt": self.prompt, "at": iso(self.at), "source": self.source}


def iso(unix_seconds: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2026-11-22T01:50:00.123Z."""
    t = time.gmtime(unix_seconds)
    ms = int((unix_seconds % 1) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{ms:03d}Z"
