// One (row, head) of a decode step's self-attention, AVX2 + FMA: the query against positions
// [0, T) of a bfloat16, int8 or int4 KV cache, softmax, weighted sum of values (the bfloat16 one
// also serves cross-attention, with an additive bias [T]: 0, or -inf for padding). The head
// size is NC * 16 floats (2 * NC registers); scores are float32 scratch of at least T + 16
// floats. The same maths as the AVX-512 kernels, 8 lanes at a time.
#pragma once

#include <algorithm>
#include <cstring>

#include "simd.h"

namespace er {

template <int NC>
void attend(const float* q, const uint16_t* k, const uint16_t* v, int64_t T, float scale,
            float* scores, float* out, const float* bias = nullptr) {
  constexpr int64_t D = NC * 16, R = 2 * NC;
  __m256 qv[R];
  for (int r = 0; r < R; ++r) qv[r] = _mm256_mul_ps(_mm256_loadu_ps(q + 8 * r), _mm256_set1_ps(scale));
  auto dot = [&](const uint16_t* key) {
    __m256 a = _mm256_mul_ps(qv[0], load_bf16(key));
    for (int r = 1; r < R; ++r) a = _mm256_fmadd_ps(qv[r], load_bf16(key + 8 * r), a);
    return a;
  };
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  int64_t t0 = 0;
  for (; t0 + 8 <= T; t0 += 8, k += 8 * D) {  // 8 positions, one horizontal-sum butterfly
    __m256 a[8];
    for (int j = 0; j < 8; ++j) a[j] = dot(k + j * D);
    __m256 sums = hsum8(a);
    if (bias) sums = _mm256_add_ps(sums, _mm256_loadu_ps(bias + t0));
    _mm256_storeu_ps(scores + t0, sums);
    vmax = _mm256_max_ps(vmax, sums);
  }
  float best = hmax(vmax);
  for (int64_t t = t0; t < T; ++t, k += D) {
    const float score = hsum(dot(k)) + (bias ? bias[t] : 0.0f);
    scores[t] = score;
    best = score > best ? score : best;
  }
  const __m256 inv = _mm256_set1_ps(softmax_weights(scores, T, best, nullptr));
  __m256 o[R];
  for (auto& x : o) x = _mm256_setzero_ps();
  for (int64_t t = 0; t < T; ++t, v += D) {
    const __m256 p = _mm256_set1_ps(scores[t]);
    for (int r = 0; r < R; ++r) o[r] = _mm256_fmadd_ps(p, load_bf16(v + 8 * r), o[r]);
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + 8 * r, _mm256_mul_ps(o[r], inv));
}

// The query as int16 (one scale, 15 bits), 16 dims a register, for vpmaddwd against keys
// widened from int8: exact int32 dot products. Returns the scale.
template <int NC>
inline float query_i16(const float* q, __m256i (&q16)[NC]) {
  const float qmax = abs_max(q, NC * 16);
  const float qs = qmax > 0 ? qmax / 32767.0f : 1.0f;
  const __m256 inv = _mm256_set1_ps(1.0f / qs);
  for (int c = 0; c < NC; ++c) {
    const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(q + 16 * c), inv));
    const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(q + 16 * c + 8), inv));
    q16[c] = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), _MM_SHUFFLE(3, 1, 2, 0));
  }
  return qs;
}

// One int8 key [NC * 16] against the int16 query: 8 int32 partial sums.
template <int NC>
inline __m256i key_dot_i16(const __m256i (&q16)[NC], const int8_t* key) {
  __m256i acc = _mm256_setzero_si256();
  for (int c = 0; c < NC; ++c) {
    const __m128i kv = _mm_loadu_si128(reinterpret_cast<const __m128i*>(key + 16 * c));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(q16[c], _mm256_cvtepi8_epi16(kv)));
  }
  return acc;
}

// Memory is kept busy across the two passes: while the keys' pass runs, the values are asked for
// (into L2); while the values' pass runs, the keys of the next head this thread attends
// (`next_k`, or nullptr). One stream is always in flight instead of each pass waiting for its own.
template <int NC>
void attend_q8(const float* q, const int8_t* k, const float* ks, const int8_t* v, const float* vs,
               int64_t T, float scale, float* scores, float* out, const int8_t* next_k) {
  constexpr int64_t D = NC * 16, R = 2 * NC;
  for (int64_t line = 0; line < kAttendPrefetch && line < T * D; line += 64) {
    prefetch(k + line);  // both streams start cold: ask for their first lines at once
    prefetch(v + line);
  }
  __m256i q16[NC];
  const __m256 vscale = _mm256_set1_ps(scale * query_i16<NC>(q, q16));
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  int64_t t0 = 0;
  for (; t0 + 8 <= T; t0 += 8, k += 8 * D) {  // 8 positions, one horizontal-sum butterfly
    for (int64_t line = 0; line < 8 * D; line += 64) {
      prefetch(k + kAttendPrefetch + line);
      prefetch(v + t0 * D + line);  // the same positions' values, for the second pass
    }
    __m256 a[8];
    for (int j = 0; j < 8; ++j) a[j] = _mm256_cvtepi32_ps(key_dot_i16<NC>(q16, k + j * D));
    const __m256 sums = _mm256_mul_ps(_mm256_mul_ps(hsum8(a), _mm256_loadu_ps(ks + t0)), vscale);
    _mm256_storeu_ps(scores + t0, sums);
    vmax = _mm256_max_ps(vmax, sums);
  }
  float best = hmax(vmax);
  for (int64_t t = t0; t < T; ++t, k += D) {
    const float score = static_cast<float>(hsum_epi32(key_dot_i16<NC>(q16, k))) * ks[t] *
                        _mm256_cvtss_f32(vscale);
    scores[t] = score;
    best = score > best ? score : best;
  }
  const __m256 inv = _mm256_set1_ps(softmax_weights(scores, T, best, vs));
  __m256 o[R];
  for (auto& x : o) x = _mm256_setzero_ps();
  for (int64_t t = 0; t < T; ++t, v += D) {
    for (int64_t line = 0; line < D; line += 64) prefetch(v + kAttendPrefetch + line);
    if (next_k)
      for (int64_t line = 0; line < D; line += 64) prefetch(next_k + t * D + line);
    const __m256 p = _mm256_set1_ps(scores[t]);  // softmax weight times the value's scale
    for (int r = 0; r < R; ++r) o[r] = _mm256_fmadd_ps(p, load_i8(v + 8 * r), o[r]);
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + 8 * r, _mm256_mul_ps(o[r], inv));
}

// ---- int4 cache (head size 64, common.h's blocks) ---------------------------------------------
// Without VNNI, vpmaddubsw (unsigned x signed bytes, pairs summed into int16) does the work:
// - keys: half a 64-byte group is 8 positions x 4 bytes; its low nibbles (unsigned, <= 15)
//   against the 4 query bytes of dims 4j.. (int8) give each position's pairs (<= 2 * 15 * 127),
//   summed over the 8 groups in int16 (<= 30480: no saturation), then vpmaddwd against ones
//   into the position's int32 lane; the high nibbles likewise for dims 32 + 4j..;
// - values: half a 64-byte load is 8 dims x 4 positions; the 4 positions' softmax weights
//   (uint8, the unsigned side) against the nibbles (<= 15, the signed side) give pairs of at
//   most 2 * 255 * 15, summed over a block's 4 groups in int16 (<= 30600), then vpmaddwd.
// The chunks, online softmax and 8-bit weights are the AVX-512 kernel's, so both give the same
// numbers up to float rounding.

// 8 of a block's key or value scales (bfloat16 at byte offset `at`) as floats.
inline __m256 q4_scales(const uint8_t* blk, int64_t at) {
  return load_bf16(reinterpret_cast<const uint16_t*>(blk + at));
}

// The int32 dots of 8 positions' keys (half `half` of a block) with the int8 query (q4: its 4
// bytes of dims 4j.. in every lane at [j], those of dims 32 + 4j.. at [8 + j]).
inline __m256i q4_key_dots(const uint8_t* blk, int half, const __m256i* q4) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
  for (int j = 0; j < 8; ++j) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * j + 32 * half));
    lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(_mm256_and_si256(x, nibble), q4[j]));
    hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(x, 4), nibble), q4[8 + j]));
  }
  const __m256i ones = _mm256_set1_epi16(1);
  return _mm256_add_epi32(_mm256_madd_epi16(lo, ones), _mm256_madd_epi16(hi, ones));
}

// acc[c] (the int32 sums of dims 8c..8c+7) += one block's values weighed by w8 [16] (uint8).
inline void q4_value_sums(const uint8_t* values, const uint8_t* w8, __m256i (&acc)[8]) {
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int h = 0; h < 2; ++h) {
    for (int half = 0; half < 2; ++half) {  // dims 16h + 8 half .. (low) and 32 + that (high)
      __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
      for (int g = 0; g < 4; ++g) {
        int32_t four;
        std::memcpy(&four, w8 + 4 * g, 4);
        const __m256i wg = _mm256_set1_epi32(four);  // positions 4g..4g+3
        const __m256i x = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(values + 128 * g + 64 * h + 32 * half));
        lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(wg, _mm256_and_si256(x, nibble)));
        hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(wg, _mm256_and_si256(_mm256_srli_epi16(x, 4), nibble)));
      }
      const int c = 2 * h + half;
      acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(lo, ones));
      acc[4 + c] = _mm256_add_epi32(acc[4 + c], _mm256_madd_epi16(hi, ones));
    }
  }
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
  __m256i q4[16];
  for (int j = 0; j < 8; ++j) {
    int32_t lo, hi;
    std::memcpy(&lo, q8 + 4 * j, 4);
    std::memcpy(&hi, q8 + 32 + 4 * j, 4);
    q4[j] = _mm256_set1_epi32(lo), q4[8 + j] = _mm256_set1_epi32(hi);
  }
  const __m256 kscale = _mm256_set1_ps(scale * qs);
  const __m256 offset = _mm256_set1_ps(8.0f * static_cast<float>(qsum));  // the keys' +8
  const __m256 none = _mm256_set1_ps(-INFINITY);
  constexpr int kHalves = 2 * kQ4Chunk;  // 8 positions each
  const Q4Ahead ask{head, used, next};
  float best = -INFINITY;
  __m256 o[8], weighed = _mm256_setzero_ps(), total = _mm256_setzero_ps();
  for (auto& x : o) x = _mm256_setzero_ps();
  for (int64_t n0 = 0; n0 < blocks; n0 += kQ4Chunk) {  // a chunk of blocks stays in L1 for both passes
    const int64_t count = std::min(kQ4Chunk, blocks - n0);
    __m256 s[kHalves];
    __m256 mask[kHalves];
    __m256 top = none;
    for (int i = 0; i < 2 * count; ++i) {
      const int64_t at = (n0 + i / 2) * kQ4BlockBytes;
      const uint8_t* blk = head + at;
      for (int line = 0; line < 4; ++line) ask(at + 256 * (i % 2) + 64 * line);  // keys: 4 a half
      mask[i] = _mm256_castsi256_ps(first_lanes(T - (n0 * kQ4Block + 8 * i)));
      const __m256 dots = _mm256_cvtepi32_ps(q4_key_dots(blk, i % 2, q4));
      s[i] = _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(dots, offset), q4_scales(blk, kQ4KeyScales + 16 * (i % 2))),
                           kscale);
      top = _mm256_max_ps(top, _mm256_blendv_ps(none, s[i], mask[i]));
    }
    if (_mm256_movemask_ps(_mm256_cmp_ps(top, _mm256_set1_ps(best), _CMP_GT_OQ))) {
      const float high = hmax(top);  // the max rises: rescale the sums so far
      const __m256 f = _mm256_set1_ps(std::exp(best - high));  // 0 for the first chunk
      for (auto& x : o) x = _mm256_mul_ps(x, f);
      weighed = _mm256_mul_ps(weighed, f), total = _mm256_mul_ps(total, f);
      best = high;
    }
    __m256 w[kHalves], wtop = _mm256_setzero_ps();
    for (int i = 0; i < 2 * count; ++i) {
      const uint8_t* blk = head + (n0 + i / 2) * kQ4BlockBytes;
      const __m256 e = _mm256_and_ps(exp_ps(_mm256_sub_ps(s[i], _mm256_set1_ps(best))), mask[i]);
      total = _mm256_add_ps(total, e);
      w[i] = _mm256_mul_ps(e, q4_scales(blk, kQ4ValueScales + 16 * (i % 2)));
      wtop = _mm256_max_ps(wtop, w[i]);
    }
    const float wmax = hmax(wtop);
    if (!(wmax > 0)) continue;  // every weight underflowed: nothing to add
    const __m256 up = _mm256_set1_ps(255.0f / wmax), step = _mm256_set1_ps(wmax / 255.0f);
    __m256i acc[8], wsum = _mm256_setzero_si256();
    for (auto& a : acc) a = _mm256_setzero_si256();
    for (int i = 0; i < count; ++i) {
      const __m256i w0 = _mm256_cvtps_epi32(_mm256_mul_ps(w[2 * i], up));
      const __m256i w1 = _mm256_cvtps_epi32(_mm256_mul_ps(w[2 * i + 1], up));
      wsum = _mm256_add_epi32(wsum, _mm256_add_epi32(w0, w1));
      alignas(16) uint8_t w8[16];
      store_u8x16(w0, w1, w8);
      const int64_t at = (n0 + i) * kQ4BlockBytes;
      for (int64_t line = kQ4Values; line < kQ4BlockBytes; line += 64) ask(at + line);  // values, scales
      q4_value_sums(head + at + kQ4Values, w8, acc);
    }
    weighed = _mm256_fmadd_ps(_mm256_cvtepi32_ps(wsum), step, weighed);  // for the values' +8
    for (int c = 0; c < 8; ++c) o[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[c]), step, o[c]);
  }
  const __m256 inv = _mm256_set1_ps(1.0f / hsum(total));
  const __m256 off = _mm256_set1_ps(8.0f * hsum(weighed));
  // o[c]: dims 8c.. for c < 4 (low nibbles), 32 + 8(c - 4).. for the rest: in order
  for (int c = 0; c < 8; ++c) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(_mm256_sub_ps(o[c], off), inv));
}

}  // namespace er
