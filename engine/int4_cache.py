"""Packed int4 weights kept on disk, so that quantizing them runs once per model and machine.

Quantizing musicgen-small's projections to int4 (`engine.linear.pack_int4` on our C++
quantizer) takes ~3 s of both cores; the radio needs that set at start-up on a slow hour
(`generation.coarse_when_behind`: a station goes on air only once it keeps up) and mid-stream when
generation falls behind. Loading the packed set back takes a fraction of that.

An entry is keyed by what decides its bytes: the weight (its shape and a fingerprint: every row's
sum and a strided sample of its values; a changed summation order only misses), the group size,
the quantizer's settings and the built int4 module's name (which carries the kernel variant and
its sources' digest, so a changed quantizer never reads an old entry). The folder is
`$ENDLESS_RADIO_CACHE/int4`, by default `~/.cache/endless-radio/int4`; `ENDLESS_RADIO_CACHE=0`
turns the cache off. A file that cannot be
read is removed and the weights quantized again, with a log line; one that cannot be written is
only logged: the cache never stops the radio.

Entries of an older quantizer or kernel build are never read again (their module name is in the
key), so the folder would grow by a model's set (~200 MB for musicgen-small) with every update:
a read touches its entry, and the first store of a process removes the entries nobody read or
wrote for UNUSED_DAYS (and leftovers of interrupted writes), saying how much it freed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SAMPLE_STRIDE = 1009  # every 1009th value joins the fingerprint (with every row's sum)
UNUSED_DAYS = 30  # entries not read or written for this long are removed (`prune`)
_pruned: set[Path] = set()  # folders pruned by this process


def folder() -> Path | None:
    """Where entries live, or None when the cache is off."""
    root = os.environ.get("ENDLESS_RADIO_CACHE", "")
    if root == "0":
        return None
    base = Path(root) if root else Path.home() / ".cache" / "endless-radio"
    return base / "int4"


def key(w: torch.Tensor, group: int, settings: Sequence[object], module: str) -> str:
    """The entry name for float32 weights `w` [N, K] quantized by `module` with `settings`."""
    digest = hashlib.sha256(f"{module}|{group}|{list(settings)}|{tuple(w.shape)}".encode())
    digest.update(w.sum(dim=1).numpy().tobytes())
    digest.update(w.reshape(-1)[::SAMPLE_STRIDE].contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def load(name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The packed (codes, scales) stored as `name`, or None."""
    where = folder()
    path = None if where is None else where / f"{name}.pt"
    if path is None or not path.exists():
        return None
    try:
        codes, scales = torch.load(path, weights_only=True)
        if codes.dtype != torch.uint8 or scales.dtype != torch.float16:
            raise ValueError(f"unexpected dtypes {codes.dtype}, {scales.dtype}")
        with contextlib.suppress(OSError):  # in use: `prune` keeps it (a read-only cache too)
            os.utime(path)
        return codes, scales
    except Exception as exc:  # noqa: BLE001 - a damaged entry: quantize again
        log.warning("int4 weight cache: %s unreadable (%s); quantizing again", path, exc)
        path.unlink(missing_ok=True)
        return None


def store(name: str, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Keep (codes, scales) as `name` (written whole, then renamed into place)."""
    where = folder()
    if where is None:
        return
    path = where / f"{name}.pt"
    partial = path.with_suffix(f".{os.getpid()}.part")
    if where not in _pruned:
        _pruned.add(where)
        prune(where)
    try:
        where.mkdir(parents=True, exist_ok=True)
        torch.save((codes, scales), partial)
        partial.replace(path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
        log.warning("int4 weight cache: cannot write %s (%s); going on without it", path, exc)
        with contextlib.suppress(OSError):  # (what stood in the way may not be a file)
            partial.unlink(missing_ok=True)


def prune(where: Path, now: float | None = None) -> int:
    """Remove the entries in `where` not read or written for UNUSED_DAYS, and partial writes
    older than a day; returns how many files went (logged with the bytes freed)."""
    now = time.time() if now is None else now
    removed = freed = 0
    try:
        files = list(where.iterdir())
    except OSError:
        return 0  # no folder yet, or not readable: nothing to do
    for path in files:
        if path.suffix not in (".pt", ".part"):
            continue  # not ours
        limit = UNUSED_DAYS * 86400 if path.suffix == ".pt" else 86400
        try:
            info = path.stat()
            if now - info.st_mtime < limit:
                continue
            path.unlink()
        except OSError:
            continue  # gone meanwhile, or not ours to remove
        removed, freed = removed + 1, freed + info.st_size
    if removed:
        log.info(
            "int4 weight cache: removed %d old files from %s (%.0f MB: entries unused for %d "
            "days, interrupted writes)",
            removed,
            where,
            freed / 1e6,
            UNUSED_DAYS,
        )
    return removed
