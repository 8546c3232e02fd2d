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

namespace codec_lstm {

constexpr int64_t kBlock = 32;  // units per block: its 4 x 32 rows (256 KB at H 1024) stay in L2

inline __m256 load_f16(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The 8 horizontal sums of a[0..7] as one vector (lane j = sum of a[j]).
inline __m256 hsum8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// out[r * NB + b] = dot(w row r, h[b]) for R consecutive rows of K halves, NB streams of K floats
// (R * NB == 8: every weight vector converted once is used NB times).
template <int R, int NB>
inline void dots8(const uint16_t* w, const float* h, int64_t K, float* out) {
  static_assert(R * NB == 8, "eight accumulators");
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 hv[NB];
    for (int b = 0; b < NB; ++b) hv[b] = _mm256_loadu_ps(h + b * K + k);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = load_f16(w + r * K + k);
      for (int b = 0; b < NB; ++b) acc[r * NB + b] = _mm256_fmadd_ps(wv, hv[b], acc[r * NB + b]);
    }
  }
  _mm256_storeu_ps(out, hsum8(acc));
}

// out[r] = dot(w row r, h) for 4 rows, one stream (the odd unit of a block).
inline void dots4(const uint16_t* w, const float* h, int64_t K, float* out) {
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {  // two accumulators per row: K % 16 == 0 needed
    const __m256 h0 = _mm256_loadu_ps(h + k), h1 = _mm256_loadu_ps(h + k + 8);
    for (int r = 0; r < 4; ++r) {
      acc[r] = _mm256_fmadd_ps(load_f16(w + r * K + k), h0, acc[r]);
      acc[4 + r] = _mm256_fmadd_ps(load_f16(w + r * K + k + 8), h1, acc[4 + r]);
    }
  }
  const __m256 s = hsum8(acc);
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
}

// exp(x), x clamped to [-87, 88]: 2^n * 2^f with f in [-0.5, 0.5] and a degree-6 polynomial
// for 2^f (relative error about 2e-7).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

// tanh(x): odd polynomial for |x| < 0.625 (Cephes tanhf), 1 - 2 / (exp(2|x|) + 1) beyond,
// the sign put back.
inline __m256 tanh8(__m256 x) {
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 big = _mm256_sub_ps(
      one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(exp8(_mm256_add_ps(a, a)), one)));
  const __m256 z = _mm256_mul_ps(a, a);
  __m256 p = _mm256_set1_ps(-5.70498872745e-3f);
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954e-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531e-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036e-1f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422e-1f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), a, a);
  const __m256 r = _mm256_blendv_ps(big, small, _mm256_cmp_ps(a, _mm256_set1_ps(0.625f), _CMP_LT_OQ));
  return _mm256_or_ps(r, sign);
}

// Units [j0, j1) of one frame for B streams (j0, j1 multiples of 8, H % 16 == 0).
//   w   [H][4][H] float16 bits, unit-major;  pre [B][ld_pre] rows of 4H gate inputs (i|f|g|o);
//   h   [B][H] state before the frame (read), c [B][H] cell before (read);
//   h_out, c_out [B][H] after the frame (written for units [j0, j1) only).
inline void lstm_units(const uint16_t* w, const float* pre, int64_t ld_pre, const float* h,
                       const float* c, float* h_out, float* c_out, int64_t B, int64_t H,
                       int64_t j0, int64_t j1) {
  alignas(32) float g[4][2][kBlock];  // gate sums of a block: [gate][stream of the tile][unit]
  alignas(32) float d[8];
  for (int64_t jb = j0; jb < j1; jb += kBlock) {
    const int64_t nu = std::min(kBlock, j1 - jb);
    for (int64_t b0 = 0; b0 < B; b0 += 2) {
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
          const __m256 i = sigmoid8(_mm256_add_ps(_mm256_load_ps(&g[0][s][u]), _mm256_loadu_ps(p + u)));
          const __m256 f = sigmoid8(_mm256_add_ps(_mm256_load_ps(&g[1][s][u]), _mm256_loadu_ps(p + H + u)));
          const __m256 z = tanh8(_mm256_add_ps(_mm256_load_ps(&g[2][s][u]), _mm256_loadu_ps(p + 2 * H + u)));
          const __m256 o = sigmoid8(_mm256_add_ps(_mm256_load_ps(&g[3][s][u]), _mm256_loadu_ps(p + 3 * H + u)));
          const __m256 cn = _mm256_fmadd_ps(f, _mm256_loadu_ps(c + b * H + jb + u), _mm256_mul_ps(i, z));
          _mm256_storeu_ps(c_out + b * H + jb + u, cn);
          _mm256_storeu_ps(h_out + b * H + jb + u, _mm256_mul_ps(o, tanh8(cn)));
        }
      }
    }
  }
}

}  // namespace codec_lstm
