"""The int4 KV cache (engine/kv_cache.py, the kernels in engine/kernels/*/attention.h): its byte
layout, the attention over it against float64 maths on the same nibbles, the one-call decoder
step over it against the same decoder run op by op, and how far it strays from float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import LoadOptions, ModelLoadError, MusicModel
from engine.conditioning import batch_conditions
from engine.kv_cache import KVCache, dequantize_q4, quantize_q4
from engine.options import WindowOptions
from tests.engine.steps import assert_steps_agree, decode_steps

CPU = torch.device("cpu")


def test_quantize_q4_packs_two_nibbles_per_byte():
    x = torch.zeros(64)
    x[0], x[32], x[5], x[63] = 7.0, -7.0, 3.0, 1.4  # scale 1: u = x + 8
    packed, scale = quantize_q4(x)
    assert packed.dtype == torch.uint8 and packed.shape == (32,)
    assert scale.dtype == torch.bfloat16 and scale.item() == 1.0
    assert packed[0].item() == 15 | (1 << 4)  # dim 0 low nibble, dim 32 high nibble
    assert packed[5].item() == 11 | (8 << 4)
    assert packed[31].item() == 8 | (9 << 4)  # dim 63: round(1.4) = 1
    torch.manual_seed(0)
    y = torch.randn(10, 64)
    packed, scales = quantize_q4(y)
    # the scale is max|x| / 7 to bfloat16's 8 bits: a nibble's step, half of it at most off
    assert torch.allclose(scales.float(), y.abs().amax(-1) / 7, rtol=2**-8, atol=0)
    err = (dequantize_q4(packed, scales) - y).abs()
    assert (err <= scales.float()[:, None] * (0.5 + 2**-7) + 1e-6).all()
    zero_packed, zero_scale = quantize_q4(torch.zeros(64))
    assert zero_scale.item() == 1.0 and (zero_packed == 8 | (8 << 4)).all()


def test_int4_cache_layout_and_writes():
    """One 1088-byte block per 16 positions of a head: keys [8][16][4], values [4][2][16][4],
    the key scales, the value scales (bfloat16); range writes from odd starts and per-row writes
    land alike."""
    torch.manual_seed(1)
    cache = KVCache(2, 3, 2, 19, 64, device=CPU, kind="int4")
    assert cache.blocks.shape == (2, 3, 2, 2, 1088)  # 19 positions: two whole blocks of 16 slots
    assert cache.batch == 3 and cache.layer(1)[0].shape == (3, 2, 2, 1088)
    keys, values = torch.randn(3, 2, 19, 64), torch.randn(3, 2, 19, 64)
    cache.write(1, 0, keys[:, :, :3], values[:, :, :3])
    cache.write(1, 3, keys[:, :, 3:18], values[:, :, 3:18])  # an odd start, across a block
    cache.write_rows(1, torch.tensor([18, 18, 18]), keys[:, :, 18:19], values[:, :, 18:19])
    got_k, got_v = cache.view(1, 19)
    want_k = dequantize_q4(*quantize_q4(keys))
    want_v = dequantize_q4(*quantize_q4(values))
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    block = cache.blocks[1, 1, 0, 1]  # row 1, head 0, positions 16..31
    packed, scale = quantize_q4(keys[1, 0, 17])  # position 17: lane 1 of block 1
    assert torch.equal(block[:512].view(8, 16, 4)[:, 1].reshape(-1), packed)
    assert block[1024:1056].view(torch.bfloat16)[1] == scale
    packed, scale = quantize_q4(values[1, 0, 18])  # lane 2: group 0, p = 2
    assert torch.equal(block[512:1024].view(4, 2, 16, 4)[0, :, :, 2].reshape(-1), packed)
    assert block[1056:1088].view(torch.bfloat16)[2] == scale
    assert (cache.blocks[0] == 0).all()  # layer 0 untouched
    with pytest.raises(ValueError, match="heads of 64, not 16"):
        KVCache(1, 1, 1, 8, 16, device=CPU, kind="int4")


def _reference(qkv, cache: KVCache, positions, heads: int, scale: float, uint8_weights: bool):
    """Attention in float64 over the cache's own nibbles (after the step wrote its key and
    value), with the query rounded to int8 as the kernel takes it; with `uint8_weights`, each
    block's softmax weights times the values' scales rounded to steps of its largest / 255, as
    the kernel sums them."""
    keys, values = cache.view(0, cache.max_positions)
    q = qkv[:, : heads * 64].view(-1, heads, 64)
    qs = q.abs().amax(-1, keepdim=True) / 127
    q = torch.round(q / qs) * qs
    value_scales = cache._q4_parts()[3][0].double().flatten(2)  # [B, H, P]
    out = []
    for b, at in enumerate(positions):
        s = (q[b, :, None].double() * keys[b, :, : at + 1].double()).sum(-1) * scale
        p = s.softmax(-1)
        if uint8_weights:
            w = torch.zeros(heads, value_scales.shape[-1], dtype=torch.float64)
            w[:, : at + 1] = p * value_scales[b, :, : at + 1]
            chunks = torch.nn.functional.pad(w, (0, -w.shape[-1] % 64)).unflatten(-1, (-1, 64))
            step = chunks.amax(-1, keepdim=True) / 255
            w = (torch.round(chunks / step) * step).flatten(-2)
            p = w[:, : at + 1] / value_scales[b, :, : at + 1]
        out.append((p[..., None] * values[b, :, : at + 1].double()).sum(-2))
    return torch.stack(out).reshape(len(positions), -1).float()


@pytest.mark.parametrize("positions", [[0, 1, 2], [15, 16, 17], [1000, 63, 1499]])
def test_attend_step_q4_against_float64(k, positions):
    torch.manual_seed(sum(positions))
    heads, rows = 3, len(positions)
    cache = KVCache(1, rows, heads, 1500, 64, device=CPU, kind="int4")
    keys, values = torch.randn(rows, heads, 1500, 64), torch.randn(rows, heads, 1500, 64) * 3
    cache.write(0, 0, keys, values)
    qkv = torch.randn(rows, 3 * heads * 64) * 2
    got = k.attend_step_q4(qkv, *cache.layer(0), torch.tensor(positions), 0.125)
    for b, at in enumerate(positions):  # the step wrote its own key and value where it stands
        new_k = qkv[b, heads * 64 : 2 * heads * 64].view(heads, 64)
        new_v = qkv[b, 2 * heads * 64 :].view(heads, 64)
        keys[b, :, at], values[b, :, at] = new_k, new_v
        cached_k, cached_v = cache.view(0, at + 1)
        assert torch.allclose(cached_k[b, :, at], dequantize_q4(*quantize_q4(new_k)), atol=1e-6)
        assert torch.allclose(cached_v[b, :, at], dequantize_q4(*quantize_q4(new_v)), atol=1e-6)
    want = _reference(qkv, cache, positions, heads, 0.125, uint8_weights=True)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * want.abs().max().item())
    # the weights' 8 bits add a small fraction of what the values' 4 bits cost
    exact_weights = _reference(qkv, cache, positions, heads, 0.125, uint8_weights=False)
    exact = torch.stack(
        [
            torch.softmax(qh @ kh.T * 0.125, -1) @ vh
            for qh, kh, vh in _heads(qkv, keys, values, positions, heads)
        ]
    ).view(rows, -1)
    weights_err = (got - exact_weights).abs().mean()
    assert weights_err < 0.1 * (exact_weights - exact).abs().mean(), weights_err


def _heads(qkv, keys, values, positions, heads):
    """(query [1, 64], keys and values [at + 1, 64]) per (row, head), in float64."""
    for b, at in enumerate(positions):
        for h in range(heads):
            q = qkv[b, h * 64 : (h + 1) * 64].double()[None]
            yield q, keys[b, h, : at + 1].double(), values[b, h, : at + 1].double()


def test_attend_step_q4_refuses_bad_caches(k):
    qkv = torch.randn(1, 3 * 64)
    (good,) = KVCache(1, 1, 1, 8, 64, device=CPU, kind="int4").layer(0)
    with pytest.raises(RuntimeError, match="row 0 position 16 outside"):  # 16 slots
        k.attend_step_q4(qkv, good, torch.tensor([16]), 0.125)
    with pytest.raises(RuntimeError, match=r"uint8 blocks \[B, H, P / 16, 1088\], got Char"):
        k.attend_step_q4(qkv, good.to(torch.int8), torch.tensor([0]), 0.125)
    with pytest.raises(RuntimeError, match="uint8 blocks"):
        k.attend_step_q4(qkv, good[..., :1024], torch.tensor([0]), 0.125)
    with pytest.raises(RuntimeError, match="each head's blocks contiguous"):
        wide = torch.zeros(1, 1, 2, 2 * 1088, dtype=torch.uint8)[..., :1088]
        k.attend_step_q4(qkv, wide, torch.tensor([0]), 0.125)


@pytest.fixture(scope="module")
def int4_model(k, tiny_head64_dir):
    options = LoadOptions(model=tiny_head64_dir, device="cpu", quantize="int8", kv_cache="int4")
    model = MusicModel.load(options)
    assert model.decoder.kv_cache == "int4" and model.decoder._fused is not None
    return model


@pytest.mark.parametrize("stations", [1, 4])
def test_fused_step_over_int4_equals_op_by_op(int4_model, stations):
    """The one-call step and the Python decoder (attend_step_q4 per layer) over the same int4
    cache, stations at different positions (odd and even: both halves of a value pair)."""
    decoder = int4_model.decoder
    rows_at = [[p + 7 * (r // 2) for r in range(2 * stations)] for p in range(30)]
    prompts = ["slow jazz", "fast drum and bass with a long prompt", "ambient", "a b c d e f g"]
    got = decode_steps(decoder, int4_model, True, rows_at, prompts[:stations])
    want = decode_steps(decoder, int4_model, False, rows_at, prompts[:stations])
    assert got.shape == (30, 2 * stations, decoder.num_codebooks, decoder.vocab)
    assert_steps_agree(got, want, share=0.8)  # a key's nibble that flips stays in the cache


def _teacher_forced(model, decoder, frames: int) -> torch.Tensor:
    torch.manual_seed(3)
    cross = decoder.cross_kv(*batch_conditions([model.encode_prompt("jazz")], guidance=True))
    ids = torch.randint(0, decoder.vocab, (1, decoder.num_codebooks, frames)).expand(2, -1, -1)
    cache = decoder.new_cache(2, frames + 1)
    return torch.stack([decoder.decode_one_step(ids[:, :, t], cache, cross) for t in range(frames)])


def test_int4_cache_stays_close_to_float32(tiny_head64_dir, int4_model):
    """Teacher-forced logits over 120 positions stay within a few percent of the logits' spread
    of float32's, and within a few times the int8 cache's distance (the figures on
    musicgen-small shapes: bench/precision.py)."""
    with torch.inference_mode():
        got = _teacher_forced(int4_model, int4_model.decoder, 120)
        options = LoadOptions(model=tiny_head64_dir, device="cpu", quantize="int8", kv_cache="int8")
        int8 = MusicModel.load(options)
        near = _teacher_forced(int8, int8.decoder, 120)
        exact = MusicModel.load(LoadOptions(model=tiny_head64_dir, device="cpu", dtype="float32"))
        want = _teacher_forced(exact, exact.decoder, 120)
    err4, err8 = (got - want).abs().mean(), (near - want).abs().mean()
    assert err4 < 0.05 * want.std() and err4 < 3 * err8, (err4, err8, want.std())
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
    assert agree > 0.9, agree


def test_int4_cache_needs_heads_of_64(k, tiny_model_dir):
    with pytest.raises(ModelLoadError, match="int4 cache holds heads of 64, this model's are 16"):
        MusicModel.load(LoadOptions(model=tiny_model_dir, device="cpu", kv_cache="int4"))
    with pytest.raises(ValueError, match="kv_cache: int4 is a CPU mode"):
        LoadOptions(kv_cache="int4", device="cuda").validate()


def test_a_model_takes_the_cheaper_cache_and_back_mid_stream(k, tiny_head64_dir, int4_model):
    """`MusicModel.use_cheap_cache` (the radio's rung before int4 weights): with it an
    int8-cache model's steps are an int4-cache model's, step for step, and without it its own
    again; two stations batched read on across the switches, their batch's cache converted at
    the switch with every position they had written (`KVCache.converted`), into the buffers
    of the kind it left the time before."""
    options = LoadOptions(model=tiny_head64_dir, device="cpu", quantize="int8", kv_cache="int8")
    model = MusicModel.load(options)
    assert model.cheap_cache_available() is None and not model.cheap_cache
    rows_at = [[p, p + 5, p + 2, p + 9] for p in range(12)]

    def steps(m):
        return decode_steps(m.decoder, m, True, rows_at, ["jazz", "rain"])

    own = steps(model)
    streams = model.open_streams(["jazz", "rain"])
    model.read_together(streams, 8)
    batch = streams[0].tokens._batch
    held = [batch.cache.view(layer, 9) for layer in range(len(model.decoder.layers))]
    held_buffer = batch.cache.tensors()[0].data_ptr()
    lone = model.open_stream("ambient")  # a batch of its own
    lone.read(3)

    slices = sum(1 for _ in model.prepare_cheap_cache())  # ahead of need, a slice at a time
    assert slices == 2 * 2 * len(model.decoder.layers)  # both batches' caches and spares
    prepared = batch._other_kind[0].tensors()[0].data_ptr()
    model.use_cheap_cache(True)
    assert model.cheap_cache and model.decoder.kv_cache == "int4"
    assert batch.cache.tensors()[0].data_ptr() == prepared
    torch.testing.assert_close(steps(model), steps(int4_model), rtol=0, atol=0)
    assert batch.cache.kind == lone.tokens._batch.cache.kind == "int4"  # converted at the switch
    pcm = model.read_together(streams, 4)
    assert all(p.shape == (1, 4 * model.hop) for p in pcm)
    for layer, (keys, values) in enumerate(held):
        got_keys, got_values = batch.cache.view(layer, 9)
        assert torch.equal(got_keys, dequantize_q4(*quantize_q4(keys)))
        assert torch.equal(got_values, dequantize_q4(*quantize_q4(values)))

    int4_buffer = batch.cache.tensors()[0].data_ptr()
    int8_buffer = held_buffer

    model.use_cheap_cache(False)
    assert not model.cheap_cache
    torch.testing.assert_close(steps(model), own, rtol=0, atol=0)
    model.read_together(streams, 4)
    # back in the int8 buffers it left (kept for the way back), and then in the int4 ones again
    assert batch.cache.kind == "int8" and batch.cache.tensors()[0].data_ptr() == int8_buffer
    model.use_cheap_cache(True)
    model.read_together(streams, 2)
    assert batch.cache.tensors()[0].data_ptr() == int4_buffer


def test_the_cheaper_cache_is_refused_where_it_cannot_run(k, tiny_model_dir, int4_model):
    heads16 = MusicModel.load(LoadOptions(model=tiny_model_dir, device="cpu", quantize="int8"))
    assert heads16.cheap_cache_available() == (
        "an int4 KV cache holds heads of 64, this model's are 16"
    )
    assert "replaces an int8 one" in int4_model.cheap_cache_available()  # int4 already
    with pytest.raises(ValueError, match="replaces an int8 one"):
        int4_model.use_cheap_cache(True)


def test_the_cache_changes_kind_while_warm_rows_build_the_next_window(k, tiny_head64_dir):
    """A switch while a stream's warm rows are being fed (the next window, built beside the
    current one, at its own positions) converts them too: the warm restart takes them, and the
    stream reads on through restarts both ways."""
    options = LoadOptions(model=tiny_head64_dir, device="cpu", quantize="int8", kv_cache="int8")
    model = MusicModel.load(options)
    window = WindowOptions(window=150, context=40)
    stream = model.open_stream("jazz", window=window)
    tokens = stream.tokens
    while not tokens.warming:
        stream.read(5)
    model.use_cheap_cache(True)
    assert tokens._batch.cache.kind == "int4"
    before = tokens.warm_restarts
    pcm = stream.read(200)  # past two window restarts
    assert pcm.shape == (1, 200 * model.hop) and np.isfinite(pcm).all()
    assert tokens.warm_restarts >= before + 2 and tokens.prefills == 1  # nothing prefilled
    while not tokens.warming:
        stream.read(5)
    model.use_cheap_cache(False)
    assert tokens._batch.cache.kind == "int8"
    assert np.isfinite(stream.read(200)).all() and tokens.prefills == 1


def test_room_for_the_next_window_restart_is_made_ahead_after_a_switch(k, tiny_head64_dir):
    """A switch of cache kind that found no buffers prepared writes into new memory with room
    for the rows there are; the first window restart after it then laid its rows and their
    warm copies out into two fresh buffers (two int4 stations on 2 cores: a chunk of 1.7-2.7
    s, both underran). `MusicModel.prepare_spares` makes the spare ahead, a layer of a buffer
    per step, and that restart writes into it."""
    options = LoadOptions(model=tiny_head64_dir, device="cpu", quantize="int8", kv_cache="int8")
    model = MusicModel.load(options)
    streams = model.open_streams(["jazz", "rain"], window=WindowOptions(window=150, context=40))
    batch = streams[0].tokens._batch
    model.read_together(streams, 5)
    assert not model.spares_missing  # the spare made with the first layout
    model.use_cheap_cache(True)  # nothing prepared: new memory for the 4 rows there are
    assert batch.cache.kind == "int4" and model.spares_missing
    parts = sum(1 for _ in model.prepare_spares())
    assert parts == len(batch.cache.tensors()) * len(model.decoder.layers)
    assert not model.spares_missing and batch._spare.holds(8)  # 2 stations' rows, doubled
    spare = batch._spare.tensors()[0].data_ptr()
    while not streams[0].tokens.warming:  # on to the first window restart (warm rows)
        model.read_together(streams, 5)
    assert batch.cache.batch > 4 and batch.cache.tensors()[0].data_ptr() == spare
