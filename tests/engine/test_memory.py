"""`engine.memory.keep_freed_memory`: a large block freed and asked for again reuses its pages
instead of faulting fresh ones in (each test in a process of its own: the setting is global)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Allocate 64 MB, touch it, free it, then count the page faults of doing that again.
REUSE = """
import resource, sys
from engine.memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None

def touched(n):
    block = bytearray(n)
    for i in range(0, n, 4096):
        block[i] = 1
    return block

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

n = 64 * 2**20
block = touched(n)
del block
before = faults()
block = touched(n)
print(kept, faults() - before)
"""

PAGES = 64 * 2**20 // 4096


def run(mode: str) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", REUSE, mode], capture_output=True, text=True, check=True
    )
    kept, faults = done.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_block_is_reused_without_faulting_once_kept() -> None:
    kept, faults = run("keep")
    assert kept == "True"
    assert faults < PAGES // 20, f"{faults} page faults for a reused 64 MB block"
    # and without it the same block faults in again page by page: what the setting saves
    _, faults = run("default")
    assert faults > PAGES // 2, f"only {faults} page faults without keep_freed_memory"


def test_keep_freed_memory_is_idempotent() -> None:
    from engine.memory import keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() == first
