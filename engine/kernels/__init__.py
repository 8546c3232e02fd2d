"""Our own CPU kernels for the decode step (`cpu.cpp` and the headers it includes), built on
first use and cached.

A decode step reads every weight and every cached key once and does little maths with them, so
it is bound by memory bandwidth. These kernels reach that bound where PyTorch's general ones do
not for a batch of a few rows (figures: `python bench/kernels.py`):

- `DecodeStepInt8`: a whole decoder step with int8 weights over an int8 KV cache, in one call
  (`decode_step.h`), the CPU default;
- `linear_int8(x, packed, scales)`: x [M, K] times packed int8 weights (`int8_gemm.h`, VNNI),
  any M: decode steps and prefills;
- `attend_step` / `attend_step_q8`: a step's self-attention over a bfloat16 / int8 KV cache
  (`attention.h`), each row at its own position;
- `linear_bf16(x, w)`: x [M <= 8, K] times bfloat16 weights w [N, K] -> float32 [M, N];
- `decode_attention(q, keys, values, lengths, scale)`: one query position per row against a
  bfloat16 KV cache.

They need a C++ compiler and a CPU with AVX-512 BF16 and VNNI. `get()` returns the module, or None
when they are not available, after saying why once in the log; `ENDLESS_RADIO_KERNELS=0` turns
them off. The build (~40 s, once per machine, PyTorch version and source digest) lands in
PyTorch's extension cache (`TORCH_EXTENSIONS_DIR` moves it). The kernels release the GIL.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu.cpp")
_HEADERS = (
    "simd.h",
    "attention.h",
    "int8_gemm.h",
    "decode_step.h",
    "sampling.h",
)  # included by cpu.cpp
_FLAGS = [
    "-O3",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512bf16",
    "-mavx512vnni",
    "-fopenmp",
]
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni")
_lock = threading.Lock()
_state: dict = {}


def unavailable_reason() -> str | None:
    """Why the kernels cannot be used here, or None if they can (before building them)."""
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


def get():
    """The built kernel module, or None (the reason is logged once)."""
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
        return _state["module"]


def _source_hash() -> str:
    """A digest of the kernel sources: PyTorch's build cache does not look at included headers,
    so the module's name changes with them and a changed header is never served stale."""
    digest = hashlib.sha256()
    for name in ("cpu.cpp", *_HEADERS):
        digest.update(_SOURCE.with_name(name).read_bytes())
    return digest.hexdigest()[:12]


def _build():
    reason = unavailable_reason()
    if reason is None:
        try:
            from torch.utils.cpp_extension import load

            started = time.monotonic()
            log.info("building the CPU decode kernels (first run on this machine: ~30 s)")
            module = load(
                name=f"endless_radio_cpu_{_source_hash()}",
                sources=[str(_SOURCE)],
                extra_cflags=_FLAGS,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
            log.info("CPU decode kernels ready in %.1f s", time.monotonic() - started)
            return module
        except Exception as exc:  # a missing compiler or headers: say so, run PyTorch's kernels
            reason = f"the build failed ({type(exc).__name__}: {str(exc).strip()[:300]})"
    log.warning("CPU decode kernels not used: %s; decoding with PyTorch's kernels (slower)", reason)
    return None
