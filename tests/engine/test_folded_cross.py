"""Cross-attention folded into the text (engine/decoder.py `Decoder.cross_kv`, the fused step's
`cross_attention_folded` in engine/kernels/decode_step.h): the fold's maths against the
projections in float64, the kernel against float64 maths on the same int8 vectors, the fused step
folded against the op-by-op path with float cross projections, what bfloat16 text products
(`text_products`) move, which rows fold, and when a prompt change's text does."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from engine import LoadOptions, MusicModel, SamplingOptions, WindowOptions
from engine.batch import FOLD_AFTER_STEPS
from engine.conditioning import Bf16Products, batch_conditions, encode_prompt
from engine.decoder import FOLD_SHARE, concat_cross
from radio.generator import change_frames_for


@pytest.fixture(scope="module")
def int8_model(k, tiny_model_dir):
    return MusicModel.load(
        LoadOptions(model=tiny_model_dir, device="cpu", dtype="float32", quantize="int8")
    )


def test_the_kernel_adds_softmax_of_scores_times_the_values(k):
    """Per folded row and head: softmax over its text positions of h . z * scale + bias, times
    u * scale, summed over heads and positions; rows not folded, and rows without text, get
    nothing. Against float64 maths on the same int8 vectors."""
    torch.manual_seed(0)
    layers, rows, heads, positions, hidden = 2, 5, 3, 7, 48
    vectors = torch.randint(
        -127, 128, (layers, rows, heads, 2, positions, hidden), dtype=torch.int8
    )
    scales = torch.rand(layers, rows, heads, 2, positions) * 0.01 + 1e-3
    folded = torch.tensor([True, True, False, True, True])
    lengths = torch.tensor([7, 3, 7, 0, 5])  # row 3: no text (a null row)
    bias = torch.zeros(rows, positions)
    bias[4, 1] = float("-inf")  # row 4 has padding inside its text
    h = torch.randn(rows, hidden)
    for layer in range(layers):
        got = k.cross_attend_folded(h, vectors, scales, folded, bias, lengths, layer)
        want = torch.zeros(rows, hidden, dtype=torch.float64)
        for b in range(rows):
            n = int(lengths[b])
            if not folded[b] or n == 0:
                continue
            for hd in range(heads):
                z = vectors[layer, b, hd, 0, :n].double() * scales[layer, b, hd, 0, :n, None]
                u = vectors[layer, b, hd, 1, :n].double() * scales[layer, b, hd, 1, :n, None]
                weights = torch.softmax(z @ h[b].double() + bias[b, :n].double(), dim=0)
                want[b] += weights @ u
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5), (got - want).abs().max()
        assert (got[[2, 3]] == 0).all()


def test_the_kernel_refuses_inputs_of_the_wrong_shape(k):
    vectors = torch.zeros(1, 2, 2, 2, 3, 16, dtype=torch.int8)
    scales, rows = torch.ones(1, 2, 2, 2, 3), torch.ones(2, dtype=torch.bool)
    args = (torch.zeros(2, 3), torch.full((2,), 3))
    with pytest.raises(RuntimeError, match="float32 scales"):
        k.cross_attend_folded(torch.zeros(2, 16), vectors, scales[..., :2], rows, *args, 0)
    with pytest.raises(RuntimeError, match="the folded rows, bool"):
        k.cross_attend_folded(torch.zeros(2, 16), vectors, scales, rows.long(), *args, 0)
    with pytest.raises(RuntimeError, match="reads 4 text positions of 3"):
        k.cross_attend_folded(torch.zeros(2, 16), vectors, scales, rows, args[0], args[1] + 1, 0)


def test_the_fold_is_the_projections_maths(int8_model):
    """softmax(h . z + bias) u summed over heads and positions, with z and u from `Decoder._fold`,
    equals out_cross(attention(q_cross(h), k, v)) on the model's float weights (float64)."""
    decoder = int8_model.decoder
    torch.manual_seed(2)
    states, mask = batch_conditions([int8_model.encode_prompt("slow jazz")], guidance=False)
    w = decoder.layers[1]
    e, heads, d = decoder.hidden, decoder.heads, decoder.head_dim
    keys = F.linear(states, w.k_cross).view(1, -1, heads, d).transpose(1, 2)
    values = F.linear(states, w.v_cross).view(1, -1, heads, d).transpose(1, 2)
    folded = decoder._fold(w, keys, values)[0].double()  # [H, 2, S, E]
    h = torch.randn(e, dtype=torch.float64)
    bias = torch.zeros(mask.shape[-1], dtype=torch.float64).masked_fill(~mask[0], float("-inf"))
    got = sum(torch.softmax(folded[i, 0] @ h + bias, 0) @ folded[i, 1] for i in range(heads))
    q = (w.q_cross_weight.double() @ h).view(heads, d)
    scores = torch.einsum("hd,hsd->hs", q, keys[0].double()) / d**0.5 + bias
    attended = torch.einsum("hs,hsd->hd", torch.softmax(scores, -1), values[0].double())
    want = w.out_cross_weight.double() @ attended.reshape(e)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()


@contextlib.contextmanager
def text_products(decoder, dtype: str) -> Iterator[None]:
    """The decoder's prompt products (`Resolved.text_products`) set to `dtype` meanwhile."""
    saved = decoder.settings
    decoder.settings, decoder._text = dataclasses.replace(saved, text_products=dtype), None
    try:
        yield
    finally:
        decoder.settings, decoder._text = saved, None


def _ids(model, rows: int, steps: int = 12) -> torch.Tensor:
    decoder = model.decoder
    generator = torch.Generator().manual_seed(3)
    return torch.randint(
        0, decoder.vocab + 1, (steps, rows, decoder.num_codebooks), generator=generator
    )


def _steps(model, cross, ids: torch.Tensor) -> torch.Tensor:
    """Logits [steps, rows, K, V] of decode steps over `ids` [steps, rows, K] from position 0."""
    decoder = model.decoder
    cache = decoder.new_cache(ids.shape[1], 64)
    rows = list(range(ids.shape[1]))
    return torch.stack(
        [decoder.decode_one_step(x, cache, cross, [p for _ in rows]) for p, x in enumerate(ids)]
    )


def test_the_fused_step_folded_is_the_op_by_op_step_with_float_cross_projections(int8_model):
    """The fused step over folded rows against the op-by-op path whose q_cross and out_cross are
    the float weights (the folded maths skips their int8 rounding): equal up to the folded
    vectors' int8 rounding, closer than the int8 projections come (float32 text products)."""
    model, decoder = int8_model, int8_model.decoder
    with text_products(decoder, "float32"):
        states = batch_conditions([model.encode_prompt("slow jazz")], guidance=True)
        cross = decoder.cross_kv(*states)
    assert cross.folded and cross.folded_inputs().rows.tolist() == [True, False]
    ids = _ids(model, 2)
    folded = _steps(model, cross, ids)
    saved, fused = [(w.q_cross, w.out_cross) for w in decoder.layers], decoder._fused
    try:
        decoder._fused = None
        for w in decoder.layers:
            w.q_cross = lambda x, w=w: F.linear(x, w.q_cross_weight)
            w.out_cross = lambda x, w=w: F.linear(x, w.out_cross_weight)
        float_cross = _steps(model, cross, ids)
    finally:
        decoder._fused = fused
        for w, (q, out) in zip(decoder.layers, saved, strict=True):
            w.q_cross, w.out_cross = q, out
    decoder.fold_cross = False
    try:
        with text_products(decoder, "float32"):
            projected = _steps(model, decoder.cross_kv(*states), ids)
    finally:
        decoder.fold_cross = True
    spread = float_cross.std()
    err = (folded - float_cross).abs().mean() / spread
    assert err < 0.001, err
    assert (projected - float_cross).abs().mean() / spread > 1.5 * err


@pytest.mark.parametrize("kind", ["bfloat16", "bfloat16-weights"])
def test_bfloat16_text_products_move_the_fused_steps_little(int8_model, kind):
    """A prompt's text encoded, and its keys, values and fold computed, through bfloat16
    (`text_products`: PyTorch's bfloat16 maths where the CPU has them natively, our kernel's
    bfloat16 weights and float32 maths elsewhere; a prompt change's text x2 faster) against
    float32: the fused step's logits, folded and not, move by under 0.2% of their spread (the
    precision budget is 3%; bench/precision.py measures the whole mode), and the products
    really ran so (the folded vectors differ)."""
    model, decoder = int8_model, int8_model.decoder
    if kind == "bfloat16-weights" and decoder._modules.kernels is None:
        pytest.skip("our CPU kernels do not run here")
    ids = _ids(model, 2)
    for fold in (True, False):
        decoder.fold_cross = fold
        try:
            with text_products(decoder, "float32"):
                exact = decoder.cross_kv(
                    *batch_conditions([model.encode_prompt("slow jazz")], True)
                )
            with text_products(decoder, kind):
                cheap = decoder.cross_kv(
                    *batch_conditions([model.encode_prompt("slow jazz")], True)
                )
                assert decoder._text is not None and decoder._text[0].k.dtype == torch.bfloat16
                assert (decoder.text_kernel is not None) == (kind == "bfloat16-weights")
            want, got = _steps(model, exact, ids), _steps(model, cheap, ids)
        finally:
            decoder.fold_cross = True
        assert (got - want).abs().mean() / want.std() < 0.002
        if fold:
            assert not torch.equal(exact.folded[0][1].vectors, cheap.folded[0][1].vectors)


def test_a_row_folds_when_its_text_alone_reads_fewer_bytes(int8_model):
    """A row folds while its text, times the stations expected (`fold_stations`), reads fewer
    bytes folded than `FOLD_SHARE` of q_cross's and out_cross's weights; `cross_read` says what
    a step reads;
    batched, each row keeps its own choice and its own logits."""
    model, decoder = int8_model, int8_model.decoder
    short, medium = "jazz", "slow rainy day jazz and soft piano"
    long = " ".join(["a slow and rainy afternoon in a small cafe"] * 6)
    prompts = (short, medium, long)
    states = {p: batch_conditions([model.encode_prompt(p)], guidance=True) for p in prompts}
    weights, per_token = decoder.cross_weight_bytes(), decoder._fold_token_bytes()
    tokens = {p: int(s[1][0].sum()) for p, s in states.items()}
    assert tokens[short] * per_token < FOLD_SHARE * weights < tokens[medium] * per_token
    assert tokens[medium] * per_token < weights < tokens[long] * per_token
    crosses = {p: decoder.cross_kv(*s) for p, s in states.items()}
    assert crosses[medium].folded == []  # fewer bytes folded, but not few enough
    assert decoder.cross_read(crosses[short]) == (tokens[short] * per_token, True)
    assert crosses[long].folded == [] and decoder.cross_read(crosses[long]) == (weights, False)
    try:
        decoder.fold_stations = int(FOLD_SHARE * weights / (tokens[short] * per_token)) + 1
        assert decoder.cross_kv(*states[short]).folded == []
    finally:
        decoder.fold_stations = 1
    both = concat_cross([crosses[short], crosses[long]])
    assert both.folded_inputs().rows.tolist() == [True, False, False, False]
    assert decoder.cross_read(both) == (tokens[short] * per_token + weights, True)
    ids = _ids(model, 4)
    batched = _steps(model, both, ids)
    alone = [_steps(model, crosses[short], ids[:, :2]), _steps(model, crosses[long], ids[:, 2:])]
    assert torch.equal(batched, torch.cat(alone, dim=1))


def test_a_prompt_encoded_through_bfloat16_weights_stays_near_float32(int8_model):
    """`Bf16Products` routes every linear of the T5 encoder (and `enc_to_dec_proj`) through our
    kernel while a prompt is encoded, and only then: the states within 1% of float32's, not
    equal to them (bfloat16 weights really ran), and the modules float32 again after."""
    kernels = int8_model.decoder._modules.kernels
    if kernels is None:
        pytest.skip("our CPU kernels do not run here")
    musicgen = int8_model.musicgen
    exact = encode_prompt(musicgen, "slow jazz with soft drums")
    products = Bf16Products(kernels)
    cheap = encode_prompt(musicgen, "slow jazz with soft drums", products=products)
    linears = [
        m
        for part in (musicgen.text_encoder, musicgen.enc_to_dec_proj)
        if part is not None
        for m in part.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    assert set(products._copies) == set(linears)
    assert all(w.dtype == torch.bfloat16 for w in products._copies.values())
    assert torch.equal(cheap.mask, exact.mask)
    err = (cheap.states - exact.states).abs().mean() / exact.states.abs().mean()
    assert 0 < err < 0.01, err
    assert all(m.route is None for m in linears)
    assert torch.equal(encode_prompt(musicgen, "slow jazz with soft drums").states, exact.states)


@torch.inference_mode()
def test_a_prefill_skips_the_null_rows_cross_attention(int8_model, monkeypatch):
    """A prefill's null rows (all-zero text values, no bias: their cross-attention adds exactly
    zero) skip q_cross, the attention and out_cross; on our kernels a row's products do not
    depend on the rows beside it, so the logits are the same bit for bit."""
    d = int8_model.decoder
    states, mask = batch_conditions([int8_model.encode_prompt("jazz")], guidance=True)
    cross = d.cross_kv(states, mask)
    assert d._text_rows(cross).tolist() == [0]  # the conditional row only
    torch.manual_seed(0)
    ids = torch.randint(0, d.vocab, (2, d.num_codebooks, 30))
    skipped = d.prefill(ids, d.new_cache(2, 64), cross)
    monkeypatch.setattr(type(d), "_text_rows", lambda self, cross: None)
    assert torch.equal(skipped, d.prefill(ids, d.new_cache(2, 64), cross))


@torch.inference_mode()
def test_a_prompt_change_folds_its_text_after_its_first_audio(int8_model):
    """A prompt change's new text is folded `FOLD_AFTER_STEPS` steps after its prefill, not
    before it: the change, the radio's first read after it (half a 10-frame chunk) and the reads
    just after run on the projections, the fold comes in a later read, and the steps read the
    folded text from then on."""
    decoder = int8_model.decoder
    stream = int8_model.open_stream("jazz", SamplingOptions(seed=1), WindowOptions())
    batch = stream.tokens._batch
    stream.read(FOLD_AFTER_STEPS)
    assert batch.cross.folded and batch.cross.fold_later is None  # (folded at the opening's)
    folds = decoder.fold_seconds
    stream.set_prompt("slow jazz")
    changed = batch.steps
    assert not batch.cross.folded and batch.cross.fold_later is not None
    stream.read(change_frames_for(10))
    assert batch.steps - changed < FOLD_AFTER_STEPS
    assert decoder.fold_seconds == folds and not batch.cross.folded
    assert decoder.cross_read(batch.cross) == (decoder.cross_weight_bytes(), False)
    while batch.steps - changed < FOLD_AFTER_STEPS - 10:
        stream.read(10)
    assert decoder.fold_seconds == folds and not batch.cross.folded  # (not yet)
    stream.read(10)
    assert batch.steps - changed >= FOLD_AFTER_STEPS
    assert decoder.fold_seconds > folds and batch.cross.fold_later is None
    assert batch.cross.folded_inputs().rows.tolist() == [True, False]
    tokens = int(batch.cross.stacked()[3][0])
    assert decoder.cross_read(batch.cross) == (tokens * decoder._fold_token_bytes(), True)
