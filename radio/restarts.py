"""What survives a restart: the stations' prompts and history, their programmes, HLS numbering.

Through the state file (`radio.statefile.StateStore`, `server.state_file`): `load_saved` reads it
(a bad file is moved aside by the store, never fatal); `restore` gives each station back its
prompt and history; `director` its programme director (pins, holds, the queue and its votes, a
live schedule edit; a bad record is logged and the director starts fresh); `hls_start_sequence` says where HLS numbering resumes (never on a number a
player may have seen); `keep_saving` writes a snapshot every few seconds and once more at
shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from radio.config import StationConfig
from radio.history import PromptRecord
from radio.hls_output import HlsOutput
from radio.programme.director import Director
from radio.programme_runner import StationProgramme
from radio.statefile import StateStore, StationState, stations_from_state, stations_to_state
from radio.station import Station

log = logging.getLogger(__name__)

SAVE_SECONDS = 5.0  # a crash loses at most this much of prompt history


def open_store(path: str) -> StateStore | None:
    return StateStore(path) if path else None


def load_saved(store: StateStore | None) -> dict[str, StationState]:
    return stations_from_state(store.load()) if store is not None else {}


def hls_start_sequence(saved: StationState | None, segment_seconds: float) -> int:
    return saved.resume_sequence(time.time(), segment_seconds) if saved is not None else 0


def restore(stations: Mapping[str, Station], saved: Mapping[str, StationState]) -> None:
    """Put the saved prompt and history back on each station that still exists."""
    for sid, rec in saved.items():
        st = stations.get(sid)
        if st is None:
            continue
        st.history.clear()
        for h in rec.history:  # oldest first; the station keeps the newest first
            st.history.appendleft(PromptRecord(h.prompt, h.at, h.source or "restore"))
        st.prompt = rec.prompt
        st.prompt_since = rec.prompt_since if rec.prompt_since is not None else time.time()
        log.info("station %s: restored prompt %r from the state file", sid, st.prompt)


def director(sc: StationConfig, saved: StationState | None, clock: Callable[[], float]) -> Director:
    """The station's director, as it was saved when it was (a bad record: logged, fresh)."""
    data = saved.programme if saved is not None else None
    try:
        return Director.from_state(sc, data, clock)
    except ValueError as e:
        log.error("state file: stations.%s.%s; its programme starts fresh", sc.id, e)
        return Director(sc, clock)


def snapshot(
    stations: Mapping[str, Station],
    hls: Mapping[str, HlsOutput],
    programmes: Mapping[str, StationProgramme],
) -> dict[str, Any]:
    now = time.time()
    records = {}
    for sid, st in stations.items():
        out = hls.get(sid)
        prog = programmes.get(sid)
        records[sid] = StationState(
            prompt=st.prompt,
            prompt_since=st.prompt_since,
            history=tuple(reversed(st.history)),
            hls_next_sequence=out.segmenter.next_sequence if out is not None else 0,
            saved_at=now,
            programme=prog.to_state() if prog is not None else None,
        )
    return stations_to_state(records)


async def keep_saving(
    store: StateStore,
    stations: Mapping[str, Station],
    hls: Mapping[str, HlsOutput],
    programmes: Mapping[str, StationProgramme],
) -> None:
    """Save every SAVE_SECONDS and once more when cancelled (shutdown)."""
    failing = False
    try:
        while True:
            await asyncio.sleep(SAVE_SECONDS)
            try:
                await asyncio.to_thread(store.save, snapshot(stations, hls, programmes))
                failing = False
            except OSError as e:
                if not failing:
                    log.error("cannot write the state file %s (%s); will retry", store.path, e)
                failing = True
    finally:
        try:
            store.save(snapshot(stations, hls, programmes))
        except OSError as e:
            log.error("cannot write the state file %s at shutdown (%s)", store.path, e)
