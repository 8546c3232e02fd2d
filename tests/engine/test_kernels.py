"""Our CPU decode kernels (engine/kernels) against PyTorch's maths, and a decoder that uses them
against the same decoder on PyTorch's kernels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine import LoadOptions, MusicModel, kernels
from engine.decoder import Decoder


@pytest.mark.parametrize("rows", range(1, 9))
def test_linear_bf16_equals_float32_maths(k, rows):
    torch.manual_seed(rows)
    x, w = torch.randn(rows, 256), torch.randn(96, 256).bfloat16()
    want = x.bfloat16().float() @ w.float().T  # the kernel rounds x to bfloat16, sums in float32
    got = k.linear_bf16(x, w)
    assert got.dtype == torch.float32 and got.shape == (rows, 96)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("size", [0, 255, 256, 4096 + 100, 3 * 2**20 + 7])
def test_stream_read_reads_every_whole_piece(k, size):
    # the XOR of every 8-byte word of its whole 256-byte pieces, whichever thread read them
    g = torch.Generator().manual_seed(size)
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g)
    words = data[: size // 256 * 256].view(torch.int64).numpy()
    assert k.stream_read(data) == int(np.bitwise_xor.reduce(words, initial=0))
    with pytest.raises(RuntimeError, match="contiguous uint8 vector"):
        k.stream_read(data.to(torch.int8))


def test_attention_prefetch_distance_is_the_cpu_makers(k):
    # AMD's CPUs read a cached head 4 KB ahead, the others 1 KB (common.h: measured on each)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    vendors = [line.split(":")[1].strip() for line in cpuinfo if line.startswith("vendor_id")]
    if not vendors:
        pytest.skip("no vendor_id in /proc/cpuinfo")
    vendor = vendors[0]
    assert k.attend_prefetch() == (4096 if vendor == "AuthenticAMD" else 1024)


def test_linear_bf16_refuses_bad_shapes(k):
    w = torch.randn(64, 64).bfloat16()
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        k.linear_bf16(torch.randn(9, 64), w)
    with pytest.raises(RuntimeError, match="x has 32 features, w expects 64"):
        k.linear_bf16(torch.randn(2, 32), w)
    with pytest.raises(RuntimeError, match="contiguous bfloat16"):
        k.linear_bf16(torch.randn(2, 64), w.float())


@pytest.mark.parametrize("rows", [1, 2, 5, 13, 40])
@pytest.mark.parametrize("features", [768, 100, 33])
def test_linear_bf16_weights_is_float32_maths_on_the_rounded_weights(k, rows, features):
    """A prompt's text products (`text_products.h`): float32 rows of any number times
    bfloat16 weights, summed in float32; K not a multiple of 8 and N not of 3 too."""
    torch.manual_seed(rows * features)
    x, w = torch.randn(rows, features), torch.randn(50, features).bfloat16()
    want = x.double() @ w.double().T  # the weights' rounding is the only one beside float32's
    got = k.linear_bf16_weights(x, w)
    assert got.dtype == torch.float32 and got.shape == (rows, 50)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    grouped = k.linear_bf16_weights(torch.stack([x, 2 * x]), torch.stack([w, w]))
    torch.testing.assert_close(grouped[1].double(), 2 * want, rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("rows", [1, 4, 13, 40])
@pytest.mark.parametrize("features", [1024, 100, 5])
def test_matmul_panels_is_the_per_head_product(k, rows, features):
    """The fold's per-head products: weights [G, K, N] in panels of 8 features (`panels`, the
    last padded), against float64 maths on the same rounded weights."""
    from engine.decoder import panels

    torch.manual_seed(rows + features)
    x, w = torch.randn(3, rows, 64), torch.randn(3, 64, features).bfloat16()
    got = k.matmul_panels(x, panels(w), features)
    assert got.dtype == torch.float32 and got.shape == (3, rows, features)
    torch.testing.assert_close(got.double(), x.double() @ w.double(), rtol=1e-5, atol=1e-4)


def test_text_products_refuse_bad_shapes(k):
    from engine.decoder import panels

    w = torch.randn(64, 32).bfloat16()
    with pytest.raises(RuntimeError, match="x has 16 features, w expects 32"):
        k.linear_bf16_weights(torch.randn(2, 16), w)
    with pytest.raises(RuntimeError, match="bfloat16 w"):
        k.linear_bf16_weights(torch.randn(2, 32), w.float())
    with pytest.raises(RuntimeError, match="2 groups of x, 1 of w"):
        k.linear_bf16_weights(torch.randn(2, 3, 32), w[None])
    p = panels(torch.randn(1, 32, 20).bfloat16())
    with pytest.raises(RuntimeError, match="30 features need 4 panels, w has 3"):
        k.matmul_panels(torch.randn(1, 2, 32), p, 30)
    with pytest.raises(RuntimeError, match="x has 16 features, w expects 32"):
        k.matmul_panels(torch.randn(1, 2, 16), p, 20)


@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_decode_attention_equals_sdpa_per_row_length(k, head_dim):
    torch.manual_seed(head_dim)
    rows, heads, slots = 4, 3, 300
    keys = torch.randn(rows, heads, slots, head_dim).bfloat16()
    values = torch.randn(rows, heads, slots, head_dim).bfloat16()
    q = torch.randn(rows, heads, head_dim) * 2
    lengths = torch.tensor([1, 17, 256, 300])  # one slot, a ragged tail, whole vectors, full
    got = k.decode_attention(q, keys, values, lengths, head_dim**-0.5)
    for b, n in enumerate(lengths.tolist()):
        want = F.scaled_dot_product_attention(
            q[b, :, None], keys[b, :, :n].float(), values[b, :, :n].float()
        )[:, 0]
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=2e-6)


def test_decode_attention_reads_a_strided_cache_of_row_views(k):
    """The batch hands each stream a view of rows of the layer's cache: strides, not copies."""
    cache = torch.randn(2, 6, 4, 50, 16).bfloat16()  # [L, B, H, P, D]
    q = torch.randn(2, 4, 16)
    view = cache[1, 2:4]
    got = k.decode_attention(q, view, view, torch.tensor([50, 7]), 0.25)
    want = k.decode_attention(q, view.contiguous(), view.contiguous(), torch.tensor([50, 7]), 0.25)
    assert torch.equal(got, want)


def test_decode_attention_refuses_bad_lengths(k):
    cache = torch.randn(2, 2, 10, 16).bfloat16()
    q = torch.randn(2, 2, 16)
    with pytest.raises(RuntimeError, match=r"row 1 attends 11 positions, outside \[1, 10\]"):
        k.decode_attention(q, cache, cache, torch.tensor([3, 11]), 0.25)
    with pytest.raises(RuntimeError, match="bfloat16 keys and values"):
        k.decode_attention(q, cache.float(), cache.float(), torch.tensor([3, 3]), 0.25)


def test_attend_step_writes_the_new_keys_then_attends(k):
    """One call = split the fused qkv, store k/v (bfloat16) at each row's position, attend."""
    torch.manual_seed(3)
    rows, heads, slots, d = 3, 4, 40, 32
    e = heads * d
    keys = torch.randn(rows, heads, slots, d).bfloat16()
    values = torch.randn(rows, heads, slots, d).bfloat16()
    want_k, want_v = keys.clone(), values.clone()
    qkv = torch.randn(rows, 3 * e)
    positions = torch.tensor([0, 21, 39])
    got = k.attend_step(qkv, keys, values, positions, d**-0.5)
    q, kn, vn = (x.view(rows, heads, d) for x in qkv.chunk(3, dim=-1))
    for b, at in enumerate(positions.tolist()):
        want_k[b, :, at], want_v[b, :, at] = kn[b], vn[b]
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)
    want = k.decode_attention(q, want_k, want_v, positions + 1, d**-0.5).reshape(rows, e)
    assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match=r"row 2 position 40 outside \[0, 40\)"):
        k.attend_step(qkv, keys, values, torch.tensor([0, 1, 40]), 0.1)


def test_attend_step_q8_quantizes_per_vector_and_attends(k):
    """The int8 cache: each new key/value vector stored as int8 with max|x| / 127 as its scale;
    the attention over the dequantized cache equals float32 SDPA over it."""
    from engine.kv_cache import quantize_vectors

    torch.manual_seed(4)
    rows, heads, slots, d = 2, 3, 50, 64
    e = heads * d
    full_k, full_v = torch.randn(rows, heads, slots, d), torch.randn(rows, heads, slots, d)
    keys, key_scales = quantize_vectors(full_k)
    values, value_scales = quantize_vectors(full_v)
    qkv = torch.randn(rows, 3 * e)
    positions = torch.tensor([5, 49])
    got = k.attend_step_q8(qkv, keys, key_scales, values, value_scales, positions, d**-0.5)
    q, kn, vn = (x.view(rows, heads, d) for x in qkv.chunk(3, dim=-1))
    for b, at in enumerate(positions.tolist()):
        want_k, want_s = quantize_vectors(kn[b])
        assert torch.equal(keys[b, :, at], want_k)
        torch.testing.assert_close(key_scales[b, :, at], want_s)
        deq_k = keys[b, :, : at + 1].float() * key_scales[b, :, : at + 1, None]
        deq_v = values[b, :, : at + 1].float() * value_scales[b, :, : at + 1, None]
        want = F.scaled_dot_product_attention(q[b, :, None], deq_k, deq_v)[:, 0].reshape(e)
        # the kernel also rounds the query to 15 bits (int16 dot products): within 1e-4
        torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-4)
        # and the quantization itself is close: within 1% of the float32 attention's spread
        exact_k, exact_v = full_k[b, :, : at + 1].clone(), full_v[b, :, : at + 1].clone()
        exact_k[:, at], exact_v[:, at] = kn[b], vn[b]
        exact = F.scaled_dot_product_attention(q[b, :, None], exact_k, exact_v)[:, 0].reshape(e)
        assert (got[b] - exact).abs().max() < 0.01 * exact.abs().max() + 0.01


def _teacher_forced_logits(decoder: Decoder, model: MusicModel, steps: int) -> torch.Tensor:
    """Logits [steps, 2, K, V] of decode steps fed the same fixed random tokens."""
    torch.manual_seed(0)
    condition = model.encode_prompt("slow jazz")
    from engine.conditioning import batch_conditions

    states, mask = batch_conditions([condition], guidance=True)
    cross = decoder.cross_kv(states, mask)
    cache = decoder.new_cache(2, 256)
    ids = torch.randint(0, decoder.vocab, (2, decoder.num_codebooks, 40))
    out = [decoder.prefill(ids, cache, cross)]
    for _ in range(steps - 1):
        step = torch.randint(0, decoder.vocab, (1, decoder.num_codebooks)).expand(2, -1)
        out.append(decoder.decode_one_step(step, cache, cross))
    return torch.stack(out)


@pytest.mark.parametrize(
    "quantize,dtype,kv",
    [("none", "bfloat16", "bfloat16"), ("int8", "float32", "int8")],
)
def test_decoder_on_our_kernels_matches_pytorch_kernels(
    k, tiny_model_dir, monkeypatch, quantize, dtype, kv
):
    """The same bfloat16 / int8 decoder with and without our kernels: the KV cache in bfloat16
    or int8 instead of float32 is the only rounding difference, far below the weights' own."""
    options = LoadOptions(model=tiny_model_dir, device="cpu", dtype=dtype, quantize=quantize)
    model = MusicModel.load(options)
    ours = model.decoder
    assert ours.kv_cache == kv and ours._kernels is not None
    monkeypatch.setitem(kernels._state, "module", None)
    plain = Decoder(model.musicgen.decoder, ours.precision)
    assert plain.kv_cache == "float32" and plain._kernels is None
    with torch.inference_mode():
        got = _teacher_forced_logits(ours, model, 120)
        want = _teacher_forced_logits(plain, model, 120)
    diff = (got - want).abs()
    assert diff.mean() < 0.01 * want.std(), (diff.mean(), want.std())
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
    assert agree > 0.97, agree


def test_kv_cache_option(k, tiny_model_dir, monkeypatch):
    from engine import ModelLoadError

    def load(**kw):
        return MusicModel.load(LoadOptions(model=tiny_model_dir, device="cpu", **kw)).decoder

    assert load(dtype="float32").kv_cache == "float32"  # a float32 model stays exact
    assert load(dtype="float32", quantize="int8", kv_cache="bfloat16").kv_cache == "bfloat16"
    assert load(dtype="bfloat16", quantize="none", kv_cache="float32")._kernels is None
    with pytest.raises(ValueError, match="kv_cache: must be one of"):
        LoadOptions(kv_cache="int2").validate()
    monkeypatch.setenv("ENDLESS_RADIO_KERNELS", "0")
    with pytest.raises(ModelLoadError, match="kv_cache: int8 needs our CPU kernels"):
        load(dtype="float32", quantize="int8", kv_cache="int8")
    assert load(dtype="float32", quantize="int8").kv_cache == "float32"  # auto: PyTorch's


def test_the_variant_that_runs_is_the_best_this_cpu_has(k, monkeypatch):
    """AVX-512 BF16 + VNNI where the CPU has it, else AVX2; the module and `isa()` name it;
    ENDLESS_RADIO_KERNELS picks a variant or turns them off, with the reason."""
    flags = set(Path("/proc/cpuinfo").read_text().split())
    best = next(v for v in kernels.VARIANTS if set(v.cpu_flags) <= flags)
    assert kernels.choose_variant() == (best, None)
    assert kernels.isa() == k.isa() == best.name
    runs = kernels.runnable_variants()[0]  # best first, then what a failed build falls back to
    assert runs[0] == best and runs == [v for v in kernels.VARIANTS if set(v.cpu_flags) <= flags]
    monkeypatch.setenv("ENDLESS_RADIO_KERNELS", "avx2")
    assert kernels.choose_variant()[0].name == "avx2"
    assert [v.name for v in kernels.runnable_variants()[0]] == ["avx2"]  # named: only that one
    monkeypatch.setenv("ENDLESS_RADIO_KERNELS", "0")
    assert kernels.choose_variant() == (None, "ENDLESS_RADIO_KERNELS=0")
    monkeypatch.setenv("ENDLESS_RADIO_KERNELS", "sse2")
    assert "ENDLESS_RADIO_KERNELS=sse2 is not 0, auto or one of avx512, avx2" in str(
        kernels.choose_variant()[1]
    )


def test_the_variants_this_cpu_does_not_run_still_compile():
    """Every variant but the one that runs here (which the other tests build and run) compiles
    to machine code with its flags: an AVX2 machine catches a broken AVX-512 build, and an
    AVX-512 one a broken AVX2 build."""
    import shutil
    import subprocess

    if shutil.which("g++") is None:
        pytest.skip("no g++: the kernels cannot be built here at all")
    running, _ = kernels.choose_variant()
    others = [v for v in kernels.VARIANTS if running is None or v.name != running.name]
    assert others, "two variants, one runs"
    for variant in others:
        done = subprocess.run(
            kernels.compile_check_command(variant), capture_output=True, text=True
        )
        assert done.returncode == 0, f"{variant.name}:\n{done.stderr[-3000:]}"


def test_a_failed_build_falls_back_to_the_next_variant_and_says_so(monkeypatch, caplog):
    """A CPU with AVX-512 whose AVX-512 build fails runs the AVX2 build (with a warning naming the
    failure), not PyTorch's kernels; a variant asked for by name is the only one tried."""
    built: list[str] = []

    class Module:
        def __init__(self, name: str) -> None:
            self.name = name

        def isa(self) -> str:
            return self.name

        def amx_enable(self, rows: int) -> str:
            return "the AVX2 build has no AMX products"

    def build(name, source, flags, **_):
        variant = name.split("_")[3]
        built.append(variant)
        if variant == "avx512":
            raise RuntimeError("Error building extension: target specific option mismatch")
        return Module(variant)

    every_flag = {f for v in kernels.VARIANTS for f in v.cpu_flags}
    monkeypatch.setattr(kernels, "build", build)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: every_flag)
    monkeypatch.delenv("ENDLESS_RADIO_KERNELS", raising=False)
    with caplog.at_level("WARNING", logger="engine.kernels"):
        module = kernels._build()
    assert module is not None and module.isa() == "avx2" and built == ["avx512", "avx2"]
    assert "the avx512 build failed (RuntimeError" in caplog.text
    assert "running the avx2 build" in caplog.text

    built.clear()
    caplog.clear()
    monkeypatch.setenv("ENDLESS_RADIO_KERNELS", "avx512")
    with caplog.at_level("WARNING", logger="engine.kernels"):
        assert kernels._build() is None
    assert built == ["avx512"]
    assert "not used: the avx512 build failed" in caplog.text
