"""A station relayed to its Icecast server: the MP3 mount's bytes and the on-air title.

`mount_chunks` takes the station's MP3 as a relay that the listener counts leave out (the MP3 is
encoded once, for everyone); `follow_title` keeps the Icecast metadata equal to what listeners
hear (`PromptTimeline.titles`: it changes when a new prompt is heard, not when it is chosen).
`relay_tasks` starts both for every station with `[stations.icecast]`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from radio.icecast import IcecastSource
from radio.mounts import Mp3Mount
from radio.timing import PromptTimeline

log = logging.getLogger(__name__)


async def mount_chunks(mount: Mp3Mount) -> AsyncIterator[bytes]:
    """The MP3 bytes of a station's mount, taken as an uncounted relay; when the relay falls
    behind and is dropped it joins again (from the mount's burst). Ends when the mount closes."""
    while True:
        listener = mount.add(counted=False)
        try:
            while (data := await listener.next()) is not None:
                yield data
        finally:
            mount.remove(listener)
        if listener.closed or not listener.dropped:
            return  # the mount closed: the station is shutting down
        log.warning("icecast relay fell behind the station's MP3 mount; joining it again")


async def follow_title(source: IcecastSource, timeline: PromptTimeline) -> None:
    """Show the station's on-air title on the Icecast server, now and at every change, until
    cancelled. Never waits for Icecast itself (a slow server must not hold the titles back)."""
    pushes: set[asyncio.Task[None]] = set()
    try:
        async for title in timeline.titles():
            task = asyncio.create_task(source.set_title(title))
            pushes.add(task)
            task.add_done_callback(pushes.discard)
    finally:
        for task in pushes:
            task.cancel()


def relay_tasks(
    sources: dict[str, IcecastSource],
    mounts: dict[str, Mp3Mount],
    timing: dict[str, PromptTimeline],
) -> list[asyncio.Task[None]]:
    """For each station with a source: stream its mount, and keep its title."""
    tasks = []
    for sid, src in sources.items():
        tasks.append(asyncio.create_task(src.run(mount_chunks(mounts[sid])), name=f"icecast-{sid}"))
        tasks.append(
            asyncio.create_task(follow_title(src, timing[sid]), name=f"icecast-title-{sid}")
        )
    return tasks
