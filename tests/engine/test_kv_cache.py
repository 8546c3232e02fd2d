"""KVCache.select_rows and relaid: the rows a new layout keeps, and the empty rows it makes."""

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


@pytest.mark.parametrize("kind", ["float32", "int8", "int4"])
def test_relaid_moves_rows_within_its_own_buffers(kind):
    """The compiled step's layout changes: rows kept in order move within the cache's buffers
    (a row inserted, rows removed, rows both ways at once), none written over before it is
    read; rows out of order, or more than the buffers hold, go to new buffers with the room
    asked for."""
    cache = _filled(kind).select_rows([0, 1, 2, 3], capacity=7)
    buffers = {b.data_ptr() for b in cache._buffers.values()}
    for sources in ([0, None, 1, 2, 3], [0, 2, 3, 4], [None, 0, 2, None, 3, None], [1, 4, 5]):
        before = [t.clone() for t in cache.tensors()]
        new = cache.relaid(sources)
        for got, want in zip(new.tensors(), _expected(before, sources, kind), strict=True):
            assert torch.equal(got, want), sources
        assert {t.data_ptr() for t in new.tensors()} == buffers
        assert new.batch == len(sources) and new.length == 0
        cache = new
    for sources, room in (([2, None, 0], 3), ([0, 1, 2, None, None, None, None, None], 9)):
        before = [t.clone() for t in cache.tensors()]
        new = cache.relaid(sources, capacity=room)
        for got, want in zip(new.tensors(), _expected(before, sources, kind), strict=True):
            assert torch.equal(got, want), sources
        assert not {t.data_ptr() for t in new.tensors()} & {t.data_ptr() for t in cache.tensors()}
        assert new.holds(room) and not new.holds(room + 1)
        cache = new


def _quantized(kind: str, rows: int = 4, capacity: int = 6) -> KVCache:
    """An int8 or int4 cache of `rows` rows (a view of buffers with room for `capacity`), its
    40 slots written from random keys and values as steps write them."""
    cache = KVCache(3, capacity, 2, 40, 64, device=torch.device("cpu"), kind=kind)
    cache = cache.select_rows([None] * rows, capacity=capacity)
    generator = torch.Generator().manual_seed(0)
    for layer in range(3):
        keys = 3 * torch.randn(rows, 2, 40, 64, generator=generator)
        cache.write(layer, 0, keys, torch.randn(rows, 2, 40, 64, generator=generator))
    cache.length = 40
    return cache


def test_a_cache_converts_between_int8_and_int4_as_steps_write_them(k):
    """`KVCache.converted` (the radio's cheaper-cache rung): every position written is read
    back and quantized again exactly as the other kind's writes quantize (the reference: the
    PyTorch `quantize_q4` / `quantize_vectors` of the dequantized values), the rows keep their
    room, only the first `positions` are converted, and the source cache is untouched."""
    from engine.kv_cache import dequantize_q4, quantize_q4, quantize_vectors

    int8 = _quantized("int8")
    before = [t.clone() for t in int8.tensors()]
    int4 = int8.converted("int4", k)
    assert int4.kind == "int4" and int4.batch == 4 and int4.holds(6) and int4.length == 40
    for layer in range(3):
        for got, held in zip(int4.view(layer, 40), int8.view(layer, 40), strict=True):
            assert torch.equal(got, dequantize_q4(*quantize_q4(held)))
    assert all(torch.equal(a, b) for a, b in zip(before, int8.tensors(), strict=True))

    back = int4.converted("int8", k)
    assert back.kind == "int8" and back.batch == 4 and back.holds(6)
    for layer in range(3):
        for got, held in zip(back.view(layer, 40), int4.view(layer, 40), strict=True):
            codes, scales = quantize_vectors(held)
            assert torch.equal(got, codes.float() * scales[..., None])

    # only the positions written (the slots after them hold whatever the new memory held
    # until steps write them)
    part = int8.converted("int4", k, positions=17)
    for layer in range(3):
        for got, want in zip(part.view(layer, 17), int4.view(layer, 17), strict=True):
            assert torch.equal(got, want)


def test_a_conversion_writes_over_the_cache_it_came_from(k):
    """`into`: the other kind's cache kept for the way back is written over (its buffers, its
    room) when it holds the rows; one with too little room is not used."""
    int8 = _quantized("int8", rows=4, capacity=6)
    int4 = int8.converted("int4", k)
    back = int4.converted("int8", k, into=int8)
    assert back.tensors()[0].data_ptr() == int8.tensors()[0].data_ptr() and back.holds(6)
    fresh = int4.converted("int8", k)
    assert all(torch.equal(a, b) for a, b in zip(back.tensors(), fresh.tensors(), strict=True))
    small = _quantized("int8", rows=2, capacity=2)
    roomy = int4.converted("int8", k, into=small)
    assert roomy.tensors()[0].data_ptr() != small.tensors()[0].data_ptr() and roomy.batch == 4


def test_only_int8_and_int4_caches_convert(k):
    cache = KVCache(1, 2, 2, 16, 64, device=torch.device("cpu"), kind="bfloat16")
    with pytest.raises(ValueError, match="between int8 and int4, not bfloat16 to int4"):
        cache.converted("int4", k)
    with pytest.raises(ValueError, match="not int8 to int8"):
        _quantized("int8").converted("int8", k)
