"""int4 weights (engine/linear.py `quantize_int4`, `pack_int4`; engine/kernels/int4_gemm.h): the
byte layout, the kernel against exact integer maths in float64, the quantizer against
max-scaling and against its PyTorch reference, and the int4 decoder against float32."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from bench.precision import teacher_forced_logits
from engine import LoadOptions, ModelLoadError, MusicModel, SamplingOptions
from engine.decoder import Decoder, kernel_layer, kernel_projection
from engine.delay import codebook_delays, delayed_layout
from engine.kernels import int4
from engine.linear import (
    INT4_CLIP,
    INT4_REFITS,
    Int4KernelLinear,
    Int8DynamicLinear,
    Int8KernelLinear,
    pack_int4,
    quantize_int4,
)
from engine.musicgen import MusicGen
from tests.engine.steps import (
    assert_steps_agree,
    decode_steps,
    decode_steps_paired,
    first_mismatch,
    fused_step_of,
    projected,
)


@pytest.fixture(scope="module")
def k4():
    """Our int4 kernel module; the test skips (with the reason) where it cannot run."""
    reason = int4.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the int4 kernel cannot run here: {reason}")
    module = int4.get()
    assert module is not None, "the CPU has AVX2/FMA/F16C but the int4 kernel did not build (log)"
    return module


def _dequantized(codes, scales, offsets, group):
    n, kp = codes.shape
    u = codes.float().view(n, kp // group, group)
    return (u * scales.float()[..., None] + offsets.float()[..., None]).view(n, kp)


def _int4_reference(x: torch.Tensor, w: torch.Tensor, group: int) -> torch.Tensor:
    """What the kernel computes, in float64: per-row int8 activations, the quantizer's codes,
    exact integer sums per group, y = r * sum_g (s * D + b * S)."""
    codes, s, b = quantize_int4(w, group)
    n, kp = codes.shape
    m, kk = x.shape
    r = x.abs().amax(dim=1) / 127
    r = torch.where(r > 0, r, torch.ones_like(r))
    q = torch.zeros(m, kp, dtype=torch.float64)
    q[:, :kk] = torch.round(x * (1 / r)[:, None]).double()  # the kernel multiplies by 1 / r
    grouped = q.view(m, kp // group, group)
    dots = torch.einsum("mgk,ngk->mng", grouped, codes.view(n, kp // group, group).double())
    sums = grouped.sum(dim=-1)  # [M, groups]
    per_group = dots * s.double()[None] + sums[:, None, :] * b.double()[None]
    return r.double()[:, None] * per_group.sum(dim=-1)


@pytest.mark.parametrize(("n", "kk", "group"), [(64, 64, 32), (100, 42, 32), (17, 300, 128),
                                                (256, 1024, 64)])  # fmt: skip
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 33, 300])
def test_linear_int4_is_exact_integer_maths(k4, n, kk, group, rows):
    """Decode rows (1-8, the chunked path up to 16) and prefill rows (33, 300: panels), odd K
    and N (padding to the group and to blocks of 16)."""
    torch.manual_seed(n + kk + rows)
    x, w = torch.randn(rows, kk), torch.randn(n, kk) * 0.02
    packed, scales = pack_int4(w, group)  # the PyTorch quantizer: the reference's codes
    got = k4.linear_int4(x, packed, scales, n)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    want = _int4_reference(x, w, group)
    # float32 sums over the groups: the only rounding
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    exact = x @ w.T  # and the whole product stays within int4's error of float32 maths
    assert (got - exact).norm() < 0.12 * exact.norm()


def test_amx_tiles_give_the_vnni_int4_products_bit_for_bit(k4):
    """Where the CPU has AMX, the int4 products of 3 rows or more (and `amx_rows()`) run on its
    tiles, a group's codes unpacked into a tile per block: the same exact group sums and the
    same float sums in the same order as VNNI, so the same floats; groups of 32 stay on VNNI,
    groups of 128 take two tile passes; N not a multiple of the 64-feature panel."""
    from engine import kernels

    rows_from = kernels.amx_rows()
    if not rows_from:
        pytest.skip("the products do not run on AMX tiles here (no AMX, or turned off)")
    try:
        for n, kk, group in [(1024, 1024, 64), (100, 200, 64), (70, 256, 128), (48, 96, 32)]:
            torch.manual_seed(n + kk)
            packed, scales = pack_int4(torch.randn(n, kk) * 0.02, group)
            for rows in [1, 2, 3, 4, 16, 17, 40]:
                x = torch.randn(rows, kk)
                assert k4.amx_enable(0) == ""
                vnni = k4.linear_int4(x, packed, scales, n)
                assert k4.amx_enable(1) == ""
                got = k4.linear_int4(x, packed, scales, n)
                assert torch.equal(got, vnni), (n, kk, group, rows)
    finally:
        assert kernels.set_amx_rows(rows_from) == ""
    assert kernels.amx_rows() == rows_from


def test_pack_int4_layout():
    """Feature n, input k: block n // 16, step k // 8, byte (n % 16) * 4 + k % 4, the low nibble
    for k % 8 < 4, the high one above; a block's group g holds 16 scales then 16 offsets."""
    torch.manual_seed(0)
    w = torch.randn(20, 70)
    codes, s, b = quantize_int4(w, 32)
    packed, pairs = pack_int4(w, 32)
    assert packed.shape == (2, 96 // 8, 64) and packed.dtype == torch.uint8
    assert pairs.shape == (2, 3, 2, 16) and pairs.dtype == torch.float16
    assert codes.shape == (20, 96) and int(codes.max()) <= 15
    for n in range(20):
        for kk in range(96):
            byte = int(packed[n // 16, kk // 8, (n % 16) * 4 + kk % 4])
            nibble = byte >> 4 if kk % 8 >= 4 else byte & 15
            assert nibble == int(codes[n, kk]), (n, kk)
        for g in range(3):
            assert pairs[n // 16, g, 0, n % 16] == s[n, g]
            assert pairs[n // 16, g, 1, n % 16] == b[n, g]
    assert (codes[:, 70:] == 0).all()  # padding inputs
    assert (packed[1, :, 16:] == 0).all() and (pairs[1, :, :, 4:] == 0).all()  # padding features


def test_quantizer_never_worse_than_max_scaling():
    """Per group, the chosen pair's squared error is at most max-scaling's (s = max|w| / 7,
    codes 1..15 around 8, both in float16), and clearly lower overall."""
    torch.manual_seed(1)
    w = torch.randn(64, 256) * 0.02
    w[3, 5] = 0.3  # an outlier: clipping the rest of its group pays
    for group in (32, 64, 128):
        codes, s, b = quantize_int4(w, group)
        err = ((_dequantized(codes, s, b, group) - w) ** 2).view(64, -1, group).sum(-1)
        g = w.view(64, -1, group)
        s0 = (g.abs().amax(-1, keepdim=True) / 7).half().float()
        b0 = (-8 * s0).half().float()
        u0 = torch.round((g - b0) / s0).clamp(0, 15)
        err0 = ((u0 * s0 + b0 - g) ** 2).sum(-1)
        assert (err <= err0 * (1 + 1e-6)).all()
        assert err.sum() < 0.8 * err0.sum(), f"group {group}: {err.sum()} vs {err0.sum()}"


def test_kernel_quantizer_matches_the_reference(k4):
    """The C++ quantizer (load time) picks the PyTorch reference's codes and pairs, up to float
    summation order deciding a rare near-tie."""
    torch.manual_seed(2)
    w = torch.randn(96, 200) * 0.05
    for group in (32, 64, 128):
        want = quantize_int4(w, group)
        got = k4.quantize_int4(w, group, torch.tensor(INT4_CLIP), INT4_REFITS)
        assert [t.shape for t in got] == [t.shape for t in want]
        assert [t.dtype for t in got] == [t.dtype for t in want]
        assert (got[0] != want[0]).float().mean() < 1e-3
        assert (got[1] != want[1]).float().mean() < 1e-2
        err = [((_dequantized(*q, group)[:, :200] - w) ** 2).sum().item() for q in (got, want)]
        assert err[0] == pytest.approx(err[1], rel=1e-3)


def test_linear_int4_refuses_bad_inputs(k4):
    packed, scales = pack_int4(torch.randn(20, 64), 32)
    with pytest.raises(RuntimeError, match="x has 16 features, the weights were packed for 64"):
        k4.linear_int4(torch.randn(2, 16), packed, scales, 20)
    with pytest.raises(RuntimeError, match="packed codes must be contiguous uint8"):
        k4.linear_int4(torch.randn(2, 64), packed.float(), scales, 20)
    with pytest.raises(RuntimeError, match="scales must be contiguous float16"):
        k4.linear_int4(torch.randn(2, 64), packed, scales.float(), 20)
    with pytest.raises(RuntimeError, match="40 output features need 3 blocks of 16"):
        k4.linear_int4(torch.randn(2, 64), packed, scales, 40)
    with pytest.raises(ValueError, match="int4 group must be one of"):
        pack_int4(torch.randn(20, 64), 48)
    with pytest.raises(ValueError, match="finite and within float16's range"):
        pack_int4(torch.full((4, 32), float("nan")))


def test_int4_decoder_stays_close_to_float32(k4, tiny_head64_dir):
    """Teacher-forced logits of the int4 decoder (and int4 fc1/fc2 with int8 for the rest) on
    the tiny model with heads of 64, against float32: int4 weights stray further than int8
    (bench/precision.py has the real shapes' figures), within these bounds."""
    model = MusicGen.load(Path(tiny_head64_dir))
    frames = torch.randint(0, 2048, (4, 40), generator=torch.Generator().manual_seed(0))
    ids = delayed_layout(frames, codebook_delays(4, 1), 37)
    ref = teacher_forced_logits(model, Decoder(model.decoder), ids)[:, 0]
    for mode, bound in (("int4", 0.12), ("int4-ffn", 0.1)):
        decoder = Decoder(model.decoder, mode, "float32")
        assert isinstance(decoder.layers[0].fc1, Int4KernelLinear)
        assert isinstance(decoder.lm_heads, Int4KernelLinear) == (mode == "int4")
        assert isinstance(decoder.layers[0].qkv, Int4KernelLinear) == (mode == "int4")
        if mode == "int4-ffn":  # the rest int8: our op-by-op kernel where it builds
            assert isinstance(decoder.layers[0].qkv, (Int8KernelLinear, Int8DynamicLinear))
        assert decoder._fused is None, "a float32 cache runs op by op (the fused step's are int8/4)"
        got = teacher_forced_logits(model, decoder, ids)[:, 0]
        mean = (got - ref).abs().mean() / ref.std()
        assert mean < bound, f"{mode}: mean |dlogit| {mean:.2%} of the logit std"
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_int4_model_prefills_and_streams(k4, tiny_head64_dir):
    """LoadOptions(quantize="int4") end to end: the decoder prefills with the same int4
    projections, and a stream reads audio across a prompt change (a re-prefill)."""
    model = MusicModel.load(LoadOptions(model=tiny_head64_dir, device="cpu", quantize="int4"))
    decoder = model.decoder
    assert decoder.precision == "int4" and decoder.prefill_layers is decoder.layers
    stream = model.open_stream("jazz")
    assert stream.read(20).shape == (1, 20 * 640)
    stream.set_prompt("rock", from_frame=10)
    assert stream.read(20).shape == (1, 20 * 640)


def test_int4_without_its_kernel_is_a_clear_error(tiny_head64_dir, monkeypatch):
    monkeypatch.setenv("ENDLESS_RADIO_KERNELS", "0")
    with pytest.raises(ModelLoadError, match="int4 CPU kernel .* ENDLESS_RADIO_KERNELS=0"):
        MusicModel.load(LoadOptions(model=tiny_head64_dir, device="cpu", quantize="int4-ffn"))
    model = MusicGen.load(Path(tiny_head64_dir))
    with pytest.raises(ValueError, match="int4 CPU kernel"):
        Decoder(model.decoder, "int4", "float32")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(quantize="int5"), "quantize: must be one of"),
        (dict(quantize="int4", dtype="bfloat16"), "int4 runs its activations in float32"),
        (dict(quantize="int4-ffn", device="cuda"), "int4-ffn is a CPU mode"),
    ],
)
def test_bad_int4_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        LoadOptions(**options).validate()


# ---- int4 projections in the fused one-call step (decode_step.h) ------------------------------

FUSED_CASES = [("int4", "int8"), ("int4-ffn", "int8"), ("int4", "int4"), ("int4-ffn", "int4")]


@pytest.fixture(scope="module", params=FUSED_CASES, ids=[f"{q}-{c}cache" for q, c in FUSED_CASES])
def int4_fused_model(request, k, k4, tiny_head64_dir):
    """The tiny model (heads of 64: the int4 cache holds only those) in an int4 mode over an int8
    or int4 KV cache: it takes the fused step."""
    quantize, kv_cache = request.param
    options = LoadOptions(model=tiny_head64_dir, device="cpu", quantize=quantize, kv_cache=kv_cache)
    model = MusicModel.load(options)
    decoder = model.decoder
    assert decoder.kv_cache == kv_cache
    assert decoder._fused is not None, f"{quantize} over an {kv_cache} cache takes the fused step"
    assert isinstance(decoder.layers[0].fc2, Int4KernelLinear)
    kinds = {"int4": Int4KernelLinear, "int4-ffn": Int8KernelLinear}[quantize]
    assert isinstance(decoder.layers[0].qkv, kinds) and isinstance(decoder.lm_heads, kinds)
    return model


@pytest.mark.parametrize("stations", [2, 4])
def test_fused_int4_step_equals_op_by_op(int4_fused_model, stations):
    """Stations with guidance (4 or 8 rows: one or two tiles of the int4 product) at different
    positions and prompts, 30 steps, from the same cache at every step: the fused step's logits equal the op-by-op decoder's (linear_int4 /
    linear_int8 per projection: the same integer products; the float sums' order and GELU's
    formula differ by ~1e-7). Run on, each path over its own cache, they stay close."""
    model = int4_fused_model
    decoder = model.decoder
    rows_at = [[p + 7 * (r // 2) for r in range(2 * stations)] for p in range(30)]
    prompts = ["slow jazz", "fast drum and bass with a long prompt", "ambient", "a b c d e f g"]
    prompts = prompts[:stations]
    got, want = decode_steps_paired(decoder, model, rows_at, prompts)
    assert got.shape == want.shape == (30, 2 * stations, decoder.num_codebooks, decoder.vocab)
    assert_steps_agree(got, want, share=0.98)
    # a cached key or value that the ~1e-7 differences round the other way stays in its cache
    apart = decode_steps(decoder, model, True, rows_at, prompts)
    assert_steps_agree(apart, decode_steps(decoder, model, False, rows_at, prompts), share=0.7)


def test_fused_int4_stream_equals_op_by_op_greedy(int4_fused_model):
    """A short greedy stream (prefill, then decode steps on the fused step or op by op): the
    same tokens."""
    model = int4_fused_model
    decoder = model.decoder
    fused = decoder._fused
    tokens = []
    try:
        for step in (fused, None):
            decoder._fused = step
            with projected(decoder):
                stream = model.open_stream("slow jazz", SamplingOptions(greedy=True))
                stream.tokens.generate_until(40)
            tokens.append(stream.tokens.history()[0][:, :40])
    finally:
        decoder._fused = fused
    assert torch.equal(tokens[0], tokens[1]), first_mismatch(tokens[0], tokens[1])


def test_fused_step_checks_int4_projections(k, k4, tiny_head64_dir):
    """An int4 projection comes with its output features; a wrong count, int8 bytes called int4,
    or a projection of another shape are refused naming the layer and the weight."""
    model = MusicGen.load(Path(tiny_head64_dir))
    decoder = Decoder(model.decoder, "int4-ffn", "int8")
    assert decoder._fused is not None

    def step(layers):
        return fused_step_of(k, decoder, layers)

    first, w = (kernel_layer(k, layer) for layer in decoder.layers[:2])
    step([first, w])
    fc2 = decoder.layers[1].fc2
    assert isinstance(fc2, Int4KernelLinear) and w.fc2.kind == "int4"
    assert w.fc2.out_features == fc2.out_features
    w.fc2 = k.Projection(kind="int4", data=fc2.packed, scales=fc2.scales, out_features=100)
    with pytest.raises(RuntimeError, match="layer 1 fc2: 100 output features need 7 blocks"):
        step([first, w])
    qkv = decoder.layers[1].qkv
    w.fc2 = k.Projection(
        kind="int4", data=qkv.packed, scales=qkv.scales, out_features=qkv.out_features
    )
    with pytest.raises(RuntimeError, match="layer 1 fc2: packed codes must be contiguous uint8"):
        step([first, w])
    w.fc2 = kernel_projection(k, fc2)
    w.qkv = kernel_projection(k, decoder.layers[1].fc1)  # int4 E -> F where E -> 3E belongs
    with pytest.raises(RuntimeError, match=r"layer 1 qkv should take 128 -> 384 features"):
        step([first, w])
    with pytest.raises(TypeError, match="int8 or int4 projections, not DenseLinear"):
        kernel_projection(k, Decoder(model.decoder).layers[0].fc1)


def test_coarse_weights_swap_int4_projections_in_and_back(tiny_model_dir):
    """`MusicModel.use_coarse` (the radio's last rung while behind): with it an int8 model's
    steps are an int4 model's, step for step; without it again, its own; a stream reads on
    across the swaps (the KV cache stays)."""
    from tests.engine.steps import decode_steps

    int8 = MusicModel.load(LoadOptions(model=tiny_model_dir, quantize="int8"))
    int4 = MusicModel.load(LoadOptions(model=tiny_model_dir, quantize="int4"))
    assert int8.coarse_available() is None and not int8.coarse_ready
    rows_at = [[3, 7], [4, 8], [5, 9]]

    def steps(model):
        return decode_steps(model.decoder, model, True, rows_at, ["jazz"])

    own = steps(int8)
    stream = int8.open_stream("jazz")
    stream.read(5)
    int8.use_coarse(True)
    assert int8.coarse and int8.coarse_ready
    torch.testing.assert_close(steps(int8), steps(int4), rtol=0, atol=1e-5)
    assert stream.read(5).shape == (1, 5 * int8.hop)
    int8.use_coarse(False)
    assert not int8.coarse
    torch.testing.assert_close(steps(int8), own, rtol=0, atol=0)
    assert stream.read(5).shape == (1, 5 * int8.hop)
    dense = MusicModel.load(LoadOptions(model=tiny_model_dir, quantize="none"))
    assert "int8 projections" in dense.coarse_available()
    with pytest.raises(ValueError, match="int8 projections"):
        dense.use_coarse(True)


def test_coarse_weights_in_the_last_half_of_the_layers(tiny_model_dir):
    """`use_coarse(0.5)` (the radio's first coarse rung): int4 projections in the last half of
    the decoder's layers, int8 in the first half and the lm heads, on one fused step; its steps
    lie between the int8 model's and the all-int4 one's, and back at 0 they are int8's again,
    exactly. A share outside [0, 1] is refused."""
    from tests.engine.steps import decode_steps

    int8 = MusicModel.load(LoadOptions(model=tiny_model_dir, quantize="int8"))
    rows_at = [[3, 7], [4, 8], [5, 9]]

    def steps(model):
        return decode_steps(model.decoder, model, True, rows_at, ["jazz"])

    decoder = int8.decoder
    fine, heads, n = list(decoder.layers), decoder.lm_heads, len(decoder.layers)
    own = steps(int8)
    int8.use_coarse(1.0)
    coarse, every = list(decoder.layers), steps(int8)
    int8.use_coarse(0.5)
    assert int8.coarse == 0.5 and decoder.lm_heads is heads
    assert decoder.layers[: n - n // 2] == fine[: n - n // 2]
    assert decoder.layers[n - n // 2 :] == coarse[n - n // 2 :]
    half = steps(int8)
    to_int8, to_int4 = (half - own).abs().mean(), (half - every).abs().mean()
    assert 0 < to_int8 < (every - own).abs().mean() and to_int4 > 0
    assert decoder._fused is decoder._weights(0.5)[3]  # made once, kept for the next time
    int8.use_coarse(0.0)
    assert int8.coarse == 0.0 and decoder.layers == fine
    torch.testing.assert_close(steps(int8), own, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"coarse: a share of the layers in \[0, 1\], got 1.5"):
        int8.use_coarse(1.5)


def test_coarse_weights_are_prepared_a_layer_per_step_between_reads(tiny_model_dir, monkeypatch):
    """`MusicModel.prepare_coarse`: the int4 set a layer at a time, so that the radio spreads
    its seconds between chunks; the model reads on with its int8 weights meanwhile, and then
    `use_coarse` swaps at once (it quantizes nothing more), to an int4 model's steps."""
    from engine.decoder import Decoder
    from tests.engine.steps import decode_steps

    int8 = MusicModel.load(LoadOptions(model=tiny_model_dir, quantize="int8"))
    int4 = MusicModel.load(LoadOptions(model=tiny_model_dir, quantize="int4"))
    rows_at = [[3, 7], [4, 8], [5, 9]]

    def steps(model):
        return decode_steps(model.decoder, model, True, rows_at, ["jazz"])

    own = steps(int8)
    stream = int8.open_stream("jazz")
    layers = len(int8.decoder.layers)
    parts = int8.prepare_coarse()
    for i in range(layers):
        assert not int8.coarse_ready, f"ready after {i} of {layers} layers"
        next(parts)
        assert stream.read(2).shape == (1, 2 * int8.hop)  # int8 reads go on between the parts
        assert not int8.coarse
    assert int8.coarse_ready
    assert next(parts, "done") == "done"
    torch.testing.assert_close(steps(int8), own, rtol=0, atol=0)  # still int8 until swapped

    def quantize_again(*args, **kwargs):
        raise AssertionError("use_coarse quantized a layer although the set was ready")

    monkeypatch.setattr(Decoder, "_layer", staticmethod(quantize_again))
    int8.use_coarse(True)
    torch.testing.assert_close(steps(int8), steps(int4), rtol=0, atol=1e-5)
    assert list(int8.prepare_coarse()) == []  # nothing left to do


def test_packed_int4_weights_come_back_from_the_disk_cache(k4, tmp_path, monkeypatch, caplog):
    """The second quantization of the same weights reads the packed set the first one stored
    (the same bytes, without running the quantizer); other weights, another group or a damaged
    entry quantize afresh; ENDLESS_RADIO_CACHE=0 stores nothing."""
    from engine import int4_cache
    from engine.linear import pack_int4

    monkeypatch.setenv("ENDLESS_RADIO_CACHE", str(tmp_path))
    torch.manual_seed(0)
    w = torch.randn(40, 96)
    first = pack_int4(w, 32, k4)
    (entry,) = (tmp_path / "int4").iterdir()

    class NoQuantizer:  # the cached set must not need the quantizer
        __name__ = k4.__name__

        def quantize_int4(self, *args):
            raise AssertionError("quantized again despite the cache")

    again = pack_int4(w.clone(), 32, NoQuantizer())
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))

    other = w.clone()
    other[3, 7] += 0.5  # one value: another row sum, another entry
    assert not torch.equal(pack_int4(other, 32, k4)[0], first[0])
    pack_int4(w, 64, k4)
    assert len(list((tmp_path / "int4").iterdir())) == 3

    entry.write_bytes(b"not a tensor file")
    with caplog.at_level("WARNING", logger="engine.int4_cache"):
        mended = pack_int4(w, 32, k4)
    assert "unreadable" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(first, mended, strict=True))
    assert int4_cache.load(entry.stem) is not None  # stored again

    monkeypatch.setenv("ENDLESS_RADIO_CACHE", "0")
    assert int4_cache.folder() is None
    pack_int4(torch.randn(16, 64), 32, k4)
    assert len(list((tmp_path / "int4").iterdir())) == 3


def test_int4_cache_entries_unused_for_a_month_are_removed(tmp_path, monkeypatch, caplog):
    """A read keeps an entry fresh; the first store of a process removes entries nobody used
    for UNUSED_DAYS (an older quantizer's, say) and day-old partial writes, and says so."""
    from engine import int4_cache

    monkeypatch.setenv("ENDLESS_RADIO_CACHE", str(tmp_path))
    where = tmp_path / "int4"
    where.mkdir()
    codes, scales = torch.zeros(4, dtype=torch.uint8), torch.zeros(2).half()
    for name in ("old", "read", "recent"):
        torch.save((codes, scales), where / f"{name}.pt")
    (where / "old.123.part").write_bytes(b"x")
    (where / "notes.txt").write_text("not ours")
    month = int4_cache.UNUSED_DAYS * 86400
    stale = time.time() - month - 60
    for name in ("old.pt", "read.pt", "old.123.part", "notes.txt"):
        os.utime(where / name, (stale, stale))
    assert int4_cache.load("read") is not None  # read: fresh again
    monkeypatch.setattr(int4_cache, "_pruned", set())
    with caplog.at_level("INFO", logger="engine.int4_cache"):
        int4_cache.store("new", codes, scales)
    assert sorted(p.name for p in where.iterdir()) == [
        "new.pt",
        "notes.txt",
        "read.pt",
        "recent.pt",
    ]
    assert "removed 2 old files" in caplog.text and "unused for 30 days" in caplog.text
    assert int4_cache.prune(where) == 0  # nothing more; once per process from `store`


def test_an_unwritable_int4_cache_entry_is_only_logged(tmp_path, monkeypatch, caplog):
    """torch.save reports a failed write as RuntimeError, not OSError: the cache logs it and the
    caller goes on (the radio never stops for its cache)."""
    from engine import int4_cache

    monkeypatch.setenv("ENDLESS_RADIO_CACHE", str(tmp_path))
    (tmp_path / "int4" / f"entry.{os.getpid()}.part").mkdir(parents=True)  # in the way
    with caplog.at_level("WARNING", logger="engine.int4_cache"):
        int4_cache.store("entry", torch.zeros(1, dtype=torch.uint8), torch.zeros(1).half())
    assert "cannot write" in caplog.text
    assert int4_cache.load("entry") is None
