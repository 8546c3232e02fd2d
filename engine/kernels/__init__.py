"""Our own CPU kernels for the decode step (`cpu.cpp` and the headers it includes), built on
first use for the instruction set this CPU has, and cached.

A decode step reads every weight and every cached key once and does little maths with them, so
it is bound by memory bandwidth. These kernels reach that bound where PyTorch's general ones do
not for a batch of a few rows (figures: `python bench/bench_kernels.py`, docs/kernels.md):

- `DecodeStepInt8`: a whole decoder step with int8 or int4 weights (per projection) over an int8
  or int4 KV cache, in one call (`decode_step.h`), the CPU default; its weights come by name
  (`DecoderLayer`, `Projection`, `LayerNorm`);
- `linear_int8(x, packed, scales)`: x [M, K] times packed int8 weights, exact int32 sums, any M:
  decode steps and prefills;
- `attend_step` / `attend_step_q8` / `attend_step_q4`: a step's self-attention over a bfloat16 /
  int8 / int4 KV cache, each row at its own position;
- `linear_bf16(x, w)`: x [M <= 8, K] times bfloat16 weights w [N, K] -> float32 [M, N];
- `decode_attention(q, keys, values, lengths, scale)`: one query position per row against a
  bfloat16 KV cache;
- `sample_top_k`: guidance, top-k, temperature and the draws of N streams.

Two builds of the same sources (`VARIANTS`), each ISA's kernels in its own folder (`avx512/`,
`avx2/`; `isa.h` picks one): AVX-512 BF16 + VNNI where the CPU has it, else AVX2 + FMA + F16C
(Zen 2/3, Intel client CPUs), else none. `get()` returns the module, or None when no variant can
run, after saying why once in the log; `isa()` names the variant that runs.
`ENDLESS_RADIO_KERNELS=0` turns them off, `=avx2` (or `=avx512`) asks for that variant. The
AVX-512 build runs the int8 and int4 products of several rows on AMX tiles where the CPU has them
(Xeon Sapphire Rapids and later: `amx_rows()`; `ENDLESS_RADIO_AMX=0` turns that off, a number
sets the rows from which they run). The
build (~40 s, once per machine, variant, PyTorch version and source digest) lands in PyTorch's
extension cache (`TORCH_EXTENSIONS_DIR` moves it). The kernels release the GIL.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from engine.extensions import build, source_digest

log = logging.getLogger(__name__)

_FOLDER = Path(__file__).parent
_SOURCE = _FOLDER / "cpu.cpp"  # the one translation unit; it includes every header below
_COMMON_FLAGS = ("-O3", "-fopenmp")


@dataclass(frozen=True)
class Variant:
    """One build of the kernels."""

    name: str  # in the module's name, the log, `isa()`, ENDLESS_RADIO_KERNELS and -DER_ISA_<NAME>
    cpu_flags: tuple[str, ...]  # what /proc/cpuinfo must list for it to run
    cflags: tuple[str, ...]  # the compiler's instruction-set flags

    def compile_flags(self) -> list[str]:
        return [*_COMMON_FLAGS, *self.cflags, f"-DER_ISA_{self.name.upper()}"]


VARIANTS = (  # best first
    Variant(
        "avx512",
        # the int4 products are written with AVX2, FMA and F16C in both builds (int4_gemm.h),
        # and -mavx512f implies AVX2 but neither FMA nor F16C
        ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx2", "fma", "f16c"),
        (
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512bf16",
            "-mavx512vnni",
            "-mavx2",
            "-mfma",
            "-mf16c",
        ),  # fmt: skip
    ),
    Variant("avx2", ("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c")),
)
# The int8 products of this many rows or more go on AMX tiles where the CPU has them
# (avx512/amx.h), the int4 ones from 3 (int4_gemm.h kAmxMinRows): 24 layers of musicgen-small's
# int8 projections on a Xeon, 2026-12-06, against VNNI in turns: x0.96-1.07 the time at 2 rows
# (one station with guidance; that station x1.04-1.06 faster end to end in three runs), x0.90-0.92
# at 4, x0.86-0.89 at 8, x0.80-0.82 at 16, x0.62-0.68 at 50 (a prompt change's prefill), x0.45-0.49
# at 1000; at 1 row x1.00-1.05 (docs/kernels.md).
AMX_MIN_ROWS = 2
AMX_INT4_MIN_ROWS = 3  # int4_gemm.h kAmxMinRows: at 1-2 rows its VNNI loop streams as fast
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}
_amx_modules: list[ModuleType] = []  # `follow_amx`


def cpu_flags() -> set[str] | None:
    """The flags /proc/cpuinfo lists for this CPU (its instruction sets); None without one (not
    Linux)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None


def runnable_variants() -> tuple[list[Variant], str | None]:
    """The variants to build here, best first: every one this CPU has the instructions for,
    or only the one ENDLESS_RADIO_KERNELS names; or none and why."""
    wanted = os.environ.get("ENDLESS_RADIO_KERNELS", "auto")
    if wanted == "0":
        return [], "ENDLESS_RADIO_KERNELS=0"
    names = [v.name for v in VARIANTS]
    if wanted not in ("auto", "1", *names):
        return [], f"ENDLESS_RADIO_KERNELS={wanted} is not 0, auto or one of {', '.join(names)}"
    flags = cpu_flags()
    if flags is None:
        return [], "not a Linux CPU (no /proc/cpuinfo)"
    asked = [v for v in VARIANTS if wanted not in names or v.name == wanted]
    runs = [v for v in asked if set(v.cpu_flags) <= flags]
    if runs:
        return runs, None
    missing = [f"{', '.join(f for f in v.cpu_flags if f not in flags)} ({v.name})" for v in asked]
    return [], f"this CPU lacks {'; '.join(missing)}"


def choose_variant() -> tuple[Variant | None, str | None]:
    """The variant this CPU runs (`runnable_variants`' best), or None and why not."""
    runs, reason = runnable_variants()
    return (runs[0] if runs else None), reason


def unavailable_reason() -> str | None:
    """Why the kernels cannot be used here, or None if they can (before building them)."""
    return choose_variant()[1]


def get() -> ModuleType | None:
    """The built kernel module, or None (the reason is logged once)."""
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
        return _state["module"]


def isa() -> str | None:
    """The instruction set of the kernels that run here ("avx512", "avx2"), or None."""
    module = get()
    return None if module is None else module.isa()


def headers() -> list[Path]:
    """Every header cpu.cpp may include: the shared ones and each ISA folder's."""
    return sorted(_FOLDER.rglob("*.h"))


def _source_hash() -> str:
    """A digest of the kernel sources: PyTorch's build cache does not look at included headers,
    so the module's name changes with them and a changed header is never served stale."""
    return source_digest(_FOLDER, [_SOURCE, *headers()])


def compile_check_command(variant: Variant) -> list[str]:
    """A g++ command that compiles every kernel cpu.cpp binds (`all_kernels.h`) as built for
    `variant`, to machine code that is thrown away: it runs on any x86 CPU, whatever
    instructions it has, in a few seconds (cpu.cpp's torch bindings, ISA-free, would take ~40 s
    more). Code generation, not only a syntax check: an intrinsic the variant's flags do not
    enable fails only when it is inlined (`-fkeep-inline-functions` emits every inline kernel)."""
    from torch.utils.cpp_extension import include_paths

    return [
        "g++", "-std=c++20", "-x", "c++", "-c", "-O0", "-fkeep-inline-functions", "-o", "/dev/null",
        *variant.compile_flags(), *(f"-I{p}" for p in include_paths()),
        str(_FOLDER / "all_kernels.h"),
    ]  # fmt: skip


def _build() -> ModuleType | None:
    module, reason = build_best(
        "endless_radio_cpu", _SOURCE, _source_hash(), what="the CPU decode kernels", takes="~40 s"
    )
    if module is None:
        log.warning(
            "CPU decode kernels not used: %s; decoding with PyTorch's kernels (slower)", reason
        )
    else:
        _enable_amx(module)
    return module


def amx_setting() -> tuple[int, str | None]:
    """The rows from which ENDLESS_RADIO_AMX asks for the AMX tiles (0: never), and what is
    wrong with its value, if anything (the default is taken then)."""
    wanted = os.environ.get("ENDLESS_RADIO_AMX", "auto").strip()
    if wanted in ("auto", "1", ""):
        return AMX_MIN_ROWS, None
    if wanted == "0":
        return 0, None
    if wanted.isdigit():
        return int(wanted), None
    return AMX_MIN_ROWS, (
        f"ENDLESS_RADIO_AMX={wanted} is not 0, auto or a row count; taking auto "
        f"({AMX_MIN_ROWS} rows)"
    )


def _enable_amx(module: ModuleType) -> None:
    """The int8 and int4 products of several rows on AMX tiles where the CPU has them
    (avx512/amx.h), from the rows ENDLESS_RADIO_AMX asks for; said in the log either way on a
    CPU with AMX."""
    rows, problem = amx_setting()
    if problem:
        log.warning("%s", problem)
    why = module.amx_enable(rows)
    has_amx = "amx_int8" in (cpu_flags() or set())
    if why and has_amx:
        log.warning("the AMX tiles cannot run: %s; the int8 products run on %s", why, module.isa())
    elif not why and rows:
        log.info(
            "the int8 products of %d rows or more run on AMX tiles (the int4 ones of %d or more)",
            rows,
            max(rows, AMX_INT4_MIN_ROWS),
        )
    elif has_amx:
        log.info("the AMX tiles are off (ENDLESS_RADIO_AMX=0)")


def set_amx_rows(rows: int) -> str:
    """The int8 and int4 products of `rows` rows or more on AMX tiles from now on (0: never), in
    every module of ours that has them (benchmarks and tests switch them in turns); "" when set,
    else why not."""
    module = get()
    if module is None:
        return "our kernels do not run here"
    why = str(module.amx_enable(rows))
    if not why:
        for other in _amx_modules:
            other.amx_enable(rows)
    return why


def follow_amx(module: ModuleType) -> None:
    """`module` (another extension of ours with tile products: the int4 one) takes the AMX
    setting of the main module now and whenever it changes."""
    _amx_modules.append(module)
    main = get()
    module.amx_enable(0 if main is None else int(main.amx_min_rows()))


def amx_rows() -> int:
    """The rows from which our int8 products run on AMX tiles (the int4 ones from at least
    AMX_INT4_MIN_ROWS), 0 when they never do (no kernels, no AMX, or ENDLESS_RADIO_AMX=0)."""
    module = get()
    return 0 if module is None else int(module.amx_min_rows())


def build_best(
    prefix: str, source: Path, digest: str, *, what: str, takes: str
) -> tuple[ModuleType | None, str | None]:
    """`source` built for the chosen variant (`choose_variant`), as the module
    `{prefix}_{variant}_{digest}`; if that build fails (and no variant was asked for by name),
    the next variant this CPU runs, saying so: slower kernels of ours beat PyTorch's by far.
    The module, or None and why."""
    variants, reason = runnable_variants()
    failed: list[str] = []
    for variant in variants:
        try:
            started = time.monotonic()
            module = build(
                f"{prefix}_{variant.name}_{digest}",
                source,
                variant.compile_flags(),
                what=f"{what} ({variant.name})",
                takes=takes,
            )
        except Exception as exc:  # a missing compiler or headers, a broken variant: say so
            failed.append(
                f"the {variant.name} build failed ({type(exc).__name__}: {str(exc).strip()[:300]})"
            )
            continue
        if failed:
            log.warning("%s: %s; running the %s build", what, "; ".join(failed), variant.name)
        log.info("%s (%s) ready in %.1f s", what, variant.name, time.monotonic() - started)
        return module, None
    return None, "; ".join(failed) or reason
