// Small AVX2 + FMA building blocks shared by the AVX2 kernels: 8-lane masks, bfloat16/int8 loads,
// a vectorised exp, horizontal sums, softmax weights, int8 packing, per-vector int8 and int4
// quantization. Header-only: cpu.cpp is the one translation unit.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../common.h"

namespace er {

// The first min(n, 8) lanes (n >= 1) set, as maskload/maskstore/blend want them: the tail of a
// loop over 8 floats at a time.
inline __m256i first_lanes(int64_t n) {
  const int32_t k = static_cast<int32_t>(std::min<int64_t>(n, 8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline __m256 load_bf16(const uint16_t* p) {  // 8 bfloat16 -> float32
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

inline __m256 load_i8(const int8_t* p) {  // 8 int8 -> float32
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1))));
}

// The 8 horizontal sums of a[0..7], as one vector (lane j = sum of a[j]): two rounds of
// horizontal adds and one exchange of halves, ~1.5 instructions per sum.
inline __m256 hsum8(const __m256* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// exp(x) for x <= 0 (softmax after subtracting the max): 2^n * 2^f, f in [-0.5, 0.5], with a
// degree-6 polynomial for 2^f (relative error about 2e-7) and 2^n built in the exponent bits
// (n >= -126 after the clamp: a normal float).
inline __m256 exp_ps(__m256 x) {
  const __m256 t = _mm256_mul_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)),
                                 _mm256_set1_ps(1.44269504088896341f));
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

// Softmax weights of scores[0, T) in place, each times value_scales[t] when given (an int8
// cache folds the value's scale into its weight); returns 1 / (sum of the plain weights).
inline float softmax_weights(float* scores, int64_t T, float best, const float* value_scales) {
  const __m256 vbest = _mm256_set1_ps(best);
  __m256 vsum = _mm256_setzero_ps();
  for (int64_t t = 0; t < T; t += 8) {
    const __m256i m = first_lanes(T - t);
    const __m256 e = _mm256_and_ps(
        exp_ps(_mm256_sub_ps(_mm256_maskload_ps(scores + t, m), vbest)), _mm256_castsi256_ps(m));
    const __m256 w = value_scales ? _mm256_mul_ps(e, _mm256_maskload_ps(value_scales + t, m)) : e;
    _mm256_maskstore_ps(scores + t, m, w);
    vsum = _mm256_add_ps(vsum, e);
  }
  return 1.0f / hsum(vsum);
}

// 16 int32 lanes (a: the first 8, b: the next 8) -> 16 int8 at dst, saturating.
inline void store_i8x16(__m256i a, __m256i b, int8_t* dst) {
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), _MM_SHUFFLE(3, 1, 2, 0));
  const __m128i v = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), v);
}

// 16 int32 lanes in [0, 255] -> 16 uint8 at dst.
inline void store_u8x16(__m256i a, __m256i b, uint8_t* dst) {
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), _MM_SHUFFLE(3, 1, 2, 0));
  const __m128i v = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), v);
}

inline __m256 abs_ps(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }

// max |x[0, n)| for n a multiple of 8.
inline float abs_max(const float* x, int64_t n) {
  __m256 m = _mm256_setzero_ps();
  for (int64_t c = 0; c < n; c += 8) m = _mm256_max_ps(m, abs_ps(_mm256_loadu_ps(x + c)));
  return hmax(m);
}

// Quantize one vector of D floats (D a multiple of 16) to int8 at dst, returning its scale.
inline float quantize_vector(const float* x, int8_t* dst, int64_t D) {
  const float amax = abs_max(x, D);
  const float s = amax > 0 ? amax / 127.0f : 1.0f;
  const __m256 inv = _mm256_set1_ps(1.0f / s);
  for (int64_t c = 0; c < D; c += 16) {  // nearest even
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + c), inv));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + c + 8), inv));
    store_i8x16(a, b, dst + c);
  }
  return s;
}

// Quantize one vector of 64 floats to 4 bits, u = round(x / s) + 8 in [1, 15] with s = max|x| / 7
// rounded to bfloat16, two per byte: out[r] = u[r] | u[r + 32] << 4 (32 bytes). Returns s's bits.
inline uint16_t quantize_q4(const float* x, uint8_t* out) {
  const float amax = abs_max(x, 64);
  const uint16_t bits = amax > 0 ? bf16_bits(amax / 7.0f) : bf16_bits(1.0f);
  const __m256 s = _mm256_set1_ps(bf16_float(bits));
  const __m256i lo7 = _mm256_set1_epi32(-7), hi7 = _mm256_set1_epi32(7), eight = _mm256_set1_epi32(8);
  auto nibble = [&](const float* p) {  // x / s to the nearest even, as torch.round
    const __m256i i = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(p), s));
    return _mm256_add_epi32(_mm256_min_epi32(_mm256_max_epi32(i, lo7), hi7), eight);
  };
  auto both = [&](int c) { return _mm256_or_si256(nibble(x + c), _mm256_slli_epi32(nibble(x + 32 + c), 4)); };
  for (int c = 0; c < 32; c += 16) store_u8x16(both(c), both(c + 8), out + c);
  return bits;
}

// The same loads by element type, for kernels written once over bfloat16 or int8 vectors.
inline __m256 load_floats(const uint16_t* p) { return load_bf16(p); }
inline __m256 load_floats(const int8_t* p) { return load_i8(p); }

// sum of x[i] * z[i] over n floats (n a multiple of 16), z bfloat16 or int8: four accumulators.
template <class T>
inline float dot_with(const float* x, const T* z, int64_t n) {
  __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int j = 0; j < 4; ++j)
      a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8 * j), load_floats(z + i + 8 * j), a[j]);
  for (; i < n; i += 8) a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load_floats(z + i), a[0]);
  return hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
}

// out[i] = the sum over t < rows of w[t] * u[t * n + i] (n a multiple of 8; u bfloat16 or int8
// rows of n): each element's terms added in t's order, one fused multiply-add each, as adding
// w[t] * u[t] row after row into zeros would (rows whose weight is 0 skipped), 32 elements at a
// time in registers rather than out loaded and stored once a row.
template <class T>
inline void weighted_rows(const float* w, const T* u, int64_t rows, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256 a[4];
    for (__m256& x : a) x = _mm256_setzero_ps();
    for (int64_t t = 0; t < rows; ++t) {
      if (w[t] == 0.0f) continue;
      const __m256 vw = _mm256_set1_ps(w[t]);
      const T* r = u + t * n + i;
      for (int j = 0; j < 4; ++j) a[j] = _mm256_fmadd_ps(vw, load_floats(r + 8 * j), a[j]);
    }
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out + i + 8 * j, a[j]);
  }
  for (; i < n; i += 8) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t t = 0; t < rows; ++t)
      if (w[t] != 0.0f) a = _mm256_fmadd_ps(_mm256_set1_ps(w[t]), load_floats(u + t * n + i), a);
    _mm256_storeu_ps(out + i, a);
  }
}

}  // namespace er
