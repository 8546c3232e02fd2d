// Packed int8 matrix products for the decoder's projections: y = x w^T with int8 weights (one
// scale per output feature) and int8 activations (one scale per row), exact int32 sums by
// AVX-512 VNNI (vpdpbusd), float32 out. One kernel serves a decode step's few rows (where it
// streams the weights once, at memory speed) and a prefill's thousand (where each 64-feature
// block of weights stays in L2 while every row tile passes over it).
//
// The layout is common.h's: [N/64][K/4][64][4] bytes, each w + 128. vpdpbusd multiplies unsigned
// by signed bytes, the weight is the unsigned side, and the +128 comes back out as 128 * sum(x)
// per row (QuantRows.comp).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "amx.h"
#include "simd.h"

namespace er {

constexpr int64_t kRowTile = 4;  // rows per register tile: 4 rows x 64 features, 16 accumulators
// Software prefetch distance in bytes. The hardware prefetcher alone leaves a decode step at
// ~35 GB/s here; asking 1 KB ahead brings the weights in at ~45 GB/s, and lets the maths of
// 8 rows (4 stations) overlap the stream instead of adding to it (bench/kernels.py).
constexpr int64_t kPrefetch = 1024;

// Rows x [M][ldx] of K floats -> q [M][ldq] int8 (zero padded up to Kp), scale [M], comp [M];
// codes in [-levels, levels].
inline void quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp,
                          int8_t* q, int64_t ldq, float* scale, int32_t* comp,
                          float levels = 127.0f) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    int8_t* qr = q + m * ldq;
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t c = 0; c < K; c += 16) {
      const __mmask16 mask = first_lanes(K - c);
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask, xr + c)));
    }
    const float amax = _mm512_reduce_max_ps(vmax);
    const float s = amax > 0 ? amax / levels : 1.0f;
    const __m512 inv = _mm512_set1_ps(1.0f / s);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t c = 0; c < K; c += 16) {
      const __mmask16 mask = first_lanes(K - c);
      const __m512i i = _mm512_maskz_cvtps_epi32(
          mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, xr + c), inv));  // nearest even
      _mm512_mask_cvtsepi32_storeu_epi8(qr + c, mask, i);
      sum = _mm512_add_epi32(sum, i);
    }
    for (int64_t c = K; c < Kp; ++c) qr[c] = 0;
    scale[m] = s;
    comp[m] = 128 * _mm512_reduce_add_epi32(sum);
  }
}

// gelu(x) = x/2 (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (error < 1.5e-7),
// written as 1 + erf(z) = 2 - P (z >= 0) or P (z < 0), P = poly(t) exp(-z^2): no cancellation.
inline __m512 gelu_ps(__m512 x) {
  const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
  const __m512 az = _mm512_abs_ps(z);
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f),
                                 _mm512_fmadd_ps(az, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  p = _mm512_mul_ps(_mm512_mul_ps(p, t), exp_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), az), az)));
  const __mmask16 positive = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GE_OQ);
  const __m512 one_plus_erf = _mm512_mask_sub_ps(p, positive, _mm512_set1_ps(2.0f), p);
  return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), one_plus_erf);
}

// y[m][n0 + ...] (=, += or gelu of) the int32 sums of rows [m0, m0 + MR), each minus its +128
// compensation, times the row's and the feature's scales.
template <int MR, Out OUT>
inline void tile_out(const __m512i (*acc)[4], const QuantRows& x, int64_t m0, const float* ws,
                     int64_t n0, int64_t N, float* y, int64_t ldy) {
  for (int m = 0; m < MR; ++m) {
    const __m512i comp = _mm512_set1_epi32(x.comp[m0 + m]);
    const __m512 s = _mm512_set1_ps(x.scale[m0 + m]);
    float* yr = y + (m0 + m) * ldy;
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + 16 * j;
      if (n >= N) break;
      const __mmask16 mask = first_lanes(N - n);
      __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m][j], comp));
      v = _mm512_mul_ps(_mm512_mul_ps(v, s), _mm512_maskz_loadu_ps(mask, ws + n));
      if constexpr (OUT == Out::Add) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, yr + n));
      if constexpr (OUT == Out::Gelu) v = gelu_ps(v);
      _mm512_mask_storeu_ps(yr + n, mask, v);
    }
  }
}

// MR rows' sums over k-groups [k0, k1) of one block (p: the block), added into acc.
// `prefetch_ahead`: the tile that streams the block from memory asks for it kPrefetch ahead.
template <int MR>
inline void tile_sums(const uint8_t* p, int64_t k0, int64_t k1, const int8_t* const (&xr)[MR],
                      __m512i (&acc)[MR][4], bool prefetch_ahead) {
  for (int64_t k = k0; k < k1; ++k) {
    const uint8_t* w = p + k * 4 * kBlock;
    if (prefetch_ahead)
      for (int line = 0; line < 4; ++line) prefetch(w + kPrefetch + 64 * line);
    const __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 64);
    const __m512i w2 = _mm512_loadu_si512(w + 128), w3 = _mm512_loadu_si512(w + 192);
    for (int m = 0; m < MR; ++m) {
      int32_t four;
      std::memcpy(&four, xr[m] + 4 * k, 4);
      const __m512i xb = _mm512_set1_epi32(four);
      acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], w0, xb);
      acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], w1, xb);
      acc[m][2] = _mm512_dpbusd_epi32(acc[m][2], w2, xb);
      acc[m][3] = _mm512_dpbusd_epi32(acc[m][3], w3, xb);
    }
  }
}

// fn(std::integral_constant<int, MR>{}) for a tile of min(rows, kRowTile) rows (rows >= 1).
template <class Fn>
inline void with_tile_rows(int64_t rows, Fn&& fn) {
  static_assert(kRowTile == 4, "one case per tile height");
  switch (std::min<int64_t>(kRowTile, rows)) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    default: fn(std::integral_constant<int, 4>{}); break;
  }
}

template <int MR>
inline void row_pointers(const QuantRows& x, int64_t m0, const int8_t* (&xr)[MR]) {
  for (int m = 0; m < MR; ++m) xr[m] = x.q + (m0 + m) * x.ld;
}

// Rows [m0, m0 + MR) against one block of 64 output features starting at n0, the whole K at once.
template <int MR, Out OUT>
inline void block_tile(const uint8_t* wb, int64_t K4, const QuantRows& x, int64_t m0,
                       const float* ws, int64_t n0, int64_t N, float* y, int64_t ldy) {
  __m512i acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_si512();
  const int8_t* xr[MR];
  row_pointers(x, m0, xr);
  tile_sums(wb, 0, K4, xr, acc, m0 == 0);  // later tiles find the block in L2
  tile_out<MR, OUT>(acc, x, m0, ws, n0, N, y, ldy);
}

// A decode step of 5 to 16 rows (3 to 8 stations) in whole-K passes of 4-row tiles would leave
// memory idle while the later tiles re-read each block from L2: 4 stations took 1.26x one
// station's time on the projections, with the maths (54 us of a 145 us matrix) added to the
// stream instead of hidden under it. Here the block goes by in chunks of kChunk k-groups (4 KB,
// in L1 while every tile passes over it), each tile's sums rest in memory between chunks, and
// each pass asks for its share of the chunk after next, so the stream never pauses.
constexpr int64_t kChunk = 16;
constexpr int64_t kMaxChunkedRows = 16;
constexpr int64_t kChunkAhead = 2;  // chunks between the one read and the one asked for

template <int MR>
inline void chunk_pass(const uint8_t* wb, int64_t k0, int64_t k1, const QuantRows& x, int64_t m0,
                       __m512i (*saved)[4], const uint8_t* ahead, int64_t line0, int64_t line1) {
  const int8_t* xr[MR];
  row_pointers(x, m0, xr);
  __m512i acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = saved[m][j];
  for (int64_t line = line0; line < line1; ++line) prefetch(ahead + 64 * line);
  tile_sums(wb, k0, k1, xr, acc, false);
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) saved[m][j] = acc[m][j];
}

template <Out OUT>
void block_chunked(const uint8_t* wb, int64_t K4, const QuantRows& x, int64_t M, const float* ws,
                   int64_t n0, int64_t N, float* y, int64_t ldy) {
  __m512i acc[kMaxChunkedRows][4];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_si512();
  const int64_t tiles = (M + kRowTile - 1) / kRowTile;
  for (int64_t k0 = 0; k0 < K4; k0 += kChunk) {
    const int64_t k1 = std::min(K4, k0 + kChunk), lines = (k1 - k0) * 4;
    const uint8_t* ahead = wb + (k0 + kChunkAhead * kChunk) * 4 * kBlock;  // may be the next block
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t m0 = t * kRowTile, l0 = lines * t / tiles, l1 = lines * (t + 1) / tiles;
      with_tile_rows(M - m0, [&](auto mr) {
        chunk_pass<mr>(wb, k0, k1, x, m0, acc + m0, ahead, l0, l1);
      });
    }
  }
  for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
    with_tile_rows(M - m0, [&](auto mr) { tile_out<mr, OUT>(acc + m0, x, m0, ws, n0, N, y, ldy); });
  }
}

// One block of 64 features against all M rows on the AMX tiles (amx.h), 16 rows a pass: the
// block's whole 64-input chunks through tdpbsud (the first pass streams the block from memory,
// asking kAhead chunks ahead into L1; the others find it in L2), the inputs left over (K not a
// multiple of 64) through VNNI as a decode tile sums them, and the sums out as tile_out writes
// them.
template <Out OUT>
void block_amx(const uint8_t* wb, int64_t K4, const QuantRows& x, int64_t M, const float* ws,
               int64_t n0, int64_t N, float* y, int64_t ldy, uint64_t product) {
  const int64_t chunks = K4 / amx::kChunkK4, tail = chunks * amx::kChunkK4;
  alignas(64) int32_t sums[amx::kRows * kBlock];
  __m512i acc[amx::kRows][4];
  for (int64_t m0 = 0; m0 < M; m0 += amx::kRows) {
    const int64_t rows = std::min(amx::kRows, M - m0);
    amx::ready(product, rows);
    amx::zero_sums();
    const int8_t* xm = x.q + m0 * x.ld;
    for (int64_t c = 0; c < chunks; ++c) {
      const uint8_t* chunk = wb + c * amx::kChunkBytes;
      if (m0 == 0)
        for (int64_t line = 0; line < amx::kChunkBytes; line += 64)
          prefetch_l1(chunk + amx::kAhead * amx::kChunkBytes + line);
      amx::pass(xm + c * 64, x.ld, chunk);
    }
    amx::store_sums(sums);
    for (int64_t m = 0; m < rows; ++m)
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_load_si512(sums + m * kBlock + 16 * j);
    for (int64_t t = 0; t < rows; t += kRowTile) {
      with_tile_rows(rows - t, [&](auto mr) {
        constexpr int MR = decltype(mr)::value;
        if (tail < K4) {
          const int8_t* xr[MR];
          row_pointers(x, m0 + t, xr);
          tile_sums(wb, tail, K4, xr, *reinterpret_cast<__m512i(*)[MR][4]>(acc + t), false);
        }
        tile_out<MR, OUT>(acc + t, x, m0 + t, ws, n0, N, y, ldy);
      });
    }
  }
}

// The number of a product on the AMX tiles (amx.h `ready`), or 0 where `M` rows of `w` go on
// VNNI: from amx_min_rows() rows, where the CPU has the tiles.
inline uint64_t int8_tiles_product(const PackedInt8& w, int64_t M) {
  const int64_t amx_rows = amx_min_rows();
  if (amx_rows > 0 && M >= amx_rows && w.Kp / 4 >= amx::kChunkK4)
    return amx::products.fetch_add(1, std::memory_order_relaxed) + 1;
  return 0;
}

// Block b (kBlock features) of y [M][ldy] (=, += or gelu of) x w^T: on the tiles when
// `tiles_product` (int8_tiles_product) is not 0. One item of the product for a team (team.h).
template <Out OUT>
void gemm_int8_block(const PackedInt8& w, const QuantRows& x, int64_t M, float* y, int64_t ldy,
                     int64_t b, uint64_t tiles_product) {
  const int64_t K4 = w.Kp / 4;
  const uint8_t* wb = w.data + b * K4 * 4 * kBlock;
  if (tiles_product != 0) {
    block_amx<OUT>(wb, K4, x, M, w.scales, b * kBlock, w.N, y, ldy, tiles_product);
    return;
  }
  if (M > kRowTile && M <= kMaxChunkedRows) {
    block_chunked<OUT>(wb, K4, x, M, w.scales, b * kBlock, w.N, y, ldy);
    return;
  }
  for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
    with_tile_rows(M - m0, [&](auto mr) {
      block_tile<mr, OUT>(wb, K4, x, m0, w.scales, b * kBlock, w.N, y, ldy);
    });
  }
}

// y [M][ldy] (=, += or gelu of) x w^T over the M quantized rows; blocks split across threads.
// From amx_min_rows() rows (where the CPU has the tiles) on AMX, else on VNNI.
template <Out OUT>
void gemm_int8(const PackedInt8& w, const QuantRows& x, int64_t M, float* y, int64_t ldy) {
  const uint64_t product = int8_tiles_product(w, M);
  parallel_blocks(w.blocks(),
                  [&](int64_t b) { gemm_int8_block<OUT>(w, x, M, y, ldy, b, product); });
}

// A prefill's rows go as a decode step's here: VNNI's products are exact for 8-bit codes (the
// AVX2 build takes 7 for them, avx2/int8_gemm.h).
constexpr float kPrefillLevels = 127.0f;

template <Out OUT>
void gemm_int8_prefill(const PackedInt8& w, const QuantRows& x, int64_t M, float* y, int64_t ldy) {
  gemm_int8<OUT>(w, x, M, y, ldy);
}

// y = gelu(y) over M rows of N (row stride ldy), the same maths as gemm_int8's Out::Gelu: for
// products without that epilogue (int4 weights in the fused step).
inline void gelu_rows(float* y, int64_t M, int64_t N, int64_t ldy) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; n += 16) {
      const __mmask16 mask = first_lanes(N - n);
      _mm512_mask_storeu_ps(y + m * ldy + n, mask, gelu_ps(_mm512_maskz_loadu_ps(mask, y + m * ldy + n)));
    }
}

// y = LayerNorm(x) over E features per row, with weight w and bias b.
inline void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t E,
                       float eps) {
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t c = 0; c < E; c += 16) {
    const __mmask16 m = first_lanes(E - c);
    vsum = _mm512_add_ps(vsum, _mm512_maskz_loadu_ps(m, x + c));
  }
  const float mean = _mm512_reduce_add_ps(vsum) / static_cast<float>(E);
  const __m512 vmean = _mm512_set1_ps(mean);
  __m512 vsq = _mm512_setzero_ps();
  for (int64_t c = 0; c < E; c += 16) {
    const __mmask16 m = first_lanes(E - c);
    const __m512 d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, x + c), vmean);
    vsq = _mm512_fmadd_ps(d, d, vsq);
  }
  const float rstd = 1.0f / std::sqrt(_mm512_reduce_add_ps(vsq) / static_cast<float>(E) + eps);
  const __m512 vr = _mm512_set1_ps(rstd);
  for (int64_t c = 0; c < E; c += 16) {
    const __mmask16 m = first_lanes(E - c);
    const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + c), vmean);
    const __m512 v = _mm512_fmadd_ps(_mm512_mul_ps(d, vr), _mm512_maskz_loadu_ps(m, w + c),
                                     _mm512_maskz_loadu_ps(m, b + c));
    _mm512_mask_storeu_ps(y + c, m, v);
  }
}

}  // namespace er
