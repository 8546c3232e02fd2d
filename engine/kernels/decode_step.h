// A whole MusicGen decoder step with int8 or int4 weights (each projection its own kind: int4-ffn
// mixes them) over an int8 or int4 KV cache, in one call: the same
// maths as `engine.decoder.Decoder.forward` for one position per row,
//
//     x = sum_k embed_k(ids_k) + sinusoid(position)
//     per layer:  x += out(attend(qkv(LN(x))));  x += out_c(cross(q_c(LN(x))));  x += fc2(gelu(fc1(LN(x))))
//     logits = heads(LN(x))
//
// with no Python, no allocation and no tensor dispatch between the ops. A step reads every
// weight and cached key once, so it is bound by memory bandwidth; what is left besides the
// projections (layer norms, quantizing activations, cross-attention over a few text tokens) is
// a few microseconds per layer. Projections and self-attention split their work over the
// intra-op threads; the small parts run on the calling thread.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <utility>
#include <vector>

#include "cache_heads.h"
#include "int4_gemm.h"

namespace er {

// A projection's weights as the step reads them: `kind` says which member holds them. Another
// kind of weights adds an enumerator, a member, its cases here and its case in `project`.
struct Projection {
  enum class Kind { Int8, Int4 } kind = Kind::Int8;
  PackedInt8 int8{};  // Kind::Int8
  int4::PackedInt4 int4{};  // Kind::Int4
  int64_t out_features() const { return kind == Kind::Int4 ? int4.N : int8.N; }
  int64_t padded_inputs() const { return kind == Kind::Int4 ? int4.Kp : int8.Kp; }
  int64_t groups() const { return kind == Kind::Int4 ? int4.groups() : 0; }  // int4's per row
};

struct LayerNormW {
  const float *weight, *bias;  // [E]
};

// One decoder layer's weights by name; cpu.cpp holds the same names as tensors.
template <class Norm, class Proj>
struct DecoderLayerOf {
  Norm ln_self;
  Proj qkv, out_self;  // E -> 3E (q, k, v), E -> E
  Norm ln_cross;
  Proj q_cross, out_cross;  // E -> E, E -> E
  Norm ln_ffn;
  Proj fc1, fc2;  // E -> F, F -> E
};
using DecoderLayerW = DecoderLayerOf<LayerNormW, Projection>;

struct ModelW {
  int64_t E, H, D, F, L, K;  // hidden, heads, head size, ffn, layers, codebooks
  std::vector<const float*> embed;  // K x [V + 1][E]
  const float* positions;  // [max_positions][E] sinusoids
  std::vector<DecoderLayerW> layers;
  LayerNormW ln_final;
  Projection lm_heads;  // E -> K * V
  float eps;

  template <class Fn>
  void each_projection(Fn&& fn) const {
    for (const DecoderLayerW& w : layers)
      for (const Projection* p : {&w.qkv, &w.out_self, &w.q_cross, &w.out_cross, &w.fc1, &w.fc2})
        fn(*p);
    fn(lm_heads);
  }
};

// Quantized keys/values, strided: int8 keys/values [L, B, H, P, D] with float32 scales
// [L, B, H, P], or an int4 cache (bits 4, heads of 64): `keys` its blocks [L, B, H, P / 16, 1088]
// bytes (attention.h), `values` and the scales unused.
struct CacheQ {
  uint8_t *keys, *values;
  float *key_scales, *value_scales;
  int64_t kl, kb, kh;  // byte strides of keys and values (or blocks) over layer, row, head
  int64_t sl, sb, sh;  // element strides of the int8 cache's scales
  int64_t P;
  int bits;  // 8 or 4
};

struct CrossInputs {  // cross-attention keys/values [L][B][H][S][D] bfloat16, contiguous
  const uint16_t *keys, *values;
  const float* bias;  // [B][S]: 0 where a text token is, -inf where the row has padding
  const int64_t* lengths;  // [B]: the positions [0, length) a row reads (0: its output is zero)
  int64_t S;
  // Or nullptr: the attention folded into the text, [L][B][H][2][S][E] int8 with a float32
  // scale per vector [L][B][H][2][S] (per row, head and text position z = W_q,h^T k / sqrt(D),
  // then u = W_o[:, h] v: `cross_attention_folded`), read in place of q_cross, the keys and
  // values, and out_cross.
  const int8_t* folded = nullptr;
  const float* folded_scales = nullptr;
  const bool* folded_rows = nullptr;  // [B]: the rows that read it (others: the projections)
  bool is_folded(int64_t b) const { return folded && folded_rows[b]; }
};

struct StepScratch {
  std::vector<float> x, h, qkv, a, ff, scores;
  std::vector<int8_t> q;  // a projection's quantized rows [B][Kp]
  std::vector<float> qscale;  // [B]
  std::vector<int32_t> qcomp;  // [B]: int8 weights' compensation
  std::vector<float> qsums;  // [B][Kp / G]: int4 weights' group sums
  std::vector<float> partial;  // [B][H][E]: folded cross-attention's output per (row, head)
  std::vector<int64_t> items;  // folded cross-attention's (row, head) items that read text
  void fit(const ModelW& m, int64_t B, int64_t P, int64_t S) {
    int64_t widest = 0, groups = 0;
    m.each_projection([&](const Projection& p) {
      widest = std::max(widest, p.padded_inputs()), groups = std::max(groups, p.groups());
    });
    x.resize(B * m.E), h.resize(B * m.E), a.resize(B * m.E), qkv.resize(B * 3 * m.E);
    ff.resize(B * m.F), q.resize(B * widest), qscale.resize(B), qcomp.resize(B);
    qsums.resize(B * groups);
    scores.resize(at::get_num_threads() * (std::max(P, S) + 32));
    partial.resize(B * m.H * m.E), items.reserve(B * m.H);
  }
};

// Quantize B rows of `in` (K wide) into the scratch and run `w` over them: out = (Out::Store),
// += (Out::Add, the residual) or gelu of (Out::Gelu, fc1) the product.
template <Out OUT>
inline void project(const Projection& w, const float* in, int64_t K, int64_t B, float* out,
                    int64_t ldy, StepScratch& s) {
  switch (w.kind) {
    case Projection::Kind::Int8: {
      const PackedInt8& p = w.int8;
      quantize_rows(in, K, B, K, p.Kp, s.q.data(), p.Kp, s.qscale.data(), s.qcomp.data());
      gemm_int8<OUT>(p, QuantRows{s.q.data(), p.Kp, s.qscale.data(), s.qcomp.data()}, B, out, ldy);
      break;
    }
    case Projection::Kind::Int4: {  // what linear_int4 does (int4.cpp), into the scratch
      const int4::PackedInt4& p = w.int4;
      const int64_t groups = p.groups();
      for (int64_t b = 0; b < B; ++b)
        int4::quantize_row(in + b * K, K, p.Kp, p.G, s.q.data() + b * p.Kp, s.qscale.data() + b,
                           s.qsums.data() + b * groups);
      const int4::GroupedRows rows{s.q.data(), p.Kp, s.qscale.data(), s.qsums.data(), groups};
      int4::gemm_int4<OUT == Out::Add>(p, rows, B, out, ldy);
      // no GELU epilogue in int4's product: a pass over fc1's [B][F] (a few KB) after it
      if constexpr (OUT == Out::Gelu) gelu_rows(out, B, p.N, ldy);
      break;
    }
  }
}

// The bytes of `w` this thread streams in its product (the blocks at::parallel_for gives it), as
// ranges to ask for early: int8's packed blocks, or int4's codes and their scales (both
// contiguous over the thread's blocks); an empty range where there is none. Up to 16 rows (a
// decode step); above, int4 goes by panels of blocks and the ranges are only a good guess.
inline std::array<std::pair<const uint8_t*, const uint8_t*>, 2> thread_share(const Projection& w) {
  if (w.kind == Projection::Kind::Int8) return {thread_share(w.int8), {nullptr, nullptr}};
  const int4::PackedInt4& p = w.int4;
  const auto [b0, b1] = thread_blocks(p.blocks());
  const auto* scales = reinterpret_cast<const uint8_t*>(p.scales);
  const int64_t scale_bytes = p.groups() * 2 * int4::kFeatures * sizeof(uint16_t);
  return {{{p.block_codes(b0), p.block_codes(b1)},
           {scales + b0 * scale_bytes, scales + b1 * scale_bytes}}};
}

// y = LayerNorm(x) for B rows of E.
inline void norm_rows(const LayerNormW& w, const float* x, int64_t B, int64_t E, float eps,
                      float* y) {
  for (int64_t b = 0; b < B; ++b) layer_norm(x + b * E, w.weight, w.bias, y + b * E, E, eps);
}

constexpr int64_t kCrossAhead = 4;  // (row, head) items of cross-attention asked for ahead

// Cross-attention of B query rows q [B][E] over S text positions -> out [B][E], (row, head)
// pairs split across threads beyond one station's two rows (each thread's scores at scratch *
// thread): for one station it is a few microseconds per layer, not worth a sync of the threads
// (which, in the radio, share the cores with the encoders).
inline void cross_attention(const ModelW& m, int64_t layer, const CrossInputs& c,
                            const float* q, int64_t B, float* out, float* scores, int64_t scratch) {
  const int64_t E = m.E, H = m.H, D = m.D, S = c.S;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  // Each (row, head) reads two short streams (a few KB each) that the hardware prefetcher would
  // hardly ramp up on: the items kCrossAhead ahead are asked for (into L2) while one is computed.
  auto ask = [&](int64_t i) {
    const int64_t b = i / H, at = ((layer * B + b) * H + i % H) * S * D;
    for (int64_t line = 0; line < c.lengths[b] * D; line += 32) {  // 64-byte lines
      prefetch(c.keys + at + line);
      prefetch(c.values + at + line);
    }
  };
  at::parallel_for(0, B * H, 2 * H, [&](int64_t i0, int64_t i1) {
    float* own = scores + at::get_thread_num() * scratch;
    for (int64_t i = i0; i < std::min(i1, i0 + kCrossAhead); ++i) ask(i);
    for (int64_t i = i0; i < i1; ++i) {
      if (i + kCrossAhead < i1) ask(i + kCrossAhead);
      const int64_t b = i / H, h = i % H, at = ((layer * B + b) * H + h) * S * D;
      if (c.lengths[b] == 0 || c.is_folded(b)) {  // a null row (all-zero values), or folded
        std::fill(out + b * E + h * D, out + b * E + (h + 1) * D, 0.0f);
        continue;
      }
      with_head_chunks(D, [&](auto nc) {
        attend<nc>(q + b * E + h * D, c.keys + at, c.values + at, c.lengths[b], scale, own,
                   out + b * E + h * D, c.bias + b * S);
      });
    }
  });
}

// Cross-attention folded into the text: x[b] += sum over heads h and text positions s of
// softmax_s(h[b] . z[b,h,s] + bias[b,s]) u[b,h,s]. With z = W_q,h^T k / sqrt(D) and
// u = W_o[:, h] v (`CrossInputs::folded`) that is out_cross(attend(q_cross(h), k, v)): MusicGen's
// projections have no bias, so the two products move onto the text once per prompt. A step then
// reads 2 * S vectors of E int8 per head of a folded row instead of both projections' weights:
// fewer bytes while the rows have few text tokens (the caller chooses which rows fold:
// `Decoder.cross_kv`; when none of the others has text, the projections are not read at all).
// The folded rows' (row, head) items are split across the threads (scratch * thread for their
// scores), each head's output added into x after, in order.
inline void cross_attention_folded(const ModelW& m, int64_t layer, const CrossInputs& c,
                                   const float* h, int64_t B, float* x, StepScratch& s,
                                   int64_t scratch) {
  const int64_t E = m.E, H = m.H, S = c.S;
  s.items.clear();
  for (int64_t b = 0; b < B; ++b)
    if (c.lengths[b] > 0 && c.is_folded(b))
      for (int64_t hd = 0; hd < H; ++hd) s.items.push_back(b * H + hd);
  const int64_t* items = s.items.data();
  at::parallel_for(0, static_cast<int64_t>(s.items.size()), 1, [&](int64_t i0, int64_t i1) {
    float* scores = s.scores.data() + at::get_thread_num() * scratch;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = items[i] / H, T = c.lengths[b];
      const int64_t at = (layer * B * H + items[i]) * 2 * S;  // its first vector
      const int8_t* z = c.folded + at * E;
      const int8_t* u = z + S * E;
      const float *zs = c.folded_scales + at, *us = zs + S;
      const float* row = h + b * E;
      float best = -INFINITY;
      for (int64_t p = 0; p < T; ++p) {
        scores[p] = dot_with(row, z + p * E, E) * zs[p] + c.bias[b * S + p];
        best = std::max(best, scores[p]);
      }
      // each weight times its u's scale (an int8 cache's trick); the sum is of the plain ones
      const float inv = softmax_weights(scores, T, best, us);
      float* out = s.partial.data() + items[i] * E;
      std::fill(out, out + E, 0.0f);
      for (int64_t p = 0; p < T; ++p)
        if (scores[p] != 0.0f) add_scaled(scores[p] * inv, u + p * E, out, E);
    }
  });
  // the heads in order, whichever thread made them: a row's sums do not depend on the batch
  for (const int64_t i : s.items) {
    const float* part = s.partial.data() + i * E;
    float* xb = x + i / H * E;
    for (int64_t e = 0; e < E; ++e) xb[e] += part[e];
  }
}

// ids [B][K] at positions [B] (each row its own) -> logits [B][K * V]; writes each row's new
// key/value into the cache at its position.
inline void decode_step(const ModelW& m, const int64_t* ids, const int64_t* pos, int64_t B,
                        const CacheQ& c, const CrossInputs& cross, StepScratch& s, float* logits) {
  const int64_t E = m.E, H = m.H, D = m.D, F = m.F;
  s.fit(m, B, c.P, cross.S);
  float *x = s.x.data(), *h = s.h.data(), *a = s.a.data(), *qkv = s.qkv.data(), *ff = s.ff.data();
  for (int64_t b = 0; b < B; ++b) {
    float* xb = x + b * E;
    const float* p = m.positions + pos[b] * E;
    for (int64_t e = 0; e < E; ++e) xb[e] = p[e];
    for (int64_t k = 0; k < m.K; ++k) {
      const float* row = m.embed[k] + ids[b * m.K + k] * E;
      for (int64_t e = 0; e < E; ++e) xb[e] += row[e];
    }
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t scratch = std::max(c.P, cross.S) + 32;
  bool projected = false;  // whether a row reads text through q_cross and out_cross
  for (int64_t b = 0; b < B; ++b) projected |= cross.lengths[b] > 0 && !cross.is_folded(b);
  for (int64_t l = 0; l < m.L; ++l) {
    const DecoderLayerW& w = m.layers[l];
    norm_rows(w.ln_self, x, B, E, m.eps, h);
    project<Out::Store>(w.qkv, h, E, B, qkv, 3 * E, s);
    parallel_by_position(pos, B, H, [&](int64_t i, const ItemRun& run) {
      float* scores = s.scores.data() + at::get_thread_num() * scratch;
      // Attention waits on memory more than it fills the bus: meanwhile the next projection's
      // weights, this thread's share, are asked for (into L2), a slice per (row, head).
      if (run.parts)
        for (const auto& [begin, end] : thread_share(w.out_self))
          prefetch_part(begin, end, run.part, run.parts);
      const int64_t b = i / H, hd = i % H;
      const float* row = qkv + b * 3 * E;
      uint8_t* k = c.keys + l * c.kl + b * c.kb + hd * c.kh;
      const uint8_t* next_k = nullptr;  // the keys (blocks) this thread reads next
      if (run.next >= 0) next_k = c.keys + l * c.kl + run.next / H * c.kb + run.next % H * c.kh;
      const float* in = row + hd * D;
      if (c.bits == 4) {
        if (run.first) prefetch_q4_start(k, pos[b] + 1);
        attend_head_q4(in, in + E, in + 2 * E, k, pos[b], scale, a + b * E + hd * D, next_k);
        return;
      }
      uint8_t* v = c.values + l * c.kl + b * c.kb + hd * c.kh;
      float* ks = c.key_scales + l * c.sl + b * c.sb + hd * c.sh;
      float* vs = c.value_scales + l * c.sl + b * c.sb + hd * c.sh;
      attend_head_q8(in, in + E, in + 2 * E, reinterpret_cast<int8_t*>(k), ks,
                     reinterpret_cast<int8_t*>(v), vs, pos[b], D, scale, scores,
                     a + b * E + hd * D, reinterpret_cast<const int8_t*>(next_k));
    });
    project<Out::Add>(w.out_self, a, E, B, x, E, s);

    norm_rows(w.ln_cross, x, B, E, m.eps, h);
    if (cross.folded) cross_attention_folded(m, l, cross, h, B, x, s, scratch);
    if (projected) {  // a folded row's attention output is zero here: out_cross adds nothing
      project<Out::Store>(w.q_cross, h, E, B, qkv, E, s);
      cross_attention(m, l, cross, qkv, B, a, s.scores.data(), scratch);
      project<Out::Add>(w.out_cross, a, E, B, x, E, s);
    }

    norm_rows(w.ln_ffn, x, B, E, m.eps, h);
    project<Out::Gelu>(w.fc1, h, E, B, ff, F, s);
    project<Out::Add>(w.fc2, ff, F, B, x, E, s);
  }
  norm_rows(m.ln_final, x, B, E, m.eps, h);
  project<Out::Store>(m.lm_heads, h, E, B, logits, m.lm_heads.out_features(), s);
}

}  // namespace er
