// A prompt's text products with bfloat16 weights on CPUs without native bfloat16 maths: y = x w^T
// for float32 rows x [M][K] (any M: a prompt's tokens) and bfloat16 weights w [N][K], float32
// FMAs and sums. Each bfloat16 widens to float32 exactly (a shift), so the only rounding beside
// float32's is the weights' own. Used once per prompt change (the T5 encoder:
// engine/conditioning.py `Bf16Products`; the cross-attention's keys and values and their fold:
// engine/decoder.py `cross_kv`), where PyTorch's
// float32 products read their weights at 11-13 GB/s and its bfloat16 ones, without AVX-512
// BF16, run 6x slower still.
//
// AVX2 + FMA only (both builds compile it): a register tile is up to 4 rows x 3 features, 12
// float32 accumulators over K in steps of 8, the 3 features' weights widened into 3 registers
// and each row's 8 inputs taken from memory by its FMAs. A task is 48 features of one group (a
// head of the fold, or the whole matrix), every row tile passed over each 3 of them while
// their weights sit in L1 (3 x K bfloat16), so the weights stream from memory once; the tasks
// go to the threads by `parallel_blocks` (a thread done with its share takes the others':
// one preempted by another process does not hold the product up).
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace er {
namespace text {

constexpr int kRows = 4;  // rows per register tile
constexpr int kFeatures = 3;  // features per register tile
constexpr int64_t kFeaturesPerTask = 48;  // features a thread's task covers (16 tiles)

inline __m256 widen_bf16(const uint16_t* p) {  // 8 bfloat16 -> float32
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

inline float widen_bf16(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float sum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

// y[m][n] for MR rows from x (row stride K) and NR features from w (row stride K), K % 8 tail
// summed in scalars.
template <int MR, int NR>
inline void tile(const float* x, const uint16_t* w, float* y, int64_t K, int64_t ldy) {
  __m256 acc[MR][NR];
  for (auto& row : acc)
    for (auto& a : row) a = _mm256_setzero_ps();
  const int64_t K8 = K / 8 * 8;
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = widen_bf16(w + n * K + k);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_fmadd_ps(xv, wv[n], acc[m][n]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) {
      float s = sum8(acc[m][n]);
      for (int64_t k = K8; k < K; ++k) s += x[m * K + k] * widen_bf16(w[n * K + k]);
      y[m * ldy + n] = s;
    }
}

template <int MR>
inline void rows_tile(const float* x, const uint16_t* w, float* y, int64_t K, int64_t ldy,
                      int64_t features) {
  if (features == 3)
    tile<MR, 3>(x, w, y, K, ldy);
  else if (features == 2)
    tile<MR, 2>(x, w, y, K, ldy);
  else
    tile<MR, 1>(x, w, y, K, ldy);
}

// Rows [0, M) over features [n0, n1) of one group: row tiles of near-equal heights (13 rows go
// as 4, 3, 3, 3, not 4, 4, 4, 1) under each 3-feature tile.
inline void rows_over(const float* x, const uint16_t* w, float* y, int64_t M, int64_t N,
                      int64_t K, int64_t n0, int64_t n1) {
  const int64_t tiles = (M + kRows - 1) / kRows;
  for (int64_t n = n0; n < n1; n += kFeatures) {
    const int64_t features = std::min<int64_t>(kFeatures, n1 - n);
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t m0 = M * t / tiles, rows = M * (t + 1) / tiles - m0;
      const float* xt = x + m0 * K;
      float* yt = y + m0 * N + n;
      const uint16_t* wt = w + n * K;
      switch (rows) {
        case 4: rows_tile<4>(xt, wt, yt, K, N, features); break;
        case 3: rows_tile<3>(xt, wt, yt, K, N, features); break;
        case 2: rows_tile<2>(xt, wt, yt, K, N, features); break;
        default: rows_tile<1>(xt, wt, yt, K, N, features); break;
      }
    }
  }
}

// y [G][M][N] = x [G][M][K] w[G][N][K]^T per group; x, w, y contiguous.
inline void linear_bf16_weights(const float* x, const uint16_t* w, float* y, int64_t G, int64_t M,
                                int64_t N, int64_t K) {
  const int64_t tasks_per_group = (N + kFeaturesPerTask - 1) / kFeaturesPerTask;
  parallel_blocks(G * tasks_per_group, [&](int64_t t) {
    const int64_t g = t / tasks_per_group, n0 = t % tasks_per_group * kFeaturesPerTask;
    rows_over(x + g * M * K, w + g * N * K, y + g * M * N, M, N, K, n0,
              std::min(N, n0 + kFeaturesPerTask));
  });
}

// ---- weights in panels of 8 features [P][K][8]: the fold's per-head products (K = the head
// size, 64) ----------------------------------------------------------------------------------------
// A short K spends a dot-product tile's time in its final sums, so these go the other way: each
// row's input broadcast, FMAs over 8 features at once, no horizontal sums. The weights come in
// panels of 8 features, each contiguous over K (engine/conditioning.py `panels`): laid out
// [K][N] instead, a tile's K rows 2 KB apart fall into two of L1's sets and miss each pass. A
// register tile is up to 3 rows x 3 panels (24 features).

constexpr int kPanel = 8;  // features per panel
constexpr int kPanelRows = 3;  // rows per register tile (9 accumulators, 3 weights, 1 input)
constexpr int64_t kPanelsPerTask = 6;  // panels a thread's task covers

template <int MR, int V>
inline void tile_panels(const float* x, const uint16_t* w, float* y, int64_t K, int64_t ldy,
                        int64_t last) {
  __m256 acc[MR][V];
  for (auto& row : acc)
    for (auto& a : row) a = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 wv[V];
    for (int v = 0; v < V; ++v) wv[v] = widen_bf16(w + (v * K + k) * kPanel);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_broadcast_ss(x + m * K + k);
      for (int v = 0; v < V; ++v) acc[m][v] = _mm256_fmadd_ps(xv, wv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < V; ++v) {
      if (v < V - 1 || last == kPanel) {
        _mm256_storeu_ps(y + m * ldy + kPanel * v, acc[m][v]);
      } else {  // the last panel of a row holds fewer features
        alignas(32) float out[kPanel];
        _mm256_store_ps(out, acc[m][v]);
        std::memcpy(y + m * ldy + kPanel * v, out, last * sizeof(float));
      }
    }
}

template <int MR>
inline void rows_panels(const float* x, const uint16_t* w, float* y, int64_t K, int64_t ldy,
                        int64_t panels, int64_t last) {
  switch (panels) {
    case 3: return tile_panels<MR, 3>(x, w, y, K, ldy, last);
    case 2: return tile_panels<MR, 2>(x, w, y, K, ldy, last);
    default: return tile_panels<MR, 1>(x, w, y, K, ldy, last);
  }
}

// y [G][M][N] = x [G][M][K] times per group the weights w [G][P][K][8] (P = ceil(N / 8) panels
// of 8 features, the last zero padded); x, w, y contiguous.
inline void matmul_panels(const float* x, const uint16_t* w, float* y, int64_t G, int64_t M,
                          int64_t N, int64_t K) {
  const int64_t P = (N + kPanel - 1) / kPanel;
  const int64_t tasks_per_group = (P + kPanelsPerTask - 1) / kPanelsPerTask;
  const int64_t tiles = (M + kPanelRows - 1) / kPanelRows;
  parallel_blocks(G * tasks_per_group, [&](int64_t t) {
    const int64_t g = t / tasks_per_group, p0 = t % tasks_per_group * kPanelsPerTask;
    const int64_t p1 = std::min(P, p0 + kPanelsPerTask);
    for (int64_t p = p0; p < p1; p += 3) {
      const int64_t panels = std::min<int64_t>(3, p1 - p);
      const int64_t last = std::min<int64_t>(kPanel, N - (p + panels - 1) * kPanel);
      const uint16_t* wp = w + (g * P + p) * K * kPanel;
      for (int64_t i = 0; i < tiles; ++i) {
        const int64_t m0 = M * i / tiles, rows = M * (i + 1) / tiles - m0;
        const float* xt = x + (g * M + m0) * K;
        float* yt = y + (g * M + m0) * N + p * kPanel;
        switch (rows) {
          case 3: rows_panels<3>(xt, wp, yt, K, N, panels, last); break;
          case 2: rows_panels<2>(xt, wp, yt, K, N, panels, last); break;
          default: rows_panels<1>(xt, wp, yt, K, N, panels, last); break;
        }
      }
    }
  });
}

}  // namespace text
}  // namespace er
