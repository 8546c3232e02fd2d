"""The decoder's linear layers in each precision mode.

- `dense`: `F.linear` in the model's dtype (float32, bfloat16 or float16).
- `bf16`: dense bfloat16 weights under float32 activations (an int8 decoder's prefills).
- `int4`: 4-bit weight codes with a float16 scale and offset per output feature per group of 64
  inputs (`quantize_int4`), activations int8 per row, through our `linear_int4` kernel
  (`engine/kernels/int4_gemm.h`; AVX-512 VNNI or AVX2): half int8's bytes per decode step, at a
  precision cost that `bench/precision.py` reports. A decoder may hold int4 for its
  feed-forward projections only (`int4-ffn`, int8 for the rest).
- `int8`: weights quantized per output channel to int8, activations quantized on the fly, one
  scale per row; inputs and outputs stay float32. A CPU mode: a decode step reads a quarter of
  the float32 bytes. Where our kernels run (AVX-512 VNNI or AVX2), `linear_int8` (exact int32
  sums, 8-bit activations, any number of rows: decode steps and prefills alike); elsewhere
  PyTorch's fbgemm dynamic kernels (`torch.ops.quantized.linear_dynamic`, 7-bit activations).

Dense bfloat16 weights on a CPU run a decode step's few rows through our `linear_bf16` kernel
(`engine.kernels`: one pass over the weights at memory speed, 1.4x `F.linear` here) and larger
batches (prefills) through `F.linear`.

The decoder calls every projection through one of these, so a new mode is one class here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from engine.settings import Resolved

PRECISIONS = ("dense", "bf16", "int8", "int4")
# A decoder's modes (`engine.decoder.Decoder`): one precision for every projection, or int4 for
# the feed-forward projections (fc1, fc2: 8 of a layer's 14 M weights) and int8 for the rest.
DECODER_PRECISIONS = ("dense", "int8", "int4", "int4-ffn")
INT4_FFN = ("fc1", "fc2")
Projection = Callable[[torch.Tensor], torch.Tensor]  # x [..., in] -> [..., out]: any class here
MAX_KERNEL_ROWS = 8  # linear_bf16 handles up to 8 rows (4 stations with guidance)


class DenseLinear:
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight  # [out, in]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class CastLinear:
    """Dense weights kept in another dtype than the activations (bfloat16 under float32)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        self.weight = weight.detach().to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)


class Bf16KernelLinear(CastLinear):
    """Dense bfloat16 weights on a CPU with our kernels: a decode step's few rows through
    `linear_bf16`, bigger batches (prefills) through `CastLinear`'s `F.linear`."""

    def __init__(self, weight: torch.Tensor, kernels: ModuleType) -> None:
        super().__init__(weight.contiguous(), torch.bfloat16)
        self._kernels = kernels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if rows > MAX_KERNEL_ROWS:
            return super().__call__(x)
        y = self._kernels.linear_bf16(x.reshape(rows, x.shape[-1]), self.weight)
        return y.view(*x.shape[:-1], self.weight.shape[0]).to(x.dtype)


def pack_int8(
    weight: torch.Tensor, kernels: ModuleType | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (bytes [ceil(N / 64), ceil(K / 4), 256] uint8, scales [N] float32), the
    layout of `engine/kernels/common.h`: blocks of 64 output features, 4 inputs x 64 features
    per 256 bytes, each byte the int8 weight + 128; padding is weight 0. With `kernels` (ours)
    their `pack_int8` does it (the same bytes, ~10x faster: part of every start's load)."""
    if kernels is not None:
        return kernels.pack_int8(weight.detach().float().cpu().contiguous())
    return pack_int8_reference(weight)


def pack_int8_reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`pack_int8` in PyTorch: the definition our kernels' packer is tested against."""
    w = weight.detach().float().cpu()
    n, k = w.shape
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int16) + 128
    blocks, groups = -(-n // 64), -(-k // 4)
    full = torch.full((blocks * 64, groups * 4), 128, dtype=torch.int16)
    full[:n, :k] = q
    packed = full.to(torch.uint8).view(blocks, 64, groups, 4).permute(0, 2, 1, 3)
    return packed.reshape(blocks, groups, 256).contiguous(), scales.contiguous()


class Int8KernelLinear:
    """int8 weights through our `linear_int8` kernel (AVX-512 VNNI or AVX2 CPUs)."""

    def __init__(self, weight: torch.Tensor, kernels: ModuleType) -> None:
        self.packed, self.scales = pack_int8(weight, kernels)
        self.out_features = weight.shape[0]
        self._kernels = kernels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._kernels.linear_int8(x.reshape(-1, shape[-1]), self.packed, self.scales)
        return y.view(*shape[:-1], self.out_features)

    def with_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """gelu(self(x)) in one call: the kernel's epilogue (the fused step's fc1 gelu, erf
        within 1.5e-7), on its threads while the products are in cache (a prefill's PyTorch gelu
        over 50 rows took 0.47 ms a layer, 11 of its 191 ms, on 2 Zen 3 cores)."""
        shape = x.shape
        y = self._kernels.linear_int8(x.reshape(-1, shape[-1]), self.packed, self.scales, gelu=True)
        return y.view(*shape[:-1], self.out_features)


INT4_GROUPS = (32, 64, 128)  # inputs per int4 group: bytes vs error (docs/int4-weights.md)
INT4_GROUP = 64  # the default
# ranges tried per group ([min, max] x ratio) and least-squares refits of (scale, offset) to the
# chosen codes: 11 ratios and 2 refits did no better on the bench's weights (8.45% against 8.43%
# product error at groups of 64)
INT4_CLIP = (1.0, 0.9)
INT4_REFITS = 4


def _round_half(t: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to what float16 stores (the kernel reads float16)."""
    return t.half().float()


def _int4_codes(w: torch.Tensor, s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Codes u in [0, 15] nearest to w = s * u + b (groups [..., G], s and b [..., 1])."""
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round((w - b) / safe).clamp_(0, 15)


def _int4_error(
    w: torch.Tensor, mask: torch.Tensor, s: torch.Tensor, b: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    return (((s * u + b - w) * mask) ** 2).sum(dim=-1, keepdim=True)


def _int4_weights(weight: torch.Tensor, group: int) -> torch.Tensor:
    """The weights as float32 [N, K] on the CPU, checked for int4."""
    if group not in INT4_GROUPS:
        raise ValueError(f"int4 group must be one of {INT4_GROUPS}, got {group}")
    w = weight.detach().float().cpu()
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"int4: weights must be a non-empty [N, K] matrix, got {tuple(w.shape)}")
    low, high = torch.aminmax(w)  # one pass; NaN propagates, so `not <=` catches it too
    if not (low.item() >= -6e4 and high.item() <= 6e4):
        raise ValueError("int4: weights must be finite and within float16's range (|w| <= 6e4)")
    return w


def quantize_int4(
    weight: torch.Tensor, group: int = INT4_GROUP
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (codes [N, Kp] uint8 in [0, 15], scales and offsets [N, Kp / group]
    float16) with w ~ scale * code + offset per group of `group` inputs (Kp: K padded to a
    multiple of `group`, codes 0 there).

    Per group, the (scale, offset) pair with the least squared error among: max-scaling
    (scale max|w| / 7, codes 1..15 around 8: never worse than it), the group's range [min, max]
    shrunk by each ratio of `INT4_CLIP` (clipping the tails buys finer steps), and then
    least-squares refits of the best pair to its codes. Errors are measured with the pair
    rounded to float16, as the kernel reads it. This is the reference; our int4 module's
    `quantize_int4` (`engine/kernels/int4_quantize.h`) does the same ~50x faster."""
    w = _int4_weights(weight, group)
    n, k = w.shape
    groups = -(-k // group)
    padded = torch.zeros(n, groups * group)
    padded[:, :k] = w
    mask = torch.zeros(groups * group)
    mask[:k] = 1
    g, mask = padded.view(n, groups, group), mask.view(groups, group)
    lo = g.masked_fill(mask == 0, float("inf")).amin(dim=-1, keepdim=True)
    hi = g.masked_fill(mask == 0, float("-inf")).amax(dim=-1, keepdim=True)

    amax = torch.maximum(lo.abs(), hi.abs())
    s = _round_half(amax / 7)
    b = _round_half(-8 * s)
    best = (s, b, _int4_codes(g, s, b))
    best_err = _int4_error(g, mask, *best)

    def consider(s: torch.Tensor, b: torch.Tensor) -> None:
        nonlocal best, best_err
        s, b = _round_half(s.clamp(min=0)), _round_half(b)
        u = _int4_codes(g, s, b)
        err = _int4_error(g, mask, s, b, u)
        better = err < best_err
        best = tuple(
            torch.where(better, new, old) for new, old in zip((s, b, u), best, strict=True)
        )
        best_err = torch.where(better, err, best_err)

    for ratio in INT4_CLIP:
        consider((hi - lo) * ratio / 15, lo * ratio)
    for _ in range(INT4_REFITS):  # w ~ s * u + b by least squares over the group's codes
        u = best[2] * mask
        count = mask.sum(dim=-1, keepdim=True)
        su, sw = u.sum(dim=-1, keepdim=True), (g * mask).sum(dim=-1, keepdim=True)
        suu, suw = (u * u).sum(dim=-1, keepdim=True), (u * g).sum(dim=-1, keepdim=True)
        det = count * suu - su * su
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        consider(
            torch.where(ok, (count * suw - su * sw) / det, best[0]),
            torch.where(ok, (suu * sw - su * suw) / det, best[1]),
        )
    s, b, u = best
    codes = (u * mask).to(torch.uint8).view(n, groups * group)
    return codes, s[..., 0].half(), b[..., 0].half()


def pack_int4(
    weight: torch.Tensor, group: int = INT4_GROUP, kernels: ModuleType | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (codes uint8 [ceil(N / 16), Kp / 8, 64], scales float16
    [ceil(N / 16), Kp / group, 2, 16]), the layout of `engine/kernels/int4_gemm.h`.

    Features go in blocks of 16. Per block and step of 8 inputs (k = 8t + i), 64 bytes: byte
    4j + i holds feature j's code of input 8t + i in its low nibble and of input 8t + 4 + i in
    its high nibble (i < 4). Per block and group: the 16 features' scales, then their 16
    offsets. Padding features have code 0, scale 0 and offset 0 (their outputs are 0).
    With `kernels` (our int4 module) its quantizer runs, and the packed result is kept on disk
    (`engine.int4_cache`: the next start reads it back instead); else `quantize_int4`."""
    if kernels is None:
        return _pack_int4(*quantize_int4(weight, group), group)
    from engine import int4_cache

    w = _int4_weights(weight, group)
    name = int4_cache.key(w, group, (*INT4_CLIP, INT4_REFITS), kernels.__name__)
    cached = int4_cache.load(name)
    if cached is not None:
        return cached
    clips = torch.tensor(INT4_CLIP, dtype=torch.float32)
    codes, scales, offsets = kernels.quantize_int4(w, group, clips, INT4_REFITS)
    packed = _pack_int4(codes, scales, offsets, group)
    int4_cache.store(name, *packed)
    return packed


def _pack_int4(
    codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`pack_int4`'s layout of quantized codes [N, Kp], scales and offsets [N, Kp / group]."""
    n, kp = codes.shape
    blocks = -(-n // 16)
    full = torch.zeros(blocks * 16, kp, dtype=torch.uint8)
    full[:n] = codes
    steps = full.view(blocks, 16, kp // 8, 2, 4)  # [block, feature j, step t, nibble, i]
    packed = steps[:, :, :, 0] | (steps[:, :, :, 1] << 4)  # [block, j, t, i]
    packed = packed.permute(0, 2, 1, 3).reshape(blocks, kp // 8, 64).contiguous()
    pairs = torch.zeros(blocks * 16, kp // group, 2, dtype=torch.float16)
    pairs[:n, :, 0], pairs[:n, :, 1] = scales, offsets
    pairs = pairs.view(blocks, 16, kp // group, 2).permute(0, 2, 3, 1).contiguous()
    return packed, pairs


class Int4KernelLinear:
    """int4 weights (a scale and an offset per feature per `group` inputs) through our
    `linear_int4` kernel (AVX-512 VNNI or AVX2 CPUs). `packed`, `scales`, `group` and
    `out_features` are what a fused step reads."""

    def __init__(self, weight: torch.Tensor, kernels: ModuleType, group: int = INT4_GROUP) -> None:
        self.packed, self.scales = pack_int4(weight, group, kernels)
        self.group = group
        self.out_features, self.in_features = weight.shape
        self._kernels = kernels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._kernels.linear_int4(
            x.reshape(-1, shape[-1]), self.packed, self.scales, self.out_features
        )
        return y.view(*shape[:-1], self.out_features)


class Int8DynamicLinear:
    def __init__(self, weight: torch.Tensor) -> None:
        w = weight.detach().float().cpu()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
        zeros = torch.zeros(w.shape[0], dtype=torch.long)
        with warnings.catch_warnings():
            # PyTorch marks quantized tensor *creation* deprecated; the packed kernels are the
            # fast path on x86 today. torchao is the successor once it has a CPU equivalent.
            warnings.filterwarnings(
                "ignore", message=".*quantize_per_.*deprecated", category=UserWarning
            )
            q = torch.quantize_per_channel(w, scales.double(), zeros, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(q, None)
        self.out_features, self.in_features = w.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # reduce_range=True (7-bit activations) takes fbgemm's fast AVX-512 path: ~40x faster
        # here than the 8-bit path, for a logit error that bench/precision.py reports.
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float(), self._packed, True)
        return y.view(*shape[:-1], self.out_features)


def projection_precision(mode: str, projection: str) -> str:
    """The precision of one projection (`qkv`, `fc1`, `lm_heads`, ...) in a decoder mode (or in
    a plain precision, which every projection takes)."""
    if mode == "int4-ffn":
        return "int4" if projection in INT4_FFN else "int8"
    return mode


@dataclass(frozen=True)
class KernelModules:
    """Our C++ modules a decoder's projections may run on, as its settings decided
    (`engine.settings.Resolved`): None where they do not run."""

    kernels: ModuleType | None = None  # engine.kernels: linear_int8, linear_bf16, attention, ...
    int4: ModuleType | None = None  # engine.kernels.int4: linear_int4

    @classmethod
    def of(cls, settings: Resolved) -> KernelModules:
        """The modules `settings` run on (`resolve` probed them: they built)."""
        kernels = int4 = None
        if settings.kernels is not None:
            from engine import kernels as module

            kernels = module.get()
            assert kernels is not None, "resolve() chose our kernels after they failed to build"
        if settings.quantize.startswith("int4"):
            from engine.kernels import int4 as int4_module

            int4 = int4_module.get()
            assert int4 is not None, "resolve() chose int4 weights without the int4 kernel"
        return cls(kernels, int4)


def make_linear(
    weight: torch.Tensor, precision: str, modules: KernelModules, int4_group: int = INT4_GROUP
) -> Projection:
    """A projection of `weight` [out, in] in `precision` (`PRECISIONS`), on our kernels in
    `modules` where they run."""
    if precision == "dense":
        if modules.kernels is not None and _kernel_shape(weight):
            return Bf16KernelLinear(weight, modules.kernels)
        return DenseLinear(weight)
    if precision == "bf16":
        return CastLinear(weight, torch.bfloat16)
    if precision == "int8":
        if weight.device.type != "cpu":
            raise ValueError("quantize: int8 is a CPU mode; on a GPU use bfloat16 or float16")
        if modules.kernels is not None:
            return Int8KernelLinear(weight, modules.kernels)
        return Int8DynamicLinear(weight)
    if precision == "int4":
        if weight.device.type != "cpu":
            raise ValueError("quantize: int4 is a CPU mode; on a GPU use bfloat16 or float16")
        if modules.int4 is None:
            raise ValueError("quantize: int4 projections need our int4 kernel (engine.settings)")
        return Int4KernelLinear(weight, modules.int4, int4_group)
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _kernel_shape(weight: torch.Tensor) -> bool:
    out_features, in_features = weight.shape
    return (
        weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and in_features % 32 == 0
        and out_features % 2 == 0
    )
