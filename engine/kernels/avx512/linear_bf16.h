// bfloat16 weights, AVX-512 BF16: y = x w^T for a few rows (vdpbf16ps), and float32 -> bfloat16
// rounding (vcvtneps2bf16) for a bfloat16 KV cache.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include "simd.h"

namespace er {

template <int M>
void linear_rows(const uint16_t* x, const uint16_t* w, float* y, int64_t N, int64_t K) {
  // Two output features per iteration share the loads of x; each weight is read once.
  constexpr int R = 2;
  at::parallel_for(0, N / R, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * R;
      __m512 acc[M][R];
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 32) {
        __m512bh wv[R];
        for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + (n + r) * K + k);
        for (int m = 0; m < M; ++m) {
          const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
          for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
        }
      }
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) y[m * N + n + r] = _mm512_reduce_add_ps(acc[m][r]);
    }
  });
}

// x [M][K] bfloat16 (M in 1..8), w [N][K] bfloat16 (K % 32 == 0, N even) -> y [M][N] float32.
inline void linear_bf16_rows(const uint16_t* x, const uint16_t* w, float* y, int64_t M, int64_t N,
                             int64_t K) {
  with_up_to_8(M, [&](auto rows) { linear_rows<rows>(x, w, y, N, K); });
}

// n floats (a multiple of 16) to bfloat16 at dst, nearest even as torch's .to(bfloat16).
inline void store_bf16(const float* x, uint16_t* dst, int64_t n) {
  for (int64_t c = 0; c < n; c += 16) {
    const __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + c));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), v);
  }
}

}  // namespace er
