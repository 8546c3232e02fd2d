// bfloat16 weights, AVX2 + FMA: y = x w^T for a few rows (each bfloat16 widened to float32 by a
// shift, float32 FMAs), and float32 -> bfloat16 rounding for a bfloat16 KV cache.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

#include "simd.h"

namespace er {

template <int M>
void linear_rows(const uint16_t* x, const uint16_t* w, float* y, int64_t N, int64_t K) {
  std::vector<float> xf(M * K);  // the rows as float32 once (exact: bfloat16 is float32's top half)
  for (int64_t i = 0; i < M * K; i += 8) _mm256_storeu_ps(xf.data() + i, load_bf16(x + i));
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {  // each weight is read once, for every row
      __m256 acc[M];
      for (auto& a : acc) a = _mm256_setzero_ps();
      for (int64_t k = 0; k < K; k += 8) {
        const __m256 wv = load_bf16(w + n * K + k);
        for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xf.data() + m * K + k), wv, acc[m]);
      }
      for (int m = 0; m < M; ++m) y[m * N + n] = hsum(acc[m]);
    }
  });
}

// x [M][K] bfloat16 (M in 1..8), w [N][K] bfloat16 (K % 32 == 0, N even) -> y [M][N] float32.
inline void linear_bf16_rows(const uint16_t* x, const uint16_t* w, float* y, int64_t M, int64_t N,
                             int64_t K) {
  with_up_to_8(M, [&](auto rows) { linear_rows<rows>(x, w, y, N, K); });
}

// n floats (a multiple of 16) to bfloat16 at dst, nearest even as torch's .to(bfloat16) (for
// finite values).
inline void store_bf16(const float* x, uint16_t* dst, int64_t n) {
  const __m256i half = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
  for (int64_t c = 0; c < n; c += 8) {
    const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(x + c));
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, half), odd), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), _MM_SHUFFLE(3, 1, 2, 0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c), _mm256_castsi256_si128(packed));
  }
}

}  // namespace er
