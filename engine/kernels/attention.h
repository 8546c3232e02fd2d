// One (row, head) of a decode step's self-attention: the query against positions [0, T) of a
// bfloat16 or int8 KV cache, softmax, weighted sum of values. The head size is NC * 16 floats,
// held in registers; scores are float32 scratch of at least T + 16 floats.
#pragma once

#include "simd.h"

namespace er {

// How far ahead (bytes) the int8 cache's keys and values are prefetched while a head is read.
// Each (row, head) is two short streams (64 KB at 1000 positions) that the hardware prefetcher
// ramps up on too late: 4 KB ahead, and both streams' first lines at once, made 24 layers of
// attention over 1000 positions ~25% faster here (3.9 -> 2.9 ms; the same work in L3: 1.2 ms).
constexpr int64_t kAttendPrefetch = 4096;

template <int NC>
void attend(const float* q, const uint16_t* k, const uint16_t* v, int64_t T, float scale,
            float* scores, float* out) {
  constexpr int64_t D = NC * 16;
  __m512 qv[NC];
  for (int c = 0; c < NC; ++c) qv[c] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * c), _mm512_set1_ps(scale));
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  int64_t t0 = 0;
  for (; t0 + 16 <= T; t0 += 16, k += 16 * D) {  // 16 positions, one horizontal-sum butterfly
    __m512 a[16];
    for (int j = 0; j < 16; ++j) {
      a[j] = _mm512_mul_ps(qv[0], load_bf16(k + j * D));
      for (int c = 1; c < NC; ++c) a[j] = _mm512_fmadd_ps(qv[c], load_bf16(k + j * D + 16 * c), a[j]);
    }
    const __m512 sums = hsum16(a);
    _mm512_storeu_ps(scores + t0, sums);
    vmax = _mm512_max_ps(vmax, sums);
  }
  float best = _mm512_reduce_max_ps(vmax);
  for (int64_t t = t0; t < T; ++t, k += D) {
    __m512 a = _mm512_mul_ps(qv[0], load_bf16(k));
    for (int c = 1; c < NC; ++c) a = _mm512_fmadd_ps(qv[c], load_bf16(k + 16 * c), a);
    const float score = _mm512_reduce_add_ps(a);
    scores[t] = score;
    best = score > best ? score : best;
  }
  const __m512 inv = _mm512_set1_ps(softmax_weights(scores, T, best, nullptr));
  __m512 o[NC];
  for (int c = 0; c < NC; ++c) o[c] = _mm512_setzero_ps();
  for (int64_t t2 = 0; t2 < T; ++t2, v += D) {
    const __m512 p = _mm512_set1_ps(scores[t2]);
    for (int c = 0; c < NC; ++c) o[c] = _mm512_fmadd_ps(p, load_bf16(v + 16 * c), o[c]);
  }
  for (int c = 0; c < NC; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(o[c], inv));
}

// q [B, H, D] float32; keys/values [B, H, P, D] bfloat16 (D a multiple of 16, at most 128);
// lengths [B]: row b attends positions [0, lengths[b]). Returns [B, H, D] float32.

template <int NC>
void attend_q8(const float* q, const int8_t* k, const float* ks, const int8_t* v, const float* vs,
               int64_t T, float scale, float* scores, float* out) {
  constexpr int64_t D = NC * 16;
  for (int64_t line = 0; line < kAttendPrefetch && line < T * D; line += 64) {
    prefetch(k + line);  // both streams start cold: ask for their first lines at once
    prefetch(v + line);
  }
  __m512 qv[NC];
  for (int c = 0; c < NC; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  __m512 vscale = _mm512_set1_ps(scale);
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  int64_t t0 = 0;
  if constexpr (NC % 2 == 0) {
    // The query as int16 (one scale, 15 bits): a key's 32 int8 values widen to int16 and meet
    // it in one VNNI dot product (vpdpwssd), a third of the instructions of float32 FMAs.
    __m512 m = _mm512_setzero_ps();
    for (int c = 0; c < NC; ++c) m = _mm512_max_ps(m, _mm512_abs_ps(qv[c]));
    const float qmax = _mm512_reduce_max_ps(m);
    const float qs = qmax > 0 ? qmax / 32767.0f : 1.0f;
    const __m512 qinv = _mm512_set1_ps(1.0f / qs);
    __m512i q16[NC / 2];
    for (int c = 0; c < NC / 2; ++c) {
      const __m256i lo = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(qv[2 * c], qinv)));
      const __m256i hi =
          _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(qv[2 * c + 1], qinv)));
      q16[c] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    }
    vscale = _mm512_set1_ps(scale * qs);
    for (; t0 + 16 <= T; t0 += 16, k += 16 * D) {  // 16 positions, one horizontal-sum butterfly
      __m512 a[16];
      for (int64_t line = 0; line < 16 * D; line += 64) prefetch(k + kAttendPrefetch + line);
      for (int j = 0; j < 16; ++j) {
        __m512i acc = _mm512_setzero_si512();
        for (int c = 0; c < NC / 2; ++c) {
          const __m256i kv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + j * D + 32 * c));
          acc = _mm512_dpwssd_epi32(acc, q16[c], _mm512_cvtepi8_epi16(kv));
        }
        a[j] = _mm512_cvtepi32_ps(acc);
      }
      const __m512 sums = _mm512_mul_ps(_mm512_mul_ps(hsum16(a), _mm512_loadu_ps(ks + t0)), vscale);
      _mm512_storeu_ps(scores + t0, sums);
      vmax = _mm512_max_ps(vmax, sums);
    }
    // the tail positions below use the same rounded query, in float32
    for (int c = 0; c < NC; ++c)
      qv[c] = _mm512_roundscale_ps(_mm512_mul_ps(qv[c], qinv),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    scale *= qs;
  } else {
    for (; t0 + 16 <= T; t0 += 16, k += 16 * D) {  // 16 positions, one horizontal-sum butterfly
      __m512 a[16];
      for (int j = 0; j < 16; ++j) {
        a[j] = _mm512_mul_ps(qv[0], load_i8(k + j * D));
        for (int c = 1; c < NC; ++c)
          a[j] = _mm512_fmadd_ps(qv[c], load_i8(k + j * D + 16 * c), a[j]);
      }
      const __m512 sums = _mm512_mul_ps(_mm512_mul_ps(hsum16(a), _mm512_loadu_ps(ks + t0)), vscale);
      _mm512_storeu_ps(scores + t0, sums);
      vmax = _mm512_max_ps(vmax, sums);
    }
  }
  float best = _mm512_reduce_max_ps(vmax);
  for (int64_t t = t0; t < T; ++t, k += D) {
    __m512 a = _mm512_mul_ps(qv[0], load_i8(k));
    for (int c = 1; c < NC; ++c) a = _mm512_fmadd_ps(qv[c], load_i8(k + 16 * c), a);
    const float score = _mm512_reduce_add_ps(a) * ks[t] * scale;
    scores[t] = score;
    best = score > best ? score : best;
  }
  const __m512 inv = _mm512_set1_ps(softmax_weights(scores, T, best, vs));
  __m512 o[NC];
  for (int c = 0; c < NC; ++c) o[c] = _mm512_setzero_ps();
  for (int64_t t2 = 0; t2 < T; ++t2, v += D) {
    for (int64_t line = 0; line < D; line += 64) prefetch(v + kAttendPrefetch + line);
    const __m512 p = _mm512_set1_ps(scores[t2]);  // softmax weight times the value's scale
    for (int c = 0; c < NC; ++c) o[c] = _mm512_fmadd_ps(p, load_i8(v + 16 * c), o[c]);
  }
  for (int c = 0; c < NC; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(o[c], inv));
}

// Row b's head h of a decode step over an int8 cache: quantize the step's key and value into
// position `at` (k, v [P, D] and their scales ks, vs [P] of this row and head), then attend to
// positions [0, at].
inline void attend_head_q8(const float* q, const float* k_new, const float* v_new, int8_t* k,
                           float* ks, int8_t* v, float* vs, int64_t at, int64_t D, float scale,
                           float* scores, float* out) {
  ks[at] = quantize_vector(k_new, k + at * D, D);
  vs[at] = quantize_vector(v_new, v + at * D, D);
  with_head_chunks(D, [&](auto nc) { attend_q8<nc>(q, k, ks, v, vs, at + 1, scale, scores, out); });
}

}  // namespace er
