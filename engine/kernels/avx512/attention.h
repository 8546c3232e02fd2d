// One (row, head) of a decode step's self-attention, AVX-512: the query against positions [0, T)
// of a bfloat16, int8 or int4 KV cache, softmax, weighted sum of values (the bfloat16 one also
// serves cross-attention, with an additive bias [T]: 0, or -inf for padding). The head size is
// NC * 16 floats, held in registers; scores are float32 scratch of at least T + 16 floats.
#pragma once

#include <algorithm>
#include <cstring>

#include "simd.h"

namespace er {

template <int NC>
void attend(const float* q, const uint16_t* k, const uint16_t* v, int64_t T, float scale,
            float* scores, float* out, const float* bias = nullptr) {
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
    __m512 sums = hsum16(a);
    if (bias) sums = _mm512_add_ps(sums, _mm512_loadu_ps(bias + t0));
    _mm512_storeu_ps(scores + t0, sums);
    vmax = _mm512_max_ps(vmax, sums);
  }
  float best = _mm512_reduce_max_ps(vmax);
  for (int64_t t = t0; t < T; ++t, k += D) {
    __m512 a = _mm512_mul_ps(qv[0], load_bf16(k));
    for (int c = 1; c < NC; ++c) a = _mm512_fmadd_ps(qv[c], load_bf16(k + 16 * c), a);
    const float score = _mm512_reduce_add_ps(a) + (bias ? bias[t] : 0.0f);
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
        prefetch(v + t0 * D + line);  // the same positions' values, for the second pass
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
      for (int64_t line = 0; line < D; line += 64) prefetch(next_k + t2 * D + line);
    const __m512 p = _mm512_set1_ps(scores[t2]);  // softmax weight times the value's scale
    for (int c = 0; c < NC; ++c) o[c] = _mm512_fmadd_ps(p, load_i8(v + 16 * c), o[c]);
  }
  for (int c = 0; c < NC; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(o[c], inv));
}

// ---- int4 cache (head size 64, common.h's blocks) ---------------------------------------------
// Each VNNI instruction finds what it multiplies in one 64-byte load:
// - a key group's low nibbles are dims 4j..4j+3 of 16 positions, the high ones dims 32 + 4j..;
//   vpdpbusd against those 4 query bytes (int8, one scale) adds them into each position's lane:
//   16 scores from 8 loads and 16 dot products, no horizontal sums;
// - a value load's low nibbles are dims 16h..16h+15 of 4 positions (4 bytes a lane), the high
//   ones dims 32 + 16h..; vpdpbusd against the 4 positions' softmax weights (uint8 over the
//   chunk's largest) sums them into each dim's lane: 16 positions' values from 8 loads.
// One pass, by chunks of 4 blocks (4 KB, in L1 for both halves of the chunk's work: scores,
// then weights and values; each line read asks for the one `kAttendQ4Prefetch` ahead), with an
// online softmax: the running max rises when a chunk's
// scores pass it (rare after the first chunks: a compare, not a reduction), and what is summed
// so far is rescaled. The chunk's scores are independent work for the out-of-order core, and
// its reductions and conversions are paid once per 64 positions (in L2, a head of 1000
// positions: 26 -> 21 us with chunks of 1 block).
// The weights' 8 bits are a step of 1/255 of the chunk's largest; the values' 4 bits are a
// step of 1/7 of their largest: the weights add a small fraction of the values' own error.

// A block's 16 key or value scales (bfloat16 at byte offset `at`) as floats.
inline __m512 q4_scales(const uint8_t* blk, int64_t at) {
  return load_bf16(reinterpret_cast<const uint16_t*>(blk + at));
}

// Attend the query q [64] to positions [0, T) of a head's blocks. `next`: the blocks this
// thread reads after these (or nullptr), whose first lines are asked for as this head ends.
inline void attend_q4(const float* q, const uint8_t* head, int64_t T, float scale, float* out,
                      const uint8_t* next) {
  const int64_t blocks = (T + kQ4Block - 1) / kQ4Block, used = q4_bytes(T);
  // the query as int8 (nearest even); each group of 4 dims broadcast to every lane
  alignas(64) int8_t q8[64];
  const float qs = quantize_vector(q, q8, kQ4Head);
  int32_t qsum = 0;
  for (const int8_t x : q8) qsum += x;
  __m512i qlo[8], qhi[8];
  for (int j = 0; j < 8; ++j) {
    int32_t lo, hi;
    std::memcpy(&lo, q8 + 4 * j, 4);
    std::memcpy(&hi, q8 + 32 + 4 * j, 4);
    qlo[j] = _mm512_set1_epi32(lo), qhi[j] = _mm512_set1_epi32(hi);
  }
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512 kscale = _mm512_set1_ps(scale * qs);
  const __m512 offset = _mm512_set1_ps(8.0f * static_cast<float>(qsum));  // the keys' +8
  const Q4Ahead ask{head, used, next};
  float best = -INFINITY;
  __m512 o[4], weighed = _mm512_setzero_ps(), total = _mm512_setzero_ps();
  for (auto& x : o) x = _mm512_setzero_ps();
  for (int64_t n0 = 0; n0 < blocks; n0 += kQ4Chunk) {  // a chunk of blocks stays in L1 for both passes
    const int64_t count = std::min(kQ4Chunk, blocks - n0);
    __m512 s[kQ4Chunk];
    __mmask16 mask[kQ4Chunk];
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int i = 0; i < count; ++i) {
      mask[i] = first_lanes(T - (n0 + i) * kQ4Block);
      const int64_t at = (n0 + i) * kQ4BlockBytes;
      const uint8_t* blk = head + at;
      __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                        _mm512_setzero_si512()};
      for (int j = 0; j < 8; ++j) {
        ask(at + 64 * j);  // a line asked for with each line read: the keys' 8
        const __m512i x = _mm512_loadu_si512(blk + 64 * j);
        const __m512i lo = _mm512_and_si512(x, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), nibble);
        acc[j % 2] = _mm512_dpbusd_epi32(acc[j % 2], lo, qlo[j]);
        acc[2 + j % 2] = _mm512_dpbusd_epi32(acc[2 + j % 2], hi, qhi[j]);
      }
      const __m512i dots = _mm512_add_epi32(_mm512_add_epi32(acc[0], acc[1]), _mm512_add_epi32(acc[2], acc[3]));
      s[i] = _mm512_mul_ps(
          _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(dots), offset), q4_scales(blk, kQ4KeyScales)),
          kscale);
      top = _mm512_mask_max_ps(top, mask[i], top, s[i]);
    }
    if (_mm512_cmp_ps_mask(top, _mm512_set1_ps(best), _CMP_GT_OQ)) {
      const float high = _mm512_reduce_max_ps(top);  // the max rises: rescale the sums so far
      const __m512 f = _mm512_set1_ps(std::exp(best - high));  // 0 for the first chunk
      for (auto& x : o) x = _mm512_mul_ps(x, f);
      weighed = _mm512_mul_ps(weighed, f), total = _mm512_mul_ps(total, f);
      best = high;
    }
    __m512 w[kQ4Chunk], wtop = _mm512_setzero_ps();
    for (int i = 0; i < count; ++i) {
      const __m512 e = _mm512_maskz_mov_ps(mask[i], exp_ps(_mm512_sub_ps(s[i], _mm512_set1_ps(best))));
      total = _mm512_add_ps(total, e);
      w[i] = _mm512_maskz_mul_ps(mask[i], e, q4_scales(head + (n0 + i) * kQ4BlockBytes, kQ4ValueScales));
      wtop = _mm512_max_ps(wtop, w[i]);
    }
    const float wmax = _mm512_reduce_max_ps(wtop);
    if (!(wmax > 0)) continue;  // every weight underflowed: nothing to add
    const __m512 up = _mm512_set1_ps(255.0f / wmax), step = _mm512_set1_ps(wmax / 255.0f);
    __m512i acc[4], wsum = _mm512_setzero_si512();
    for (auto& a : acc) a = _mm512_setzero_si512();
    for (int i = 0; i < count; ++i) {
      const __m512i wi = _mm512_cvtps_epi32(_mm512_mul_ps(w[i], up));
      wsum = _mm512_add_epi32(wsum, wi);
      const __m512i w8 = _mm512_castsi128_si512(_mm512_cvtusepi32_epi8(wi));
      const int64_t at = (n0 + i) * kQ4BlockBytes;
      const uint8_t* values = head + at + kQ4Values;
      ask(at + kQ4KeyScales);  // the scales' line
      for (int g = 0; g < 4; ++g) {
        ask(at + kQ4Values + 128 * g);  // the values' 8
        ask(at + kQ4Values + 128 * g + 64);
        const __m512i wg = _mm512_permutexvar_epi32(_mm512_set1_epi32(g), w8);  // positions 4g..4g+3
        const __m512i x0 = _mm512_loadu_si512(values + 128 * g);
        const __m512i x1 = _mm512_loadu_si512(values + 128 * g + 64);
        acc[0] = _mm512_dpbusd_epi32(acc[0], wg, _mm512_and_si512(x0, nibble));  // dims 0..15
        acc[1] = _mm512_dpbusd_epi32(acc[1], wg, _mm512_and_si512(x1, nibble));  // 16..31
        acc[2] = _mm512_dpbusd_epi32(acc[2], wg, _mm512_and_si512(_mm512_srli_epi16(x0, 4), nibble));  // 32..
        acc[3] = _mm512_dpbusd_epi32(acc[3], wg, _mm512_and_si512(_mm512_srli_epi16(x1, 4), nibble));  // 48..
      }
    }
    weighed = _mm512_fmadd_ps(_mm512_cvtepi32_ps(wsum), step, weighed);  // for the values' +8
    for (int c = 0; c < 4; ++c) o[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[c]), step, o[c]);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
  const __m512 off = _mm512_set1_ps(8.0f * _mm512_reduce_add_ps(weighed));
  for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(_mm512_sub_ps(o[c], off), inv));
}

}  // namespace er
