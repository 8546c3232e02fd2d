// One LSTM layer's recurrence with float16 recurrent weights, AVX2 + FMA + F16C.
//
// Per frame t and stream b: gates = pre[t, b] + W_hh h[t-1, b] (PyTorch's gate order i, f, g, o),
// c[t] = sigmoid(f) c[t-1] + sigmoid(i) tanh(g), h[t] = sigmoid(o) tanh(c[t]). pre holds the
// input projection and both biases, computed for all frames beforehand (it does not depend on h).
// The weights are stored unit-major, [H units][4 gates][H] float16: one unit's four rows lie
// together, so a thread that owns a range of units computes their gates and their new state
// without waiting for the others; a frame needs one barrier (h complete before the next frame).
// Raw pointers only; the caller splits the units between threads.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "codec_simd.h"

namespace codec_lstm {

using codec_simd::dots4;
using codec_simd::dots8;
using codec_simd::sigmoid8;
using codec_simd::tanh8;

constexpr int64_t kBlock = 32;  // units per block: its 4 x 32 rows (256 KB at H 1024) stay in L2

// One block of units [jb, jb + nu) of one frame for B streams (nu a multiple of 8, H of 16).
//   w   [H][4][H] float16 bits, unit-major;  pre [B][ld_pre] rows of 4H gate inputs (i|f|g|o);
//   h   [B][H] state before the frame (read), c [B][H] cell before (read);
//   h_out, c_out [B][H] after the frame (written for the block's units only).
inline void lstm_block(const uint16_t* w, const float* pre, int64_t ld_pre, const float* h,
                       const float* c, float* h_out, float* c_out, int64_t B, int64_t H,
                       int64_t jb, int64_t nu) {
  alignas(32) float g[4][2][kBlock];  // gate sums of the block: [gate][stream of the tile][unit]
  alignas(32) float d[8];
  for (int64_t b0 = 0; b0 < B; b0 += 2) {  // two streams at a time share each weight load
    const int nb = B - b0 >= 2 ? 2 : 1;
    const float* hb = h + b0 * H;
    if (nb == 2) {
      for (int64_t u = 0; u < nu; ++u) {
        dots8<4, 2>(w + (jb + u) * 4 * H, hb, H, d);
        for (int q = 0; q < 4; ++q) g[q][0][u] = d[q * 2], g[q][1][u] = d[q * 2 + 1];
      }
    } else {
      int64_t u = 0;
      for (; u + 2 <= nu; u += 2) {
        dots8<8, 1>(w + (jb + u) * 4 * H, hb, H, d);
        for (int q = 0; q < 4; ++q) g[q][0][u] = d[q], g[q][0][u + 1] = d[4 + q];
      }
      if (u < nu) {
        dots4(w + (jb + u) * 4 * H, hb, H, d);
        for (int q = 0; q < 4; ++q) g[q][0][u] = d[q];
      }
    }
    for (int s = 0; s < nb; ++s) {
      const int64_t b = b0 + s;
      const float* p = pre + b * ld_pre + jb;
      for (int64_t u = 0; u < nu; u += 8) {
        const auto gate = [&](int q) {
          return _mm256_add_ps(_mm256_load_ps(&g[q][s][u]), _mm256_loadu_ps(p + q * H + u));
        };
        const __m256 i = sigmoid8(gate(0)), f = sigmoid8(gate(1));
        const __m256 z = tanh8(gate(2)), o = sigmoid8(gate(3));
        const __m256 c_old = _mm256_loadu_ps(c + b * H + jb + u);
        const __m256 cn = _mm256_fmadd_ps(f, c_old, _mm256_mul_ps(i, z));
        _mm256_storeu_ps(c_out + b * H + jb + u, cn);
        _mm256_storeu_ps(h_out + b * H + jb + u, _mm256_mul_ps(o, tanh8(cn)));
      }
    }
  }
}

// Units [j0, j1) of one frame (j0 a multiple of kBlock), block by block; `reverse` walks the
// blocks from the last: a frame that goes the other way from the one before starts with the
// weights that frame read last, still in cache (a cyclic sweep larger than the cache would
// miss on every line).
inline void lstm_units(const uint16_t* w, const float* pre, int64_t ld_pre, const float* h,
                       const float* c, float* h_out, float* c_out, int64_t B, int64_t H,
                       int64_t j0, int64_t j1, bool reverse) {
  const int64_t blocks = (j1 - j0 + kBlock - 1) / kBlock;
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t jb = j0 + (reverse ? blocks - 1 - i : i) * kBlock;
    lstm_block(w, pre, ld_pre, h, c, h_out, c_out, B, H, jb, std::min(kBlock, j1 - jb));
  }
}

}  // namespace codec_lstm
