// Packed int4 weights as tensors (engine/linear.py `pack_int4`) -> the product's view of them,
// checked: for the extensions that bind int4 products (int4.cpp's linear_int4, cpu.cpp's fused
// step). Tensor-facing, so not in all_kernels.h.
#pragma once

#include <torch/extension.h>

#include "int4_gemm.h"

namespace er::int4 {

// codes uint8 [ceil(n / 16), Kp / 8, 64], scales float16 [ceil(n / 16), Kp / G, 2, 16], n output
// features; G (a multiple of 32) is Kp over the scales' groups.
inline PackedInt4 packed_view(const char* fn, const torch::Tensor& codes,
                              const torch::Tensor& scales, int64_t n) {
  TORCH_CHECK(codes.dim() == 3 && codes.size(2) == kStepBytes &&
                  codes.scalar_type() == torch::kByte && codes.is_contiguous(),
              fn, ": packed codes must be contiguous uint8 [N / 16, K / 8, 64]");
  TORCH_CHECK(scales.dim() == 4 && scales.size(2) == 2 && scales.size(3) == kFeatures &&
                  scales.scalar_type() == torch::kHalf && scales.is_contiguous(),
              fn, ": scales must be contiguous float16 [N / 16, K / G, 2, 16]");
  const int64_t blocks = (n + kFeatures - 1) / kFeatures;
  TORCH_CHECK(n >= 1 && codes.size(0) == blocks && scales.size(0) == blocks, fn, ": ", n,
              " output features need ", blocks, " blocks of 16, the codes have ", codes.size(0),
              " and the scales ", scales.size(0));
  const int64_t Kp = codes.size(1) * kStep, groups = scales.size(1);
  TORCH_CHECK(groups >= 1 && Kp % groups == 0 && (Kp / groups) % kSub == 0, fn, ": ", groups,
              " groups do not split ", Kp, " inputs into groups of a multiple of 32");
  return PackedInt4{codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr()),
                    n, Kp, Kp / groups};
}

}  // namespace er::int4
