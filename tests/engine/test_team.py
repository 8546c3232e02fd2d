"""The fused step's threads as a team (engine/kernels/team.h): a thread that stops in the middle
of an item, as a descheduled one does, has the item taken over by another, and the logits are
those of one thread, bit for bit (over several steps: each step's reads what the earlier ones
wrote into the cache)."""

from __future__ import annotations

import pytest
import torch

from engine import LoadOptions, MusicModel
from tests.engine.steps import _start

# Region numbers within a step (decode_step.h): 1 the embeddings, then per layer 2 the first
# layer norm's quantized rows, 3 the qkv product, 4 the cache writes, 5 the self-attention, ...
EMBEDDINGS, QKV, CACHE_WRITES, ATTENTION = 1, 3, 4, 5
# ... then 6 the out projection's quantized rows, 7 its product and, with every text row folded,
# 8 the folded items, 9 their heads added (and the next layer norm's quantized rows)
FOLDED, FOLDED_ADDED = 8, 9
KINDS = ["int8 cache", "int4 cache", "int4 weights"]


@pytest.fixture(scope="module")
def models(k, tiny_model_dir, tiny_head64_dir):
    int8 = MusicModel.load(LoadOptions(model=tiny_model_dir, device="cpu", quantize="int8"))
    int4 = MusicModel.load(
        LoadOptions(model=tiny_head64_dir, device="cpu", quantize="int8", kv_cache="int4")
    )
    coarse = MusicModel.load(LoadOptions(model=tiny_model_dir, device="cpu", quantize="int4"))
    for model in (int8, int4, coarse):
        assert model.decoder._fused is not None
    return {"int8 cache": int8, "int4 cache": int4, "int4 weights": coarse}


def _run(model, threads: int, stalls=(), steps: int = 6, folded: bool = False):
    """Logits [steps, rows, K, V] of `steps` decode steps of two stations at different
    positions on `threads` threads; `stalls` (member, region, item, seconds) are set before every
    step. `folded`: the prompts folded into the cross-attention (every row with text folds)."""
    decoder = model.decoder
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows_at = [[p, p, p + 5, p + 5] for p in range(steps)]
        prompts = ["slow jazz", "fast techno"]
        cross, rows, cache = _start(decoder, model, rows_at, prompts, fold=folded)
        if folded:  # int8 weights fold every text row; int4 ones some (the rest projected)
            every = cross.folded_read() == (cross.stacked()[3].sum().item(), False)
            assert every == (decoder.precision == "int8")
        out = []
        for at in rows_at:
            for member, region, item, seconds in stalls:
                decoder._fused.stall_once(member=member, region=region, item=item, seconds=seconds)
            ids = torch.randint(0, decoder.vocab + 1, (rows, decoder.num_codebooks))
            out.append(decoder.decode_one_step(ids, cache, cross, at))
        return torch.stack(out)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("kind", KINDS)
def test_two_threads_give_one_threads_logits(models, kind):
    """Without a stall, items go to whichever thread claims them first: the same sums."""
    assert torch.equal(_run(models[kind], 2), _run(models[kind], 1))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "region",
    [EMBEDDINGS, QKV, CACHE_WRITES, ATTENTION],
    ids=["the embeddings", "a product's block", "the cache writes", "an attention item"],
)
def test_a_stalled_threads_item_is_taken_over(models, kind, region):
    """Whichever thread claims the region's first item (the caller its share's first, or the
    worker once it has done its own share) stalls 30 ms there; the other takes the item over and
    goes on alone; the stalled one's late result is dropped, and back, it skips every region the
    other has done."""
    fused = models[kind].decoder._fused
    want = _run(models[kind], 1, steps=3)
    before = fused.taken_over()
    got = _run(models[kind], 2, stalls=[(0, region, 0, 0.03), (1, region, 0, 0.03)], steps=3)
    assert fused.taken_over() >= before + 3  # once per step
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_two_threads_give_one_threads_logits_with_the_text_folded(models, kind):
    """The same with the text folded: where every text row folds (int8 weights) each thread
    makes the rows' cross queries itself and the heads' sums share a region with the next layer
    norm; where some rows are projected (int4 weights) those come after them."""
    assert torch.equal(_run(models[kind], 2, folded=True), _run(models[kind], 1, folded=True))


@pytest.mark.parametrize(
    "region", [FOLDED, FOLDED_ADDED], ids=["a folded item", "the folded heads added"]
)
def test_a_stalled_threads_folded_item_is_taken_over(models, region):
    """A stall in the folded cross-attention's regions: the other thread takes the item over,
    and the logits are one thread's."""
    model = models["int8 cache"]
    fused = model.decoder._fused
    want = _run(model, 1, steps=3, folded=True)
    before = fused.taken_over()
    stalls = [(0, region, 0, 0.03), (1, region, 0, 0.03)]
    got = _run(model, 2, stalls=stalls, steps=3, folded=True)
    assert fused.taken_over() >= before + 3
    assert torch.equal(got, want)


def test_the_step_clock_times_each_part_in_order(models):
    """`Decoder.clock_parts`: each part of every step, a layer's parts once per layer, in a
    step's order, the laps counted; nothing while off, and the same logits either way."""
    decoder = models["int8 cache"].decoder
    layers = len(decoder.layers)
    want = _run(models["int8 cache"], 2, steps=3)
    decoder.clock_parts(True)
    try:
        decoder.part_times()  # from here
        got = _run(models["int8 cache"], 2, steps=3)
        times = decoder.part_times()
    finally:
        decoder.clock_parts(False)
    assert torch.equal(got, want)
    names = [name for name, _, _, _ in times]
    assert names[:5] == ["embeddings", "layer norm, quantize: qkv", "qkv", "cache writes",
                         "self-attention"]  # fmt: skip
    assert names[-2:] == ["layer norm, quantize: heads", "heads"]
    laps = {name: n for name, _, n, _ in times}
    assert laps["embeddings"] == laps["heads"] == 3
    assert laps["qkv"] == laps["self-attention"] == laps["fc2"] == 3 * layers
    assert all(seconds > 0 for name, seconds, n, _ in times if n > 0)
    # the self-attention read each row's positions up to its new one (rows at p, p, p + 5, p + 5
    # in step p), keys and values with a float32 scale each, for every head of every layer
    positions = sum(2 * (p + 1) + 2 * (p + 6) for p in range(3))
    vector = decoder.head_dim + 4
    read = {name: b for name, _, _, b in times}
    assert read.pop("self-attention") == layers * decoder.heads * positions * 2 * vector
    assert set(read.values()) == {0}
    _run(models["int8 cache"], 2, steps=2)
    assert all(n == 0 for _, _, n, _ in decoder.part_times())  # off: read and reset above


def test_the_step_clock_counts_the_folded_text_read(models):
    """The folded cross-attention's read: each folded row's z and u vectors of every text
    position, with a float32 scale each, for every head of every layer, once a step."""
    model = models["int8 cache"]
    decoder = model.decoder
    rows_at = [[p] * 4 for p in range(3)]
    cross, rows, cache = _start(decoder, model, rows_at, ["slow jazz", "fast techno"], fold=True)
    positions, projected = cross.folded_read()
    assert positions > 0 and not projected  # (the tiny model folds every row with text)
    decoder.clock_parts(True)
    try:
        decoder.part_times()
        for at in rows_at:
            ids = torch.randint(0, decoder.vocab + 1, (rows, decoder.num_codebooks))
            decoder.decode_one_step(ids, cache, cross, at)
        read = {name: b for name, _, _, b in decoder.part_times()}
    finally:
        decoder.clock_parts(False)
    vector = decoder.hidden + 4
    assert (
        read["folded cross-attention"]
        == 3 * len(decoder.layers) * decoder.heads * 2 * positions * vector
    )


def test_the_step_clock_needs_the_fused_step(tiny_model_dir):
    model = MusicModel.load(LoadOptions(model=tiny_model_dir, device="cpu", quantize="none"))
    with pytest.raises(ValueError, match="fused CPU step"):
        model.decoder.clock_parts(True)
