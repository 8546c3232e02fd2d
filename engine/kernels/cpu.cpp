// CPU kernels for the decode step, where a step reads every weight and every cached key once
// and does almost no maths with them: these loops are bound by memory bandwidth, and PyTorch's
// general kernels for a batch of one or two rows do not reach it (measured in bench/kernels.py).
//
//   linear_bf16(x, w):   y = x w^T for a few rows (M <= 8), bfloat16 weights, float32 out.
//                        One pass over the weights; AVX-512 BF16 dot products (vdpbf16ps).
//   linear_bf16_weights: y = x w^T for float32 rows (any number) and bfloat16 weights, float32
//                        maths: a prompt's text products where the CPU has no native bfloat16
//                        (text_products.h); matmul_panels the same with weights in
//                        panels of 8 features (the fold's per-head products).
//   linear_int8:         y = x w^T with packed int8 weights (int8_gemm.h), activations quantized
//                        per row; any number of rows (decode steps and prefills).
//   decode_attention:    one query position per row against a bfloat16 KV cache, each row
//                        attending its own number of positions; float32 scores, softmax and sums.
//                        Head sizes 16 to 128 (musicgen small/medium/large: 64).
//   attend_step(_q8/_q4): a decode step's whole self-attention in one call: split the fused
//                        qkv projection, write the new key/value into a bfloat16, int8 or
//                        int4 cache, attend.
//   sample_top_k:        guidance, top-k, temperature, softmax and the draw of N streams' rows
//                        in one call (sampling.h).
//   DecodeStepInt8:      a whole decoder step, int8 or int4 weights (per projection), an int8
//                        (step) or int4 (step_q4) cache (decode_step.h).
//
// This file is the one translation unit: it holds the tensor-facing checks and bindings, and
// includes the raw-pointer kernels from the headers beside it (all_kernels.h: simd.h,
// attention.h, int8_gemm.h, int4_gemm.h, decode_step.h). Built at first use by
// engine/kernels/__init__.py once per variant (docs/kernels.md: AVX-512 or AVX2 flags); called
// only on CPUs that have those.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "all_kernels.h"
#include "int4_view.h"

namespace {

using namespace er;

constexpr int64_t kMaxRows = 8;

// ---- linear ------------------------------------------------------------------------------------

torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "linear_bf16: x [M, K] and w [N, K]");
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && w.is_contiguous(), "w: contiguous bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "linear_bf16: x has ", K, " features, w expects ", w.size(1));
  TORCH_CHECK(K % 32 == 0 && N % 2 == 0, "linear_bf16: K % 32 and N % 2 must be 0");
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "linear_bf16: 1 to ", kMaxRows, " rows, got ", M);
  auto xb = x.to(torch::kBFloat16).contiguous();
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  auto xp = reinterpret_cast<const uint16_t*>(xb.data_ptr());
  auto wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  auto yp = y.data_ptr<float>();
  linear_bf16_rows(xp, wp, yp, M, N, K);
  return y;
}

// x [M, K] or [G, M, K] float32 times bfloat16 weights w [N, K] or [G, N, K] -> float32 [M, N] or
// [G, M, N]: a prompt's text products (text_products.h), any number of rows.
torch::Tensor linear_bf16_weights(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == w.dim() && (x.dim() == 2 || x.dim() == 3),
              "linear_bf16_weights: x [M, K] and w [N, K], or x [G, M, K] and w [G, N, K]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat, "linear_bf16_weights: float32 x");
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "linear_bf16_weights: bfloat16 w");
  const bool grouped = x.dim() == 3;
  const int64_t G = grouped ? x.size(0) : 1, M = x.size(-2), K = x.size(-1), N = w.size(-2);
  TORCH_CHECK(!grouped || w.size(0) == G, "linear_bf16_weights: ", G, " groups of x, ", w.size(0),
              " of w");
  TORCH_CHECK(w.size(-1) == K, "linear_bf16_weights: x has ", K, " features, w expects ", w.size(-1));
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto y = grouped ? torch::empty({G, M, N}, x.options()) : torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  text::linear_bf16_weights(xc.data_ptr<float>(), reinterpret_cast<const uint16_t*>(wc.data_ptr()),
                            y.data_ptr<float>(), G, M, N, K);
  return y;
}

// x [G, M, K] float32 times bfloat16 weights in panels w [G, P, K, 8] (P = ceil(N / 8), N
// given) -> float32 [G, M, N]: the fold's per-head products (text_products.h).
torch::Tensor matmul_panels(torch::Tensor x, torch::Tensor w, int64_t N) {
  TORCH_CHECK(x.dim() == 3 && w.dim() == 4 && w.size(3) == 8,
              "matmul_panels: x [G, M, K] and w [G, P, K, 8]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat, "matmul_panels: float32 x");
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "matmul_panels: bfloat16 w");
  const int64_t G = x.size(0), M = x.size(1), K = x.size(2);
  TORCH_CHECK(w.size(0) == G, "matmul_panels: ", G, " groups of x, ", w.size(0), " of w");
  TORCH_CHECK(w.size(2) == K, "matmul_panels: x has ", K, " features, w expects ", w.size(2));
  TORCH_CHECK(N > 0 && w.size(1) == (N + 7) / 8, "matmul_panels: ", N, " features need ",
              (N + 7) / 8, " panels, w has ", w.size(1));
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto y = torch::empty({G, M, N}, x.options());
  if (M == 0) return y;
  text::matmul_panels(xc.data_ptr<float>(), reinterpret_cast<const uint16_t*>(wc.data_ptr()),
                      y.data_ptr<float>(), G, M, N, K);
  return y;
}

// ---- attention ---------------------------------------------------------------------------------

struct CacheShape {
  int64_t B, H, P, D;
};

// A layer's cache keys/values [B, H, P, D]: equal sizes, a head size the kernels take, the given
// dtype, and each head's positions contiguous (row views of a bigger cache are fine).
CacheShape check_cache(const char* fn, const torch::Tensor& keys, const torch::Tensor& values,
                       torch::ScalarType dtype, const char* dtype_name) {
  TORCH_CHECK(keys.dim() == 4 && values.sizes() == keys.sizes(), fn, ": keys/values [B, H, P, D]");
  const CacheShape c{keys.size(0), keys.size(1), keys.size(2), keys.size(3)};
  TORCH_CHECK(c.D % 16 == 0 && c.D <= 128, fn, ": head size a multiple of 16 up to 128, got ", c.D);
  TORCH_CHECK(keys.scalar_type() == dtype && values.scalar_type() == dtype, fn, ": ", dtype_name,
              " keys and values");
  TORCH_CHECK(keys.stride(3) == 1 && keys.stride(2) == c.D && values.stride(3) == 1 &&
                  values.stride(2) == c.D,
              fn, ": each head's positions must be contiguous");
  return c;
}

// One position per row, positions [B], each in [0, P), as contiguous int64.
torch::Tensor checked_positions(const char* fn, const torch::Tensor& positions, int64_t B,
                                int64_t P) {
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == B, fn, ": one position per row");
  auto pos = positions.to(torch::kLong).contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(pp[b] >= 0 && pp[b] < P, fn, ": row ", b, " position ", pp[b], " outside [0, ",
                P, ")");
  return pos;
}

// A decode step's qkv [B, 3 * H * D] as float32, and its positions [B], each in [0, P), as int64.
std::pair<torch::Tensor, torch::Tensor> check_step(const char* fn, const torch::Tensor& qkv,
                                                   const torch::Tensor& positions,
                                                   const CacheShape& c) {
  const int64_t E = c.H * c.D;
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(0) == c.B && qkv.size(1) == 3 * E, fn, ": qkv is ",
              qkv.sizes(), ", expected [", c.B, ", ", 3 * E, "]");
  return {qkv.to(torch::kFloat).contiguous(), checked_positions(fn, positions, c.B, c.P)};
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor keys, torch::Tensor values,
                               torch::Tensor lengths, double scale) {
  const CacheShape c = check_cache("decode_attention", keys, values, torch::kBFloat16, "bfloat16");
  const int64_t B = c.B, H = c.H, P = c.P, D = c.D;
  TORCH_CHECK(q.dim() == 3 && q.size(0) == B && q.size(1) == H && q.size(2) == D,
              "decode_attention: q is ", q.sizes(), ", the cache holds ", B, " rows of ", H,
              " heads of ", D);
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B, "decode_attention: one length per row");
  auto qf = q.to(torch::kFloat).contiguous();
  auto len = lengths.to(torch::kLong).contiguous();
  const int64_t* lp = len.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= P, "decode_attention: row ", b, " attends ", lp[b],
                " positions, outside [1, ", P, "]");
  auto out = torch::empty({B, H, D}, qf.options());
  const float* qp = qf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto kp = reinterpret_cast<const uint16_t*>(keys.data_ptr());
  auto vp = reinterpret_cast<const uint16_t*>(values.data_ptr());
  const int64_t kb = keys.stride(0), kh = keys.stride(1), vb = values.stride(0), vh = values.stride(1);
  const float s = static_cast<float>(scale);

  std::vector<int64_t> last(lp, lp + B);  // each row's last position read
  for (auto& p : last) p -= 1;
  std::vector<float> scratch(at::get_num_threads() * (P + 16));
  parallel_by_position(last.data(), B, H, [&](int64_t i, const ItemRun&) {
    float* scores = scratch.data() + at::get_thread_num() * (P + 16);
    const int64_t b = i / H, h = i % H;
    const uint16_t* k = kp + b * kb + h * kh;
    const uint16_t* v = vp + b * vb + h * vh;
    const float* qi = qp + i * D;
    float* oi = op + i * D;
    with_head_chunks(D, [&](auto nc) { attend<nc>(qi, k, v, lp[b], s, scores, oi); });
  });
  return out;
}

// A whole self-attention of one decode step: qkv [B, 3 * H * D] (the fused projection's output,
// float32 or bfloat16), the layer's cache keys/values [B, H, P, D] bfloat16, positions [B].
// Writes each row's new key and value at its position (rounded to bfloat16), then attends to
// positions [0, position]. Returns [B, H * D] float32, heads merged.
torch::Tensor attend_step(torch::Tensor qkv, torch::Tensor keys, torch::Tensor values,
                          torch::Tensor positions, double scale) {
  const CacheShape c = check_cache("attend_step", keys, values, torch::kBFloat16, "bfloat16");
  const auto step = check_step("attend_step", qkv, positions, c);
  const torch::Tensor &x = step.first, &pos = step.second;
  const int64_t B = c.B, H = c.H, P = c.P, D = c.D;
  const int64_t E = H * D;
  const int64_t* pp = pos.data_ptr<int64_t>();
  auto out = torch::empty({B, E}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto kp = reinterpret_cast<uint16_t*>(keys.data_ptr());
  auto vp = reinterpret_cast<uint16_t*>(values.data_ptr());
  const int64_t kb = keys.stride(0), kh = keys.stride(1), vb = values.stride(0), vh = values.stride(1);
  const float s = static_cast<float>(scale);

  std::vector<float> scratch(at::get_num_threads() * (P + 16));
  parallel_by_position(pp, B, H, [&](int64_t i, const ItemRun&) {
    float* scores = scratch.data() + at::get_thread_num() * (P + 16);
    const int64_t b = i / H, h = i % H, at = pp[b];
    const float* row = xp + b * 3 * E + h * D;
    attend_head_bf16(row, row + E, row + 2 * E, kp + b * kb + h * kh, vp + b * vb + h * vh, at, D,
                     s, scores, op + b * E + h * D);
  });
  return out;
}

// ---- int8 KV cache ------------------------------------------------------------------------------
// Each cached key and value vector (one position of one head) is int8 with its own float32 scale:
// x ~= scale * q, scale = max|x| / 127. A quarter of float32's bytes; the sums stay float32.

// attend_step over an int8 cache: keys/values [B, H, P, D] int8, their scales [B, H, P] float32.
torch::Tensor attend_step_q8(torch::Tensor qkv, torch::Tensor keys, torch::Tensor key_scales,
                             torch::Tensor values, torch::Tensor value_scales,
                             torch::Tensor positions, double scale) {
  const CacheShape c = check_cache("attend_step_q8", keys, values, torch::kChar, "int8");
  TORCH_CHECK(key_scales.scalar_type() == torch::kFloat && value_scales.scalar_type() == torch::kFloat &&
                  key_scales.dim() == 3 && key_scales.size(2) == c.P && key_scales.stride(2) == 1 &&
                  value_scales.sizes() == key_scales.sizes() && value_scales.stride(2) == 1,
              "attend_step_q8: float32 scales [B, H, P]");
  const auto step = check_step("attend_step_q8", qkv, positions, c);
  const torch::Tensor &x = step.first, &pos = step.second;
  const int64_t B = c.B, H = c.H, P = c.P, D = c.D;
  const int64_t E = H * D;
  const int64_t* pp = pos.data_ptr<int64_t>();
  auto out = torch::empty({B, E}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto kp = keys.data_ptr<int8_t>();
  auto vp = values.data_ptr<int8_t>();
  auto ksp = key_scales.data_ptr<float>();
  auto vsp = value_scales.data_ptr<float>();
  const int64_t kb = keys.stride(0), kh = keys.stride(1), vb = values.stride(0), vh = values.stride(1);
  const int64_t sb = key_scales.stride(0), sh = key_scales.stride(1);
  const int64_t tb = value_scales.stride(0), th = value_scales.stride(1);
  const float s = static_cast<float>(scale);

  std::vector<float> scratch(at::get_num_threads() * (P + 16));
  parallel_by_position(pp, B, H, [&](int64_t i, const ItemRun& run) {
    float* scores = scratch.data() + at::get_thread_num() * (P + 16);
    const int64_t b = i / H, h = i % H, at = pp[b];
    int8_t* k = kp + b * kb + h * kh;
    int8_t* v = vp + b * vb + h * vh;
    float* ks = ksp + b * sb + h * sh;
    float* vs = vsp + b * tb + h * th;
    const float* row = xp + b * 3 * E;
    const int8_t* next_k = run.next >= 0 ? kp + run.next / H * kb + run.next % H * kh : nullptr;
    attend_head_q8(row + h * D, row + E + h * D, row + 2 * E + h * D, k, ks, v, vs, at, D, s,
                   scores, op + b * E + h * D, next_k);
  });
  return out;
}

// ---- int4 KV cache (attention.h) -----------------------------------------------------------------

// An int4 cache: blocks [..., B, H, P / 16, 1088] uint8 after `first` leading dims (a layer's:
// none; the whole cache's: the layer), each head's blocks contiguous. Returns the shape with
// D = 64 and P the slots (16 per block).
CacheShape check_cache_q4(const char* fn, const torch::Tensor& blocks, int64_t first = 0) {
  TORCH_CHECK(blocks.dim() == first + 4 && blocks.size(first + 3) == kQ4BlockBytes &&
                  blocks.scalar_type() == torch::kByte,
              fn, ": an int4 cache is uint8 blocks [", first ? "L, " : "", "B, H, P / 16, ",
              kQ4BlockBytes, "], got ", blocks.scalar_type(), " ", blocks.sizes());
  TORCH_CHECK(blocks.stride(first + 3) == 1 && blocks.stride(first + 2) == kQ4BlockBytes, fn,
              ": each head's blocks contiguous");
  return CacheShape{blocks.size(first), blocks.size(first + 1), blocks.size(first + 2) * kQ4Block,
                    kQ4Head};
}

// attend_step over an int4 cache.
torch::Tensor attend_step_q4(torch::Tensor qkv, torch::Tensor blocks, torch::Tensor positions,
                             double scale) {
  const CacheShape c = check_cache_q4("attend_step_q4", blocks);
  const auto step = check_step("attend_step_q4", qkv, positions, c);
  const torch::Tensor &x = step.first, &pos = step.second;
  const int64_t B = c.B, H = c.H, D = c.D, E = H * D;
  const int64_t* pp = pos.data_ptr<int64_t>();
  auto out = torch::empty({B, E}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto bp = blocks.data_ptr<uint8_t>();
  const int64_t sb = blocks.stride(0), sh = blocks.stride(1);
  const float s = static_cast<float>(scale);

  parallel_by_position(pp, B, H, [&](int64_t i, const ItemRun& run) {
    const int64_t b = i / H, h = i % H;
    const float* in = xp + b * 3 * E + h * D;
    uint8_t* head = bp + b * sb + h * sh;
    const uint8_t* next = run.next >= 0 ? bp + run.next / H * sb + run.next % H * sh : nullptr;
    if (run.first) prefetch_q4_start(head, pp[b] + 1);
    attend_head_q4(in, in + E, in + 2 * E, head, pp[b], s, op + b * E + h * D, next);
  });
  return out;
}

// ---- a KV cache changing kind (the radio's cheaper-cache rung) -------------------------------------
// Every position [0, T) of every (layer, row, head) read back to float32 and quantized again as a
// step writes it: int8 -> int4 with quantize_q4 (x = q * scale, as KVCache.view reads it), int4 ->
// int8 with quantize_vector (x = (u - 8) * scale). One pass over both caches: memory-bound.

// One (layer, row, head) of both caches: the int8 cache's keys, values [P, 64] and their scales
// [P], and the int4 cache's blocks.
struct Q8Q4Head {
  int8_t *k, *v;
  float *ks, *vs;
  uint8_t* blocks;
};

// fn(Q8Q4Head) for every (layer, row, head), in parallel, once the caches are checked: int8
// keys/values [L, B, H, P, 64] (each head's positions contiguous) with float32 scales
// [L, B, H, P], and int4 blocks [L, B, H, P / 16, 1088] of the same L, B and H, both holding at
// least T positions.
template <class Fn>
void for_each_q8_q4_head(const char* fn, const torch::Tensor& keys, const torch::Tensor& key_scales,
                         const torch::Tensor& values, const torch::Tensor& value_scales,
                         const torch::Tensor& blocks, int64_t T, Fn&& per_head) {
  TORCH_CHECK(keys.dim() == 5 && keys.scalar_type() == torch::kChar && values.sizes() == keys.sizes() &&
                  values.scalar_type() == torch::kChar && keys.stride(4) == 1 &&
                  keys.stride(3) == keys.size(4) && values.stride(4) == 1 &&
                  values.stride(3) == values.size(4),
              fn, ": int8 keys/values [L, B, H, P, D], each head's positions contiguous, got ",
              keys.sizes());
  for (const auto* t : {&key_scales, &value_scales})
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->dim() == 4 && t->size(0) == keys.size(0) &&
                    t->size(1) == keys.size(1) && t->size(2) == keys.size(2) &&
                    t->size(3) == keys.size(3) && t->stride(3) == 1,
                fn, ": float32 scales [L, B, H, P]");
  TORCH_CHECK(keys.size(4) == kQ4Head, fn, ": an int4 cache holds heads of ", kQ4Head);
  const CacheShape q = check_cache_q4(fn, blocks, 1);
  const int64_t L = keys.size(0), B = keys.size(1), H = keys.size(2);
  TORCH_CHECK(blocks.size(0) == L && q.B == B && q.H == H && 0 <= T && T <= keys.size(3) && T <= q.P,
              fn, ": ", T, " positions of ", keys.sizes(), " and ", blocks.sizes());
  const auto offset = [](const torch::Tensor& t, int64_t l, int64_t b, int64_t h) {
    return l * t.stride(0) + b * t.stride(1) + h * t.stride(2);
  };
  int8_t *kp = keys.data_ptr<int8_t>(), *vp = values.data_ptr<int8_t>();
  float *ksp = key_scales.data_ptr<float>(), *vsp = value_scales.data_ptr<float>();
  uint8_t* bp = blocks.data_ptr<uint8_t>();
  at::parallel_for(0, L * B * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t l = i / (B * H), b = i / H % B, h = i % H;
      per_head(Q8Q4Head{kp + offset(keys, l, b, h), vp + offset(values, l, b, h),
                        ksp + offset(key_scales, l, b, h), vsp + offset(value_scales, l, b, h),
                        bp + offset(blocks, l, b, h)});
    }
  });
}

void requantize_q8_to_q4(torch::Tensor keys, torch::Tensor key_scales, torch::Tensor values,
                         torch::Tensor value_scales, torch::Tensor blocks, int64_t T) {
  for_each_q8_q4_head("requantize_q8_to_q4", keys, key_scales, values, value_scales, blocks, T,
                      [&](const Q8Q4Head& c) {
    alignas(64) float x[kQ4Head], y[kQ4Head];
    alignas(32) uint8_t key[32], value[32];
    for (int64_t p = 0; p < T; ++p) {
      for (int d = 0; d < kQ4Head; ++d) {
        x[d] = static_cast<float>(c.k[p * kQ4Head + d]) * c.ks[p];
        y[d] = static_cast<float>(c.v[p * kQ4Head + d]) * c.vs[p];
      }
      const uint16_t key_scale = quantize_q4(x, key), value_scale = quantize_q4(y, value);
      store_q4(c.blocks, p, key, key_scale, value, value_scale);
    }
  });
}

void requantize_q4_to_q8(torch::Tensor blocks, torch::Tensor keys, torch::Tensor key_scales,
                         torch::Tensor values, torch::Tensor value_scales, int64_t T) {
  for_each_q8_q4_head("requantize_q4_to_q8", keys, key_scales, values, value_scales, blocks, T,
                      [&](const Q8Q4Head& c) {
    alignas(64) float x[kQ4Head], y[kQ4Head];
    for (int64_t p = 0; p < T; ++p) {
      const uint8_t* blk = c.blocks + p / kQ4Block * kQ4BlockBytes;
      const int64_t at = p % kQ4Block;
      uint16_t bits;
      std::memcpy(&bits, blk + kQ4KeyScales + 2 * at, 2);
      const float key_scale = bf16_float(bits);
      std::memcpy(&bits, blk + kQ4ValueScales + 2 * at, 2);
      const float value_scale = bf16_float(bits);
      for (int r = 0; r < 32; ++r) {
        const uint8_t kb = blk[q4_key_offset(at, r & ~3) + (r & 3)];
        const uint8_t vb = blk[q4_value_offset(at, r)];
        x[r] = static_cast<float>((kb & 15) - 8) * key_scale;
        x[r + 32] = static_cast<float>((kb >> 4) - 8) * key_scale;
        y[r] = static_cast<float>((vb & 15) - 8) * value_scale;
        y[r + 32] = static_cast<float>((vb >> 4) - 8) * value_scale;
      }
      c.ks[p] = quantize_vector(x, c.k + p * kQ4Head, kQ4Head);
      c.vs[p] = quantize_vector(y, c.v + p * kQ4Head, kQ4Head);
    }
  });
}

// ---- sampling ------------------------------------------------------------------------------------

// logits [R * N, K, V] float32 (R = 2: stream i's conditional row 2i and null row 2i + 1, guided
// by scales[i]; R = 1: rows already guided), temperatures [N], uniforms [N, K] in [0, 1) ->
// tokens [N, K] int64, each drawn among the row's k largest (sampling.h).
torch::Tensor sample_top_k(torch::Tensor logits, int64_t rows_per_stream, torch::Tensor scales,
                           torch::Tensor temperatures, int64_t k, torch::Tensor uniforms) {
  TORCH_CHECK(logits.dim() == 3 && logits.scalar_type() == torch::kFloat && logits.is_contiguous(),
              "sample_top_k: contiguous float32 logits [rows, K, V]");
  TORCH_CHECK(rows_per_stream == 1 || rows_per_stream == 2, "sample_top_k: 1 or 2 rows per stream");
  const int64_t N = logits.size(0) / rows_per_stream, K = logits.size(1), V = logits.size(2);
  TORCH_CHECK(N * rows_per_stream == logits.size(0), "sample_top_k: ", logits.size(0),
              " rows are not ", rows_per_stream, " per stream");
  TORCH_CHECK(0 < k && k <= V, "sample_top_k: k = ", k, " outside [1, ", V, "]");
  for (const auto* t : {&scales, &temperatures})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == N && t->scalar_type() == torch::kFloat && t->is_contiguous(),
                "sample_top_k: float32 scales and temperatures [", N, "]");
  TORCH_CHECK(uniforms.dim() == 2 && uniforms.size(0) == N && uniforms.size(1) == K &&
                  uniforms.scalar_type() == torch::kFloat && uniforms.is_contiguous(),
              "sample_top_k: float32 uniforms [", N, ", ", K, "]");
  const float *lp = logits.data_ptr<float>(), *sp = scales.data_ptr<float>();
  const float *tp = temperatures.data_ptr<float>(), *up = uniforms.data_ptr<float>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(tp[i] > 0 && sp[i] >= 1, "sample_top_k: stream ", i, " has temperature ", tp[i],
                " and guidance scale ", sp[i]);
  auto tokens = torch::empty({N, K}, logits.options().dtype(torch::kLong));
  int64_t* out = tokens.data_ptr<int64_t>();
  TopKScratch s;
  s.fit(V);
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t c = 0; c < K; ++c) {
      const float* cond = lp + (i * rows_per_stream * K + c) * V;
      const float* uncond = rows_per_stream == 2 ? cond + K * V : nullptr;
      out[i * K + c] = sample_top_k_row(cond, uncond, V, sp[i], tp[i], k, up[i * K + c], s);
    }
  }
  return tokens;
}

// ---- int8 weights --------------------------------------------------------------------------------

// A packed weight (engine/linear.py `pack_int8`): bytes [ceil(N / 64), Kp / 4, 256] uint8 and
// scales [N] float32.
PackedInt8 packed_view(const char* fn, const torch::Tensor& data, const torch::Tensor& scales) {
  TORCH_CHECK(data.dim() == 3 && data.size(2) == 4 * kBlock && data.scalar_type() == torch::kByte &&
                  data.is_contiguous(),
              fn, ": packed weights must be contiguous uint8 [N / 64, K / 4, 256]");
  TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == torch::kFloat && scales.is_contiguous(),
              fn, ": scales must be contiguous float32 [N]");
  const int64_t N = scales.size(0);
  TORCH_CHECK(data.size(0) == (N + kBlock - 1) / kBlock, fn, ": ", N, " scales for ",
              data.size(0), " blocks of 64 features");
  return PackedInt8{data.data_ptr<uint8_t>(), scales.data_ptr<float>(), N, 4 * data.size(1)};
}

// x [M, K] float (any M) times packed int8 weights -> float32 [M, N]; with `gelu`, gelu of it
// (the fused step's fc1 epilogue: a prefill's fc1 in one call, not a product and then a pass).
torch::Tensor linear_int8(torch::Tensor x, torch::Tensor data, torch::Tensor scales, bool gelu) {
  const PackedInt8 w = packed_view("linear_int8", data, scales);
  TORCH_CHECK(x.dim() == 2, "linear_int8: x must be [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K <= w.Kp && K > w.Kp - 4, "linear_int8: x has ", K,
              " features, the weights were packed for ", w.Kp, " (padded to 4)");
  auto xf = x.to(torch::kFloat).contiguous();
  auto q = torch::empty({M, w.Kp}, x.options().dtype(torch::kChar));
  auto scale = torch::empty({M}, x.options().dtype(torch::kFloat));
  auto comp = torch::empty({M}, x.options().dtype(torch::kInt));
  auto y = torch::empty({M, w.N}, x.options().dtype(torch::kFloat));
  // a prefill's rows (more than a decode step of 8 stations has) take the ISA's prefill path:
  // 7-bit codes and no vpsignb on AVX2 (int8_gemm.h), as a decode step's on AVX-512
  const bool prefill = M > kMaxChunkedRows;
  const float levels = prefill ? kPrefillLevels : 127.0f;
  // rows quantize in parallel chunks: a prefill's thousand rows are worth splitting
  at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
    quantize_rows(xf.data_ptr<float>() + m0 * K, K, m1 - m0, K, w.Kp, q.data_ptr<int8_t>() + m0 * w.Kp,
                  w.Kp, scale.data_ptr<float>() + m0, comp.data_ptr<int32_t>() + m0, levels);
  });
  const QuantRows rows{q.data_ptr<int8_t>(), w.Kp, scale.data_ptr<float>(), comp.data_ptr<int32_t>()};
  float* out = y.data_ptr<float>();
  if (prefill && gelu)
    gemm_int8_prefill<Out::Gelu>(w, rows, M, out, w.N);
  else if (prefill)
    gemm_int8_prefill<Out::Store>(w, rows, M, out, w.N);
  else if (gelu)
    gemm_int8<Out::Gelu>(w, rows, M, out, w.N);
  else
    gemm_int8<Out::Store>(w, rows, M, out, w.N);
  return y;
}

// x [N, E] float32 -> (codes int8 [N, E], scales float32 [N]): each row over its largest
// magnitude / 127, rounded half to even (`quantize_rows`, as the products' activations), the rows
// in parallel in one pass (a prompt's folded cross-attention, 24 x 3 MB of vectors: five
// PyTorch passes over them took ~30 of its ~85 ms on 2 Zen 3 cores). A zero row: codes 0, scale 1.
std::pair<torch::Tensor, torch::Tensor> quantize_int8(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat,
              "quantize_int8: x must be float32 [N, E]");
  auto xf = x.contiguous();
  const int64_t N = xf.size(0), E = xf.size(1);
  auto q = torch::empty({N, E}, xf.options().dtype(torch::kChar));
  auto scale = torch::empty({N}, xf.options());
  std::vector<int32_t> comp(N);  // (the +128 sums: unused here)
  at::parallel_for(0, N, 64, [&](int64_t m0, int64_t m1) {
    quantize_rows(xf.data_ptr<float>() + m0 * E, E, m1 - m0, E, E, q.data_ptr<int8_t>() + m0 * E,
                  E, scale.data_ptr<float>() + m0, comp.data() + m0);
  });
  return {q, scale};
}

// Reads every byte of `bytes` (uint8, contiguous) once with every thread, each a contiguous
// share, asking 2 KB ahead into L1: how fast this machine streams memory into a loop that does
// nothing with it (bench/bench_kernels.py prints it beside the plain read, a PyTorch max()).
// Returns the XOR of its whole 256-byte pieces' 8-byte words (the tail is not read), so that
// the reads are not optimized away.
int64_t stream_read(torch::Tensor bytes) {
  TORCH_CHECK(bytes.scalar_type() == torch::kByte && bytes.is_contiguous() && bytes.dim() == 1,
              "stream_read: bytes must be a contiguous uint8 vector");
  constexpr int64_t kPiece = 256, kAhead = 2048;
  const uint8_t* data = bytes.data_ptr<uint8_t>();
  const int64_t pieces = bytes.numel() / kPiece;
  std::atomic<int64_t> total{0};
  at::parallel_for(0, pieces, 1, [&](int64_t p0, int64_t p1) {
    __m256i acc = _mm256_setzero_si256();
    for (int64_t p = p0; p < p1; ++p) {
      const uint8_t* at = data + p * kPiece;
      if (p * kPiece + kAhead < bytes.numel())
        for (int64_t line = 0; line < kPiece; line += 64) prefetch_l1(at + kAhead + line);
      for (int64_t i = 0; i < kPiece; i += 32)
        acc = _mm256_xor_si256(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + i)));
    }
    alignas(32) int64_t lanes[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
    total.fetch_xor(lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3]);
  });
  return total.load();
}

// w [N, K] float32 -> (bytes [ceil(N / 64), ceil(K / 4), 256] uint8, scales [N] float32): exactly
// `engine.linear.pack_int8_reference` (per feature scale max|w| / 127, codes rounded half to even,
// clamped to +-127, stored + 128; padding 128), the layout of common.h. Blocks of 64 features
// in parallel: a model's 344 M weights in a fraction of a second instead of seconds.
std::pair<torch::Tensor, torch::Tensor> pack_int8(torch::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat,
              "pack_int8: weight must be float32 [N, K]");
  auto w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), blocks = (N + 63) / 64, groups = (K + 3) / 4;
  auto packed = torch::empty({blocks, groups, 256}, w.options().dtype(torch::kByte));
  auto scales = torch::empty({N}, w.options());
  const float* src = w.data_ptr<float>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  float* scale = scales.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> codes(groups * 4, 128);  // one feature's, padded: then 4 bytes a group
    for (int64_t b = b0; b < b1; ++b) {
      uint8_t* block = dst + b * groups * 256;
      for (int64_t j = 0; j < 64; ++j) {
        const int64_t n = b * 64 + j;
        if (n < N) {
          const float* row = src + n * K;
          float most = 0.0f;  // `omp simd`: a max reduction vectorizes without -ffast-math
#pragma omp simd reduction(max : most)
          for (int64_t k = 0; k < K; ++k) most = std::max(most, std::fabs(row[k]));
          const float s = std::max(most / 127.0f, 1e-12f);
          scale[n] = s;
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) {  // vectorizes: a division, a rounding, a clamp
            const float r = std::nearbyint(row[k] / s);  // half to even, as torch.round
            codes[k] = static_cast<uint8_t>(static_cast<int32_t>(std::clamp(r, -127.0f, 127.0f)) + 128);
          }
        } else {
          std::fill(codes.begin(), codes.end(), 128);
        }
        for (int64_t g = 0; g < groups; ++g) std::memcpy(block + g * 256 + j * 4, &codes[g * 4], 4);
      }
    }
  });
  return {packed, scales};
}

// ---- the whole decoder step ------------------------------------------------------------------
// Its weights come by name: Python builds a DecoderLayer per layer from LayerNorm and Projection
// objects (engine/decoder.py `kernel_layer`, keyword arguments only: `decoder_layer` below), and
// the step checks each one's shape and kind.

struct LayerNormTensors {  // float32 [E] each
  torch::Tensor weight, bias;
};

// One projection's weights and how they are stored, N = `out_features`: "int8", `data` packed by
// engine/linear.py `pack_int8` [ceil(N / 64), K / 4, 256] uint8 and `scales` [N] float32; or
// "int4", `data` the codes packed by `pack_int4` [ceil(N / 16), Kp / 8, 64] uint8 and `scales`
// its float16 scales and offsets [ceil(N / 16), Kp / G, 2, 16]. Another kind adds its name here
// and its case in DecodeStepInt8::projection (and in decode_step.h's Projection).
struct ProjectionTensors {
  std::string kind;
  torch::Tensor data, scales;
  int64_t out_features = 0;
};

using DecoderLayerTensors = DecoderLayerOf<LayerNormTensors, ProjectionTensors>;

// The keyword arguments of one Python call, taken by name: `take<T>("name")` casts one (a
// TypeError naming it when it is of another type), `check` raises a TypeError naming every
// missing and every unknown one. Fields are then filled by designated initializers: each name
// next to its field, never matched by position.
class NamedArgs {
 public:
  NamedArgs(const char* what, const pybind11::kwargs& kwargs) : what_(what), kwargs_(kwargs) {}

  template <class T>
  T take(const char* name) {
    taken_.emplace_back(name);
    if (!kwargs_.contains(name)) {
      missing_ += (missing_.empty() ? "" : ", ") + std::string(name);
      return T{};
    }
    try {
      return kwargs_[name].template cast<T>();
    } catch (const pybind11::cast_error&) {
      throw pybind11::type_error(std::string(what_) + ": " + name + " is a " +
                                 std::string(pybind11::str(pybind11::type::of(kwargs_[name]))) +
                                 ", not the kind of weights it names");
    }
  }

  void check() const {
    std::string unknown;
    for (const auto& item : kwargs_) {
      const auto key = item.first.cast<std::string>();
      if (std::find(taken_.begin(), taken_.end(), key) == taken_.end())
        unknown += (unknown.empty() ? "" : ", ") + key;
    }
    if (!missing_.empty() || !unknown.empty())
      throw pybind11::type_error(std::string(what_) + ": " +
                                 (missing_.empty() ? "" : "missing " + missing_) +
                                 (!missing_.empty() && !unknown.empty() ? "; " : "") +
                                 (unknown.empty() ? "" : "unknown " + unknown));
  }

 private:
  const char* what_;
  const pybind11::kwargs& kwargs_;
  std::vector<std::string> taken_;
  std::string missing_;
};

// DecoderLayer(**weights): every one of a layer's weights, by name.
DecoderLayerTensors decoder_layer(const pybind11::kwargs& weights) {
  NamedArgs w("DecoderLayer", weights);
  DecoderLayerTensors layer{
      .ln_self = w.take<LayerNormTensors>("ln_self"),
      .qkv = w.take<ProjectionTensors>("qkv"),
      .out_self = w.take<ProjectionTensors>("out_self"),
      .ln_cross = w.take<LayerNormTensors>("ln_cross"),
      .q_cross = w.take<ProjectionTensors>("q_cross"),
      .out_cross = w.take<ProjectionTensors>("out_cross"),
      .ln_ffn = w.take<LayerNormTensors>("ln_ffn"),
      .fc1 = w.take<ProjectionTensors>("fc1"),
      .fc2 = w.take<ProjectionTensors>("fc2"),
  };
  w.check();
  return layer;
}

// The folded cross-attention (decode_step.h `CrossInputs::folded`): int8 vectors
// [L, B, H, 2, S, E], float32 scales [L, B, H, 2, S] and the rows that read them, bool [B], or an
// empty `vectors` for none. Returns whether there are.
bool check_folded(const char* fn, const torch::Tensor& vectors, const torch::Tensor& scales,
                  const torch::Tensor& rows, int64_t L, int64_t B, int64_t H, int64_t S, int64_t E) {
  if (vectors.numel() == 0) return false;
  TORCH_CHECK(vectors.dim() == 6 && vectors.is_contiguous() && vectors.scalar_type() == torch::kChar &&
                  vectors.sizes() == torch::IntArrayRef({L, B, H, 2, S, E}) &&
                  scales.is_contiguous() && scales.scalar_type() == torch::kFloat &&
                  scales.sizes() == vectors.sizes().slice(0, 5),
              fn, ": folded cross-attention int8 [", L, ", ", B, ", ", H, ", 2, ", S, ", ", E,
              "] with float32 scales [", L, ", ", B, ", ", H, ", 2, ", S, "], contiguous, or empty; got ",
              vectors.sizes(), " and ", scales.sizes());
  TORCH_CHECK(rows.dim() == 1 && rows.size(0) == B && rows.scalar_type() == torch::kBool &&
                  rows.is_contiguous(),
              fn, ": the folded rows, bool [", B, "]");
  return true;
}

// What the fused step adds to its rows for the cross-attention of `layer` folded into the text
// (decode_step.h `cross_attention_folded`), alone, for tests: h [B, E] (the rows after
// ln_cross), the folded inputs, the additive bias [B, S] and the text positions each row reads
// [B]. Returns [B, E] (zero for the rows not folded).
torch::Tensor cross_attend_folded(torch::Tensor h, torch::Tensor vectors, torch::Tensor scales,
                                  torch::Tensor rows, torch::Tensor bias, torch::Tensor lengths,
                                  int64_t layer) {
  const char* fn = "cross_attend_folded";
  TORCH_CHECK(vectors.dim() == 6, fn, ": folded vectors [L, B, H, 2, S, E]");
  const int64_t L = vectors.size(0), B = vectors.size(1), H = vectors.size(2), S = vectors.size(4),
                E = vectors.size(5);
  TORCH_CHECK(check_folded(fn, vectors, scales, rows, L, B, H, S, E), fn, ": nothing folded");
  TORCH_CHECK(E % 16 == 0, fn, ": hidden a multiple of 16, got ", E);
  TORCH_CHECK(0 <= layer && layer < L, fn, ": layer ", layer, " of ", L);
  TORCH_CHECK(h.dim() == 2 && h.size(0) == B && h.size(1) == E && h.is_contiguous() &&
                  h.scalar_type() == torch::kFloat, fn, ": float32 rows [", B, ", ", E, "]");
  TORCH_CHECK(bias.sizes() == torch::IntArrayRef({B, S}) && bias.is_contiguous() &&
                  bias.scalar_type() == torch::kFloat, fn, ": float32 bias [", B, ", ", S, "]");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B && lengths.is_contiguous() &&
                  lengths.scalar_type() == torch::kLong, fn, ": int64 lengths [", B, "]");
  const int64_t* n = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(n[b] >= 0 && n[b] <= S, fn, ": row ", b, " reads ", n[b], " text positions of ", S);
  ModelW m{};
  m.E = E, m.H = H;
  StepScratch s;
  s.scores.resize(S + 32);  // one thread's scores (the step pads them so)
  s.partial.resize(B * H * E);
  CrossInputs c{nullptr, nullptr, bias.data_ptr<float>(), n, S,
                vectors.data_ptr<int8_t>(), scales.data_ptr<float>(), rows.data_ptr<bool>()};
  auto out = torch::zeros({B, E}, h.options());
  cross_attention_folded(m, layer, c, h.data_ptr<float>(), B, out.data_ptr<float>(), s);
  return out;
}

// A whole decoder step (decode_step.h) over tensors that live as long as this object.
class DecodeStepInt8 {
 public:
  // embed: K x [V + 1, E]; positions [P_max, E]; one DecoderLayer per layer; the final layer
  // norm and the heads (E -> K * V); `heads`: attention heads.
  DecodeStepInt8(std::vector<torch::Tensor> embed, torch::Tensor positions,
                 std::vector<DecoderLayerTensors> layers, LayerNormTensors ln_final,
                 ProjectionTensors lm_heads, int64_t heads, double eps)
      : embed_(std::move(embed)), positions_(positions.contiguous()), layers_(std::move(layers)),
        ln_final_(std::move(ln_final)), lm_heads_(std::move(lm_heads)) {
    TORCH_CHECK(!embed_.empty() && !layers_.empty(), "DecodeStepInt8: embeddings and layers");
    m_.K = static_cast<int64_t>(embed_.size());
    m_.E = positions_.size(1);
    m_.H = heads;
    TORCH_CHECK(m_.E % heads == 0, "DecodeStepInt8: hidden ", m_.E, " is not a multiple of ", heads, " heads");
    m_.D = m_.E / heads;
    TORCH_CHECK(m_.D % 16 == 0 && m_.D <= 128, "DecodeStepInt8: head size a multiple of 16 up to 128, got ", m_.D);
    m_.L = static_cast<int64_t>(layers_.size());
    m_.eps = static_cast<float>(eps);
    m_.positions = f32(positions_, "positions", m_.E, false);
    for (auto& e : embed_) {
      e = e.contiguous();
      TORCH_CHECK(e.dim() == 2 && e.size(1) == m_.E, "DecodeStepInt8: embeddings [V + 1, E]");
      m_.embed.push_back(f32(e, "embedding", m_.E, false));
    }
    m_.F = layers_[0].fc1.out_features;
    for (size_t i = 0; i < layers_.size(); ++i) {
      DecoderLayerTensors& t = layers_[i];
      const std::string at = "layer " + std::to_string(i) + " ";
      m_.layers.push_back(DecoderLayerW{
          .ln_self = norm(t.ln_self, at + "ln_self"),
          .qkv = projection(t.qkv, at + "qkv", m_.E, 3 * m_.E),
          .out_self = projection(t.out_self, at + "out_self", m_.E, m_.E),
          .ln_cross = norm(t.ln_cross, at + "ln_cross"),
          .q_cross = projection(t.q_cross, at + "q_cross", m_.E, m_.E),
          .out_cross = projection(t.out_cross, at + "out_cross", m_.E, m_.E),
          .ln_ffn = norm(t.ln_ffn, at + "ln_ffn"),
          .fc1 = projection(t.fc1, at + "fc1", m_.E, m_.F),
          .fc2 = projection(t.fc2, at + "fc2", m_.F, m_.E),
      });
    }
    m_.ln_final = norm(ln_final_, "ln_final");
    m_.lm_heads = projection(lm_heads_, "lm_heads", m_.E, -1);
  }

  // ids [B, K] int64 at positions [B]; an int8 cache: keys/values [L, B, H, P, D] int8 and
  // their scales [L, B, H, P] float32 (row views of a bigger cache are fine); cross-attention
  // keys/values [L, B, H, S, D] bfloat16, bias [B, S] float32 and the text positions each row
  // reads [B] int64 (`CrossKV.stacked`). Returns logits [B, K * V].
  torch::Tensor step(torch::Tensor ids, torch::Tensor positions, torch::Tensor keys,
                     torch::Tensor key_scales, torch::Tensor values, torch::Tensor value_scales,
                     torch::Tensor cross_keys, torch::Tensor cross_values, torch::Tensor cross_bias,
                     torch::Tensor cross_lengths, torch::Tensor cross_folded,
                     torch::Tensor cross_folded_scales, torch::Tensor cross_folded_rows) {
    const int64_t B = rows("DecodeStepInt8.step", ids);
    TORCH_CHECK(keys.dim() == 5 && keys.sizes() == values.sizes() && keys.size(0) == m_.L &&
                    keys.size(1) == B && keys.size(2) == m_.H && keys.size(4) == m_.D,
                "DecodeStepInt8.step: keys/values [", m_.L, ", ", B, ", ", m_.H, ", P, ", m_.D,
                "], got ", keys.sizes());
    TORCH_CHECK(keys.scalar_type() == torch::kChar && values.scalar_type() == torch::kChar,
                "DecodeStepInt8.step: an int8 cache (an int4 one goes to step_q4)");
    TORCH_CHECK(keys.strides() == values.strides() && keys.stride(4) == 1 && keys.stride(3) == m_.D,
                "DecodeStepInt8.step: keys and values laid out alike, each head's positions contiguous");
    const int64_t P = keys.size(3);
    TORCH_CHECK(key_scales.dim() == 4 && key_scales.sizes() == value_scales.sizes() &&
                    key_scales.strides() == value_scales.strides() && key_scales.size(3) == P &&
                    key_scales.stride(3) == 1 && key_scales.scalar_type() == torch::kFloat &&
                    value_scales.scalar_type() == torch::kFloat,
                "DecodeStepInt8.step: float32 scales [L, B, H, P]");
    const CacheQ cache{static_cast<uint8_t*>(keys.data_ptr()), static_cast<uint8_t*>(values.data_ptr()),
                       key_scales.data_ptr<float>(), value_scales.data_ptr<float>(),
                       keys.stride(0), keys.stride(1), keys.stride(2),
                       key_scales.stride(0), key_scales.stride(1), key_scales.stride(2), P, 8};
    return run("DecodeStepInt8.step", ids, positions, cache, cross_keys, cross_values, cross_bias,
               cross_lengths, cross_folded, cross_folded_scales, cross_folded_rows);
  }

  // The same over an int4 cache (heads of 64): blocks [L, B, H, P / 16, 1088] uint8.
  torch::Tensor step_q4(torch::Tensor ids, torch::Tensor positions, torch::Tensor blocks,
                        torch::Tensor cross_keys, torch::Tensor cross_values, torch::Tensor cross_bias,
                        torch::Tensor cross_lengths, torch::Tensor cross_folded,
                     torch::Tensor cross_folded_scales, torch::Tensor cross_folded_rows) {
    TORCH_CHECK(m_.D == kQ4Head, "DecodeStepInt8.step_q4: an int4 cache holds heads of ", kQ4Head,
                ", this model's are ", m_.D);
    const int64_t B = rows("DecodeStepInt8.step_q4", ids);
    const CacheShape c = check_cache_q4("DecodeStepInt8.step_q4", blocks, 1);
    TORCH_CHECK(blocks.size(0) == m_.L && c.B == B && c.H == m_.H,
                "DecodeStepInt8.step_q4: blocks [", m_.L, ", ", B, ", ", m_.H,
                ", P / 16, ", kQ4BlockBytes, "], got ", blocks.sizes());
    const CacheQ cache{blocks.data_ptr<uint8_t>(), nullptr, nullptr, nullptr,
                       blocks.stride(0), blocks.stride(1), blocks.stride(2), 0, 0, 0, c.P, 4};
    return run("DecodeStepInt8.step_q4", ids, positions, cache, cross_keys, cross_values, cross_bias,
               cross_lengths, cross_folded, cross_folded_scales, cross_folded_rows);
  }

  int64_t taken_over() const { return scratch_.team.taken_over(); }

  // The step's clock (decode_step.h `PartClock`): on or off, and each part's seconds and laps
  // since it was last read, in the step's order.
  void clock_parts(bool on) { scratch_.clock.on = on; }
  std::vector<std::tuple<std::string, double, int64_t, int64_t>> part_times() {
    std::vector<std::tuple<std::string, double, int64_t, int64_t>> out;
    PartClock& c = scratch_.clock;
    for (int p = 0; p < kParts; ++p)
      out.emplace_back(kPartNames[p], c.seconds[p], c.laps[p], c.bytes[p]);
    c.seconds.fill(0), c.laps.fill(0), c.bytes.fill(0);
    return out;
  }

  void stall_once(int64_t member, int64_t region, int64_t item, double seconds) {
    TORCH_CHECK(member >= 0 && region >= 1 && item >= 0 && seconds >= 0,
                "DecodeStepInt8.stall_once: member >= 0, region >= 1, item >= 0, seconds >= 0");
    scratch_.team.stall_once(member, region, item, seconds);
  }

 private:
  // ids [B, K] int64 -> B.
  int64_t rows(const char* fn, const torch::Tensor& ids) const {
    TORCH_CHECK(ids.dim() == 2 && ids.size(1) == m_.K && ids.scalar_type() == torch::kLong,
                fn, ": ids must be int64 [B, ", m_.K, "]");
    return ids.size(0);
  }

  // The checks every step shares, then the step.
  torch::Tensor run(const char* fn, const torch::Tensor& ids, const torch::Tensor& positions,
                    const CacheQ& cache, const torch::Tensor& cross_keys,
                    const torch::Tensor& cross_values, const torch::Tensor& cross_bias,
                    const torch::Tensor& cross_lengths, const torch::Tensor& cross_folded,
                    const torch::Tensor& cross_folded_scales,
                    const torch::Tensor& cross_folded_rows) {
    const int64_t B = rows(fn, ids), P = cache.P;
    const auto pos = checked_positions(fn, positions, B, std::min(P, positions_.size(0)));
    const int64_t* pp = pos.data_ptr<int64_t>();
    auto idc = ids.contiguous();
    const int64_t* ip = idc.data_ptr<int64_t>();
    for (int64_t i = 0; i < B * m_.K; ++i)
      TORCH_CHECK(ip[i] >= 0 && ip[i] < embed_[0].size(0), fn, ": token id ", ip[i],
                  " outside [0, ", embed_[0].size(0), ")");
    TORCH_CHECK(cross_keys.dim() == 5 && cross_keys.sizes() == cross_values.sizes() &&
                    cross_keys.size(0) == m_.L && cross_keys.size(1) == B &&
                    cross_keys.size(2) == m_.H && cross_keys.size(4) == m_.D &&
                    cross_keys.is_contiguous() && cross_values.is_contiguous() &&
                    cross_keys.scalar_type() == torch::kBFloat16 &&
                    cross_values.scalar_type() == torch::kBFloat16,
                fn, ": contiguous bfloat16 cross keys/values [L, B, H, S, D]");
    const int64_t S = cross_keys.size(3);
    TORCH_CHECK(cross_bias.dim() == 2 && cross_bias.size(0) == B && cross_bias.size(1) == S &&
                    cross_bias.is_contiguous() && cross_bias.scalar_type() == torch::kFloat,
                fn, ": float32 cross bias [B, S]");
    TORCH_CHECK(cross_lengths.dim() == 1 && cross_lengths.size(0) == B &&
                    cross_lengths.scalar_type() == torch::kLong && cross_lengths.is_contiguous(),
                fn, ": int64 cross lengths [B]");
    const int64_t* lengths = cross_lengths.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(lengths[b] >= 0 && lengths[b] <= S, fn, ": row ", b, " reads ",
                  lengths[b], " text positions of ", S);
    const bool folded = check_folded(fn, cross_folded, cross_folded_scales, cross_folded_rows, m_.L, B,
                                     m_.H, S, m_.E);
    const CrossInputs cross{static_cast<const uint16_t*>(cross_keys.data_ptr()),
                            static_cast<const uint16_t*>(cross_values.data_ptr()),
                            cross_bias.data_ptr<float>(), lengths, S,
                            folded ? cross_folded.data_ptr<int8_t>() : nullptr,
                            folded ? cross_folded_scales.data_ptr<float>() : nullptr,
                            folded ? cross_folded_rows.data_ptr<bool>() : nullptr};
    auto logits = torch::empty({B, m_.lm_heads.out_features()}, ids.options().dtype(torch::kFloat));
    decode_step(m_, ip, pp, B, cache, cross, scratch_, logits.data_ptr<float>());
    return logits;
  }
  // A contiguous float32 tensor; `vector`: of exactly n elements.
  static const float* f32(torch::Tensor& t, const std::string& what, int64_t n, bool vector) {
    TORCH_CHECK(t.defined() && t.scalar_type() == torch::kFloat, "DecodeStepInt8: ", what,
                " must be float32");
    t = t.contiguous();
    TORCH_CHECK(!vector || (t.dim() == 1 && t.size(0) == n), "DecodeStepInt8: ", what, " must be [",
                n, "], got ", t.sizes());
    return t.data_ptr<float>();
  }

  LayerNormW norm(LayerNormTensors& t, const std::string& what) const {
    return LayerNormW{f32(t.weight, what + ".weight", m_.E, true), f32(t.bias, what + ".bias", m_.E, true)};
  }

  // A projection from `in` features to `out` (-1: any).
  static Projection projection(ProjectionTensors& t, const std::string& what, int64_t in, int64_t out) {
    TORCH_CHECK(t.kind == "int8" || t.kind == "int4", "DecodeStepInt8: ", what,
                " has weights of kind '", t.kind, "'; the step runs int8 and int4");
    TORCH_CHECK(t.data.defined() && t.scales.defined(), "DecodeStepInt8: ", what, " has no tensors");
    t.data = t.data.contiguous(), t.scales = t.scales.contiguous();
    const std::string fn = "DecodeStepInt8: " + what;
    Projection p;
    int64_t padded = 0;  // the inputs `in` pads to: int8's to 4, int4's to its group
    if (t.kind == "int8") {
      p.kind = Projection::Kind::Int8;
      p.int8 = packed_view(fn.c_str(), t.data, t.scales);
      TORCH_CHECK(p.int8.N == t.out_features, fn, ": ", t.out_features,
                  " output features, its scales are for ", p.int8.N);
      padded = (in + 3) / 4 * 4;
    } else {
      p.kind = Projection::Kind::Int4;
      p.int4 = int4::packed_view(fn.c_str(), t.data, t.scales, t.out_features);
      padded = (in + p.int4.G - 1) / p.int4.G * p.int4.G;
    }
    TORCH_CHECK(p.padded_inputs() == padded && (out < 0 || p.out_features() == out), fn,
                " should take ", in, " -> ", out, " features, was packed as ", p.padded_inputs(),
                " -> ", p.out_features());
    return p;
  }

  std::vector<torch::Tensor> embed_;
  torch::Tensor positions_;
  std::vector<DecoderLayerTensors> layers_;
  LayerNormTensors ln_final_;
  ProjectionTensors lm_heads_;
  ModelW m_;
  StepScratch scratch_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels touch no Python object: other threads (the radio's event loop) run meanwhile.
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("isa", [] { return std::string(kIsa); }, "the instruction set this build is for");
  // linear_int8's prefill path: from this many rows, activations take codes in +-prefill_levels
  m.attr("prefill_rows") = kMaxChunkedRows + 1;
  m.attr("prefill_levels") = static_cast<int>(kPrefillLevels);
  m.def("amx_enable", &amx_enable, pybind11::arg("min_rows"),
        "the int8 and int4 products of min_rows rows or more on AMX tiles (0: never; int4 from "
        "3 at least): '' when set, else why the tiles cannot run here");
  m.def("amx_min_rows", &amx_min_rows, "rows from which the products run on AMX (0: never)");
  m.def("attend_prefetch", [] { return kAttendPrefetch; },
        "how far ahead (bytes) the attention asks for a cached head's keys and values: the CPU "
        "maker's best (common.h)");
  m.def("linear_bf16", &linear_bf16, nogil, "y = x w^T, bfloat16 weights, a few rows");
  m.def("linear_bf16_weights", &linear_bf16_weights, nogil,
        "y = x w^T, float32 rows (any number) and bfloat16 weights, per group");
  m.def("matmul_panels", &matmul_panels, nogil,
        "y = x w per group, float32 rows and bfloat16 weights in panels of 8 features");
  m.def("decode_attention", &decode_attention, nogil, "one query per row over a bfloat16 KV cache");
  m.def("attend_step", &attend_step, nogil, "write a step's keys/values, then attend, per row");
  m.def("attend_step_q8", &attend_step_q8, nogil, "attend_step over an int8 KV cache with scales");
  m.def("attend_step_q4", &attend_step_q4, nogil, "attend_step over an int4 KV cache (blocks)");
  m.def("cross_attend_folded", &cross_attend_folded, nogil,
        "one layer's cross-attention folded into the text, as the fused step adds it (tests)");
  m.def("requantize_q8_to_q4", &requantize_q8_to_q4, nogil,
        "positions [0, T) of an int8 KV cache [L, B, H, P, 64] written into an int4 one");
  m.def("requantize_q4_to_q8", &requantize_q4_to_q8, nogil,
        "positions [0, T) of an int4 KV cache written into an int8 one [L, B, H, P, 64]");
  m.def("sample_top_k", &sample_top_k, nogil, "guidance, top-k, temperature and draws of N streams");
  m.def("linear_int8", &linear_int8, nogil,
        "y = x w^T (gelu of it with gelu=True), packed int8 weights, activations int8 per row",
        pybind11::arg("x"), pybind11::arg("data"), pybind11::arg("scales"),
        pybind11::arg("gelu") = false);
  m.def("pack_int8", &pack_int8, nogil, "float32 weights [N, K] -> packed int8 bytes and scales");
  m.def("stream_read", &stream_read, nogil,
        "read a uint8 vector once with every thread, 2 KB ahead into L1: its words' XOR");
  m.def("quantize_int8", &quantize_int8, nogil,
        "float32 rows [N, E] -> int8 codes and a scale per row (largest magnitude / 127)");
  namespace py = pybind11;
  py::class_<LayerNormTensors>(m, "LayerNorm", "a layer norm's float32 weight and bias [E]")
      .def(py::init<torch::Tensor, torch::Tensor>(), py::arg("weight"), py::arg("bias"));
  py::class_<ProjectionTensors>(m, "Projection",
                                "one projection's weights and its N output features: kind 'int8', "
                                "data [N/64, K/4, 256] uint8 (engine.linear.pack_int8), scales [N] "
                                "float32; or kind 'int4', data [N/16, Kp/8, 64] uint8 and scales "
                                "[N/16, Kp/G, 2, 16] float16 (engine.linear.pack_int4)")
      .def(py::init<std::string, torch::Tensor, torch::Tensor, int64_t>(), py::kw_only(),
           py::arg("kind"), py::arg("data"), py::arg("scales"), py::arg("out_features"))
      .def_readonly("kind", &ProjectionTensors::kind)
      .def_readonly("out_features", &ProjectionTensors::out_features);
  py::class_<DecoderLayerTensors>(m, "DecoderLayer",
                                  "one decoder layer's weights, by name: ln_self, qkv, out_self, "
                                  "ln_cross, q_cross, out_cross, ln_ffn, fc1, fc2")
      .def(py::init(&decoder_layer))
      .def_readwrite("ln_self", &DecoderLayerTensors::ln_self)
      .def_readwrite("qkv", &DecoderLayerTensors::qkv)
      .def_readwrite("out_self", &DecoderLayerTensors::out_self)
      .def_readwrite("ln_cross", &DecoderLayerTensors::ln_cross)
      .def_readwrite("q_cross", &DecoderLayerTensors::q_cross)
      .def_readwrite("out_cross", &DecoderLayerTensors::out_cross)
      .def_readwrite("ln_ffn", &DecoderLayerTensors::ln_ffn)
      .def_readwrite("fc1", &DecoderLayerTensors::fc1)
      .def_readwrite("fc2", &DecoderLayerTensors::fc2);
  py::class_<DecodeStepInt8>(m, "DecodeStepInt8")
      .def(py::init<std::vector<torch::Tensor>, torch::Tensor, std::vector<DecoderLayerTensors>,
                    LayerNormTensors, ProjectionTensors, int64_t, double>(),
           py::kw_only(), py::arg("embed"), py::arg("positions"), py::arg("layers"),
           py::arg("ln_final"), py::arg("lm_heads"), py::arg("heads"), py::arg("eps"))
      .def("step", &DecodeStepInt8::step, nogil, "one decoder step: ids [B, K] -> logits [B, K * V]")
      .def("step_q4", &DecodeStepInt8::step_q4, nogil, "the decoder step over an int4 KV cache")
      .def("taken_over", &DecodeStepInt8::taken_over,
           "items of the steps so far that one thread computed for another (team.h)")
      .def("clock_parts", &DecodeStepInt8::clock_parts, py::arg("on"),
           "time each part of the coming steps (decode_step.h PartClock), or stop")
      .def("part_times", &DecodeStepInt8::part_times,
           "[(part, seconds, laps, KV cache bytes read)] of the steps since the last call, in a "
           "step's order")
      .def("stall_once", &DecodeStepInt8::stall_once, py::kw_only(), py::arg("member"),
           py::arg("region"), py::arg("item"), py::arg("seconds"),
           "for tests: in the next step, thread `member` sleeps after claiming item `item` of "
           "its `region`-th region, as a descheduled thread would");
}
