// Small AVX-512 building blocks shared by the AVX-512 kernels: bfloat16/int8 loads, a vectorised
// exp, a 16-way horizontal sum, softmax weights, per-vector int8 and int4 quantization.
// Header-only: cpu.cpp is the one translation unit.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../common.h"

namespace er {

// The mask of the first min(n, 16) lanes (n >= 1): the tail of a loop over 16 floats at a time.
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

inline __m512 load_bf16(const uint16_t* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// exp(x) for x <= 0 (softmax after subtracting the max): 2^n * 2^f, f in [-0.5, 0.5], with a
// degree-6 polynomial for 2^f (relative error about 2e-7) and scalef for 2^n.
inline __m512 exp_ps(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)),
                                 _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// The 16 horizontal sums of a[0..15], as one vector (lane j = sum of a[j]): a butterfly of
// unpacks and lane shuffles, ~3 instructions per sum instead of ~10 for one reduce each.
inline __m512 hsum16(__m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Softmax weights of scores[0, T) in place, each times value_scales[t] when given (an int8
// cache folds the value's scale into its weight); returns 1 / (sum of the plain weights).
inline float softmax_weights(float* scores, int64_t T, float best, const float* value_scales) {
  const __m512 vbest = _mm512_set1_ps(best);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t t = 0; t < T; t += 16) {
    const __mmask16 m = first_lanes(T - t);
    const __m512 e = _mm512_maskz_mov_ps(
        m, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + t), vbest)));
    const __m512 w = value_scales ? _mm512_mul_ps(e, _mm512_maskz_loadu_ps(m, value_scales + t)) : e;
    _mm512_mask_storeu_ps(scores + t, m, w);
    vsum = _mm512_add_ps(vsum, e);
  }
  return 1.0f / _mm512_reduce_add_ps(vsum);
}

inline __m512 load_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Quantize one vector of D floats to int8 at dst, returning its scale.
inline float quantize_vector(const float* x, int8_t* dst, int64_t D) {
  __m512 m = _mm512_setzero_ps();
  for (int64_t c = 0; c < D; c += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + c)));
  const float amax = _mm512_reduce_max_ps(m);
  const float s = amax > 0 ? amax / 127.0f : 1.0f;
  const __m512 inv = _mm512_set1_ps(1.0f / s);
  for (int64_t c = 0; c < D; c += 16) {
    const __m512i i = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + c), inv));  // nearest
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c), _mm512_cvtsepi32_epi8(i));
  }
  return s;
}

// Quantize one vector of 64 floats to 4 bits, u = round(x / s) + 8 in [1, 15] with s = max|x| / 7
// rounded to bfloat16, two per byte: out[r] = u[r] | u[r + 32] << 4 (32 bytes). Returns s's bits.
inline uint16_t quantize_q4(const float* x, uint8_t* out) {
  __m512 m = _mm512_setzero_ps();
  for (int c = 0; c < 64; c += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + c)));
  const float amax = _mm512_reduce_max_ps(m);
  const uint16_t bits = amax > 0 ? bf16_bits(amax / 7.0f) : bf16_bits(1.0f);
  const __m512 s = _mm512_set1_ps(bf16_float(bits));
  const __m512i lo7 = _mm512_set1_epi32(-7), hi7 = _mm512_set1_epi32(7), eight = _mm512_set1_epi32(8);
  for (int c = 0; c < 32; c += 16) {
    auto nibble = [&](const float* p) {  // x / s to the nearest even, as torch.round
      const __m512i i = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(p), s));
      return _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(i, lo7), hi7), eight);
    };
    const __m512i both = _mm512_or_si512(nibble(x + c), _mm512_slli_epi32(nibble(x + 32 + c), 4));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c), _mm512_cvtepi32_epi8(both));
  }
  return bits;
}

// The same loads by element type, for kernels written once over bfloat16 or int8 vectors.
inline __m512 load_floats(const uint16_t* p) { return load_bf16(p); }
inline __m512 load_floats(const int8_t* p) { return load_i8(p); }

// sum of x[i] * z[i] over n floats (n a multiple of 16), z bfloat16 or int8: four accumulators.
template <class T>
inline float dot_with(const float* x, const T* z, int64_t n) {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    for (int j = 0; j < 4; ++j)
      a[j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16 * j), load_floats(z + i + 16 * j), a[j]);
  for (; i < n; i += 16) a[0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), load_floats(z + i), a[0]);
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
}

// out[i] = the sum over t < rows of w[t] * u[t * n + i] (n a multiple of 16; u bfloat16 or int8
// rows of n): each element's terms added in t's order, one fused multiply-add each, as adding
// w[t] * u[t] row after row into zeros would (rows whose weight is 0 skipped), 64 elements at a
// time in registers rather than out loaded and stored once a row.
template <class T>
inline void weighted_rows(const float* w, const T* u, int64_t rows, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    __m512 a[4];
    for (__m512& x : a) x = _mm512_setzero_ps();
    for (int64_t t = 0; t < rows; ++t) {
      if (w[t] == 0.0f) continue;
      const __m512 vw = _mm512_set1_ps(w[t]);
      const T* r = u + t * n + i;
      for (int j = 0; j < 4; ++j) a[j] = _mm512_fmadd_ps(vw, load_floats(r + 16 * j), a[j]);
    }
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out + i + 16 * j, a[j]);
  }
  for (; i < n; i += 16) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t t = 0; t < rows; ++t)
      if (w[t] != 0.0f) a = _mm512_fmadd_ps(_mm512_set1_ps(w[t]), load_floats(u + t * n + i), a);
    _mm512_storeu_ps(out + i, a);
  }
}

}  // namespace er
