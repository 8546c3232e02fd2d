"""Building our C++ extensions (decode kernels, int4 weights, codec kernels) with PyTorch's
`cpp_extension.load`, the same way for each.

The module's name carries a digest of its sources, headers included (PyTorch's build cache looks
only at the listed sources), so a changed header is never served stale, and of their folder, so
that two checkouts never fight over one build. PyTorch serialises
builds of one module with a lock file that the building process removes when it is done; a
build that was killed leaves the lock behind and every later process would wait on it forever.
`build` removes a lock older than `STALE_LOCK_SECONDS` (a build takes about a minute, a few on
a busy machine) with a warning, and builds again.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

STALE_LOCK_SECONDS = 600.0


def source_digest(root: Path, paths: list[Path]) -> str:
    """12 hex digits over the files' folder, names (relative to `root`) and bytes, and the
    PyTorch installation they build against. The folder is in it because PyTorch rebuilds a
    module whose sources moved: two checkouts of the same sources would otherwise take turns
    rebuilding one module, each build waiting on the other's lock. The installation, because
    its include paths are on the compile's command line: two environments (a venv for the
    radio, one for the tests) took turns rebuilding every kernel, ~50 s per start, silently."""
    import torch

    digest = hashlib.sha256(str(root.resolve()).encode())
    digest.update(str(Path(torch.__file__).resolve().parent).encode())
    for path in paths:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def remove_stale_lock(name: str, now: float | None = None) -> bool:
    """Remove the build lock of extension `name` when it is older than STALE_LOCK_SECONDS
    (its builder died); True when one was removed."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_LOCK_SECONDS:
        return False
    log.warning(
        "a build of %s was interrupted (its lock file is %.0f min old); removing the stale lock "
        "and building again",
        name,
        age / 60,
    )
    lock.unlink(missing_ok=True)
    return True


def built(name: str) -> bool:
    """Whether extension `name` is in PyTorch's build cache: loading it takes a moment, not a
    compile."""
    from torch.utils.cpp_extension import _get_build_directory

    return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists()


def build(name: str, source: Path, cflags: list[str], what: str, takes: str) -> ModuleType:
    """`torch.utils.cpp_extension.load` of one C++ source with OpenMP, quietly; raises what the
    build raises (the callers say why they run without the extension). A compile is logged
    first, `what` it builds and how long that `takes`; a cached build is just loaded."""
    from torch.utils.cpp_extension import load

    if not built(name):
        log.info("building %s (once per machine and source version: %s)", what, takes)
    remove_stale_lock(name)
    return load(
        name=name,
        sources=[str(source)],
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )
