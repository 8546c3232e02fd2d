"""The decoder's linear layers in each precision mode.

- `dense`: `F.linear` in the model's dtype (float32, bfloat16 or float16).
- `bf16`: dense bfloat16 weights under float32 activations (an int8 decoder's prefills).
- `int8`: weights quantized per output channel to int8, activations quantized on the fly
  (PyTorch's own fbgemm/oneDNN dynamic kernels, `torch.ops.quantized.linear_dynamic`); inputs
  and outputs stay float32. A CPU mode: a decode step reads a quarter of the float32 bytes.

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
