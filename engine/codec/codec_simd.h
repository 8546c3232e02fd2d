// Small AVX2 building blocks of the codec's kernels: float16 loads (F16C) and dot products of
// float16 rows with float32 vectors, an 8-way horizontal sum, and vectorised exp, expm1,
// sigmoid, tanh and ELU, accurate to a few float32 ulps (the streaming decode must stay equal
// to the one-shot decode up to float rounding).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace codec_simd {

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

// expm1(x) for x <= 0: a degree-8 Taylor polynomial on (-0.5, 0] (no cancellation near 0),
// exp(x) - 1 below.
inline __m256 expm1_neg8(__m256 x) {
  __m256 p = _mm256_set1_ps(1.0f / 40320);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.0f / 5040));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.0f));
  const __m256 small = _mm256_mul_ps(p, x);
  const __m256 big = _mm256_sub_ps(exp8(x), _mm256_set1_ps(1.0f));
  return _mm256_blendv_ps(big, small, _mm256_cmp_ps(x, _mm256_set1_ps(-0.5f), _CMP_GT_OQ));
}

// ELU with alpha 1: x for x > 0, expm1(x) otherwise.
inline __m256 elu8(__m256 x) {
  const __m256 neg = expm1_neg8(_mm256_min_ps(x, _mm256_setzero_ps()));
  return _mm256_blendv_ps(neg, x, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ));
}

// bfloat16 <-> float32, 8 at a time: a bfloat16 is a float32's top half; rounded to nearest
// even on the way down, as PyTorch rounds (not NaNs with a payload only in the low half).
inline __m256 load_bf16x8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline void store_bf16x8(uint16_t* p, __m256 v) {
  __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m128i lo = _mm256_castsi256_si128(u), hi = _mm256_extracti128_si256(u, 1);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(lo, hi));
}

// y[i] = elu(x[i]) for n values of T, 8 at a time in float32 (`load`, `store`: 8 Ts <-> __m256),
// the tail through a buffer.
template <class T, class Load, class Store>
inline void elu_each(const T* x, T* y, int64_t n, Load load, Store store) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store(y + i, elu8(load(x + i)));
  if (i < n) {
    T buf[8] = {};
    for (int64_t j = i; j < n; ++j) buf[j - i] = x[j];
    store(buf, elu8(load(buf)));
    for (int64_t j = i; j < n; ++j) y[j] = buf[j - i];
  }
}

// ... for n floats
inline void elu(const float* x, float* y, int64_t n) {
  elu_each(x, y, n, [](const float* p) { return _mm256_loadu_ps(p); },
           [](float* p, __m256 v) { _mm256_storeu_ps(p, v); });
}

// ... and for n bfloat16s (the codec's upsampling stack in bfloat16), in float32 maths
inline void elu(const uint16_t* x, uint16_t* y, int64_t n) {
  elu_each(x, y, n, load_bf16x8, store_bf16x8);
}

}  // namespace codec_simd
