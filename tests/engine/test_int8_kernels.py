"""Our int8 kernels (engine/kernels/*/int8_gemm.h, decode_step.h): the packed int8 projection
against exact integer maths, and the one-call decoder step against the same decoder run op by
op in Python."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

from engine import LoadOptions, MusicModel
from engine.conditioning import batch_conditions
from engine.decoder import LayerWeights, kernel_layer, kernel_projection
from engine.linear import Int8KernelLinear, pack_int8, pack_int8_reference
from tests.engine.steps import assert_steps_agree, decode_steps, fused_step_of


def _int8_reference(x: torch.Tensor, w: torch.Tensor, levels: int = 127) -> torch.Tensor:
    """What the kernel computes, in float64: per-row int8 activations (codes in +-levels),
    per-feature int8 weights, exact integer sums."""
    w_scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    wq = torch.round(w / w_scale[:, None]).clamp(-127, 127)
    x_scale = x.abs().amax(dim=1) / levels
    xq = torch.round(x * (1 / x_scale)[:, None])  # the kernel multiplies by the inverse
    return (xq.double() @ wq.double().T) * x_scale[:, None].double() * w_scale[None].double()


@pytest.mark.parametrize(("n", "kk"), [(192, 64), (100, 42), (200, 1000), (64, 1024), (1024, 4096)])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 16, 17, 37, 50])
def test_linear_int8_is_exact_integer_maths(k, n, kk, rows):
    """Exact integer products of int8 codes; a prefill's rows (from `prefill_rows`) take codes
    in +-`prefill_levels` (63 on AVX2: no vpsignb then; 127, as a step's, on AVX-512)."""
    torch.manual_seed(n + kk + rows)
    x, w = torch.randn(rows, kk), torch.randn(n, kk) * 0.02
    packed, scales = pack_int8(w)
    assert packed.shape == (-(-n // 64), -(-kk // 4), 256) and packed.dtype == torch.uint8
    got = k.linear_int8(x, packed, scales)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    levels = k.prefill_levels if rows >= k.prefill_rows else 127
    want = _int8_reference(x, w, levels)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # and the quantization stays close to float32 maths
    exact = x @ w.T
    assert (got - exact).abs().max() < 0.03 * exact.abs().max()


def test_amx_tiles_give_the_vnni_products_bit_for_bit(k):
    """Where the CPU has AMX, the int8 products of `amx_rows()` rows or more run on its tiles
    (avx512/amx.h): the same exact integer sums as VNNI, so the same floats, for every row count
    (a tile's 16 rows, the rows left over) and K with inputs left past the tiles' 64 (VNNI sums
    those), gelu or not; ENDLESS_RADIO_AMX's setting comes back after each switch."""
    from engine import kernels

    rows_from = kernels.amx_rows()
    if not rows_from:
        pytest.skip("the int8 products do not run on AMX tiles here (no AMX, or turned off)")
    try:
        for n, kk in [(200, 1000), (64, 1024), (1024, 4096), (96, 68)]:
            torch.manual_seed(n + kk)
            w = torch.randn(n, kk) * 0.02
            packed, scales = pack_int8(w)
            for rows in [1, 2, 3, 4, 7, 16, 17, 33, 50]:
                x = torch.randn(rows, kk)
                for gelu in (False, True):
                    assert k.amx_enable(0) == ""
                    vnni = k.linear_int8(x, packed, scales, gelu)
                    assert k.amx_enable(1) == ""
                    assert torch.equal(k.linear_int8(x, packed, scales, gelu), vnni), (n, kk, rows)
    finally:
        k.amx_enable(rows_from)
    assert kernels.amx_rows() == rows_from


def test_endless_radio_amx_sets_the_rows_or_turns_the_tiles_off(monkeypatch):
    """ENDLESS_RADIO_AMX: unset or auto the measured default, 0 off, a number the rows from
    which the tiles run; anything else named in a warning and the default taken."""
    from engine import kernels

    for value, want in [("auto", (kernels.AMX_MIN_ROWS, None)), ("0", (0, None)), ("4", (4, None))]:
        monkeypatch.setenv("ENDLESS_RADIO_AMX", value)
        assert kernels.amx_setting() == want
    monkeypatch.delenv("ENDLESS_RADIO_AMX")
    assert kernels.amx_setting() == (kernels.AMX_MIN_ROWS, None)
    monkeypatch.setenv("ENDLESS_RADIO_AMX", "yes")
    rows, problem = kernels.amx_setting()
    assert rows == kernels.AMX_MIN_ROWS
    assert problem == "ENDLESS_RADIO_AMX=yes is not 0, auto or a row count; taking auto (2 rows)"


@pytest.mark.parametrize("rows", [2, 50])
def test_linear_int8_adds_the_gelu_of_the_fused_steps_fc1(k, rows):
    """`gelu=True`: gelu of the same products in one call (a prefill's fc1 and a step's), the
    erf within float32's rounding of PyTorch's exact one."""
    torch.manual_seed(rows)
    x, w = torch.randn(rows, 256), torch.randn(512, 256) * 0.05
    packed, scales = pack_int8(w)
    plain = k.linear_int8(x, packed, scales)
    torch.testing.assert_close(
        k.linear_int8(x, packed, scales, gelu=True), F.gelu(plain), rtol=0, atol=2e-6
    )


def test_quantize_int8_scales_each_row_by_its_largest_magnitude(k):
    """`quantize_int8` (the folded cross-attention's vectors): codes round(x * 127 / max|x|)
    half to even, the scale max|x| / 127; a zero row has codes 0 (and a scale of 1)."""
    torch.manual_seed(0)
    x = torch.randn(300, 1024) * torch.rand(300, 1)
    x[7] = 0.0
    codes, scales = k.quantize_int8(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and scales.shape == (300,)
    amax = x.abs().amax(dim=1)
    torch.testing.assert_close(scales[amax > 0], amax[amax > 0] / 127)
    want = torch.round(x * (127 / amax.clamp(min=1e-30))[:, None])
    assert (codes.float() - want).abs().max() <= 1  # (x / s against x * (1 / s): an ulp)
    assert (codes.float() == want).float().mean() > 0.999
    assert int(codes[7].abs().max()) == 0 and codes.abs().max() == 127


def test_a_prefills_rows_take_seven_bit_codes_on_avx2(k):
    """The prefill path's codes: 63 levels each side on AVX2 (the stored weights' +128 times the
    codes straight into vpmaddubsw stay under its saturation), 127 on AVX-512 (VNNI is exact for
    8 bits); a decode step's rows (up to 8 stations' 16) keep 127 everywhere."""
    assert k.prefill_rows == 17
    assert k.prefill_levels == (63 if k.isa() == "avx2" else 127)
    # the largest products the unsigned sums can see: weights at +-127 (bytes 255 and 1) against
    # codes at +-63 in every input, where 8-bit codes would saturate int16 pairs
    w = torch.full((64, 256), 0.02)
    w[1::2] = -0.02
    x = torch.ones(k.prefill_rows, 256)
    x[1::2] = -1.0
    got = k.linear_int8(x, *pack_int8(w))
    torch.testing.assert_close(got.double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-5)


def test_pack_int8_layout(k):
    """Feature n, input i sits at block n // 64, group i // 4, byte (n % 64) * 4 + i % 4, + 128."""
    w = torch.randn(70, 10)
    packed, scales = pack_int8(w)
    q = torch.round(w / scales[:, None]).to(torch.int16)
    for n, i in [(0, 0), (5, 3), (63, 9), (64, 4), (69, 7)]:
        assert int(packed[n // 64, i // 4, (n % 64) * 4 + i % 4]) == int(q[n, i]) + 128
    assert int(packed[1, 0, 6 * 4]) == 128  # padding feature 70: weight 0
    assert int(packed[0, 2, 3]) == 128  # padding input 11: weight 0


@pytest.mark.parametrize(("n", "kk"), [(70, 10), (64, 1024), (1024, 4096), (3, 1)])
def test_our_packer_writes_the_references_bytes(k, n, kk):
    """`kernels.pack_int8` (every model's load) writes exactly what the PyTorch definition does,
    padding, a row of zeros and codes at a rounding tie (+-0.5: half to even) included."""
    torch.manual_seed(n * kk)
    w = torch.randn(n, kk) * 0.02
    w[0] = 0.0
    if kk > 2:
        w[-1, :3] = torch.tensor([1.0, 0.5 / 127, -2.5 / 127])  # codes 127, 0.5 and -2.5
    packed, scales = pack_int8(w, k)
    want_packed, want_scales = pack_int8_reference(w)
    assert torch.equal(scales, want_scales)
    assert torch.equal(packed, want_packed)


def test_linear_int8_refuses_bad_inputs(k):
    packed, scales = pack_int8(torch.randn(64, 32))
    with pytest.raises(RuntimeError, match="x has 16 features, the weights were packed for 32"):
        k.linear_int8(torch.randn(2, 16), packed, scales)
    with pytest.raises(RuntimeError, match="packed weights must be contiguous uint8"):
        k.linear_int8(torch.randn(2, 32), packed.float(), scales)
    with pytest.raises(RuntimeError, match="128 scales for 1 blocks"):
        k.linear_int8(torch.randn(2, 32), packed, torch.ones(128))


@pytest.fixture(scope="module")
def int8_model(k, tiny_model_dir):
    model = MusicModel.load(LoadOptions(model=tiny_model_dir, device="cpu", quantize="int8"))
    assert model.decoder._fused is not None, "the int8 decoder should take the one-call step"
    assert isinstance(model.decoder.layers[0].fc1, Int8KernelLinear)
    return model


@pytest.mark.parametrize("stations", [2, 4])
def test_fused_step_equals_op_by_op_int8_decoder(int8_model, stations):
    """Stations (2 rows each) at different window positions, prompts of different lengths; 4
    stations (8 rows) take the projections' chunked path for 5 to 16 rows."""
    decoder = int8_model.decoder
    rows_at = [[p + 7 * (r // 2) for r in range(2 * stations)] for p in range(30)]
    prompts = ["slow jazz", "fast drum and bass with a long prompt", "ambient", "a b c d e f g"]
    got = decode_steps(decoder, int8_model, True, rows_at, prompts[:stations])
    want = decode_steps(decoder, int8_model, False, rows_at, prompts[:stations])
    assert got.shape == want.shape == (30, 2 * stations, decoder.num_codebooks, decoder.vocab)
    assert_steps_agree(got, want, share=0.98)


def test_fused_step_refuses_bad_inputs(int8_model):
    decoder = int8_model.decoder
    cross = decoder.cross_kv(*batch_conditions([int8_model.encode_prompt("jazz")], guidance=True))
    cache = decoder.new_cache(2, 16)
    ids = torch.zeros(2, decoder.num_codebooks, dtype=torch.long)
    with pytest.raises(RuntimeError, match="row 0 position 16 outside"):
        decoder.decode_one_step(ids, cache, cross, [16, 0])
    with pytest.raises(RuntimeError, match="token id 5000 outside"):
        decoder.decode_one_step(ids + 5000, cache, cross)
    with pytest.raises(RuntimeError, match="keys/values"):
        decoder.decode_one_step(ids, decoder.new_cache(3, 16), cross)


def test_fused_step_takes_its_weights_by_name(int8_model):
    """Each layer's weights come by name (`DecoderLayer`); a projection of another kind or
    shape, or a misshapen layer norm, is refused naming the layer and the weight."""
    decoder = int8_model.decoder
    k = decoder.kernels

    def step(layers):
        return fused_step_of(k, decoder, layers)

    first, w = (kernel_layer(k, layer) for layer in decoder.layers[:2])
    step([first, w])
    packed = decoder.layers[1].fc1
    w.fc1 = k.Projection(kind="int2", data=packed.packed, scales=packed.scales, out_features=128)
    with pytest.raises(RuntimeError, match="layer 1 fc1 has weights of kind 'int2'"):
        step([first, w])
    w.fc1 = k.Projection(kind="int8", data=packed.packed, scales=packed.scales, out_features=100)
    with pytest.raises(RuntimeError, match="layer 1 fc1: 100 output features, its scales are for"):
        step([first, w])
    w.fc1 = kernel_projection(k, packed)
    w.qkv = kernel_projection(k, decoder.layers[1].out_self)
    with pytest.raises(RuntimeError, match=r"layer 1 qkv should take \d+ -> \d+ features, was"):
        step([first, w])
    w.qkv = kernel_projection(k, decoder.layers[1].qkv)
    weight, bias = decoder.layers[1].ln_ffn
    w.ln_ffn = k.LayerNorm(weight, bias[:-1])
    with pytest.raises(RuntimeError, match=r"layer 1 ln_ffn.bias must be \[\d+\]"):
        step([first, w])
    with pytest.raises(TypeError):
        k.DecoderLayer(qkv=w.qkv)  # every weight, by name
    with pytest.raises(AttributeError):
        w.fc3 = w.fc2


def test_int8_prefill_equals_step_by_step_decoding(int8_model):
    """An int8 decoder prefills with the same int8 projections (a compute-bound product where
    our kernel beats bfloat16): the prefill's last logits and cache agree with feeding the same
    tokens one decode step at a time."""
    decoder = int8_model.decoder
    assert decoder.prefill_layers is decoder.layers
    cross = decoder.cross_kv(*batch_conditions([int8_model.encode_prompt("jazz")], guidance=True))
    torch.manual_seed(2)
    ids = torch.randint(0, decoder.vocab, (1, decoder.num_codebooks, 40)).expand(2, -1, -1)
    with torch.inference_mode():
        prefilled = decoder.new_cache(2, 48)
        got = decoder.prefill(ids, prefilled, cross)
        stepped = decoder.new_cache(2, 48)
        for p in range(ids.shape[-1]):
            want = decoder.decode_one_step(ids[:, :, p], stepped, cross)
    assert prefilled.length == stepped.length == 40
    # the prefill attends to its own float keys, the steps to the int8 cache: close, not equal
    assert (got - want).abs().max() < 0.05 * want.std()
    keys = prefilled.keys[:, :, :, :40].float() * prefilled.key_scales[:, :, :, :40, None]
    step_keys = stepped.keys[:, :, :, :40].float() * stepped.key_scales[:, :, :, :40, None]
    assert (keys - step_keys).abs().max() < 0.05 * step_keys.abs().max()


def test_a_layer_names_its_missing_unknown_and_mistyped_weights(int8_model):
    """`DecoderLayer(**weights)` takes each weight by name: the TypeError says which are
    missing, which names it does not know, and which weight is of the wrong kind."""
    decoder = int8_model.decoder
    k = decoder.kernels
    w = kernel_layer(k, decoder.layers[0])
    names = (
        "ln_self",
        "qkv",
        "out_self",
        "ln_cross",
        "q_cross",
        "out_cross",
        "ln_ffn",
        "fc1",
        "fc2",
    )
    folded = {"k_cross", "v_cross", "q_cross_weight", "out_cross_weight"}  # read once per prompt
    assert set(names) == {f.name for f in fields(LayerWeights)} - folded
    weights = {name: getattr(w, name) for name in names}
    k.DecoderLayer(**weights)
    with pytest.raises(TypeError, match="DecoderLayer: missing out_self, fc2; unknown fc3"):
        k.DecoderLayer(
            **{n: v for n, v in weights.items() if n not in ("out_self", "fc2")}, fc3=w.fc2
        )
    with pytest.raises(TypeError, match="DecoderLayer: ln_ffn is a .*Projection"):
        k.DecoderLayer(**{**weights, "ln_ffn": w.fc1})
