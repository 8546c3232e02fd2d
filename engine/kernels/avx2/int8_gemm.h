// Packed int8 matrix products for the decoder's projections, AVX2: y = x w^T with int8 weights
// (one scale per output feature) and int8 activations (one scale per row), exact int32 sums,
// float32 out. The same layout and numbers as the AVX-512 kernel (common.h), without VNNI.
//
// Exact dot products from vpmaddubsw + vpmaddwd. vpmaddubsw multiplies unsigned by signed bytes
// and adds pairs into int16 with saturation: (w + 128) * x would overflow (2 * 255 * 127), so
// each 4-byte group is taken by the sign trick: |x| (unsigned, <= 127) times w * sign(x)
// (vpsignb; w in [-127, 127] after flipping the stored byte's top bit), whose pairs are at most
// 2 * 127 * 127 = 32258 < 2^15: never saturated. vpmaddwd against ones then adds each pair of
// pairs into the int32 lane of the feature: a 256-bit register holds 8 features x 4 inputs, the
// lanes of 8 features' sums. No +128 comes back out (QuantRows.comp is not used).
//
// A 64-feature block is 8 such registers; a register tile is 2 rows x 32 features (half a
// block): 8 accumulators, 4 broadcast activations, a weight register and a temporary in
// AVX2's 16. Up to 16 rows go over each block by chunks of k-groups that stay in L1 while every
// (half, row tile) pass reads them, so a decode step streams the weights from memory once; a
// prefill's rows go by groups of 16 the same way, the block in L2.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "simd.h"

namespace er {

constexpr int64_t kRowTile = 2;  // rows per register tile: 2 rows x 32 features, 8 accumulators
constexpr int64_t kHalf = 32;  // features per tile: half a block
constexpr int64_t kChunk = 16;  // k-groups per chunk (4 KB of a block) in the decode path
constexpr int64_t kMaxChunkedRows = 16;
constexpr int64_t kChunkAhead = 2;  // chunks between the one read and the one asked for

// Rows x [M][ldx] of K floats -> q [M][ldq] int8 (zero padded up to Kp), scale [M], comp [M];
// codes in [-levels, levels] (127; a prefill's rows 63, `kPrefillLevels`).
inline void quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp,
                          int8_t* q, int64_t ldq, float* scale, int32_t* comp,
                          float levels = 127.0f) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    int8_t* qr = q + m * ldq;
    __m256 vmax = _mm256_setzero_ps();
    for (int64_t c = 0; c < K; c += 8)
      vmax = _mm256_max_ps(vmax, abs_ps(_mm256_maskload_ps(xr + c, first_lanes(K - c))));
    const float amax = hmax(vmax);
    const float s = amax > 0 ? amax / levels : 1.0f;
    const __m256 inv = _mm256_set1_ps(1.0f / s);
    __m256i sum = _mm256_setzero_si256();
    for (int64_t c = 0; c < K; c += 16) {  // nearest even; zero past K
      const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_maskload_ps(xr + c, first_lanes(K - c)), inv));
      const __m256i b = _mm256_cvtps_epi32(
          _mm256_mul_ps(_mm256_maskload_ps(xr + c + 8, first_lanes(std::max<int64_t>(K - c - 8, 0))), inv));
      alignas(16) int8_t bytes[16];
      store_i8x16(a, b, bytes);
      std::memcpy(qr + c, bytes, std::min<int64_t>(16, Kp - c));
      sum = _mm256_add_epi32(sum, _mm256_add_epi32(a, b));
    }
    for (int64_t c = (K + 15) / 16 * 16; c < Kp; ++c) qr[c] = 0;
    scale[m] = s;
    comp[m] = 128 * hsum_epi32(sum);
  }
}

// gelu(x) = x/2 (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (error < 1.5e-7),
// written as 1 + erf(z) = 2 - P (z >= 0) or P (z < 0), P = poly(t) exp(-z^2): no cancellation.
inline __m256 gelu_ps(__m256 x) {
  const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
  const __m256 az = abs_ps(z);
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f),
                                 _mm256_fmadd_ps(az, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.0f)));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  p = _mm256_mul_ps(_mm256_mul_ps(p, t), exp_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), az), az)));
  const __m256 positive = _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GE_OQ);
  const __m256 one_plus_erf = _mm256_blendv_ps(p, _mm256_sub_ps(_mm256_set1_ps(2.0f), p), positive);
  return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5f)), one_plus_erf);
}

// y[m][n0 + ...] (=, += or gelu of) the int32 sums of rows [m0, m0 + MR) over 32 features from
// n0, times the row's and the feature's scales.
template <int MR, Out OUT, bool U = false>
inline void tile_out(const __m256i (*acc)[4], const QuantRows& x, int64_t m0, const float* ws,
                     int64_t n0, int64_t N, float* y, int64_t ldy) {
  for (int m = 0; m < MR; ++m) {
    const __m256 s = _mm256_set1_ps(x.scale[m0 + m]);
    const __m256i comp = _mm256_set1_epi32(U ? x.comp[m0 + m] : 0);  // the weights' +128
    float* yr = y + (m0 + m) * ldy;
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + 8 * j;
      if (n >= N) break;
      const __m256i mask = first_lanes(N - n);
      __m256 v = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[m][j], comp));
      v = _mm256_mul_ps(_mm256_mul_ps(v, s), _mm256_maskload_ps(ws + n, mask));
      if constexpr (OUT == Out::Add) v = _mm256_add_ps(v, _mm256_maskload_ps(yr + n, mask));
      if constexpr (OUT == Out::Gelu) v = gelu_ps(v);
      _mm256_maskstore_ps(yr + n, mask, v);
    }
  }
}

// acc (8 features' int32 sums) += the 4-input dots of the weights w (signed bytes: 8 features x
// 4 inputs) with one row's 4 inputs (xs: the 4 bytes in every lane, xa = |xs|): exact.
inline __m256i dot4(__m256i acc, __m256i w, __m256i xs, __m256i xa) {
  const __m256i pairs = _mm256_maddubs_epi16(xa, _mm256_sign_epi8(w, xs));  // |pairs| <= 32258
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// MR rows' sums over k-groups [k0, k1) of 32 features (p: the half block's first bytes), added
// into acc.
template <int MR>
inline void tile_sums(const uint8_t* p, int64_t k0, int64_t k1, const int8_t* const (&xr)[MR],
                      __m256i (&acc)[MR][4]) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = k0; k < k1; ++k) {
    const uint8_t* w = p + k * 4 * kBlock;
    __m256i xs[MR], xa[MR];
    for (int m = 0; m < MR; ++m) {
      int32_t four;
      std::memcpy(&four, xr[m] + 4 * k, 4);
      xs[m] = _mm256_set1_epi32(four);
      xa[m] = _mm256_abs_epi8(xs[m]);
    }
    for (int j = 0; j < 4; ++j) {
      const __m256i wj = _mm256_xor_si256(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * j)), flip);  // w + 128 -> w
      for (int m = 0; m < MR; ++m) acc[m][j] = dot4(acc[m][j], wj, xs[m], xa[m]);
    }
  }
}

// The same sums for a prefill's rows, codes in [-63, 63] (`kPrefillLevels`): the stored bytes
// (w + 128, unsigned) times the codes straight into vpmaddubsw, whose pairs stay within
// 2 * 255 * 63 = 32130 < 2^15: exact without vpsignb, which with vpmaddubsw and vpmaddwd held
// the signed path to ~76 GMAC/s a core (145 without it, in L1). The +128 comes back out at
// the end (QuantRows.comp, in tile_out).
template <int MR>
inline void tile_sums_unsigned(const uint8_t* p, int64_t k0, int64_t k1,
                               const int8_t* const (&xr)[MR], __m256i (&acc)[MR][4]) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t k = k0; k < k1; ++k) {
    const uint8_t* w = p + k * 4 * kBlock;
    __m256i xs[MR];
    for (int m = 0; m < MR; ++m) {
      int32_t four;
      std::memcpy(&four, xr[m] + 4 * k, 4);
      xs[m] = _mm256_set1_epi32(four);
    }
    for (int j = 0; j < 4; ++j) {
      const __m256i wj = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * j));
      for (int m = 0; m < MR; ++m)
        acc[m][j] = _mm256_add_epi32(acc[m][j], _mm256_madd_epi16(_mm256_maddubs_epi16(wj, xs[m]), ones));
    }
  }
}

// fn(std::integral_constant<int, MR>{}) for a tile of min(rows, kRowTile) rows (rows >= 1).
template <class Fn>
inline void with_tile_rows(int64_t rows, Fn&& fn) {
  static_assert(kRowTile == 2, "one case per tile height");
  if (rows >= 2)
    fn(std::integral_constant<int, 2>{});
  else
    fn(std::integral_constant<int, 1>{});
}

template <int MR>
inline void row_pointers(const QuantRows& x, int64_t m0, const int8_t* (&xr)[MR]) {
  for (int m = 0; m < MR; ++m) xr[m] = x.q + (m0 + m) * x.ld;
}

// One pass of the decode path: a row tile over one half of a chunk, its sums resting in `saved`
// between chunks, asking (into L1) for lines [line0, line1) of the chunk after next.
template <int MR, bool U = false>
inline void chunk_pass(const uint8_t* wb, int64_t k0, int64_t k1, int half, const QuantRows& x,
                       int64_t m0, __m256i (*saved)[8], const uint8_t* ahead, int64_t line0,
                       int64_t line1) {
  const int8_t* xr[MR];
  row_pointers(x, m0, xr);
  __m256i acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = saved[m][4 * half + j];
  for (int64_t line = line0; line < line1; ++line) prefetch(ahead + 64 * line);
  if constexpr (U)
    tile_sums_unsigned(wb + half * 4 * kHalf, k0, k1, xr, acc);
  else
    tile_sums(wb + half * 4 * kHalf, k0, k1, xr, acc);
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) saved[m][4 * half + j] = acc[m][j];
}

// A decode step's rows (M <= kMaxChunkedRows) over one block: the block goes by in chunks of
// kChunk k-groups (4 KB, in L1 while both halves and every row tile pass over it), and the
// passes of each chunk ask for the chunk after next, so the stream never pauses.
template <Out OUT, bool U = false>
void block_chunked(const uint8_t* wb, int64_t K4, const QuantRows& x, int64_t M, const float* ws,
                   int64_t n0, int64_t N, float* y, int64_t ldy) {
  __m256i acc[kMaxChunkedRows][8];
  for (auto& row : acc)
    for (auto& a : row) a = _mm256_setzero_si256();
  const int64_t tiles = (M + kRowTile - 1) / kRowTile, passes = 2 * tiles;
  for (int64_t k0 = 0; k0 < K4; k0 += kChunk) {
    const int64_t k1 = std::min(K4, k0 + kChunk), lines = (k1 - k0) * 4;
    const uint8_t* ahead = wb + (k0 + kChunkAhead * kChunk) * 4 * kBlock;  // may be the next block
    for (int64_t pass = 0; pass < passes; ++pass) {
      const int half = static_cast<int>(pass / tiles);
      const int64_t m0 = pass % tiles * kRowTile;
      const int64_t l0 = lines * pass / passes, l1 = lines * (pass + 1) / passes;
      with_tile_rows(M - m0, [&](auto mr) {
        chunk_pass<mr, U>(wb, k0, k1, half, x, m0, acc + m0, ahead, l0, l1);
      });
    }
  }
  for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
    with_tile_rows(M - m0, [&](auto mr) {
      constexpr int MR = decltype(mr)::value;
      for (int half = 0; half < 2; ++half) {
        __m256i out[MR][4];
        for (int m = 0; m < MR; ++m)
          for (int j = 0; j < 4; ++j) out[m][j] = acc[m0 + m][4 * half + j];
        tile_out<MR, OUT, U>(out, x, m0, ws, n0 + half * kHalf, N, y, ldy);
      }
    });
  }
}

// The rows [m0, m0 + count) of x.
inline QuantRows rows_from(const QuantRows& x, int64_t m0) {
  return QuantRows{x.q + m0 * x.ld, x.ld, x.scale + m0, x.comp + m0};
}

// This build has no tiles: every product goes on AVX2 (gemm_int8_block's 0).
inline uint64_t int8_tiles_product(const PackedInt8&, int64_t) { return 0; }

// Block b (kBlock features) of y [M][ldy] (=, += or gelu of) x w^T, the rows by groups of
// kMaxChunkedRows. U: the rows' codes are in [-63, 63] (`kPrefillLevels`), their sums unsigned
// (`tile_sums_unsigned`). One item of the product for a team (team.h).
template <Out OUT, bool U = false>
void gemm_int8_block(const PackedInt8& w, const QuantRows& x, int64_t M, float* y, int64_t ldy,
                     int64_t b, uint64_t = 0) {
  const int64_t K4 = w.Kp / 4;
  const uint8_t* wb = w.data + b * K4 * 4 * kBlock;
  for (int64_t m0 = 0; m0 < M; m0 += kMaxChunkedRows) {
    block_chunked<OUT, U>(wb, K4, rows_from(x, m0), std::min(kMaxChunkedRows, M - m0), w.scales,
                          b * kBlock, w.N, y + m0 * ldy, ldy);
  }
}

// y [M][ldy] (=, += or gelu of) x w^T over the M quantized rows; blocks split across threads.
// A prefill's rows go by groups of kMaxChunkedRows, each over the block in L2 as a decode step
// goes over it from memory.
template <Out OUT, bool U = false>
void gemm_int8(const PackedInt8& w, const QuantRows& x, int64_t M, float* y, int64_t ldy) {
  parallel_blocks(w.blocks(),
                  [&](int64_t b) { gemm_int8_block<OUT, U>(w, x, M, y, ldy, b); });
}

// A prefill's rows (more than kMaxChunkedRows): codes in [-63, 63] (`quantize_rows` with these
// levels) through the unsigned products, 135 against 116 GMAC/s on two Zen 3 threads for 17-50
// rows (a prompt change's 25 frames are 50), activations at 7 bits where a decode step's keep 8.
// The AVX-512 build has no such path (VNNI's products are exact for 8 bits): its
// kPrefillLevels are 127.
constexpr float kPrefillLevels = 63.0f;

template <Out OUT>
void gemm_int8_prefill(const PackedInt8& w, const QuantRows& x, int64_t M, float* y, int64_t ldy) {
  gemm_int8<OUT, true>(w, x, M, y, ldy);
}

// y = gelu(y) over M rows of N (row stride ldy), the same maths as gemm_int8's Out::Gelu: for
// products without that epilogue (int4 weights in the fused step).
inline void gelu_rows(float* y, int64_t M, int64_t N, int64_t ldy) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; n += 8) {
      const __m256i mask = first_lanes(N - n);
      _mm256_maskstore_ps(y + m * ldy + n, mask, gelu_ps(_mm256_maskload_ps(y + m * ldy + n, mask)));
    }
}

// y = LayerNorm(x) over E features per row, with weight w and bias b.
inline void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t E,
                       float eps) {
  __m256 vsum = _mm256_setzero_ps();
  for (int64_t c = 0; c < E; c += 8)
    vsum = _mm256_add_ps(vsum, _mm256_maskload_ps(x + c, first_lanes(E - c)));
  const float mean = hsum(vsum) / static_cast<float>(E);
  const __m256 vmean = _mm256_set1_ps(mean);
  __m256 vsq = _mm256_setzero_ps();
  for (int64_t c = 0; c < E; c += 8) {
    const __m256i m = first_lanes(E - c);
    const __m256 d = _mm256_and_ps(_mm256_sub_ps(_mm256_maskload_ps(x + c, m), vmean), _mm256_castsi256_ps(m));
    vsq = _mm256_fmadd_ps(d, d, vsq);
  }
  const float rstd = 1.0f / std::sqrt(hsum(vsq) / static_cast<float>(E) + eps);
  const __m256 vr = _mm256_set1_ps(rstd);
  for (int64_t c = 0; c < E; c += 8) {
    const __m256i m = first_lanes(E - c);
    const __m256 d = _mm256_sub_ps(_mm256_maskload_ps(x + c, m), vmean);
    const __m256 v = _mm256_fmadd_ps(_mm256_mul_ps(d, vr), _mm256_maskload_ps(w + c, m),
                                     _mm256_maskload_ps(b + c, m));
    _mm256_maskstore_ps(y + c, m, v);
  }
}

}  // namespace er
