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
// a few microseconds per layer. The intra-op threads run the step as a team (team.h): each
// projection's blocks, each (row, head) of the attentions and each of the small parts is an item
// that one member computes into its own memory and commits, so that a thread the scheduler
// takes off its core does not stop the others.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <utility>
#include <vector>

#include "cache_heads.h"
#include "int4_gemm.h"
#include "team.h"

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
  // A product's items for a team (team.h), and the output features of each: int8's blocks,
  // int4's panels.
  int64_t items() const { return kind == Kind::Int4 ? int4.panels() : int8.blocks(); }
  int64_t item_features() const {
    return kind == Kind::Int4 ? int4::kPanel * int4::kFeatures : kBlock;
  }
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
  // Where head h of row b in layer l starts: in keys and values (bytes), in the scales.
  int64_t head(int64_t l, int64_t b, int64_t h) const { return l * kl + b * kb + h * kh; }
  int64_t scales(int64_t l, int64_t b, int64_t h) const { return l * sl + b * sb + h * sh; }
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
  bool reads_folded(int64_t b) const { return lengths[b] > 0 && is_folded(b); }  // has text, folded
};

// The parts of a step, in their order, for its clock (`PartClock`).
enum class Part : int {
  Embeddings, NormQkv, Qkv, CacheWrites, SelfAttention, QuantizeOut, OutSelf, NormCross,
  FoldedCross, FoldedAdded, FoldedAddedNormFc1, ProjectedCross, NormFc1, Fc1, QuantizeFc2, Fc2,
  NormHeads, Heads, Count
};
constexpr int kParts = static_cast<int>(Part::Count);
inline constexpr std::array<const char*, kParts> kPartNames = {
    "embeddings",
    "layer norm, quantize: qkv",
    "qkv",
    "cache writes",
    "self-attention",
    "quantize: out",
    "out",
    "layer norm: cross",
    "folded cross-attention",
    "folded heads added",
    "folded heads added, layer norm, quantize: fc1",
    "cross-attention, projected",
    "layer norm, quantize: fc1",
    "fc1",
    "quantize: fc2",
    "fc2",
    "layer norm, quantize: heads",
    "heads"};

// Where a step's time goes, part by part, as the team's first member (the calling thread, which
// runs the whole program) sees it: each part from its start to the next part's, the team's waits
// included. Off unless asked for (`bench/timeline.py --parts`); on, ~500 clock reads a step.
struct PartClock {
  bool on = false;
  std::array<double, kParts> seconds{};
  std::array<int64_t, kParts> laps{};
  std::array<int64_t, kParts> bytes{};  // what a part reads of the KV cache (self-attention)
};

// The first member's laps of a PartClock through one step: at(p) as part p starts. Only the
// first member writes the clock, and only while the caller waits in the step.
class Laps {
 public:
  Laps(PartClock& clock, const Team::Member& t)
      : clock_(t.id() == 0 && clock.on ? &clock : nullptr) {}
  Laps(const Laps&) = delete;
  Laps& operator=(const Laps&) = delete;
  ~Laps() { at(Part::Count); }
  void at(Part p) {
    if (!clock_) return;
    const auto now = std::chrono::steady_clock::now();
    if (part_ != Part::Count) {
      const int i = static_cast<int>(part_);
      clock_->seconds[i] += std::chrono::duration<double>(now - last_).count();
      ++clock_->laps[i];
    }
    part_ = p, last_ = now;
  }
  // Whether this member keeps the clock (the first member, while it is on).
  bool on() const { return clock_ != nullptr; }
  // The current part reads these bytes (counted once, by the first member).
  void reads(int64_t bytes) {
    if (clock_ && part_ != Part::Count) clock_->bytes[static_cast<int>(part_)] += bytes;
  }

 private:
  PartClock* clock_;
  Part part_ = Part::Count;
  std::chrono::steady_clock::time_point last_;
};

// What a team member computes before its commit writes it where the step reads it (team.h).
struct Own {
  std::vector<float> y;  // a product's rows, [B][its output's row stride]
  std::vector<float> rows;  // [B][E]: a layer norm's rows, or x's new rows
  std::vector<int8_t> q;  // quantized rows [B][Kp], as StepScratch's
  std::vector<float> qscale, qsums;
  std::vector<int32_t> qcomp;
  std::vector<float> out;  // [E]: one attention item's output (D) or folded partial (E)
  std::vector<uint8_t> kv;  // one (row, head)'s new key and value [2][D] int8 (or 2 x 32 int4)
  std::vector<float> kv_scales;  // [2] (int4: bfloat16 bits)
  std::vector<int64_t> items;  // folded cross-attention's (row, head) items that read text
  std::vector<float> h;  // [B][E]: ln_cross of the folded rows, when only they read text
  std::vector<float> normed;  // [E]: one row's layer norm
};

struct StepScratch {
  std::vector<float> x, h, qkv, a, ff, scores;
  std::vector<int8_t> q;  // a projection's quantized rows [B][Kp]
  std::vector<float> qscale;  // [B]
  std::vector<int32_t> qcomp;  // [B]: int8 weights' compensation
  std::vector<float> qsums;  // [B][Kp / G]: int4 weights' group sums
  std::vector<float> partial;  // [B][H][E]: folded cross-attention's output per (row, head)
  std::vector<Own> own;  // each team member's
  Team team;
  PartClock clock;
  void fit(const ModelW& m, int64_t B, int64_t P, int64_t S) {
    int64_t widest = 0, groups = 0, outputs = 0;
    m.each_projection([&](const Projection& p) {
      widest = std::max(widest, p.padded_inputs()), groups = std::max(groups, p.groups());
      outputs = std::max(outputs, p.out_features());
    });
    const int64_t members = at::get_num_threads();
    x.resize(B * m.E), h.resize(B * m.E), a.resize(B * m.E), qkv.resize(B * 3 * m.E);
    ff.resize(B * m.F), q.resize(B * widest), qscale.resize(B), qcomp.resize(B);
    qsums.resize(B * groups);
    scores.resize(members * (std::max(P, S) + 32));
    partial.resize(B * m.H * m.E);
    if (static_cast<int64_t>(own.size()) < members) own.resize(members);
    for (Own& o : own) {
      o.y.resize(B * std::max({outputs, 3 * m.E, m.F})), o.rows.resize(B * m.E);
      o.q.resize(B * widest), o.qscale.resize(B), o.qcomp.resize(B), o.qsums.resize(B * groups);
      o.out.resize(m.E), o.kv.resize(2 * m.D), o.kv_scales.resize(2);
      o.h.resize(B * m.E), o.normed.resize(m.E);
      o.items.reserve(B * m.H);
    }
    int64_t items = B * m.H;  // the widest region: a product's or the attention's
    m.each_projection([&](const Projection& p) { items = std::max(items, p.items()); });
    team.fit(items);
  }
};

// A member's row b of `rows` [B][n] (its own `rows`) into `to` [B][n].
inline void commit_row(const Own& o, int64_t b, int64_t n, float* to) {
  std::copy(o.rows.begin() + b * n, o.rows.begin() + (b + 1) * n, to + b * n);
}

// Row b of the B rows being quantized for `w`'s kind, `in` [K], into o's row b.
inline void quantize_for(const Projection& w, const float* in, int64_t K, int64_t b, Own& o) {
  if (w.kind == Projection::Kind::Int8) {
    const PackedInt8& p = w.int8;
    quantize_rows(in, K, 1, K, p.Kp, o.q.data() + b * p.Kp, p.Kp, o.qscale.data() + b,
                  o.qcomp.data() + b);
    return;
  }
  const int4::PackedInt4& p = w.int4;
  int4::quantize_row(in, K, p.Kp, p.G, o.q.data() + b * p.Kp, o.qscale.data() + b,
                     o.qsums.data() + b * p.groups());
}

// o's quantized row b (quantize_for) into the scratch, where `w`'s product reads it.
inline void commit_quantized(const Projection& w, int64_t b, const Own& o, StepScratch& s) {
  const int64_t Kp = w.padded_inputs();
  std::copy(o.q.begin() + b * Kp, o.q.begin() + (b + 1) * Kp, s.q.begin() + b * Kp);
  s.qscale[b] = o.qscale[b];
  if (w.kind == Projection::Kind::Int8) {
    s.qcomp[b] = o.qcomp[b];
    return;
  }
  const int64_t G = w.groups();
  std::copy(o.qsums.begin() + b * G, o.qsums.begin() + (b + 1) * G, s.qsums.begin() + b * G);
}

// One region: the B rows `in` [B][K] quantized for `w`, into the scratch, an item per row;
// `norm`: a layer norm first. (One item for all rows, the other member waiting: 0.27 ms of one
// station's step, against 0.20 ms by rows; Xeon.)
inline void quantize_region(Team::Member& t, StepScratch& s, const Projection& w, const float* in,
                            int64_t K, int64_t B, const LayerNormW* norm = nullptr, float eps = 0) {
  Own& mine = s.own[t.id()];
  t.region(
      B,
      [&](int64_t b) {
        const float* row = in + b * K;
        if (norm) {
          layer_norm(row, norm->weight, norm->bias, mine.rows.data() + b * K, K, eps);
          row = mine.rows.data() + b * K;
        }
        quantize_for(w, row, K, b, mine);
      },
      [&](int64_t b) { commit_quantized(w, b, mine, s); });
}

// One region: y [B][ldy] (=, += or gelu of) the scratch's quantized rows times `w`: an item per
// block (or panel) of output features, into the member's own rows, then into y.
template <Out OUT>
inline void product_region(Team::Member& t, StepScratch& s, const Projection& w, int64_t B,
                           float* y, int64_t ldy) {
  // Store and Gelu compute what lands; an Add computes the product alone and adds it at commit
  // (the same float additions as the fused epilogue's).
  constexpr Out kCompute = OUT == Out::Add ? Out::Store : OUT;
  const int64_t N = w.out_features(), features = w.item_features();
  uint64_t tiles = 0;
  int4::Plan plan;
  float* y_own = s.own[t.id()].y.data();
  if (w.kind == Projection::Kind::Int8)
    tiles = int8_tiles_product(w.int8, B);
  else
    plan = int4::plan(w.int4, B);
  t.region(
      w.items(),
      [&](int64_t i) {
        if (w.kind == Projection::Kind::Int8) {
          const PackedInt8& p = w.int8;
          gemm_int8_block<kCompute>(
              p, QuantRows{s.q.data(), p.Kp, s.qscale.data(), s.qcomp.data()}, B, y_own, ldy, i,
              tiles);
          return;
        }
        const int4::PackedInt4& p = w.int4;
        const int4::GroupedRows rows{s.q.data(), p.Kp, s.qscale.data(), s.qsums.data(),
                                     p.groups()};
        int4::gemm_int4_item<false>(p, rows, B, y_own, ldy, plan, i);
        // no GELU epilogue in int4's product: a pass over the item's features after it
        if constexpr (OUT == Out::Gelu) {
          const int64_t n0 = i * features;
          gelu_rows(y_own + n0, B, std::min(features, N - n0), ldy);
        }
      },
      [&](int64_t i) {
        const int64_t n0 = i * features, n1 = std::min(N, n0 + features);
        for (int64_t b = 0; b < B; ++b) {
          const float* from = y_own + b * ldy;
          float* to = y + b * ldy;
          if constexpr (OUT == Out::Add) {
            for (int64_t n = n0; n < n1; ++n) to[n] += from[n];
          } else {
            std::copy(from + n0, from + n1, to + n0);
          }
        }
      });
}

constexpr int64_t kCrossAhead = 4;  // (row, head) items of cross-attention asked for ahead

// Cross-attention of query row b's head h (q [B][E]) over its text positions -> out [D]: zero
// for a null row (all-zero values) or a folded one (`cross_attention_folded` reads it).
inline void cross_item(const ModelW& m, int64_t layer, const CrossInputs& c, const float* q,
                       int64_t B, int64_t b, int64_t h, float* scores, float* out) {
  const int64_t H = m.H, D = m.D, S = c.S;
  if (c.lengths[b] == 0 || c.is_folded(b)) {
    std::fill(out, out + D, 0.0f);
    return;
  }
  const int64_t at = ((layer * B + b) * H + h) * S * D;
  with_head_chunks(D, [&](auto nc) {
    attend<nc>(q + b * m.E + h * D, c.keys + at, c.values + at, c.lengths[b],
               1.0f / std::sqrt(static_cast<float>(D)), scores, out, c.bias + b * S);
  });
}

// Each (row, head) of a cross-attention asks, kCrossAhead items ahead, for the keys and values
// it reads: two short streams (a few KB each) that the hardware prefetcher would hardly ramp up
// on.
inline void ask_cross(const ModelW& m, int64_t layer, const CrossInputs& c, int64_t B, int64_t i) {
  const int64_t H = m.H, D = m.D, b = i / H, at = ((layer * B + b) * H + i % H) * c.S * D;
  for (int64_t line = 0; line < c.lengths[b] * D; line += 32) {  // 64-byte lines
    prefetch(c.keys + at + line);
    prefetch(c.values + at + line);
  }
}

// How many vectors ahead a folded cross-attention item asks for what it reads: one station's
// folded items over 19 text tokens (15 MB a step) took 0.97 ms of a step asking for nothing,
// 0.74 ms with 4 (Xeon, int8 weights and cache; 2 and 8 a little slower than 4).
constexpr int64_t kFoldedAhead = 4;

inline void ask_vector(const int8_t* v, int64_t E) {
  for (int64_t at = 0; at < E; at += 64) prefetch(v + at);
}

// Cross-attention folded into the text, one (row, head) item: the sum over text positions s of
// softmax_s(h[b] . z[b,h,s] + bias[b,s]) u[b,h,s] -> out [E]. With z = W_q,h^T k / sqrt(D) and
// u = W_o[:, h] v (`CrossInputs::folded`) that is head h's share of
// out_cross(attend(q_cross(h), k, v)): MusicGen's projections have no bias, so the two products
// move onto the text once per prompt. A step then reads 2 * S vectors of E int8 per head of a
// folded row instead of both projections' weights: fewer bytes while the rows have few text
// tokens (the caller chooses which rows fold: `Decoder.cross_kv`; when none of the others has
// text, the projections are not read at all).
inline void folded_item(const ModelW& m, int64_t layer, const CrossInputs& c, const float* h,
                        int64_t B, int64_t item, float* scores, float* out) {
  const int64_t E = m.E, H = m.H, S = c.S;
  const int64_t b = item / H, T = c.lengths[b];
  const int64_t at = (layer * B * H + item) * 2 * S;  // its first vector
  const int8_t* z = c.folded + at * E;
  const int8_t* u = z + S * E;
  const float *zs = c.folded_scales + at, *us = zs + S;
  const float* row = h + b * E;
  // two short streams (z's vectors, then u's) that the hardware prefetcher ramps up on too late:
  // both streams' first vectors at once, then each kFoldedAhead vectors ahead of its reads
  for (int64_t p = 0; p < std::min(kFoldedAhead, T); ++p)
    ask_vector(z + p * E, E), ask_vector(u + p * E, E);
  float best = -INFINITY;
  for (int64_t p = 0; p < T; ++p) {
    if (p + kFoldedAhead < T)  // (u's vectors too: the sums below read them all at once)
      ask_vector(z + (p + kFoldedAhead) * E, E), ask_vector(u + (p + kFoldedAhead) * E, E);
    scores[p] = dot_with(row, z + p * E, E) * zs[p] + c.bias[b * S + p];
    best = std::max(best, scores[p]);
  }
  // each weight times its u's scale (an int8 cache's trick); the sum is of the plain ones
  const float inv = softmax_weights(scores, T, best, us);
  for (int64_t p = 0; p < T; ++p) scores[p] *= inv;
  weighted_rows(scores, u, T, E, out);
}

// The folded rows' (row, head) items that read text, in order.
inline void folded_items(const ModelW& m, const CrossInputs& c, int64_t B,
                         std::vector<int64_t>& items) {
  items.clear();
  for (int64_t b = 0; b < B; ++b)
    if (c.reads_folded(b))
      for (int64_t hd = 0; hd < m.H; ++hd) items.push_back(b * m.H + hd);
}

// Row b of x, xb [E], += its folded heads' outputs (`partial` [B][H][E]) among `items`, in order,
// whichever thread made them: a row's sums do not depend on the batch.
inline void add_folded_heads(const ModelW& m, const std::vector<int64_t>& items, int64_t b,
                             const float* partial, float* xb) {
  for (const int64_t i : items) {
    if (i / m.H != b) continue;
    const float* part = partial + i * m.E;
    for (int64_t e = 0; e < m.E; ++e) xb[e] += part[e];
  }
}

// x += the folded cross-attention of `layer` (folded_item for every item, then
// add_folded_heads): on the calling thread, for tests (cpu.cpp `cross_attend_folded`).
inline void cross_attention_folded(const ModelW& m, int64_t layer, const CrossInputs& c,
                                   const float* h, int64_t B, float* x, StepScratch& s) {
  std::vector<int64_t> items;
  folded_items(m, c, B, items);
  for (const int64_t i : items)
    folded_item(m, layer, c, h, B, i, s.scores.data(), s.partial.data() + i * m.E);
  for (int64_t b = 0; b < B; ++b) add_folded_heads(m, items, b, s.partial.data(), x + b * m.E);
}

// ids [B][K] at positions [B] (each row its own) -> logits [B][K * V]; writes each row's new
// key/value into the cache at its position. Every intra-op thread runs this program as a team
// member (team.h): each region's items are computed into the member's own memory (`Own`) and
// committed into the scratch, the cache and the logits; between regions the program computes
// only locals.
inline void decode_step(const ModelW& m, const int64_t* ids, const int64_t* pos, int64_t B,
                        const CacheQ& c, const CrossInputs& cross, StepScratch& s, float* logits) {
  const int64_t E = m.E, H = m.H, D = m.D, F = m.F;
  s.fit(m, B, c.P, cross.S);
  const int64_t members = at::get_num_threads();
  bool projected = false;  // whether a row reads text through q_cross and out_cross
  for (int64_t b = 0; b < B; ++b) projected |= cross.lengths[b] > 0 && !cross.is_folded(b);
  int64_t bounds[Team::kMaxMembers + 1];
  // self-attention's shares by the positions they read (rows at different points of their
  // windows, stations and a stream's warm rows, split by count would leave one member the most)
  position_bounds(pos, B, H, std::min<int64_t>(members, Team::kMaxMembers), bounds);
  s.team.run(members, [&](Team::Member& t) {
    Own& mine = s.own[t.id()];
    float *x = s.x.data(), *h = s.h.data(), *a = s.a.data(), *qkv = s.qkv.data();
    float* ff = s.ff.data();
    const int64_t scratch = std::max(c.P, cross.S) + 32;  // each member's scores
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    if (cross.folded) folded_items(m, cross, B, mine.items);
    Laps laps(s.clock, t);
    laps.at(Part::Embeddings);
    t.region(  // x = sum of the codebooks' embeddings + the position's sinusoid, by rows
        B,
        [&](int64_t b) {
          float* xb = mine.rows.data() + b * E;
          const float* p = m.positions + pos[b] * E;
          for (int64_t e = 0; e < E; ++e) xb[e] = p[e];
          for (int64_t k = 0; k < m.K; ++k) {
            const float* row = m.embed[k] + ids[b * m.K + k] * E;
            for (int64_t e = 0; e < E; ++e) xb[e] += row[e];
          }
        },
        [&](int64_t b) { commit_row(mine, b, E, x); });
    for (int64_t l = 0; l < m.L; ++l) {
      const DecoderLayerW& w = m.layers[l];
      laps.at(Part::NormQkv);
      quantize_region(t, s, w.qkv, x, E, B, &w.ln_self, m.eps);
      laps.at(Part::Qkv);
      product_region<Out::Store>(t, s, w.qkv, B, qkv, 3 * E);
      laps.at(Part::CacheWrites);
      // each (row, head)'s new key and value into the cache where it stands, by the member that
      // attends it next (the lines it writes are among those it reads), its lines asked for first
      const int64_t own0 = bounds[t.id()], own1 = bounds[t.id() + 1];  // this member's share
      for (int64_t i = own0; i < own1; ++i) {
        const int64_t b = i / H, hd = i % H;
        if (c.bits == 4) {
          prefetch_q4_position(c.keys + c.head(l, b, hd), pos[b]);
          continue;
        }
        prefetch_for_write(c.keys + c.head(l, b, hd) + pos[b] * D);
        prefetch_for_write(c.values + c.head(l, b, hd) + pos[b] * D);
        prefetch_for_write(c.key_scales + c.scales(l, b, hd) + pos[b]);
        prefetch_for_write(c.value_scales + c.scales(l, b, hd) + pos[b]);
      }
      t.region(
          B * H, bounds,
          [&](int64_t i) {
            const float* in = qkv + i / H * 3 * E + i % H * D;
            uint8_t* kv = mine.kv.data();
            float* sc = mine.kv_scales.data();
            if (c.bits == 4) {
              sc[0] = quantize_q4(in + E, kv);
              sc[1] = quantize_q4(in + 2 * E, kv + 32);
            } else {
              sc[0] = quantize_vector(in + E, reinterpret_cast<int8_t*>(kv), D);
              sc[1] = quantize_vector(in + 2 * E, reinterpret_cast<int8_t*>(kv + D), D);
            }
          },
          [&](int64_t i) {
            const int64_t b = i / H, hd = i % H;
            const uint8_t* kv = mine.kv.data();
            const float* sc = mine.kv_scales.data();
            uint8_t* k = c.keys + c.head(l, b, hd);
            if (c.bits == 4) {
              store_q4(k, pos[b], kv, static_cast<uint16_t>(sc[0]), kv + 32,
                       static_cast<uint16_t>(sc[1]));
              return;
            }
            uint8_t* v = c.values + c.head(l, b, hd);
            std::copy(kv, kv + D, k + pos[b] * D);
            std::copy(kv + D, kv + 2 * D, v + pos[b] * D);
            c.key_scales[c.scales(l, b, hd) + pos[b]] = sc[0];
            c.value_scales[c.scales(l, b, hd) + pos[b]] = sc[1];
          });
      laps.at(Part::SelfAttention);
      if (laps.on())  // each (row, head) reads its positions' keys and values
        for (int64_t b = 0; b < B; ++b)
          laps.reads(H * (c.bits == 4 ? q4_bytes(pos[b] + 1) : (pos[b] + 1) * 2 * (D + 4)));
      t.region(
          B * H, bounds,
          [&](int64_t i) {
            float* out = mine.out.data();
            const bool owned = own0 <= i && i < own1;
            const int64_t b = i / H, hd = i % H;
            const float* in = qkv + b * 3 * E + hd * D;
            const uint8_t* k = c.keys + c.head(l, b, hd);
            const int64_t next = owned && i + 1 < own1 ? i + 1 : -1;  // the keys read next
            const uint8_t* next_k =
                next >= 0 ? c.keys + c.head(l, next / H, next % H) : nullptr;
            if (c.bits == 4) {
              if (!owned || i == own0) prefetch_q4_start(k, pos[b] + 1);
              attend_q4(in, k, pos[b] + 1, scale, out, next_k);
              return;
            }
            const uint8_t* v = c.values + c.head(l, b, hd);
            const float* ks = c.key_scales + c.scales(l, b, hd);
            const float* vs = c.value_scales + c.scales(l, b, hd);
            with_head_chunks(D, [&](auto nc) {
              attend_q8<nc>(in, reinterpret_cast<const int8_t*>(k), ks,
                            reinterpret_cast<const int8_t*>(v), vs, pos[b] + 1, scale,
                            s.scores.data() + t.id() * scratch, out,
                            reinterpret_cast<const int8_t*>(next_k));
            });
          },
          [&](int64_t i) {
            const float* out = mine.out.data();
            std::copy(out, out + D, a + i / H * E + i % H * D);
          });
      laps.at(Part::QuantizeOut);
      quantize_region(t, s, w.out_self, a, E, B);
      laps.at(Part::OutSelf);
      product_region<Out::Add>(t, s, w.out_self, B, x, E);

      // When the folded rows are the only ones with text (no projections to feed), each member
      // makes their queries itself, from x whole after the out product: no region for them; and
      // the heads' sums and the next layer norm are one region.
      const bool folded_alone = cross.folded && !projected;
      if (cross.folded) {
        laps.at(Part::NormCross);
        float* hf = h;
        if (folded_alone) {
          hf = mine.h.data();
          for (int64_t b = 0; b < B; ++b)
            if (cross.reads_folded(b))
              layer_norm(x + b * E, w.ln_cross.weight, w.ln_cross.bias, hf + b * E, E, m.eps);
        } else {
          t.region(  // h = ln_cross(x), the folded rows' queries
              B,
              [&](int64_t b) {
                layer_norm(x + b * E, w.ln_cross.weight, w.ln_cross.bias,
                           mine.rows.data() + b * E, E, m.eps);
              },
              [&](int64_t b) { commit_row(mine, b, E, h); });
        }
        const int64_t n = static_cast<int64_t>(mine.items.size());
        laps.at(Part::FoldedCross);
        if (laps.on())  // each item reads its row's z and u vectors with their scales
          for (const int64_t i : mine.items) laps.reads(2 * cross.lengths[i / H] * (E + 4));
        t.region(
            n,
            [&](int64_t i) {
              folded_item(m, l, cross, hf, B, mine.items[i],
                          s.scores.data() + t.id() * scratch,
                          mine.out.data());
            },
            [&](int64_t i) {
              const int64_t at = mine.items[i] * E;
              std::copy(mine.out.begin(), mine.out.begin() + E, s.partial.begin() + at);
            });
        laps.at(folded_alone ? Part::FoldedAddedNormFc1 : Part::FoldedAdded);
        t.region(  // x += the folded heads' outputs, by rows (alone: and ln_ffn(x) for fc1)
            folded_alone || n > 0 ? B : 0,
            [&](int64_t b) {
              float* xb = mine.rows.data() + b * E;
              std::copy(x + b * E, x + (b + 1) * E, xb);
              add_folded_heads(m, mine.items, b, s.partial.data(), xb);
              if (!folded_alone) return;
              layer_norm(xb, w.ln_ffn.weight, w.ln_ffn.bias, mine.normed.data(), E, m.eps);
              quantize_for(w.fc1, mine.normed.data(), E, b, mine);
            },
            [&](int64_t b) {
              commit_row(mine, b, E, x);
              if (folded_alone) commit_quantized(w.fc1, b, mine, s);
            });
      }
      if (projected) {  // a folded row's attention output is zero here: out_cross adds nothing
        laps.at(Part::ProjectedCross);
        if (cross.folded)  // h = ln_cross(x) made above, before the folded heads were added
          quantize_region(t, s, w.q_cross, h, E, B);
        else
          quantize_region(t, s, w.q_cross, x, E, B, &w.ln_cross, m.eps);
        product_region<Out::Store>(t, s, w.q_cross, B, qkv, E);
        t.region(
            B * H,
            [&](int64_t i) {
              for (int64_t j = i + 1; j < std::min(B * H, i + 1 + kCrossAhead); ++j)
                ask_cross(m, l, cross, B, j);
              cross_item(m, l, cross, qkv, B, i / H, i % H,
                         s.scores.data() + t.id() * scratch,
                         mine.out.data());
            },
            [&](int64_t i) {
              const float* out = mine.out.data();
              std::copy(out, out + D, a + i / H * E + i % H * D);
            });
        quantize_region(t, s, w.out_cross, a, E, B);
        product_region<Out::Add>(t, s, w.out_cross, B, x, E);
      }

      if (!folded_alone) {
        laps.at(Part::NormFc1);
        quantize_region(t, s, w.fc1, x, E, B, &w.ln_ffn, m.eps);
      }
      laps.at(Part::Fc1);
      product_region<Out::Gelu>(t, s, w.fc1, B, ff, F);
      laps.at(Part::QuantizeFc2);
      quantize_region(t, s, w.fc2, ff, F, B);
      laps.at(Part::Fc2);
      product_region<Out::Add>(t, s, w.fc2, B, x, E);
    }
    laps.at(Part::NormHeads);
    quantize_region(t, s, m.lm_heads, x, E, B, &m.ln_final, m.eps);
    laps.at(Part::Heads);
    product_region<Out::Store>(t, s, m.lm_heads, B, logits, m.lm_heads.out_features());
  });
}

}  // namespace er
