// One (row, head) of a decode step's self-attention: the query against positions [0, T) of a
// bfloat16 or int8 KV cache, softmax, weighted sum of values. The head size is NC * 16 floats,
// held in registers; scores are float32 scratch of at least T + 16 floats.
#pragma once

#include <algorithm>
#include <cstring>

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

// Memory is kept busy across the two passes: while the keys' pass runs, the values are asked for
// (into L2); while the values' pass runs, the keys of the next head this thread attends
// (`next_k`, or nullptr). One stream is always in flight instead of each pass waiting for its own.
template <int NC>
void attend_q8(const float* q, const int8_t* k, const float* ks, const int8_t* v, const float* vs,
               int64_t T, float scale, float* scores, float* out, const int8_t* next_k) {
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
      for (int64_t line = 0; line < 16 * D; line += 64) {
        prefetch(k + kAttendPrefetch + line);
        prefetch_l2(v + t0 * D + line);  // the same positions' values, for the second pass
      }
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
    if (next_k)
      for (int64_t line = 0; line < D; line += 64) prefetch_l2(next_k + t2 * D + line);
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
                           float* scores, float* out, const int8_t* next_k) {
  ks[at] = quantize_vector(k_new, k + at * D, D);
  vs[at] = quantize_vector(v_new, v + at * D, D);
  with_head_chunks(D, [&](auto nc) {
    attend_q8<nc>(q, k, ks, v, vs, at + 1, scale, scores, out, next_k);
  });
}

// ---- int4 cache (head size 64) ---------------------------------------------------------------
// A key or value vector is 64 nibbles u = round(x / s) + 8 with its own float32 scale s =
// max|x| / 7 (quantize_q4): 32 bytes, byte r holding dims r and r + 32. An eighth of float32's
// bytes (with the scales: 72 vs 136 bytes per position and head for int8). Both layouts put
// what one VNNI instruction multiplies in one 64-byte load, and the maths is integer and exact:
// - keys go by blocks of 16 positions, 512 bytes [8][16][4]: byte b of lane l in group j is byte
//   r = 4j + b of position l. Unmasked, a group's low nibbles are dims 4j..4j+3 of 16 positions,
//   the high ones dims 32+4j..; vpdpbusd against those 4 query bytes (int8, one scale) adds them
//   into each position's own lane: 16 scores from 8 loads and 16 dot products, no horizontal sums;
// - values go by pairs of positions, byte 2r + j of pair g holding position 2g + j: unpacked and
//   widened to int16, lane pairs vpdpwssd multiplies by the two positions' softmax weights,
//   taken as int16 over their maximum (times each value's scale; steps of max / 32767: a long
//   tail of small weights keeps its mass).
// A head's sums stay below 2^31 for up to 4096 positions (15 * 32767 * 4096).
constexpr int64_t kQ4Head = 64, kQ4MaxPositions = 4096, kQ4Block = 16;

// Byte offset of key byte r (a multiple of 4) of position t in a head's blocked keys.
inline int64_t q4_key_offset(int64_t t, int64_t r) {
  return t / kQ4Block * 512 + r / 4 * 64 + t % kQ4Block * 4;
}

inline void attend_q4(const float* q, const uint8_t* k, const float* ks, const uint8_t* v,
                      const float* vs, int64_t T, float scale, float* scores, int16_t* weights,
                      float* out, const uint8_t* next_k) {
  for (int64_t line = 0; line < kAttendPrefetch && line < T * 32; line += 64) {
    prefetch(k + line);  // both streams start cold: ask for their first lines at once
    prefetch(v + line);
  }
  // the query as int8 (nearest even); each group of 4 dims broadcast to every lane
  __m512 m = _mm512_setzero_ps();
  for (int c = 0; c < 64; c += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(q + c)));
  const float qmax = _mm512_reduce_max_ps(m);
  const float qs = qmax > 0 ? qmax / 127.0f : 1.0f;
  alignas(64) int8_t q8[64];
  int32_t qsum = 0;
  for (int c = 0; c < 64; c += 16) {
    const __m512i i = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(q + c), _mm512_set1_ps(1.0f / qs)));
    _mm_store_si128(reinterpret_cast<__m128i*>(q8 + c), _mm512_cvtsepi32_epi8(i));
    qsum += _mm512_reduce_add_epi32(i);
  }
  __m512i qlo[8], qhi[8];
  for (int j = 0; j < 8; ++j) {
    int32_t lo, hi;
    std::memcpy(&lo, q8 + 4 * j, 4);
    std::memcpy(&hi, q8 + 32 + 4 * j, 4);
    qlo[j] = _mm512_set1_epi32(lo), qhi[j] = _mm512_set1_epi32(hi);
  }
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512 kscale = _mm512_set1_ps(scale * qs);
  const __m512 offset = _mm512_set1_ps(8.0f * static_cast<float>(qsum));  // the nibbles' +8
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int64_t t0 = 0; t0 < T; t0 += kQ4Block) {  // the slots run to a whole block
    const uint8_t* kb = k + t0 * 32;
    for (int64_t line = 0; line < 512; line += 64) {
      prefetch(kb + kAttendPrefetch + line);
      prefetch_l2(v + t0 * 32 + line);  // the same positions' values, for the second pass
    }
    __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                      _mm512_setzero_si512()};
    for (int j = 0; j < 8; ++j) {
      const __m512i x = _mm512_loadu_si512(kb + 64 * j);
      const __m512i lo = _mm512_and_si512(x, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), nibble);
      acc[j % 2] = _mm512_dpbusd_epi32(acc[j % 2], lo, qlo[j]);
      acc[2 + j % 2] = _mm512_dpbusd_epi32(acc[2 + j % 2], hi, qhi[j]);
    }
    const __m512i dots = _mm512_add_epi32(_mm512_add_epi32(acc[0], acc[1]), _mm512_add_epi32(acc[2], acc[3]));
    const __mmask16 mask = first_lanes(T - t0);
    const __m512 sums = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(dots), offset),
                                                    _mm512_maskz_loadu_ps(mask, ks + t0)), kscale);
    _mm512_mask_storeu_ps(scores + t0, mask, sums);
    vmax = _mm512_mask_max_ps(vmax, mask, vmax, sums);
  }
  const float best = _mm512_reduce_max_ps(vmax);
  const float inv = softmax_weights(scores, T, best, vs);  // scores: weights times value scales
  __m512 wm = _mm512_setzero_ps();
  for (int64_t t = 0; t < T; t += 16) {
    const __mmask16 mask = first_lanes(T - t);
    wm = _mm512_max_ps(wm, _mm512_maskz_loadu_ps(mask, scores + t));
  }
  const float wmax = _mm512_reduce_max_ps(wm);
  const __m512 wq = _mm512_set1_ps(wmax > 0 ? 32767.0f / wmax : 0.0f);
  __m512i wsum = _mm512_setzero_si512();
  for (int64_t t = 0; t < T; t += 16) {
    const __mmask16 mask = first_lanes(T - t);
    const __m512i w = _mm512_maskz_cvtps_epi32(mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, scores + t), wq));
    _mm256_mask_storeu_epi16(weights + t, mask, _mm512_cvtsepi32_epi16(w));
    wsum = _mm512_add_epi32(wsum, w);
  }
  weights[T] = 0;  // an odd T's last pair: the slot after the last position weighs nothing
  __m512i acc[4];
  for (auto& a : acc) a = _mm512_setzero_si512();
  for (int64_t g = 0; 2 * g < T; ++g) {
    const uint8_t* vg = v + 64 * g;
    prefetch(vg + kAttendPrefetch);
    if (next_k) prefetch_l2(next_k + 64 * g);
    const __m512i x = _mm512_loadu_si512(vg);
    const __m512i lo = _mm512_and_si512(x, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), nibble);
    int32_t pair;
    std::memcpy(&pair, weights + 2 * g, 4);
    const __m512i w = _mm512_set1_epi32(pair);
    acc[0] = _mm512_dpwssd_epi32(acc[0], _mm512_cvtepu8_epi16(_mm512_castsi512_si256(lo)), w);
    acc[1] = _mm512_dpwssd_epi32(acc[1], _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(lo, 1)), w);
    acc[2] = _mm512_dpwssd_epi32(acc[2], _mm512_cvtepu8_epi16(_mm512_castsi512_si256(hi)), w);
    acc[3] = _mm512_dpwssd_epi32(acc[3], _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(hi, 1)), w);
  }
  const __m512i off = _mm512_set1_epi32(8 * _mm512_reduce_add_epi32(wsum));
  const __m512 back = _mm512_set1_ps(inv * wmax / 32767.0f);
  for (int c = 0; c < 4; ++c)
    _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[c], off)), back));
}

// Row b's head h of a decode step over an int4 cache (k: blocked keys, v [P / 2][64] bytes,
// scales ks, vs [P] of this row and head): quantize the step's key and value into position
// `at`, then attend to positions [0, at]. `weights`: int16 scratch of at least at + 2.
inline void attend_head_q4(const float* q, const float* k_new, const float* v_new, uint8_t* k,
                           float* ks, uint8_t* v, float* vs, int64_t at, float scale,
                           float* scores, int16_t* weights, float* out, const uint8_t* next_k) {
  alignas(32) uint8_t packed[32];
  ks[at] = quantize_q4(k_new, packed);
  for (int r = 0; r < 32; r += 4) std::memcpy(k + q4_key_offset(at, r), packed + r, 4);
  vs[at] = quantize_q4(v_new, packed);
  uint8_t* pair = v + 64 * (at / 2) + at % 2;
  for (int r = 0; r < 32; ++r) pair[2 * r] = packed[r];
  attend_q4(q, k, ks, v, vs, at + 1, scale, scores, weights, out, next_k);
}

}  // namespace er
