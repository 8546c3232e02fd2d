// Packed int4 matrix products for the decoder's projections: y = x w^T with 4-bit weight codes
// (a scale and an offset per output feature per group of G inputs) and int8 activations (one
// scale per row), exact integer sums inside each group, float32 out. One kernel serves a decode
// step's few rows (where it streams the weights once: half the bytes of int8) and a prefill's
// thousand (where a panel of 64 features stays in L2 while every row tile passes over it).
//
// The maths. A weight is w = s * u + b, u in [0, 15] its code, (s, b) its group's float16 scale
// and offset; a row of activations is x ~ r * q, q int8 in [-127, 127]. Per row m, feature n:
//
//     y[m][n] = r[m] * sum_g (s[n][g] * D[m][n][g] + b[n][g] * S[m][g])
//     D[m][n][g] = sum_{k in g} u[n][k] * q[m][k]     (exact, int16 then int32)
//     S[m][g]    = sum_{k in g} q[m][k]               (exact, once per row and group)
//
// Layout (`engine/linear.py` `pack_int4` packs it): features in blocks of 16; per block, per
// step of 8 inputs, 64 bytes: byte 4j + i holds feature j's codes of inputs 8t + i (low nibble)
// and 8t + 4 + i (high nibble), i < 4: codes [N / 16][Kp / 8][16][4]. The scales and offsets are
// float16 [N / 16][Kp / G][2][16]: the block's 16 scales, then its 16 offsets, per group.
// N is padded to 16 (code 0, scale and offset 0), K to G (code 0, activation 0).
//
// AVX2: a 32-byte load is 8 features x 8 inputs; its low nibbles (4 inputs per 32-bit lane) and
// high nibbles go through vpmaddubsw against the row's 4 activations broadcast (unsigned codes
// times signed bytes; a pair sums to at most 2 * 15 * 127), and the int16 sums add up over 4
// steps (16 products, at most 30480) before one vpmaddwd widens them into the group's int32
// sums. AVX-512 VNNI can read the same bytes: a 64-byte line is 16 features x 4 inputs per
// nibble, one vpdpbusd each against the broadcast activations: `group_sums` does so where the
// build has AVX-512 VNNI (the avx512 kernels), the rest is AVX2, FMA and F16C for every build,
// in the namespace er::int4 so that it sits beside the AVX-512 headers in one translation unit.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.h"  // parallel_blocks
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include "avx512/amx.h"  // the int4 products of several rows on AMX tiles (panel_amx)
#else
#include <string>

namespace er {  // the AVX2 build never takes the tiles: its amx_enable says so (both modules)
inline std::string amx_enable(int64_t) { return "the AVX2 build has no AMX products"; }
inline int64_t amx_min_rows() { return 0; }
}  // namespace er
#endif

namespace er::int4 {

constexpr int64_t kFeatures = 16;  // output features per block
constexpr int64_t kStep = 8;  // inputs per 64-byte step of a block
constexpr int64_t kStepBytes = 64;
constexpr int64_t kSub = 32;  // inputs whose int16 sums stay exact (4 steps x 4 products)
constexpr int64_t kMaxTile = 4;  // rows per register tile
constexpr int64_t kPanel = 4;  // blocks per L2 panel of a prefill (64 features)
// Rows up to which a block goes by in chunks of groups, each row tile passing over the chunk
// while it is in L1 (a decode step: the weights stream from memory once); more rows take the
// prefill's order (a row tile passes over a whole panel that stays in L2).
constexpr int64_t kMaxChunkedRows = 16;
constexpr int64_t kChunkBytes = 2048;  // codes per chunk of a block (plus its scales)
// Software prefetch distance in bytes of codes: the hardware prefetcher alone does not keep two
// streams (codes and scales) per thread at the bus's speed. 2 KB for one block's stream (the
// VNNI loops): one int4 station end to end x0.955-0.961 the time of 1 KB ahead on the Xeon (512
// bytes x1.07, 4 KB x1.02), in turns in one process (`bench/kernel_ab.py --parts stream-int4`);
// 1 KB for each of a tile panel's up to 4 blocks read at once (`panel_amx`): 2 KB there made
// the product at 4 rows x1.02-1.05 slower (`--parts int4 --rows 4`).
constexpr int64_t kPrefetch = 2048;
constexpr int64_t kPanelPrefetch = 1024;

// Into L1 (T0), unlike er::prefetch (common.h): the int4 product at 2-8 rows was x0.81-0.89
// slower asking into L2, on Zen 4 in turns in one process.
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

struct PackedInt4 {
  const uint8_t* codes;  // [Nb][Kp / 8][64]
  const uint16_t* scales;  // float16 [Nb][Kp / G][2][16]: scales, then offsets
  int64_t N;  // output features
  int64_t Kp;  // input features, padded to a multiple of G
  int64_t G;  // inputs per group, a multiple of 32
  int64_t blocks() const { return (N + kFeatures - 1) / kFeatures; }
  int64_t panels() const { return (blocks() + kPanel - 1) / kPanel; }  // a product's items
  int64_t groups() const { return Kp / G; }
  const uint8_t* block_codes(int64_t b) const { return codes + b * Kp * (kStepBytes / kStep); }
  const uint16_t* block_scales(int64_t b) const { return scales + b * groups() * 2 * kFeatures; }
};

struct GroupedRows {  // M rows of activations, int8 with one scale per row, and group sums
  const int8_t* q;  // [M][ld], zero past K
  int64_t ld;
  const float* scale;  // [M]: x[m] ~ scale[m] * q[m]
  const float* sums;  // [M][groups]: S[m][g], exact integers
  int64_t groups;
};

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return std::max(_mm_cvtss_f32(m), _mm_cvtss_f32(_mm_shuffle_ps(m, m, 1)));
}

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// One row x [K] -> q [Kp] int8 (x / scale to the nearest even, zero past K), its scale
// (max|x| / 127, or 1 for a zero row) and its G-input group sums [Kp / G].
inline void quantize_row(const float* x, int64_t K, int64_t Kp, int64_t G, int8_t* q,
                         float* scale, float* sums) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 vmax = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= K; c += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + c)));
  float amax = hmax(vmax);
  for (; c < K; ++c) amax = std::max(amax, std::fabs(x[c]));
  const float s = amax > 0 ? amax / 127.0f : 1.0f, inv = 1.0f / s;
  const __m256 vinv = _mm256_set1_ps(inv);
  for (int64_t g0 = 0; g0 < Kp; g0 += G) {
    __m256i vsum = _mm256_setzero_si256();
    int32_t tail = 0;
    for (c = g0; c < g0 + G; c += 8) {
      if (c + 8 <= K) {  // x * inv rounded to the nearest even (MXCSR default), |i| <= 127
        const __m256i i = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + c), vinv));
        vsum = _mm256_add_epi32(vsum, i);
        const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(q + c), _mm_packs_epi16(w, w));
        continue;
      }
      for (int64_t e = c; e < c + 8; ++e) {  // the row's tail and the padding past K
        const int32_t i = e < K ? static_cast<int32_t>(std::nearbyint(x[e] * inv)) : 0;
        q[e] = static_cast<int8_t>(i);
        tail += i;
      }
    }
    sums[g0 / G] = static_cast<float>(hsum(vsum) + tail);
  }
  *scale = s;
}

// The int32 sums D of MR rows against one block's 16 features over one group (codes: the
// group's G / 8 steps; xr: each row's activations at the group's first input), as 2 x 8 lanes.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// AVX-512 VNNI: a step's 64 bytes are 16 features x 4 inputs per nibble, so one vpdpbusd per
// nibble and row adds 4 exact products per feature straight into int32 (no int16 stage).
template <int MR>
inline void group_sums(const uint8_t* codes, int64_t G, const int8_t* const (&xr)[MR],
                       __m256i (&dot)[MR][2], bool ahead) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512i d[MR];
  for (int m = 0; m < MR; ++m) d[m] = _mm512_setzero_si512();
  for (int64_t t = 0; t < G / kStep; ++t) {
    const uint8_t* p = codes + t * kStepBytes;
    if (ahead) prefetch(p + kPrefetch);
    const __m512i v = _mm512_loadu_si512(p);
    const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    for (int m = 0; m < MR; ++m) {
      int32_t first, second;  // the row's inputs 8t .. 8t + 3 and 8t + 4 .. 8t + 7
      std::memcpy(&first, xr[m] + t * kStep, 4);
      std::memcpy(&second, xr[m] + t * kStep + 4, 4);
      d[m] = _mm512_dpbusd_epi32(d[m], lo, _mm512_set1_epi32(first));
      d[m] = _mm512_dpbusd_epi32(d[m], hi, _mm512_set1_epi32(second));
    }
  }
  for (int m = 0; m < MR; ++m)
    dot[m][0] = _mm512_castsi512_si256(d[m]), dot[m][1] = _mm512_extracti64x4_epi64(d[m], 1);
}
#else
// A step's two halves are unpacked once for the tile's rows; each row's two broadcasts are made
// where they are used and each product added straight into its sums, so that 4 rows fit in
// AVX2's 16 registers with little spilling (the broadcasts of all rows held at once spilled
// 5 of the 8 sums to the stack): x0.93-0.95 at 4 rows, x0.86-0.94 at 8 on Zen 3 in three runs
// of `bench/kernel_ab.py --parts int4`, x1.01-1.05 at 2 (within the rounds' spread, 0.76-1.10).
// The loop is bound by the vector ALUs (~3 a cycle there): per 128 products a row, 4
// vpmaddubsw, 4 vpaddw and 2 broadcasts, and the unpacking's 6 shared by the rows.
template <int MR>
inline void group_sums(const uint8_t* codes, int64_t G, const int8_t* const (&xr)[MR],
                       __m256i (&dot)[MR][2], bool ahead) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int m = 0; m < MR; ++m) dot[m][0] = dot[m][1] = _mm256_setzero_si256();
  for (int64_t h = 0; h < G; h += kSub) {
    __m256i part[MR][2];
    for (int m = 0; m < MR; ++m) part[m][0] = part[m][1] = _mm256_setzero_si256();
    for (int64_t t = h / kStep; t < (h + kSub) / kStep; ++t) {
      const uint8_t* p = codes + t * kStepBytes;
      if (ahead) prefetch(p + kPrefetch);
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
      const __m256i lo0 = _mm256_and_si256(v0, low), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low);
      const __m256i lo1 = _mm256_and_si256(v1, low), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low);
      for (int m = 0; m < MR; ++m) {
        int32_t first, second;  // the row's inputs 8t .. 8t + 3 and 8t + 4 .. 8t + 7
        std::memcpy(&first, xr[m] + t * kStep, 4);
        std::memcpy(&second, xr[m] + t * kStep + 4, 4);
        const __m256i a = _mm256_set1_epi32(first), c = _mm256_set1_epi32(second);
        part[m][0] = _mm256_add_epi16(part[m][0], _mm256_maddubs_epi16(lo0, a));  // features 0-7
        part[m][0] = _mm256_add_epi16(part[m][0], _mm256_maddubs_epi16(hi0, c));
        part[m][1] = _mm256_add_epi16(part[m][1], _mm256_maddubs_epi16(lo1, a));  // 8-15
        part[m][1] = _mm256_add_epi16(part[m][1], _mm256_maddubs_epi16(hi1, c));
      }
    }
    const __m256i ones = _mm256_set1_epi16(1);
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < 2; ++j) dot[m][j] = _mm256_add_epi32(dot[m][j], _mm256_madd_epi16(part[m][j], ones));
  }
}
#endif

// acc[m] += s * D + b * S over groups [g0, g1) of one block, for MR rows starting at row m0.
template <int MR>
inline void block_groups(const PackedInt4& w, int64_t block, int64_t g0, int64_t g1,
                         const GroupedRows& x, int64_t m0, __m256 (&acc)[MR][2], bool ahead) {
  const uint8_t* codes = w.block_codes(block);
  const uint16_t* scales = w.block_scales(block);
  const int8_t* xr[MR];
  for (int64_t g = g0; g < g1; ++g) {
    for (int m = 0; m < MR; ++m) xr[m] = x.q + (m0 + m) * x.ld + g * w.G;
    __m256i dot[MR][2];
    group_sums<MR>(codes + g * w.G * (kStepBytes / kStep), w.G, xr, dot, ahead);
    const uint16_t* sb = scales + g * 2 * kFeatures;
    if (ahead) prefetch(sb + kPrefetch * 4 / w.G);  // as far ahead as the codes' prefetch
    const __m256 s0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb)));
    const __m256 s1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + 8)));
    const __m256 b0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + 16)));
    const __m256 b1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + 24)));
    for (int m = 0; m < MR; ++m) {
      const __m256 sum = _mm256_broadcast_ss(x.sums + (m0 + m) * x.groups + g);
      acc[m][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[m][0]), s0, _mm256_fmadd_ps(b0, sum, acc[m][0]));
      acc[m][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[m][1]), s1, _mm256_fmadd_ps(b1, sum, acc[m][1]));
    }
  }
}

// y[m0 + m][block's features] = (or +=) row scale * acc, for the features below N.
template <int MR, bool ADD>
inline void store_tile(const __m256 (&acc)[MR][2], const GroupedRows& x, int64_t m0,
                       int64_t block, int64_t N, float* y, int64_t ldy) {
  const int64_t n0 = block * kFeatures, valid = std::min(kFeatures, N - n0);
  for (int m = 0; m < MR; ++m) {
    const __m256 r = _mm256_set1_ps(x.scale[m0 + m]);
    float out[kFeatures];
    _mm256_storeu_ps(out, _mm256_mul_ps(acc[m][0], r));
    _mm256_storeu_ps(out + 8, _mm256_mul_ps(acc[m][1], r));
    float* yr = y + (m0 + m) * ldy + n0;
    for (int64_t j = 0; j < valid; ++j) yr[j] = ADD ? yr[j] + out[j] : out[j];
  }
}

// fn(std::integral_constant<int, MR>{}) for a tile of min(rows, kMaxTile) rows (rows >= 1).
template <class Fn>
inline void with_tile_rows(int64_t rows, Fn&& fn) {
  static_assert(kMaxTile == 4, "one case per tile height");
  switch (std::min<int64_t>(kMaxTile, rows)) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    default: fn(std::integral_constant<int, 4>{}); break;
  }
}

// A decode step's rows (M <= kMaxChunkedRows) against one block: the block goes by in chunks of
// groups; every row tile passes over a chunk while it is in L1, its sums resting in `acc`
// between chunks; the first tile asks for the bytes ahead, so the stream never pauses.
template <bool ADD>
inline void block_chunked(const PackedInt4& w, int64_t block, const GroupedRows& x, int64_t M,
                          float* y, int64_t ldy) {
  __m256 acc[kMaxChunkedRows][2];
  for (auto& row : acc) row[0] = row[1] = _mm256_setzero_ps();
  const int64_t per_chunk = std::max<int64_t>(1, kChunkBytes / (w.G * (kStepBytes / kStep)));
  for (int64_t g0 = 0; g0 < w.groups(); g0 += per_chunk) {
    const int64_t g1 = std::min(w.groups(), g0 + per_chunk);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxTile) {
      with_tile_rows(M - m0, [&](auto mr) {
        constexpr int MR = decltype(mr)::value;
        __m256 tile[MR][2];
        for (int m = 0; m < MR; ++m) tile[m][0] = acc[m0 + m][0], tile[m][1] = acc[m0 + m][1];
        block_groups<MR>(w, block, g0, g1, x, m0, tile, m0 == 0);
        for (int m = 0; m < MR; ++m) acc[m0 + m][0] = tile[m][0], acc[m0 + m][1] = tile[m][1];
      });
    }
  }
  for (int64_t m0 = 0; m0 < M; m0 += kMaxTile) {
    with_tile_rows(M - m0, [&](auto mr) {
      constexpr int MR = decltype(mr)::value;
      store_tile<MR, ADD>(reinterpret_cast<const __m256(&)[MR][2]>(acc[m0]), x, m0, block, w.N, y, ldy);
    });
  }
}

// A prefill's rows against a panel of blocks [b0, b1): each row tile passes over the whole
// panel (in L2 after the first tile) with its activations in L1, all of K at once.
template <bool ADD>
inline void panel_rows(const PackedInt4& w, int64_t b0, int64_t b1, const GroupedRows& x,
                       int64_t M, float* y, int64_t ldy) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxTile) {
    with_tile_rows(M - m0, [&](auto mr) {
      constexpr int MR = decltype(mr)::value;
      for (int64_t b = b0; b < b1; ++b) {
        __m256 acc[MR][2];
        for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
        block_groups<MR>(w, b, 0, w.groups(), x, m0, acc, false);
        store_tile<MR, ADD>(acc, x, m0, b, w.N, y, ldy);
      }
    });
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// AMX (avx512/amx.h): a panel of up to 4 blocks (64 features) against every row, 16 rows a pass.
// A step of 8 inputs is 16 features x 4 inputs per nibble, so its low and high nibbles, masked
// apart, are two rows of a tile B (16 features x 4 consecutive inputs each): a group's 64
// inputs unpack into one 1 KB tile per block in L1, and one tdpbsud (the activations signed,
// the codes unsigned) makes the block's exact D sums for the group, which a tile store hands
// to the float sums as block_groups does (s * D + b * S per group). A decode step's rows stream
// each block's codes once (asking kPanelPrefetch ahead for each); a prefill's later
// passes find the panel in L2.
namespace amx_tiles {

// 8 steps (64 inputs) of one block's codes -> 16 tile rows of 64 bytes: low nibbles of step t
// are row 2t (inputs 8t .. 8t + 3), high nibbles row 2t + 1 (8t + 4 .. 8t + 7).
inline void unpack(const uint8_t* codes, uint8_t* tile, bool ahead) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int t = 0; t < 8; ++t) {
    const uint8_t* p = codes + t * kStepBytes;
    if (ahead) prefetch(p + kPanelPrefetch);
    const __m512i v = _mm512_loadu_si512(p);
    _mm512_store_si512(tile + 128 * t, _mm512_and_si512(v, low));
    _mm512_store_si512(tile + 128 * t + 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
  }
}

// tmm4 (activations) x the unpacked tile -> sums tile j (0-3: inline assembly names its tiles).
inline void product(int j, const uint8_t* tile) {
  asm volatile("tileloadd (%0,%1,1), %%tmm5" ::"r"(tile), "r"(int64_t{64}) : "memory");
  switch (j) {
    case 0: asm volatile("tdpbsud %%tmm5, %%tmm4, %%tmm0" ::: "memory"); break;
    case 1: asm volatile("tdpbsud %%tmm5, %%tmm4, %%tmm1" ::: "memory"); break;
    case 2: asm volatile("tdpbsud %%tmm5, %%tmm4, %%tmm2" ::: "memory"); break;
    default: asm volatile("tdpbsud %%tmm5, %%tmm4, %%tmm3" ::: "memory"); break;
  }
}

}  // namespace amx_tiles

// The tiles take int4 products from this many rows on (or amx_min_rows(), if more): at 1-2 rows
// VNNI's loop streams the codes as fast (24 layers of musicgen-small, in turns on Xeon AMX,
// 2026-12-06: x1.03 the time on the tiles at 1 and 2 rows, x0.94 at 3, x0.89 at 4, x0.77 at 8,
// x0.59 at 16, x0.55 for a 1000-row prefill; one int4 station end to end x0.99 of VNNI's speed).
constexpr int64_t kAmxMinRows = 3;

template <bool ADD>
void panel_amx(const PackedInt4& w, int64_t b0, int64_t b1, const GroupedRows& x, int64_t M,
               float* y, int64_t ldy, uint64_t tiles_product) {
  constexpr int64_t kPass = 64;  // inputs per tile pass
  const int64_t blocks = b1 - b0, groups = w.groups(), passes = w.G / kPass;
  alignas(64) uint8_t unpacked[kPanel][16 * 64];
  alignas(64) int32_t sums[amx::kRows * kBlock];  // [row][64 features], as amx::store_sums writes
  alignas(64) float acc[amx::kRows][kBlock];
  for (int64_t m0 = 0; m0 < M; m0 += amx::kRows) {
    const int64_t rows = std::min(amx::kRows, M - m0);
    const bool ahead = m0 == 0;
    amx::ready(tiles_product, rows);
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t n = 0; n < kBlock; n += 16) _mm512_store_ps(acc[m] + n, _mm512_setzero_ps());
    for (int64_t g = 0; g < groups; ++g) {
      amx::zero_sums();
      for (int64_t pass = 0; pass < passes; ++pass) {
        const int64_t k0 = g * w.G + pass * kPass;
        asm volatile("tileloadd (%0,%1,1), %%tmm4" ::"r"(x.q + m0 * x.ld + k0), "r"(x.ld)
                     : "memory");
        for (int64_t j = 0; j < blocks; ++j) {
          amx_tiles::unpack(w.block_codes(b0 + j) + k0 * (kStepBytes / kStep), unpacked[j], ahead);
          amx_tiles::product(static_cast<int>(j), unpacked[j]);
        }
      }
      amx::store_sums(sums);
      for (int64_t j = 0; j < blocks; ++j) {
        const uint16_t* sb = w.block_scales(b0 + j) + g * 2 * kFeatures;
        if (ahead) prefetch(sb + kPanelPrefetch * 4 / w.G);  // as far ahead as the codes' prefetch
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb)));
        const __m512 b =
            _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + kFeatures)));
        for (int64_t m = 0; m < rows; ++m) {
          const __m512 d = _mm512_cvtepi32_ps(_mm512_load_si512(sums + m * kBlock + 16 * j));
          const __m512 sum = _mm512_set1_ps(x.sums[(m0 + m) * x.groups + g]);
          float* a = acc[m] + 16 * j;
          _mm512_store_ps(a, _mm512_fmadd_ps(d, s, _mm512_fmadd_ps(b, sum, _mm512_load_ps(a))));
        }
      }
    }
    for (int64_t j = 0; j < blocks; ++j) {
      const int64_t n0 = (b0 + j) * kFeatures;
      const int64_t n_valid = std::min<int64_t>(kFeatures, w.N - n0);
      const __mmask16 valid = static_cast<__mmask16>((1u << n_valid) - 1);
      for (int64_t m = 0; m < rows; ++m) {
        float* yr = y + (m0 + m) * ldy + n0;
        __m512 v = _mm512_mul_ps(_mm512_load_ps(acc[m] + 16 * j), _mm512_set1_ps(x.scale[m0 + m]));
        if constexpr (ADD) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(valid, yr));
        _mm512_mask_storeu_ps(yr, valid, v);
      }
    }
  }
}
#endif

// How a product of M rows goes: by blocks of kFeatures (a decode step's rows), or by panels of
// kPanel blocks on the AMX tiles (from kAmxMinRows rows, or amx_min_rows() if more, where the
// build and the CPU have the tiles; groups of 64 inputs or a multiple) or through L2 (a
// prefill's rows). Each panel of kPanel blocks (kPanel * kFeatures features) is one item of the
// product (`PackedInt4::panels`), for a team (team.h) as for parallel_blocks.
struct Plan {
  enum class Kind { Blocks, TilePanels, Panels } kind = Kind::Blocks;
  uint64_t tiles_product = 0;  // amx.h `ready`'s number, for TilePanels
};

inline Plan plan(const PackedInt4& w, int64_t M) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  const int64_t tiles_from = amx_min_rows();
  if (tiles_from > 0 && M >= std::max(tiles_from, kAmxMinRows) && w.G % 64 == 0)
    return Plan{Plan::Kind::TilePanels, amx::products.fetch_add(1, std::memory_order_relaxed) + 1};
#endif
  // a decode step's blocks go kPanel to an item as well: a team's claim per item costs, and
  // blocks of 16 features made 4x int8's items
  return Plan{M <= kMaxChunkedRows ? Plan::Kind::Blocks : Plan::Kind::Panels, 0};
}

// Item i (a panel) of the product `p` plans: its features of y [M][ldy] = (or +=) x w^T.
template <bool ADD>
void gemm_int4_item(const PackedInt4& w, const GroupedRows& x, int64_t M, float* y, int64_t ldy,
                    const Plan& p, int64_t i) {
  const int64_t b0 = i * kPanel, b1 = std::min(w.blocks(), b0 + kPanel);
  switch (p.kind) {
    case Plan::Kind::Blocks:
      for (int64_t b = b0; b < b1; ++b) block_chunked<ADD>(w, b, x, M, y, ldy);
      return;
    case Plan::Kind::TilePanels:
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
      panel_amx<ADD>(w, b0, b1, x, M, y, ldy, p.tiles_product);
#endif
      return;
    case Plan::Kind::Panels:
      panel_rows<ADD>(w, b0, b1, x, M, y, ldy);
      return;
  }
}

// y [M][ldy] = (or +=) x w^T over the M quantized rows; blocks (or panels) split across threads.
template <bool ADD>
void gemm_int4(const PackedInt4& w, const GroupedRows& x, int64_t M, float* y, int64_t ldy) {
  const Plan p = plan(w, M);
  if (p.kind == Plan::Kind::Panels) {  // a prefill: panels in contiguous runs, through L2
    at::parallel_for(0, w.panels(), 1, [&](int64_t p0, int64_t p1) {
      for (int64_t i = p0; i < p1; ++i) gemm_int4_item<ADD>(w, x, M, y, ldy, p, i);
    });
    return;
  }
  parallel_blocks(w.panels(), [&](int64_t i) { gemm_int4_item<ADD>(w, x, M, y, ldy, p, i); });
}

}  // namespace er::int4
