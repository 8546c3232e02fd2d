// The vector parts of top-k sampling (../sampling.h), AVX-512: the logits as ordered integer
// keys, counting keys at or above a threshold, and the exps of the survivors.
#pragma once

#include <climits>

#include "simd.h"

namespace er {

// Float bits as int32 in the floats' order (for non-NaN values): signed compares of the keys
// are compares of the floats.
inline __m512i order_keys(__m512 x) {
  const __m512i b = _mm512_castps_si512(x);
  return _mm512_xor_si512(b, _mm512_and_si512(_mm512_srai_epi32(b, 31), _mm512_set1_epi32(0x7FFFFFFF)));
}

// keys[0, padded) of g[0, V) (padded: V rounded up to 16), the padding at INT32_MIN.
inline void ordered_keys(const float* g, int64_t V, int32_t* keys) {
  for (int64_t v = 0; v < V; v += 16) {
    const __mmask16 m = first_lanes(V - v);
    const __m512i key = order_keys(_mm512_maskz_loadu_ps(m, g + v));
    _mm512_storeu_si512(keys + v, _mm512_mask_mov_epi32(_mm512_set1_epi32(INT32_MIN), m, key));
  }
}

// How many of keys[0, n) (n a multiple of 16, padding at INT32_MIN) are >= t.
inline int64_t count_at_least(const int32_t* keys, int64_t n, int32_t t) {
  const __m512i vt = _mm512_set1_epi32(t);
  int64_t count = 0;
  for (int64_t i = 0; i < n; i += 16)
    count += __builtin_popcount(_mm512_cmpge_epi32_mask(_mm512_loadu_si512(keys + i), vt));
  return count;
}

// p[j] = exp(p[j] - top) for j in [0, n).
inline void exp_shifted(float* p, int64_t n, float top) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = first_lanes(n - j);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + j), _mm512_set1_ps(top)));
    _mm512_mask_storeu_ps(p + j, m, e);
  }
}

}  // namespace er
