"""The decoder's linear layers in each precision mode.

- `dense`: `F.linear` in the model's dtype (float32, bfloat16 or float16).
- `bf16`: dense bfloat16 weights under float32 activations (an int8 decoder's prefills).
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

import torch
import torch.nn.functional as F

PRECISIONS = ("dense", "bf16", "int8")
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

    def __init__(self, weight: torch.Tensor, kernels) -> None:
        super().__init__(weight.contiguous(), torch.bfloat16)
        self._kernels = kernels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if rows > MAX_KERNEL_ROWS:
            return super().__call__(x)
        y = self._kernels.linear_bf16(x.reshape(rows, x.shape[-1]), self.weight)
        return y.view(*x.shape[:-1], self.weight.shape[0]).to(x.dtype)


def pack_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (bytes [ceil(N / 64), ceil(K / 4), 256] uint8, scales [N] float32), the
    layout of `engine/kernels/common.h`: blocks of 64 output features, 4 inputs x 64 features
    per 256 bytes, each byte the int8 weight + 128; padding is weight 0."""
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

    def __init__(self, weight: torch.Tensor, kernels) -> None:
        self.packed, self.scales = pack_int8(weight)
        self.out_features = weight.shape[0]
        self._kernels = kernels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._kernels.linear_int8(x.reshape(-1, shape[-1]), self.packed, self.scales)
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
        self.out_features = w.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # reduce_range=True (7-bit activations) takes fbgemm's fast AVX-512 path: ~40x faster
        # here than the 8-bit path, for a logit error that bench/precision.py reports.
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float(), self._packed, True)
        return y.view(*shape[:-1], self.out_features)


def prefill_precision() -> str:
    """How an int8 decoder runs its (compute-bound) prefills."""
    from engine.loading import cpu_has_fast_bf16

    return "bf16" if cpu_has_fast_bf16() else "dense"


def make_linear(weight: torch.Tensor, precision: str):
    if precision == "dense":
        if _kernel_shape(weight):
            from engine import kernels

            if (module := kernels.get()) is not None:
                return Bf16KernelLinear(weight, module)
        return DenseLinear(weight)
    if precision == "bf16":
        return CastLinear(weight, torch.bfloat16)
    if precision == "int8":
        if weight.device.type != "cpu":
            raise ValueError("quantize: int8 is a CPU mode; on a GPU use bfloat16 or float16")
        from engine import kernels

        if kernels.unavailable_reason() is None and (module := kernels.get()) is not None:
            return Int8KernelLinear(weight, module)
        return Int8DynamicLinear(weight)
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _kernel_shape(weight: torch.Tensor) -> bool:
    out_features, in_features = weight.shape
    return (
        weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and in_features % 32 == 0
        and out_features % 2 == 0
    )
