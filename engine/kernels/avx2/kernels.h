// The AVX2 + FMA + F16C kernels (Zen 2/3, Intel client CPUs from Haswell on, no AVX-512): -mavx2
// -mfma -mf16c.
#pragma once

#include "attention.h"
#include "int8_gemm.h"
#include "linear_bf16.h"
#include "sampling.h"

namespace er {
constexpr const char* kIsa = "avx2";
}  // namespace er
