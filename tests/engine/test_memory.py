"""`engine.memory.keep_freed_memory`: a large block freed and asked for again reuses its pages
instead of faulting fresh ones in, in the main thread and in another one (the radio's generator
thread); each case in a process of its own, since the setting is global."""

from __future__ import annotations

import subprocess
import sys

import pytest

# In the main thread or a thread started after the setting: with one block held, allocate
# another, touch it, free it, then count the page faults of doing that again. In a thread of
# its own the second 40 MB block takes a heap of its own (glibc's per-thread heaps are 64 MB),
# which glibc unmaps once wholly free unless every thread shares the main heap.
REUSE = """
import resource, sys, threading
from engine.memory import keep_freed_memory
mode, where = sys.argv[1:]
kept = keep_freed_memory() if mode == "keep" else None
N = 40 * 2**20

def touched(n):
    block = bytearray(n)
    for i in range(0, n, 4096):
        block[i] = 1
    return block

def reuse(out):
    held = touched(N)  # (the thread's first heap is now too full for another block)
    block = touched(N)
    del block
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    block = touched(N)
    out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

out = []
if where == "thread":
    t = threading.Thread(target=reuse, args=(out,))
    t.start()
    t.join()
else:
    reuse(out)
print(kept, out[0])
"""

PAGES = 40 * 2**20 // 4096


def run(mode: str, where: str) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", REUSE, mode, where], capture_output=True, text=True, check=True
    )
    kept, faults = done.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("where", ["main", "thread"])
def test_a_freed_block_is_reused_without_faulting_once_kept(where: str) -> None:
    kept, faults = run("keep", where)
    assert kept == "True"
    assert faults < PAGES // 20, f"{faults} page faults for a reused 40 MB block ({where})"
    # and without it the same block faults in again page by page: what the setting saves
    _, faults = run("default", where)
    assert faults > PAGES // 2, f"only {faults} page faults without keep_freed_memory ({where})"


def test_keep_freed_memory_is_idempotent() -> None:
    from engine.memory import keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() == first


FREEZE = """
import gc
from engine.memory import freeze_long_lived
kept = [[i] for i in range(200_000)]  # long-lived containers, as a loaded model's
tracked = len(gc.get_objects())
frozen = freeze_long_lived()
print(tracked, frozen, len(gc.get_objects()), kept[-1][0])
"""


def test_long_lived_objects_leave_the_collectors_passes() -> None:
    """After `freeze_long_lived` a full collection no longer walks the objects alive before it
    (musicgen-small loaded: 400k of them, 141 ms a pass holding the GIL); they stay usable."""
    done = subprocess.run(
        [sys.executable, "-c", FREEZE], capture_output=True, text=True, check=True
    )
    tracked, frozen, left, last = (int(x) for x in done.stdout.split())
    assert tracked > 200_000 and frozen >= 200_000
    assert left < 1_000, f"{left} objects still in the collector's generations"
    assert last == 199_999


# Blocks of a size the heap has no room for yet, after `warm_heap` (or not): a 48 MB block and
# another beside it must come from memory never touched before unless the reserve was.
WARM = """
import resource, sys
from engine.memory import keep_freed_memory, warm_heap
mode = sys.argv[1]
kept = keep_freed_memory() if mode != "default" else False
steps = sum(1 for _ in warm_heap(96 * 2**20, 8 * 2**20)) if mode != "cold" else 0
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
blocks = [bytearray(48 * 2**20) for _ in range(2)]  # (zeroed by calloc's memset: touched)
print(kept, steps, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_warm_heap_serves_new_blocks_without_faulting() -> None:
    """`warm_heap` touches its reserve a slice per step, then frees it into the kept heap: two
    48 MB blocks of a size not seen before then take no fresh pages; without it they fault
    every page in; where freed memory is not kept it does nothing (glibc would unmap it)."""

    def run(mode: str) -> tuple[str, int, int]:
        out = subprocess.run(
            [sys.executable, "-c", WARM, mode], capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0], int(out[1]), int(out[2])

    pages = 2 * 48 * 2**20 // 4096
    kept, steps, faults = run("warm")
    assert kept == "True" and steps == 12
    assert faults < pages // 20, f"{faults} page faults after warm_heap"
    _, steps, faults = run("cold")
    assert steps == 0 and faults > pages // 2, f"only {faults} page faults without warm_heap"
    _, steps, _ = run("default")  # (freed memory not kept: the reserve would go back at once)
    assert steps == 0
