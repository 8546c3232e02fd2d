// The int4 weight quantizer of `engine/linear.py` (`quantize_int4`, whose PyTorch code is the
// reference: tests/engine/test_int4_weights.py compares them) at load-time speed: musicgen-small's
// 344 M decoder weights in seconds instead of minutes. Per group of G inputs of one feature,
// w ~ s * u + b, u in [0, 15], the pair (s, b) in float16 chosen for the least squared error
// among max-scaling (s = max|w| / 7, b = -8 s), the group's range [min, max] shrunk by each
// clipping ratio, and least-squares refits of the best pair to its codes. AVX2 and F16C.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace er::int4 {

inline float round_half(float x) {  // to float16 and back, nearest even (as torch's .half())
  return _cvtsh_ss(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

struct GroupFit {
  float s, b, err;  // the pair (rounded to float16) and its squared error
  double su, suu, suw;  // sums of its codes u, u * u and u * w over the real inputs
};

inline __m256 codes_of(__m256 x, __m256 vb, __m256 safe) {  // round((x - b) / s) in [0, 15]
  const __m256 u = _mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(x, vb), safe),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_min_ps(_mm256_max_ps(u, _mm256_setzero_ps()), _mm256_set1_ps(15.0f));
}

inline double lanes_sum(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  double total = 0;
  for (float x : lanes) total += x;
  return total;
}

// Squared error of (s, b) (rounded to float16) over w [n8] where mask is 1 (0 past K), and
// the sums a least-squares refit to its codes needs.
inline GroupFit fit_error(const float* w, const float* mask, int64_t n8, float s, float b) {
  s = round_half(std::max(s, 0.0f));
  b = round_half(b);
  const __m256 vs = _mm256_set1_ps(s), vb = _mm256_set1_ps(b);
  const __m256 safe = _mm256_set1_ps(s > 0 ? s : 1.0f);
  __m256 err = _mm256_setzero_ps(), su = err, suu = err, suw = err;
  for (int64_t i = 0; i < n8; i += 8) {
    const __m256 x = _mm256_loadu_ps(w + i), m = _mm256_loadu_ps(mask + i);
    const __m256 u = _mm256_mul_ps(codes_of(x, vb, safe), m);
    const __m256 e = _mm256_mul_ps(_mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(vs, u), vb), x), m);
    err = _mm256_add_ps(err, _mm256_mul_ps(e, e));
    su = _mm256_add_ps(su, u);
    suu = _mm256_add_ps(suu, _mm256_mul_ps(u, u));
    suw = _mm256_add_ps(suw, _mm256_mul_ps(u, x));
  }
  return {s, b, static_cast<float>(lanes_sum(err)), lanes_sum(su), lanes_sum(suu), lanes_sum(suw)};
}

// One group: src [real] (real <= G inputs; the rest of the group is padding) -> codes [G]
// (0 for padding), s and b as float16 bits; w and mask: scratch of G floats each.
inline void quantize_group(const float* src, int64_t real, int64_t G, const float* clips,
                           int64_t n_clips, int64_t refits, uint8_t* codes, uint16_t* s_out,
                           uint16_t* b_out, float* w, float* mask) {
  float lo = INFINITY, hi = -INFINITY;
  double n = 0, sw = 0;
  for (int64_t i = 0; i < G; ++i) {
    w[i] = i < real ? src[i] : 0.0f;
    mask[i] = i < real ? 1.0f : 0.0f;
    if (i < real) lo = std::min(lo, w[i]), hi = std::max(hi, w[i]), n += 1, sw += w[i];
  }
  const float amax = std::max(std::fabs(lo), std::fabs(hi));
  const float s0 = round_half(amax / 7.0f);
  GroupFit best = fit_error(w, mask, G, s0, -8.0f * s0);
  auto consider = [&](float s, float b) {
    const GroupFit f = fit_error(w, mask, G, s, b);
    if (f.err < best.err) best = f;
  };
  for (int64_t c = 0; c < n_clips; ++c) consider((hi - lo) * clips[c] / 15.0f, lo * clips[c]);
  for (int64_t r = 0; r < refits; ++r) {  // w ~ s * u + b by least squares over the codes
    const double det = n * best.suu - best.su * best.su;
    if (det > 0)
      consider(static_cast<float>((n * best.suw - best.su * sw) / det),
               static_cast<float>((best.suu * sw - best.su * best.suw) / det));
  }
  const __m256 vb = _mm256_set1_ps(best.b), safe = _mm256_set1_ps(best.s > 0 ? best.s : 1.0f);
  for (int64_t i = 0; i < G; i += 8) {
    const __m256i u = _mm256_cvtps_epi32(
        _mm256_mul_ps(codes_of(_mm256_loadu_ps(w + i), vb, safe), _mm256_loadu_ps(mask + i)));
    const __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm_packus_epi16(h, h));
  }
  *s_out = _cvtss_sh(best.s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  *b_out = _cvtss_sh(best.b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// w [N][K] -> codes [N][Kp] (Kp = groups * G), scales and offsets float16 [N][groups].
inline void quantize_weights(const float* w, int64_t N, int64_t K, int64_t G, const float* clips,
                             int64_t n_clips, int64_t refits, uint8_t* codes, uint16_t* scales,
                             uint16_t* offsets) {
  const int64_t groups = (K + G - 1) / G;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> buf(2 * G);
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k0 = g * G;
        quantize_group(w + n * K + k0, std::min(G, K - k0), G, clips, n_clips, refits,
                       codes + n * groups * G + k0, scales + n * groups + g,
                       offsets + n * groups + g, buf.data(), buf.data() + G);
      }
  });
}

}  // namespace er::int4
