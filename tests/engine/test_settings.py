"""`engine.settings.resolve`: every "auto" decided in one place, on machines described by hand
(a CPU with or without our kernels, a GPU), explicit settings honoured, impossible ones named."""

from __future__ import annotations

import pytest

from engine.options import LoadOptions
from engine.settings import Machine, resolve

AVX2 = Machine(cuda=False, fast_bf16=False, kernels="avx2")
NO_KERNELS = Machine(
    cuda=False, fast_bf16=False, kernels=None, kernels_reason="ENDLESS_RADIO_KERNELS=0"
)
AVX512 = Machine(cuda=False, fast_bf16=True, kernels="avx512")  # AVX-512 BF16, no AMX (Zen 4)
AMX = Machine(cuda=False, fast_bf16=True, kernels="avx512", amx_rows=2, amx_bf16=True)
GPU = Machine(cuda=True, fast_bf16=False, kernels=None, kernels_reason="the model runs on a GPU")


def _resolve(machine: Machine, head_dim: int = 64, **options):
    return resolve(LoadOptions(**options), machine, head_dim)


def test_a_cpu_with_our_kernels_runs_int8_weights_and_an_int8_cache():
    s = _resolve(AVX2)
    assert (s.device, s.dtype, s.quantize, s.kv_cache, s.compile) == (
        "cpu", "float32", "int8", "int8", "none"
    )  # fmt: skip
    assert s.kernels == "avx2" and s.kernel_attention and s.prefill == "decode"
    assert s.describe() == (
        "cpu, float32 activations, int8 weights, int8 KV cache, our kernels (avx2), compile "
        "off, float32 codec"
    )
    assert set(s.reasons) >= {"device", "dtype", "quantize", "kv_cache", "compile", "kernels"}
    assert "no CUDA device" in s.reasons["device"]


def test_a_cpu_without_our_kernels_keeps_pytorchs_paths():
    """ENDLESS_RADIO_KERNELS=0 (or a CPU without AVX2): int8 weights on PyTorch's kernels, a
    float32 cache, prefills with dense weights; asking for a kernel cache is an error."""
    s = _resolve(NO_KERNELS)
    assert (s.quantize, s.kv_cache, s.kernels, s.prefill) == ("int8", "float32", None, "dense")
    assert not s.kernel_attention
    assert "ENDLESS_RADIO_KERNELS=0" in s.reasons["kernels"]
    assert "PyTorch's kernels" in s.describe()
    with pytest.raises(ValueError, match="kv_cache: int8 needs our CPU kernels: ENDLESS_RADIO"):
        _resolve(NO_KERNELS, kv_cache="int8")
    with pytest.raises(ValueError, match="kv_cache: bfloat16 needs our CPU kernels"):
        _resolve(NO_KERNELS, kv_cache="bfloat16")
    # a compiled step without our kernels reads a float32 cache
    assert _resolve(NO_KERNELS, compile="compile").kv_cache == "float32"


def test_a_cpu_with_fast_bfloat16():
    """int8 stays the default (dtype auto); a float dtype asked for turns quantization off, and
    an int8 decoder without our kernels prefills in bfloat16 there."""
    assert _resolve(AVX512).quantize == "int8"
    s = _resolve(AVX512, quantize="none")
    assert (s.dtype, s.kv_cache, s.kernels) == ("bfloat16", "bfloat16", "avx512")
    fast = Machine(cuda=False, fast_bf16=True, kernels=None, kernels_reason="off")
    assert _resolve(fast).prefill == "bf16"


def test_prompt_text_products_run_with_bfloat16_weights_where_our_kernels_run():
    """A prompt's text (the T5 encoder, `Decoder.cross_kv`) goes through bfloat16 products for
    our fused step: PyTorch's on a CPU with native bfloat16 maths, our kernel's (bfloat16
    weights, float32 maths) on an AVX2 CPU, where PyTorch's bfloat16 products are 6x slower;
    float32 without our kernels and on a GPU."""
    s = _resolve(AVX512)
    assert s.text_products == "bfloat16" and "native bfloat16" in s.reasons["text_products"]
    s = _resolve(AVX2)
    assert s.text_products == "bfloat16-weights" and "our kernel" in s.reasons["text_products"]
    assert _resolve(NO_KERNELS).text_products == "float32"
    fast = Machine(cuda=False, fast_bf16=True, kernels=None, kernels_reason="off")
    assert _resolve(fast).text_products == "float32"
    assert _resolve(GPU).text_products == "float32"


def test_the_codec_upsamples_in_bfloat16_where_the_cpu_has_bfloat16_maths():
    """model.codec auto: bfloat16 on a CPU with AMX bfloat16 tiles or AVX-512 BF16, float32 on
    one without (AVX2: oneDNN's bfloat16 convs are slower there), the model's own dtype on a GPU;
    a value set is honoured, and one that is not a codec dtype is an error naming the key."""
    s = _resolve(AMX)
    assert s.codec == "bfloat16" and "AMX" in s.reasons["codec"]
    assert s.describe().endswith("compile off, bfloat16 codec")
    assert (
        _resolve(AVX512).codec == "bfloat16" and "AVX-512 BF16" in _resolve(AVX512).reasons["codec"]
    )
    assert _resolve(AVX2).codec == "float32" and "slower" in _resolve(AVX2).reasons["codec"]
    assert _resolve(NO_KERNELS).codec == "float32"
    assert _resolve(GPU).codec == "bfloat16"  # (as the bfloat16 model)
    assert _resolve(GPU, dtype="float16").codec == "float32"  # (no float16 stack)
    assert _resolve(AVX512, codec="float32").codec == "float32"
    assert _resolve(AVX2, codec="bfloat16").codec == "bfloat16"
    with pytest.raises(ValueError, match="codec: must be one of"):
        _resolve(AVX2, codec="int8")


def test_a_float32_model_stays_exact():
    s = _resolve(AVX2, dtype="float32")
    assert (s.quantize, s.kv_cache, s.kernels) == ("none", "float32", None)
    assert "nothing here runs on them" in s.reasons["kernels"]
    explicit = _resolve(AVX2, dtype="float32", kv_cache="bfloat16")
    assert (explicit.kv_cache, explicit.kernels) == ("bfloat16", "avx2")


def test_cuda_present_means_bfloat16_and_the_static_step_with_graphs():
    s = _resolve(GPU)
    assert (s.device, s.dtype, s.quantize, s.kv_cache, s.compile, s.kernels) == (
        "cuda", "bfloat16", "none", "bfloat16", "graphs", None
    )  # fmt: skip
    assert s.describe() == (
        "cuda, bfloat16 activations, bfloat16 weights, bfloat16 KV cache, PyTorch's kernels, "
        "compile graphs, bfloat16 codec"
    )
    assert _resolve(GPU, device="cpu").device == "cpu"  # a CPU asked for beside a GPU
    assert _resolve(GPU, dtype="float16", compile="none").kv_cache == "float16"
    # under the compiled step too: a cache of another dtype would be converted every step
    assert _resolve(GPU, dtype="float16").kv_cache == "float16"
    assert _resolve(GPU, dtype="float32").kv_cache == "float32"


def test_explicit_settings_are_honoured():
    s = _resolve(AVX2, quantize="int4-ffn", kv_cache="int4", compile="none")
    assert (s.quantize, s.kv_cache, s.compile, s.prefill) == ("int4-ffn", "int4", "none", "decode")
    assert "as set" in s.reasons["kv_cache"]
    s = _resolve(AVX2, dtype="bfloat16", kv_cache="float32", compile="compile")
    assert (s.dtype, s.quantize, s.kv_cache, s.compile) == (
        "bfloat16",
        "none",
        "float32",
        "compile",
    )
    assert _resolve(GPU, device="cuda:1", dtype="float16").device == "cuda:1"


@pytest.mark.parametrize(
    ("machine", "head_dim", "options", "message"),
    [
        (AVX2, 64, dict(device="cuda"), "device: cuda was asked for, but no CUDA device"),
        (GPU, 64, dict(quantize="int8"), "quantize: int8 is a CPU mode"),
        (GPU, 64, dict(kv_cache="int4"), "kv_cache: int4 is a CPU mode"),
        (AVX2, 64, dict(compile="graphs"), "compile: graphs need a CUDA device"),
        (AVX2, 16, dict(kv_cache="int4"), "kv_cache: int4 needs our CPU kernels: an int4 cache"),
        (AVX2, 24, dict(kv_cache="int8"), "kv_cache: int8 needs our CPU kernels: head size 24"),
        (
            Machine(cuda=False, fast_bf16=False, kernels="avx2", int4_reason="no F16C"),
            64,
            dict(quantize="int4"),
            "quantize: int4 needs our int4 CPU kernel .* no F16C; use quantize int8",
        ),
        (AVX2, 64, dict(quantize="int8", dtype="bfloat16"), "quantize: int8 runs its activations"),
        (AVX2, 64, dict(kv_cache="int8", compile="compile"), "kv_cache: the compiled step"),
        (AVX2, 64, dict(dtype="float8"), "dtype: must be one of"),
    ],
)
def test_impossible_combinations_name_the_key(machine, head_dim, options, message):
    with pytest.raises(ValueError, match=message):
        _resolve(machine, head_dim, **options)


def test_an_odd_head_size_falls_back_to_pytorch_attention_on_auto():
    s = _resolve(AVX2, head_dim=24)
    assert (s.quantize, s.kv_cache, s.kernels) == ("int8", "float32", "avx2")  # int8 linears
    assert not s.kernel_attention


def test_the_kernels_are_probed_only_where_the_options_may_use_them(monkeypatch):
    """A float32 model with a float32 cache, eager, does not build our kernels for nothing."""
    from engine import settings

    probed = []
    monkeypatch.setattr(settings, "_probe_kernels", lambda: probed.append(1) or ("avx2", None))
    monkeypatch.setattr(settings.torch.cuda, "is_available", lambda: False)
    plain = LoadOptions(device="cpu", dtype="float32", kv_cache="float32")
    machine = Machine.probe(plain)
    assert (machine.kernels, probed) == (None, [])
    assert "not needed" in resolve(plain, machine, 64).reasons["kernels"]
    for options in (
        LoadOptions(device="cpu"),
        LoadOptions(device="cpu", dtype="bfloat16"),
        LoadOptions(device="cpu", dtype="float32", kv_cache="bfloat16"),
        LoadOptions(device="cpu", dtype="float32", compile="compile"),
    ):
        assert Machine.probe(options).kernels == "avx2", options


def test_probing_a_cpu_without_avx2_or_with_the_kernels_turned_off(monkeypatch):
    """What `Machine.probe` reads from the environment and /proc/cpuinfo reaches the settings
    as the reason: the int8 default then runs on PyTorch's kernels with a float32 cache."""
    from engine import kernels, settings

    monkeypatch.setattr(settings.torch.cuda, "is_available", lambda: False)
    options = LoadOptions(device="cpu")
    monkeypatch.setenv("ENDLESS_RADIO_KERNELS", "0")
    off = Machine.probe(options)
    assert (off.kernels, off.kernels_reason) == (None, "ENDLESS_RADIO_KERNELS=0")
    s = resolve(options, off, head_dim=64)
    assert (s.quantize, s.kv_cache, s.kernels) == ("int8", "float32", None)
    assert s.reasons["kernels"] == "none: ENDLESS_RADIO_KERNELS=0"
    monkeypatch.delenv("ENDLESS_RADIO_KERNELS")
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"sse2", "avx", "fma"})  # no AVX2
    old = Machine.probe(options)
    assert old.kernels is None and old.kernels_reason.endswith("; avx2, f16c (avx2)")
    assert resolve(options, old, head_dim=64).kv_cache == "float32"
