"""KVCache.select_rows: the rows a new layout keeps, and the empty rows it makes."""

from __future__ import annotations

import pytest
import torch

from engine.kv_cache import KVCache


def _filled(kind: str) -> KVCache:
    cache = KVCache(3, 4, 2, 40, 64, device=torch.device("cpu"), kind=kind)
    generator = torch.Generator().manual_seed(0)
    for t in cache.tensors():
        if t.is_floating_point():
            t.copy_(torch.rand(t.shape, generator=generator))
        else:
            t.copy_(torch.randint(0, 100, t.shape, generator=generator))
    return cache


def _expected(tensors: tuple[torch.Tensor, ...], sources: list[int | None], kind: str):
    """What each tensor of the new layout holds: the source rows, zeros (scales: ones) for None."""
    names = {"int8": ("k", "ks", "v", "vs"), "int4": ("b",), "float32": ("k", "v")}[kind]
    out = []
    for name, t in zip(names, tensors, strict=True):
        empty = torch.ones_like(t[:, :1]) if name.endswith("s") else torch.zeros_like(t[:, :1])
        out.append(torch.cat([empty if s is None else t[:, s : s + 1] for s in sources], dim=1))
    return out


@pytest.mark.parametrize("kind", ["float32", "int8", "int4"])
def test_select_rows_keeps_rows_and_empties_new_ones(kind):
    cache = _filled(kind)
    # a window restart: warm rows come in after the lane's two rows, then take their place
    for sources in ([0, 1, None, None, 2, 3], [2, 3, 4, 5], [3, None, 0]):
        new = cache.select_rows(sources)
        for got, want in zip(new.tensors(), _expected(cache.tensors(), sources, kind), strict=True):
            assert torch.equal(got, want)
        assert new.batch == len(sources) and new.length == 0
        assert not {t.data_ptr() for t in new.tensors()} & {t.data_ptr() for t in cache.tensors()}
        cache = new
