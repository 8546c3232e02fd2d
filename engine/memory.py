"""The process's memory: freed memory kept, so that work which comes now and then does not
fault; a model's weights in 2 MB pages.

glibc gives large blocks back to the kernel when they are freed (those above its mmap
threshold, 128 KB rising to at most 32 MB as such blocks come and go, and the free top of its
heaps), and on a virtual machine whose balloon or reclaim hands free guest pages back to the
host, touching such memory again is slow: a prompt change's 42 MB of folded cross-attention
(musicgen-small, a 27-token text) took 120-230 ms to allocate on the 2-core Zen 4 VM against
1 ms once reused, and set_prompt 340-460 ms against ~170. The radio runs the same shapes over
and over (a prompt change, a window restart, a chunk), so once a size has been freed the next
one of it reuses those pages.

`keep_freed_memory()` tells glibc to serve every block from its heaps, every thread from the
main one (a thread's own heaps, 64 MB each, are unmapped once wholly free: in `radio serve`
the generator thread's prompt changes took 2700-4200 page faults each, 0.1-0.2 s, until it
shared the main heap), and to give back only a free top larger than `TRIM_BYTES`. Call it
before the process starts threads (`radio serve` does, first thing; a thread that has a heap
of its own keeps it). Memory then stays near the process's peak instead of dipping between
prompt changes (`radio serve`'s resident memory was the same 4.0-4.4 GB over 90 s with it as
without). No-op where the C library is not glibc.

`warm_heap()` touches a reserve of heap memory and frees it, a slice at a time (the radio's
generator runs it in its idle time once its stations are open): the heap still grows now and
then as blocks of new sizes come and go (a prompt change's text of a new length: musicgen-small
grew it by 12-36 MB, 3,000-9,000 page faults, a change of 0.2-0.4 s instead of ~0.1 s, twice in
24 changes), and on this VM a fresh page of a process this large costs ~30 us to fault in (128
MB took 0.96 s). With 128 MB touched beforehand, 38 changes in a row faulted none; once int4
weights (~200 MB) were prepared, the next change faulted 2,900 pages again, hence a new
reserve after them.

`huge_pages(tensors)` moves the memory of tensors that a decode step streams (a model's packed
weights) into the kernel's 2 MB pages (`madvise(MADV_COLLAPSE)`, Linux 6.1 on): a step reads
every weight once, ~330 MB for musicgen-small int8, and in 4 KB pages that is ~80,000 pages a
step, each a TLB miss whose page walk (two-dimensional under a hypervisor) comes before the
bytes. On the 2-core Intel Xeon VM, one station x1.01-1.03 faster with int8 weights, x1.03-1.04
with int4 weights and cache (docs/kernels.md, "Weights in 2 MB pages"). glibc's heap is 4 KB
pages unless asked (`transparent_hugepage` set to `madvise`, the usual default). `ENDLESS_RADIO_HUGE_PAGES=0` (or `set_huge_pages(False)`) leaves
them in small pages, for comparisons.

`freeze_long_lived()` takes the objects alive now (a loaded model and the radio around it:
~400k for musicgen-small) out of the garbage collector's full passes, which otherwise walk
them all while holding the GIL: 141 ms each with musicgen-small loaded (one ran within 90 s of
`radio serve`), 0.0 ms once they are frozen. `radio serve` calls it once it is built.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import gc
import logging
import os
import resource
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

TRIM_BYTES = 512 * 2**20  # a free heap top larger than this still goes back to the kernel
WARM_BYTES = 128 * 2**20  # `warm_heap`'s reserve
WARM_SLICE = 8 * 2**20  # ... touched a slice per step (~60 ms where a fault costs ~30 us)

HUGE_PAGE = 2 * 2**20  # x86-64's and arm64's (4 KB base pages) transparent huge page
MADV_COLLAPSE = 25  # Linux 6.1 (asm-generic/mman-common.h)
MERGE_GAP = 64 * 2**10  # tensors this close are one range (the allocator's headers between)

_kept = False
_huge_pages = os.environ.get("ENDLESS_RADIO_HUGE_PAGES", "1") != "0"


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and keep what is freed (glibc `mallopt`); True when
    set (now or before), False where the C library has no such settings."""
    global _kept
    if _kept:
        return True
    libc = _glibc()
    if libc is None:
        log.debug("freed memory goes back to the system as the C library decides (not glibc)")
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_BYTES))
    if not all(libc.mallopt(key, value) for key, value in settings):
        log.debug("glibc refused the mallopt settings: freed memory goes back as it decides")
        return False
    _kept = True
    log.debug("freed memory stays in the process (up to %d MB of free heap top)", TRIM_BYTES >> 20)
    return True


def warm_heap(total: int = WARM_BYTES, step: int = WARM_SLICE) -> Iterator[None]:
    """Touch `total` bytes of heap, `step` bytes per item of the iterator (each item takes the
    block, touches its next slice and frees it: between items the memory is free for whatever
    needs it): the pages stay in the process (`keep_freed_memory`) for the blocks that come
    later. Nothing to
    do (an empty iterator) unless freed memory is kept: glibc would hand the block back. Call
    once the process's long-lived memory is in place (a model's weights, the streams), and again
    after more is allocated for good (the radio's int4 weights): that takes the reserve's
    pages."""
    libc = _glibc() if _kept else None
    if libc is None or total <= 0:
        return
    libc.malloc.argtypes, libc.malloc.restype = (ctypes.c_size_t,), ctypes.c_void_p
    libc.free.argtypes, libc.free.restype = (ctypes.c_void_p,), None
    for offset in range(0, total, step):
        # the whole block is taken for each slice and freed at once (the same place comes back
        # while nothing took it meanwhile): held between the slices, it was memory a window
        # restart could not have, and two stations' first one faulted 40,000 fresh pages
        block = libc.malloc(total)
        if not block:
            return
        try:
            ctypes.memset(block + offset, 0, min(step, total - offset))
        finally:
            libc.free(block)
        yield
    log.debug("%d MB of heap touched ahead of need", total >> 20)


def page_faults() -> int:
    """Minor page faults of the calling thread so far (0 where the system does not count them
    per thread): fresh memory touched, what makes work that comes now and then slow here."""
    try:
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    except (AttributeError, OSError):  # (RUSAGE_THREAD is Linux's)
        return 0


@functools.cache  # (find_library runs ldconfig: ~2 ms, and the int4 set asks a layer at a time)
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def freeze_long_lived() -> int:
    """Leave the objects alive now out of every later collection (`gc.freeze`: they are still
    freed by their reference counts); returns how many are frozen."""
    gc.collect()  # what is garbage now is not frozen with the rest
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug(
        "%d objects (the model, the radio) left out of the garbage collector's passes", frozen
    )
    return frozen


@dataclass(frozen=True)
class HugePages:
    """What `huge_pages` did: `whole` bytes of whole 2 MB pages lay within the tensors' memory,
    `made` of them are now huge pages; `refused`: why the others are not (empty when none)."""

    whole: int
    made: int
    refused: str = ""


def set_huge_pages(on: bool) -> None:
    """Whether `huge_pages` does anything (default: on unless ENDLESS_RADIO_HUGE_PAGES=0)."""
    global _huge_pages
    _huge_pages = on


def huge_pages(tensors: Iterable[torch.Tensor]) -> HugePages:
    """Move the memory of `tensors` (CPU ones; others are skipped) into 2 MB pages now: their
    storages' address ranges, merged where they lie within MERGE_GAP of each other, each
    range's whole 2 MB pages collapsed (`madvise(MADV_COLLAPSE)`: the kernel copies them into
    huge pages, contents unchanged; a page already huge costs nothing). A range's head and tail
    beyond its whole pages stay small. Never raises: where the system cannot (not Linux, a
    kernel before 6.1, huge pages off, memory not anonymous), `refused` says why."""
    ranges = sorted(
        {
            (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            for t in tensors
            if t.device.type == "cpu" and t.untyped_storage().nbytes() > 0
        }
    )
    merged: list[list[int]] = []
    for start, size in ranges:
        if merged and start <= merged[-1][1] + MERGE_GAP:
            merged[-1][1] = max(merged[-1][1], start + size)
        else:
            merged.append([start, start + size])
    pages = [
        (first, last)
        for first, last in (
            (-(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE)
            for start, end in merged
        )
        if last > first
    ]
    whole = sum(last - first for first, last in pages)
    if not _huge_pages:
        return HugePages(whole, 0, "turned off (ENDLESS_RADIO_HUGE_PAGES=0)")
    madvise = _madvise()
    if madvise is None:
        return HugePages(whole, 0, "only Linux's glibc has madvise(MADV_COLLAPSE)")
    made, refused = 0, set()
    for first, last in pages:
        if madvise(first, last - first, MADV_COLLAPSE) == 0:
            made += last - first
        else:
            code = ctypes.get_errno()
            refused.add(_COLLAPSE_ERRORS.get(code, os.strerror(code)))
    return HugePages(whole, made, "; ".join(sorted(refused)))


_COLLAPSE_ERRORS = {
    errno.EINVAL: "the kernel does not collapse this memory (Linux before 6.1, "
    "transparent huge pages set to never, or memory mapped from a file)",
    errno.ENOMEM: "no free 2 MB pages (memory too fragmented)",
    errno.EAGAIN: "the kernel was busy with the pages (try again later)",
    errno.EPERM: "not permitted here",
}


def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = _glibc()
    if libc is None:
        return None
    fn = libc.madvise
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn
