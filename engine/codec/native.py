"""The codec's C++ kernels (`codec_kernels.cpp` and the headers beside it: the float16 LSTM, the
ELU), built on first use and cached, like `engine.kernels` but needing only AVX2, FMA and F16C.

`get()` returns the module, or None when it can not be used here (the reason logged once):
`ENDLESS_RADIO_KERNELS=0`, a CPU without those instructions, or a failed build. The build (~20 s,
once per machine, PyTorch version and source digest) lands in PyTorch's extension cache
(`TORCH_EXTENSIONS_DIR` moves it). The kernels release the GIL.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from types import ModuleType

from engine import kernels
from engine.extensions import build, source_digest

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("codec_kernels.cpp")
_HEADERS = ("codec_simd.h", "lstm_f16.h")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
_CPU_FLAGS = ("avx2", "fma", "f16c")
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def unavailable_reason() -> str | None:
    """Why the kernel can not be used here, or None if it can (before building it)."""
    if os.environ.get("ENDLESS_RADIO_KERNELS", "1") == "0":
        return "ENDLESS_RADIO_KERNELS=0"
    flags = kernels.cpu_flags()
    if flags is None:
        return "not a Linux CPU (no /proc/cpuinfo)"
    missing = [f for f in _CPU_FLAGS if f not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    return None


def get() -> ModuleType | None:
    """The built kernel module, or None (the reason is logged once)."""
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
                f"endless_radio_codec_{_source_hash()}",
                _SOURCE,
                _FLAGS,
                what="the codec kernels",
                takes="~30 s",
            )
            log.info("codec kernels ready in %.1f s", time.monotonic() - started)
            return module
        except Exception as exc:  # a missing compiler or headers: say so, run PyTorch's ops
            errors = [line for line in str(exc).splitlines() if "error:" in line]  # the compiler's
            detail = (errors[0] if errors else str(exc)).strip()[:300]
            reason = f"the build failed ({type(exc).__name__}: {detail})"
    log.warning("codec kernels not used: %s; decoding with PyTorch's ops (slower)", reason)
    return None
