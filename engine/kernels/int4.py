"""Our int4 weight product (`int4_gemm.h`), built on first use as a small extension of its own.

`linear_int4(x, codes, scales, n)`: x [M, K] float (any M: decode steps and prefills) times
weights packed by `engine.linear.pack_int4` -> float32 [M, n]. It needs AVX2, FMA and F16C (every
x86-64 CPU since 2013-2015; AVX-512 CPUs run the same code). Until the main kernel module
(`cpu.cpp`) builds for AVX2 CPUs, the header is compiled here on its own with those flags; then
its binding moves into `cpu.cpp` and this module goes. `get()` returns the module, or None when
it is not available (the reason is logged once); `ENDLESS_RADIO_KERNELS=0` turns it off as it
does the others. The build (~20 s, once per machine, PyTorch version and source digest) lands in
PyTorch's extension cache. The product releases the GIL.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from types import ModuleType

from engine.extensions import build, source_digest

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("int4.cpp")
_HEADERS = ("int4_gemm.h", "int4_quantize.h", "int4_view.h")  # included by int4.cpp
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
_CPU_FLAGS = ("avx2", "fma", "f16c")
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def unavailable_reason() -> str | None:
    """Why the int4 kernel cannot be used here, or None if it can (before building it)."""
    if os.environ.get("ENDLESS_RADIO_KERNELS", "1") == "0":
        return "ENDLESS_RADIO_KERNELS=0"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "not a Linux CPU (no /proc/cpuinfo)"
    missing = [f for f in _CPU_FLAGS if f not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    return None


def get() -> ModuleType | None:
    """The built int4 module, or None (the reason is logged once)."""
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
        return _state["module"]


def _source_hash() -> str:
    """A digest of the sources (`engine.extensions.source_digest`)."""
    return source_digest(_SOURCE.parent, [_SOURCE.with_name(n) for n in (_SOURCE.name, *_HEADERS)])


def _build() -> ModuleType | None:
    reason = unavailable_reason()
    if reason is None:
        try:
            started = time.monotonic()
            module = build(
                f"endless_radio_int4_{_source_hash()}",
                _SOURCE,
                _FLAGS,
                what="the int4 weight kernel",
                takes="~20 s",
            )
            log.info("int4 weight kernel ready in %.1f s", time.monotonic() - started)
            return module
        except Exception as exc:  # a missing compiler or headers: say so
            reason = f"the build failed ({type(exc).__name__}: {str(exc).strip()[:300]})"
    log.warning("int4 weight kernel not available: %s", reason)
    return None
