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


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_select_rows_writes_over_a_spare_with_room(kind):
    """The layout before the last change is written over: the new rows are the first rows of
    the spare's buffers, which keep their room; a spare without room is not used, and a new
    buffer gets the room asked for."""
    cache = _filled(kind)
    sources = [2, 3, None, 0, 1]
    roomy = cache.select_rows([], capacity=6)  # a blank spare: buffers of 6 rows, none in use
    assert roomy.batch == 0 and roomy.holds(6) and not roomy.holds(7)
    new = cache.select_rows(sources, spare=roomy)
    for got, want in zip(new.tensors(), _expected(cache.tensors(), sources, kind), strict=True):
        assert torch.equal(got, want)
    assert {t.data_ptr() for t in new.tensors()} == {b.data_ptr() for b in roomy._buffers.values()}
    assert new.holds(6) and new.batch == 5
    # back: the spare is now the cache it replaced (4 rows: too few for 5), so a new buffer
    small = new.select_rows([4, 3, 0, 1, 2], spare=cache, capacity=8)
    assert not {t.data_ptr() for t in small.tensors()} & {t.data_ptr() for t in cache.tensors()}
    assert small.holds(8)
    for got, want in zip(
        small.tensors(), _expected(new.tensors(), [4, 3, 0, 1, 2], kind), strict=True
    ):
        assert torch.equal(got, want)
    # never the cache being read, nor a view of part of one
    again = small.select_rows([0, 1], spare=small)
    assert not {t.data_ptr() for t in again.tensors()} & {t.data_ptr() for t in small.tensors()}
    assert not small.rows(0, 2).holds(1)
