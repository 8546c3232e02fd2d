"""The engine's settings resolved once: every "auto" of `LoadOptions` becomes a concrete choice.

`resolve(options, machine, head_dim)` is the one place that decides the device, the dtype, the
decoder's weights (int8 or not), the KV cache, the compiled step and whether our CPU kernels run,
each with its reason; `Machine.probe` reads what it needs to know about where it runs (a CUDA
device, fast bfloat16 on the CPU, our kernels). Loading logs the result in one line
(`Resolved.describe()`), for example

    engine: cpu, float32 activations, int8 weights, int8 KV cache, our kernels (avx2), compile off,
    float32 codec

and the rest of the engine (`engine.loading`, `engine.decoder`, `engine.linear`) reads the
`Resolved` choices instead of looking at the options again. A combination this machine or model
cannot run is a `ValueError` naming the key, for example `kv_cache: int8 needs our CPU kernels:
ENDLESS_RADIO_KERNELS=0`. The decoder's thread count is not a setting: `engine.threads` measures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine import kernels
from engine.kv_cache import Q4_HEAD
from engine.options import LoadOptions

KERNEL_CACHES = ("bfloat16", "int8", "int4")  # the KV caches our CPU kernels attend to
INT8_MODES = ("int8", "int4-ffn")  # decoder weights with int8 projections (`engine.linear`)
Chose = Callable[[str, str, str], str]  # records (key, value, reason), returns the value


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bfloat16 matrix math (AVX-512 BF16 or AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & (kernels.cpu_flags() or set()))


def cpu_has_amx_bf16() -> bool:
    """True on CPUs with AMX's bfloat16 tiles (Intel Xeon from Sapphire Rapids on)."""
    return "amx_bf16" in (kernels.cpu_flags() or set())


@dataclass(frozen=True)
class Machine:
    """What the resolver needs to know about where it runs."""

    cuda: bool  # a CUDA device is available
    fast_bf16: bool  # the CPU has native bfloat16 matrix maths (AVX-512 BF16 or AMX)
    kernels: str | None  # the instruction set our CPU kernels (engine.kernels) run with, or None
    kernels_reason: str = ""  # why they do not run, when `kernels` is None
    int4_reason: str | None = None  # why our int4 weight kernel cannot run; None: it can
    amx_rows: int = 0  # our int8 products of this many rows or more run on AMX tiles; 0: never
    amx_bf16: bool = False  # the CPU has AMX's bfloat16 tiles (oneDNN's bfloat16 convs use them)

    @classmethod
    def probe(cls, options: LoadOptions) -> Machine:
        """This machine, for `options`: our CPU kernels are built (once per machine: ~40 s) when
        the model will run on the CPU and the options may use them, the int4 kernel only when
        they ask for int4 weights."""
        cuda = torch.cuda.is_available()
        on_cpu = options.device == "cpu" or (options.device == "auto" and not cuda)
        isa: str | None = None
        reason: str | None = None
        if not on_cpu:
            reason = "the model runs on a GPU"
        elif not _may_use_kernels(options):
            reason = "not needed: float weights and a float32 cache"
        else:
            isa, reason = _probe_kernels()
        int4_reason = _probe_int4() if options.quantize.startswith("int4") else None
        return cls(
            cuda,
            cpu_has_fast_bf16(),
            isa,
            reason or "",
            int4_reason,
            _probe_amx(isa),
            cpu_has_amx_bf16(),
        )


def _may_use_kernels(options: LoadOptions) -> bool:
    """Whether `options` may run anything on our CPU kernels: quantized weights (their
    projections and, by default, their cache), bfloat16 weights, a cache the kernels read, or a
    compiled step (its default cache is theirs). Not a float32 or float16 model with a float32
    cache, eager: it is not worth building them for."""
    quantized = options.quantize not in ("auto", "none") or (
        options.quantize == "auto" and options.dtype == "auto"
    )
    return (
        quantized
        or options.dtype in ("auto", "bfloat16")
        or options.kv_cache in KERNEL_CACHES
        or options.compile == "compile"
    )


def _probe_kernels() -> tuple[str | None, str | None]:
    reason = kernels.unavailable_reason()
    if reason is not None:
        return None, reason
    module = kernels.get()
    if module is None:
        return None, "they did not build (see the log)"
    return str(module.isa()), None


def _probe_amx(isa: str | None) -> int:
    return kernels.amx_rows() if isa is not None else 0


def _probe_int4() -> str | None:
    from engine.kernels import int4

    reason = int4.unavailable_reason()
    if reason is None and int4.get() is None:
        reason = "it did not build (see the log)"
    return reason


# `Resolved.text_products` that round a prompt's keys and values to bfloat16 (either maths)
TEXT_BFLOAT16 = ("bfloat16", "bfloat16-weights")


@dataclass(frozen=True)
class Resolved:
    """Concrete engine settings: no "auto" left. `reasons` says why each was chosen."""

    device: str  # "cpu", "cuda" or "cuda:N"
    dtype: str  # the model's dtype: "float32", "bfloat16" or "float16" (quantized: float32)
    quantize: str  # the decoder's projections: "none", "int8", "int4" or "int4-ffn"
    kv_cache: str  # the self-attention cache: "float32", "bfloat16", "float16", "int8" or "int4"
    compile: str  # the decoder step: "none" (eager), "compile" or "graphs"
    kernels: str | None  # the ISA of our CPU kernels where this decoder runs on them, else None
    # how prefills run an int8 decoder's projections: "decode" (the decode step's own: our int8
    # kernel, the int4 kernel, or dense weights), "bf16" or "dense" (PyTorch's int8 kernels lose
    # on a prefill's big matrix products, so without ours the dense weights prefill)
    prefill: str = "decode"
    # the products that turn a prompt's text into the cross-attention a fused CPU step reads
    # (the T5 encoder, then its keys and values and their fold: `Decoder.cross_kv`), once per
    # prompt change: "bfloat16" where the CPU has native bfloat16 maths (PyTorch's, x2-4
    # faster; the keys and values are rounded to bfloat16, the fold to int8 anyway),
    # "bfloat16-weights" on our kernels elsewhere (bfloat16 weights, float32 maths:
    # `linear_bf16_weights`), else "float32"
    text_products: str = "float32"
    # the streaming codec's upsampling stack: "float32" or "bfloat16" (auto where the CPU has
    # AMX or AVX-512 BF16: x1.35-1.5 the codec's speed, 44.6 dB from the float32 decode; on a
    # GPU as a bfloat16 model, float32 beside any other)
    codec: str = "float32"
    reasons: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def precision(self) -> str:
        """The decoder's mode (`engine.linear.DECODER_PRECISIONS`)."""
        return "dense" if self.quantize == "none" else self.quantize

    @property
    def kernel_attention(self) -> bool:
        """Whether decode steps attend (and sample) with our CPU kernels."""
        return self.kernels is not None and self.kv_cache in KERNEL_CACHES

    def describe(self) -> str:
        """The one log line, e.g. `cpu, float32 activations, int8 weights, int8 KV cache, our
        kernels (avx2), compile off, float32 codec`."""
        weights = self.dtype if self.quantize == "none" else self.quantize
        kernels = f"our kernels ({self.kernels})" if self.kernels else "PyTorch's kernels"
        compiled = "off" if self.compile == "none" else self.compile
        return (
            f"{self.device}, {self.dtype} activations, {weights} weights, {self.kv_cache} KV "
            f"cache, {kernels}, compile {compiled}, {self.codec} codec"
        )

    def explain(self) -> str:
        """Every choice with its reason, one per line."""
        return "\n".join(f"  {key}: {reason}" for key, reason in self.reasons.items())


def resolve(options: LoadOptions, machine: Machine, head_dim: int) -> Resolved:
    """The concrete settings for `options` on `machine`, for a model whose attention heads have
    `head_dim` dimensions; ValueError naming the key for a combination that cannot run."""
    options.validate()
    reasons: dict[str, str] = {}

    def chose(key: str, value: str, reason: str) -> str:
        reasons[key] = f"{value}: {reason}"
        return value

    device = _device(options.device, machine, chose)
    on_cpu = device == "cpu"
    quantize = _quantize(options, on_cpu, machine, chose)
    dtype = _dtype(options.dtype, quantize, on_cpu, machine, chose)
    compile_mode = _compile(options.compile, on_cpu, chose)
    kernels = machine.kernels if on_cpu else None
    kv_cache = _kv_cache(
        options.kv_cache, on_cpu, dtype, quantize, compile_mode, kernels, head_dim, machine, chose
    )
    used = quantize in INT8_MODES or dtype == "bfloat16" or kv_cache in KERNEL_CACHES
    if kernels is not None and not used:
        kernels = None
        chose("kernels", "none", "nothing here runs on them (float weights and a float32 cache)")
    elif kernels is not None:
        amx = machine.amx_rows
        tiles = f"; the int8 products of {amx}+ rows on AMX tiles" if amx else ""
        chose("kernels", kernels, f"the best instruction set this CPU has for them{tiles}")
    else:
        why = machine.kernels_reason or "not available" if on_cpu else "not on a CPU"
        chose("kernels", "none", why)
    prefill = "decode"
    if quantize in INT8_MODES and kernels is None:
        prefill = "bf16" if machine.fast_bf16 else "dense"
        chose("prefill", prefill, "PyTorch's int8 kernels are slow on a prefill's big products")
    text_products = "float32"
    if kernels is not None and machine.fast_bf16:
        text_products = chose(
            "text_products", "bfloat16", "this CPU has native bfloat16 maths (prompt changes)"
        )
    elif kernels is not None:
        text_products = chose(
            "text_products",
            "bfloat16-weights",
            "our kernel reads the text's weights as bfloat16 and multiplies in float32 "
            "(prompt changes; this CPU has no native bfloat16 maths)",
        )
    codec = _codec(options.codec, on_cpu, dtype, machine, chose)
    return Resolved(
        device,
        dtype,
        quantize,
        kv_cache,
        compile_mode,
        kernels,
        prefill,
        text_products,
        codec,
        reasons,
    )


def _device(requested: str, machine: Machine, chose: Chose) -> str:
    if requested == "auto":
        if machine.cuda:
            return chose("device", "cuda", "auto: a CUDA device is present")
        return chose("device", "cpu", "auto: no CUDA device")
    if requested.startswith("cuda") and not machine.cuda:
        raise ValueError(f"device: {requested} was asked for, but no CUDA device is available")
    return chose("device", requested, "as set")


def _quantize(options: LoadOptions, on_cpu: bool, machine: Machine, chose: Chose) -> str:
    requested = options.quantize
    if requested == "auto":
        if on_cpu and options.dtype == "auto":
            return chose("quantize", "int8", "auto on a CPU: 3x faster than bfloat16 per step")
        why = "auto on a GPU" if not on_cpu else f"auto with dtype {options.dtype} set"
        return chose("quantize", "none", why)
    if requested != "none" and not on_cpu:
        raise ValueError(
            f"quantize: {requested} is a CPU mode, but the model would load on a GPU; use dtype "
            "bfloat16 or float16 there"
        )
    if requested.startswith("int4") and machine.int4_reason is not None:
        raise ValueError(
            f"quantize: {requested} needs our int4 CPU kernel (AVX2, FMA, F16C and a C++ "
            f"compiler), which cannot run here: {machine.int4_reason}; use quantize int8"
        )
    return chose("quantize", requested, "as set")


def _dtype(requested: str, quantize: str, on_cpu: bool, machine: Machine, chose: Chose) -> str:
    if quantize != "none":
        return chose("dtype", "float32", f"{quantize} weights run their activations in float32")
    if requested != "auto":
        return chose("dtype", requested, "as set")
    if not on_cpu:
        return chose("dtype", "bfloat16", "auto on a GPU")
    if machine.fast_bf16:
        return chose("dtype", "bfloat16", "auto: this CPU has native bfloat16 maths")
    return chose("dtype", "float32", "auto: this CPU has no native bfloat16 maths")


def _codec(requested: str, on_cpu: bool, dtype: str, machine: Machine, chose: Chose) -> str:
    if requested != "auto":
        return chose("codec", requested, "as set")
    if not on_cpu:  # (the stack runs in float32 or bfloat16: a float16 model's codec is float32)
        codec = "bfloat16" if dtype == "bfloat16" else "float32"
        return chose("codec", codec, f"auto on a GPU: as the {dtype} model")
    # oneDNN's bfloat16 convs and matmuls at the codec's shapes: x0.66-0.68 the time of float32
    # on AMX tiles (Xeon), x0.65-0.74 with AVX-512 BF16 (Zen 4, 2026-12-07: `python
    # bench/bench_codec.py --threads 2 --tables 46`); with AVX2 alone slower than float32
    if machine.amx_bf16:
        return chose(
            "codec", "bfloat16", "auto: this CPU has AMX bfloat16 tiles (x1.4-1.5 the codec)"
        )
    if machine.fast_bf16:
        return chose("codec", "bfloat16", "auto: this CPU has AVX-512 BF16 (x1.35-1.5 the codec)")
    return chose("codec", "float32", "auto: without bfloat16 maths, bfloat16 convs are slower")


def _compile(requested: str, on_cpu: bool, chose: Chose) -> str:
    if requested == "auto":
        if on_cpu:
            return chose("compile", "none", "auto on a CPU: a step is bound by reading weights")
        return chose("compile", "graphs", "auto on a GPU: CUDA graphs, a step is launch-bound")
    if requested == "graphs" and on_cpu:
        raise ValueError("compile: graphs need a CUDA device, but the model would load on the CPU")
    return chose("compile", requested, "as set")


def _kv_cache(
    requested: str,
    on_cpu: bool,
    dtype: str,
    quantize: str,
    compile_mode: str,
    kernels: str | None,
    head_dim: int,
    machine: Machine,
    chose: Chose,
) -> str:
    """Where our kernels attend (CPU): int8 for a quantized decoder, bfloat16 for a bfloat16
    one; a float32 model stays on PyTorch's exact path (float32 on a CPU, where PyTorch's
    bfloat16 attention is several times slower; the model dtype on a GPU). A compiled step
    reads a float cache: on a GPU the model dtype, on a CPU bfloat16 where our kernels attend,
    else float32."""
    attention = "float32" if on_cpu else dtype
    reason = None
    if on_cpu:
        reason = None if kernels is not None else (machine.kernels_reason or "not available")
        if reason is None and not (head_dim % 16 == 0 and head_dim <= 128):
            reason = f"head size {head_dim} is not a multiple of 16 up to 128"
        if reason is None and requested == "int4" and head_dim != Q4_HEAD:
            reason = f"an int4 cache holds heads of {Q4_HEAD}, this model's are {head_dim}"
    if requested == "auto" and compile_mode != "none":
        if not on_cpu:  # (another dtype than the queries' would be converted every step)
            return chose("kv_cache", dtype, "auto under a compiled step on a GPU: the model dtype")
        if reason is not None:
            return chose("kv_cache", "float32", f"auto, compiled, no kernels: {reason}")
        return chose("kv_cache", "bfloat16", "auto under a compiled step: a float cache")
    if requested == "float32":
        return chose("kv_cache", attention, "as set (the attention dtype)")
    reduced = dtype == "bfloat16" or quantize != "none"
    if requested == "auto" and not reduced:
        return chose("kv_cache", attention, f"auto: {dtype} weights keep the exact path")
    if not on_cpu:
        if requested in ("int8", "int4"):
            raise ValueError(f"kv_cache: {requested} is a CPU mode (our CPU kernels)")
        if requested == "auto":
            return chose("kv_cache", dtype, "auto on a GPU: the model dtype")
        return chose("kv_cache", requested, "as set")
    if reason is not None:
        if requested != "auto":
            raise ValueError(f"kv_cache: {requested} needs our CPU kernels: {reason}")
        return chose("kv_cache", attention, f"auto without our kernels: {reason}")
    if requested == "auto":
        value = "int8" if quantize != "none" else "bfloat16"
        return chose("kv_cache", value, f"auto: our kernels attend, {quantize} weights")
    return chose("kv_cache", requested, "as set")


def for_decoder(device: str, dtype: str, precision: str, kv_cache: str, head_dim: int) -> Resolved:
    """The settings of a decoder built on its own (tests, benchmarks: `engine.decoder.Decoder`
    without a loaded model's settings): its weights' `device` and `dtype`, its `precision`
    (`engine.linear.DECODER_PRECISIONS`) and `kv_cache`, eager, through `resolve`."""
    quantized = precision != "dense"
    options = LoadOptions(
        model="(a decoder)",
        device=device,
        dtype="auto" if quantized else dtype,  # quantized weights take float32 activations
        quantize=precision if quantized else "none",
        kv_cache=kv_cache,
        compile="none",
    )
    return resolve(options, Machine.probe(options), head_dim)
