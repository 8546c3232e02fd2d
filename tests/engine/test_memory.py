"""`engine.memory.keep_freed_memory`: a large block freed and asked for again reuses its pages
instead of faulting fresh ones in, in the main thread and in another one (the radio's generator
thread); each case in a process of its own, since the setting is global."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def _huge_bytes_over(first: int, last: int) -> int:
    """AnonHugePages (bytes) of the mappings in /proc/self/smaps that overlap [first, last)."""
    total, overlaps = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                overlaps = start < last and first < end
            elif overlaps and line.startswith("AnonHugePages:"):
                total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="madvise(MADV_COLLAPSE) is Linux's"
)
def test_huge_pages_move_a_tensors_memory_into_2mb_pages_and_keep_its_values() -> None:
    """What a decoder's packed weights get at load (`Decoder.weight_pages`): the tensor's whole
    2 MB pages become huge pages, as the kernel's own accounting says, with the same values."""
    import torch

    from engine.memory import HUGE_PAGE, huge_pages

    t = torch.arange(8 * 2**20, dtype=torch.int32)  # 32 MB, every page touched
    before = t.clone()
    start = t.untyped_storage().data_ptr()
    first = -(-start // HUGE_PAGE) * HUGE_PAGE
    last = (start + t.untyped_storage().nbytes()) // HUGE_PAGE * HUGE_PAGE
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    small = thp.is_file() and "[madvise]" in thp.read_text()  # (with [always] they may be huge)
    # (the mapping that holds t may hold an earlier test's huge pages beside it: smaps counts a
    # whole mapping's, so what t's pages add is the difference)
    huge_before = _huge_bytes_over(first, last)
    pages = huge_pages([t, t[: 2**20], t[2**20 :]])  # views of one storage: one range
    assert pages.whole == last - first >= 30 * 2**20
    if pages.made == 0:
        pytest.skip(f"this kernel makes no huge pages: {pages.refused}")
    assert (pages.made, pages.refused) == (pages.whole, "")
    if small:  # t's pages were 4 KB: the kernel now counts every one of its 2 MB ones more
        assert _huge_bytes_over(first, last) - huge_before >= pages.made
    else:
        assert _huge_bytes_over(first, last) >= pages.made
    assert torch.equal(t, before)
    again = huge_pages([t])  # already huge: nothing to do, and said so
    assert (again.whole, again.made, again.refused) == (pages.whole, pages.whole, "")


def test_huge_pages_turned_off_or_without_cpu_memory_do_nothing() -> None:
    import torch

    from engine.memory import huge_pages, set_huge_pages

    t = torch.ones(4 * 2**20, dtype=torch.int32)
    set_huge_pages(False)
    try:
        off = huge_pages([t])
    finally:
        set_huge_pages(True)
    assert off.whole > 0 and off.made == 0
    assert "ENDLESS_RADIO_HUGE_PAGES=0" in off.refused
    assert huge_pages([torch.empty(2**24, device="meta")]) == huge_pages([])
    assert huge_pages([]).whole == 0
