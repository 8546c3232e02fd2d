// CPU kernels for the decode step, where a step reads every weight and every cached key once
// and does almost no maths with them: these loops are bound by memory bandwidth, and PyTorch's
// general kernels for a batch of one or two rows do not reach it (measured in bench/kernels.py).
//
//   linear_bf16(x, w):   y = x w^T for a few rows (M <= 8), bfloat16 weights, float32 out.
//                        One pass over the weights; AVX-512 BF16 dot products (vdpbf16ps).
//   decode_attention:    one query position per row against a bfloat16 KV cache, each row
//                        attending its own number of positions; float32 scores, softmax and sums.
//                        Head sizes 16 to 128 (musicgen small/medium/large: 64).
//   attend_step:         a decode step's whole self-attention in one call: split the fused
//                        qkv projection, write the new key/value into the cache, attend.
//
// Built at first use by engine/kernels/__init__.py with -mavx512f -mavx512bw -mavx512vl
// -mavx512bf16 -mavx512vnni; called only on CPUs that have those.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kMaxRows = 8;

// ---- linear ------------------------------------------------------------------------------------

template <int M>
void linear_rows(const uint16_t* x, const uint16_t* w, float* y, int64_t N, int64_t K) {
  // Two output features per iteration share the loads of x; each weight is read once.
  constexpr int R = 2;
  at::parallel_for(0, N / R, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * R;
      __m512 acc[M][R];
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 32) {
        __m512bh wv[R];
        for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + (n + r) * K + k);
        for (int m = 0; m < M; ++m) {
          const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
          for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
        }
      }
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) y[m * N + n + r] = _mm512_reduce_add_ps(acc[m][r]);
    }
  });
}

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
  switch (M) {
    case 1: linear_rows<1>(xp, wp, yp, N, K); break;
    case 2: linear_rows<2>(xp, wp, yp, N, K); break;
    case 3: linear_rows<3>(xp, wp, yp, N, K); break;
    case 4: linear_rows<4>(xp, wp, yp, N, K); break;
    case 5: linear_rows<5>(xp, wp, yp, N, K); break;
    case 6: linear_rows<6>(xp, wp, yp, N, K); break;
    case 7: linear_rows<7>(xp, wp, yp, N, K); break;
    default: linear_rows<8>(xp, wp, yp, N, K); break;
  }
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

// A decode step's qkv [B, 3 * H * D] as float32, and its positions [B], each in [0, P), as int64.
std::pair<torch::Tensor, torch::Tensor> check_step(const char* fn, const torch::Tensor& qkv,
                                                   const torch::Tensor& positions,
                                                   const CacheShape& c) {
  const int64_t E = c.H * c.D;
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(0) == c.B && qkv.size(1) == 3 * E, fn, ": qkv is ",
              qkv.sizes(), ", expected [", c.B, ", ", 3 * E, "]");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == c.B, fn, ": one position per row");
  auto pos = positions.to(torch::kLong).contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < c.B; ++b)
    TORCH_CHECK(pp[b] >= 0 && pp[b] < c.P, fn, ": row ", b, " position ", pp[b], " outside [0, ",
                c.P, ")");
  return {qkv.to(torch::kFloat).contiguous(), pos};
}

inline __m512 load_bf16(const uint16_t* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// exp(x) for x <= 0 (softmax after subtracting the max): 2^n * 2^f, f in [-0.5, 0.5], with a
// degree-6 polynomial for 2^f (relative error about 2e-7) and scalef for 2^n.
inline __m512 exp_ps(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)),
                                 _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// The 16 horizontal sums of a[0..15], as one vector (lane j = sum of a[j]): a butterfly of
// unpacks and lane shuffles, ~3 instructions per sum instead of ~10 for one reduce each.
inline __m512 hsum16(__m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Softmax weights of scores[0, T) in place, each times value_scales[t] when given (an int8
// cache folds the value's scale into its weight); returns 1 / (sum of the plain weights).
inline float softmax_weights(float* scores, int64_t T, float best, const float* value_scales) {
  const __m512 vbest = _mm512_set1_ps(best);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t t = 0; t < T; t += 16) {
    const __mmask16 m = T - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (T - t)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(
        m, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + t), vbest)));
    const __m512 w = value_scales ? _mm512_mul_ps(e, _mm512_maskz_loadu_ps(m, value_scales + t)) : e;
    _mm512_mask_storeu_ps(scores + t, m, w);
    vsum = _mm512_add_ps(vsum, e);
  }
  return 1.0f / _mm512_reduce_add_ps(vsum);
}

// fn(std::integral_constant<int, NC>{}) for a head of D = NC * 16 floats, NC in 1..8.
template <class Fn>
void with_head_chunks(int64_t D, Fn&& fn) {
  switch (D / 16) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    default: fn(std::integral_constant<int, 8>{}); break;
  }
}

// One (row, head): scores against positions [0, T), softmax, weighted sum of values. The head
// size is NC * 16 floats, held in registers.
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

  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(P + 16);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      const uint16_t* k = kp + b * kb + h * kh;
      const uint16_t* v = vp + b * vb + h * vh;
      const float* qi = qp + i * D;
      float* oi = op + i * D;
      with_head_chunks(D, [&](auto nc) { attend<nc>(qi, k, v, lp[b], s, scores.data(), oi); });
    }
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

  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(P + 16);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, at = pp[b];
      uint16_t* k = kp + b * kb + h * kh;
      uint16_t* v = vp + b * vb + h * vh;
      const float* row = xp + b * 3 * E;
      for (int64_t c = 0; c < D; c += 16) {  // round to nearest even, as torch's .to(bfloat16)
        const __m256i kw = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(row + E + h * D + c));
        const __m256i vw = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(row + 2 * E + h * D + c));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(k + at * D + c), kw);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(v + at * D + c), vw);
      }
      const float* q = row + h * D;
      float* o = op + b * E + h * D;
      with_head_chunks(D, [&](auto nc) { attend<nc>(q, k, v, at + 1, s, scores.data(), o); });
    }
  });
  return out;
}

// ---- int8 KV cache ------------------------------------------------------------------------------
// Each cached key and value vector (one position of one head) is int8 with its own float32 scale:
// x ~= scale * q, scale = max|x| / 127. A quarter of float32's bytes; the sums stay float32.

inline __m512 load_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

template <int NC>
void attend_q8(const float* q, const int8_t* k, const float* ks, const int8_t* v, const float* vs,
               int64_t T, float scale, float* scores, float* out) {
  constexpr int64_t D = NC * 16;
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
    const __m512 p = _mm512_set1_ps(scores[t2]);  // softmax weight times the value's scale
    for (int c = 0; c < NC; ++c) o[c] = _mm512_fmadd_ps(p, load_i8(v + 16 * c), o[c]);
  }
  for (int c = 0; c < NC; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(o[c], inv));
}

// Quantize one vector of D floats to int8 at dst, returning its scale.
inline float quantize_vector(const float* x, int8_t* dst, int64_t D) {
  __m512 m = _mm512_setzero_ps();
  for (int64_t c = 0; c < D; c += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + c)));
  const float amax = _mm512_reduce_max_ps(m);
  const float s = amax > 0 ? amax / 127.0f : 1.0f;
  const __m512 inv = _mm512_set1_ps(1.0f / s);
  for (int64_t c = 0; c < D; c += 16) {
    const __m512i i = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + c), inv));  // nearest
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c), _mm512_cvtsepi32_epi8(i));
  }
  return s;
}

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

  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(P + 16);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, at = pp[b];
      int8_t* k = kp + b * kb + h * kh;
      int8_t* v = vp + b * vb + h * vh;
      float* ks = ksp + b * sb + h * sh;
      float* vs = vsp + b * tb + h * th;
      const float* row = xp + b * 3 * E;
      ks[at] = quantize_vector(row + E + h * D, k + at * D, D);
      vs[at] = quantize_vector(row + 2 * E + h * D, v + at * D, D);
      float* o = op + b * E + h * D;
      with_head_chunks(D, [&](auto nc) {
        attend_q8<nc>(row + h * D, k, ks, v, vs, at + 1, s, scores.data(), o);
      });
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16", &linear_bf16, "y = x w^T, bfloat16 weights, a few rows");
  m.def("decode_attention", &decode_attention, "one query per row over a bfloat16 KV cache");
  m.def("attend_step", &attend_step, "write a step's keys/values, then attend, per row");
  m.def("attend_step_q8", &attend_step_q8, "attend_step over an int8 KV cache with scales");
}
