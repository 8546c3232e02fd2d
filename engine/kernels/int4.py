"""Our int4 weight product (`int4_gemm.h`), built on first use as a small extension of its own.

`linear_int4(x, codes, scales, n)`: x [M, K] float (any M: decode steps and prefills) times
weights packed by `engine.linear.pack_int4` -> float32 [M, n]. It is built for the same variant
as the main kernels (`engine.kernels.VARIANTS`: AVX-512 VNNI where the CPU has it, else AVX2,
FMA and F16C, every x86-64 CPU since 2013-2015), and `ENDLESS_RADIO_KERNELS` chooses or turns it
off as it does them. `get()` returns the module, or None when it is not available (the reason
is logged once). The build (~20 s, once per machine, variant, PyTorch version and source digest)
lands in PyTorch's extension cache. The product releases the GIL. Where the CPU has AMX tiles, the
products of several rows run on them as the main module's do (`engine.kernels.amx_rows`).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import ModuleType

from engine.extensions import source_digest

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("int4.cpp")
_HEADERS = ("common.h", "int4_gemm.h", "int4_quantize.h", "int4_view.h")  # included by int4.cpp
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def unavailable_reason() -> str | None:
    """Why the int4 kernel cannot be used here, or None if it can (before building it)."""
    from engine import kernels

    return kernels.unavailable_reason()


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
    from engine import kernels

    module, reason = kernels.build_best(
        "endless_radio_int4", _SOURCE, _source_hash(), what="the int4 weight kernel", takes="~20 s"
    )
    if module is None:
        log.warning("int4 weight kernel not available: %s", reason)
    else:  # its products take the AMX tiles as the main module's do (which says so in the log)
        kernels.follow_amx(module)
    return module
