// The kernels of the instruction set this build is for: engine/kernels/__init__.py compiles
// cpu.cpp once per variant with that variant's -m flags and -DER_ISA_<NAME>. Each ISA folder's
// kernels.h provides the same functions in namespace er (quantize_rows, gemm_int8, layer_norm,
// attend, attend_q8, attend_q4, quantize_vector, quantize_q4, store_bf16, linear_bf16_rows and
// the top-k helpers) over common.h's layouts, and kIsa, the variant's name.
#pragma once

#if defined(ER_ISA_AVX512)
#include "avx512/kernels.h"
#elif defined(ER_ISA_AVX2)
#include "avx2/kernels.h"
#else
#error "build with -DER_ISA_AVX512 or -DER_ISA_AVX2 (engine/kernels/__init__.py)"
#endif
