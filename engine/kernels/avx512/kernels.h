// The AVX-512 BF16 + VNNI kernels (Zen 4, Sapphire Rapids and later): -mavx512f -mavx512bw
// -mavx512vl -mavx512bf16 -mavx512vnni.
#pragma once

#include "attention.h"
#include "int8_gemm.h"
#include "linear_bf16.h"
#include "sampling.h"

namespace er {
constexpr const char* kIsa = "avx512";
}  // namespace er
