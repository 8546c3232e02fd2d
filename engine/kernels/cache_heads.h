// One (row, head) of a decode step's self-attention over each kind of KV cache: write the step's
// key and value where the row stands (rounded to bfloat16, or quantized to int8 or int4), then
// attend to positions [0, at]. The same on every ISA: the conversions and the attention are
// the ISA's (isa.h), the order of the work is here.
#pragma once

#include "isa.h"

namespace er {

// A bfloat16 cache: k, v [P, D] of this row and head.
inline void attend_head_bf16(const float* q, const float* k_new, const float* v_new, uint16_t* k,
                             uint16_t* v, int64_t at, int64_t D, float scale, float* scores,
                             float* out) {
  store_bf16(k_new, k + at * D, D);  // round to nearest even, as torch's .to(bfloat16)
  store_bf16(v_new, v + at * D, D);
  with_head_chunks(D, [&](auto nc) { attend<nc>(q, k, v, at + 1, scale, scores, out); });
}

// An int8 cache: k, v [P, D] and their scales ks, vs [P] of this row and head. `next_k`: the
// keys this thread reads next (or nullptr), asked for while this head is read.
inline void attend_head_q8(const float* q, const float* k_new, const float* v_new, int8_t* k,
                           float* ks, int8_t* v, float* vs, int64_t at, int64_t D, float scale,
                           float* scores, float* out, const int8_t* next_k) {
  ks[at] = quantize_vector(k_new, k + at * D, D);
  vs[at] = quantize_vector(v_new, v + at * D, D);
  with_head_chunks(D, [&](auto nc) {
    attend_q8<nc>(q, k, ks, v, vs, at + 1, scale, scores, out, next_k);
  });
}

// An int4 cache (`head`: its blocks, heads of 64). `next`: the blocks this thread reads next.
inline void attend_head_q4(const float* q, const float* k_new, const float* v_new, uint8_t* head,
                           int64_t at, float scale, float* out, const uint8_t* next) {
  alignas(32) uint8_t key[32], value[32];
  const uint16_t key_scale = quantize_q4(k_new, key), value_scale = quantize_q4(v_new, value);
  store_q4(head, at, key, key_scale, value, value_scale);
  attend_q4(q, head, at + 1, scale, out, next);
}

}  // namespace er
