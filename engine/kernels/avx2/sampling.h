// The vector parts of top-k sampling (../sampling.h), AVX2: the logits as ordered integer keys,
// counting keys at or above a threshold, and the exps of the survivors.
#pragma once

#include <climits>

#include "simd.h"

namespace er {

// Float bits as int32 in the floats' order (for non-NaN values): signed compares of the keys
// are compares of the floats.
inline __m256i order_keys(__m256 x) {
  const __m256i b = _mm256_castps_si256(x);
  return _mm256_xor_si256(b, _mm256_and_si256(_mm256_srai_epi32(b, 31), _mm256_set1_epi32(0x7FFFFFFF)));
}

// keys[0, padded) of g[0, V) (padded: V rounded up to 16), the padding at INT32_MIN.
inline void ordered_keys(const float* g, int64_t V, int32_t* keys) {
  const int64_t padded = (V + 15) / 16 * 16;
  for (int64_t v = 0; v < padded; v += 8) {
    const __m256i m = first_lanes(V - v);
    const __m256i key = order_keys(_mm256_maskload_ps(g + v, m));
    const __m256i out = _mm256_blendv_epi8(_mm256_set1_epi32(INT32_MIN), key, m);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + v), out);
  }
}

// How many of keys[0, n) (n a multiple of 16, padding at INT32_MIN) are >= t.
inline int64_t count_at_least(const int32_t* keys, int64_t n, int32_t t) {
  const __m256i below = _mm256_set1_epi32(t - 1);  // key >= t: key > t - 1 (t > INT32_MIN here)
  int64_t count = 0;
  for (int64_t i = 0; i < n; i += 8) {
    const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i));
    count += __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(k, below))));
  }
  return count;
}

// p[j] = exp(p[j] - top) for j in [0, n).
inline void exp_shifted(float* p, int64_t n, float top) {
  for (int64_t j = 0; j < n; j += 8) {
    const __m256i m = first_lanes(n - j);
    _mm256_maskstore_ps(p + j, m, exp_ps(_mm256_sub_ps(_mm256_maskload_ps(p + j, m), _mm256_set1_ps(top))));
  }
}

}  // namespace er
