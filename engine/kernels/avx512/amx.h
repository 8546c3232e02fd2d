// The int8 and int4 products on AMX tiles (Sapphire Rapids and later Xeons; the int8 loop in
// int8_gemm.h `block_amx`, the int4 one in ../int4_gemm.h `panel_amx`), for several rows: a decode
// step of two or more stations, a stream's warm rows, a prefill. The AVX-512 build carries it and
// takes it at run time where the CPU has AMX-TILE and AMX-INT8 and Linux lets the process use the
// tiles' state (`amx_enable`); elsewhere, or with ENDLESS_RADIO_AMX=0, the VNNI products run
// (the AVX2 build's amx_enable, in int4_gemm.h, only says why not).
//
// Why: vpdpbusd does 64 byte products per instruction, so from ~4 rows the VNNI products of a
// decode step cost more than their weights' stream (int8 at 8 rows: 71% of the plain read's
// speed, 2 rows 100%+), and a prefill is all maths. One tdpbsud does 16 rows x 16 features x 64
// inputs (16 K products at 16 rows); its B operand is 16 rows of 64 bytes, each feature's 4
// consecutive inputs in one dword, which is exactly common.h's packed layout read with a stride
// of 256 bytes: the weights need no other packing. tdpbsud multiplies signed (the activations,
// tile A) by unsigned (the weights + 128, tile B) bytes; the +128 comes back out as VNNI's does.
//
// The tile instructions are written as inline assembly with a memory clobber: GCC's _tile_*
// macros tell the compiler nothing about the memory they read and write.
#pragma once

#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cpuid.h>
#include <cstdint>
#include <cstring>
#include <string>

namespace er {

namespace amx {

// Rows from which gemm_int8 and gemm_int4 take the tiles; 0 while they are off (`amx_enable`).
inline std::atomic<int64_t> min_rows{0};
// Numbers every tile product, so that a thread loads its tile configuration once per product
// (another library, oneDNN for one, may have configured the tiles in between).
inline std::atomic<uint64_t> products{0};

constexpr int64_t kRows = 16;  // a tile's rows: activations per pass
constexpr int64_t kChunkK4 = 16;  // k-groups of 4 inputs per tile pass (64 bytes a row)
constexpr int64_t kChunkBytes = kChunkK4 * 4 * kBlock;  // 4 KB of weights: four B tiles
// How many 4 KB chunks ahead a streamed block asks for its bytes (into L1: `prefetch_l1`).
constexpr int64_t kAhead = 2;

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: the sums of 64 features (16 each), 4: the activations, 5: the weights.
inline void configure(int64_t rows) {
  TileConfig c;
  for (int t = 0; t < 6; ++t) c.colsb[t] = 64;
  for (int t = 0; t < 5; ++t) c.rows[t] = static_cast<uint8_t>(rows);
  c.rows[5] = kChunkK4;
  asm volatile("ldtilecfg %0" ::"m"(c) : "memory");
}

#define ER_TILE(insn) asm volatile(insn ::: "memory")
#define ER_TILE_MEM(insn, base, stride) \
  asm volatile(insn ::"r"(base), "r"(static_cast<int64_t>(stride)) : "memory")

// Configures this thread's tiles for passes of `rows` rows, unless it did for this product.
inline void ready(uint64_t product, int64_t rows) {
  thread_local uint64_t configured_product = 0;
  thread_local int64_t configured_rows = 0;
  if (configured_product == product && configured_rows == rows) return;
  configure(rows);
  configured_product = product;
  configured_rows = rows;
}

inline void zero_sums() {
  ER_TILE("tilezero %%tmm0");
  ER_TILE("tilezero %%tmm1");
  ER_TILE("tilezero %%tmm2");
  ER_TILE("tilezero %%tmm3");
}

// Sums of one pass of 16 k-groups: A from `x` (rows at stride ld), B from a 4 KB chunk.
inline void pass(const int8_t* x, int64_t ld, const uint8_t* chunk) {
  ER_TILE_MEM("tileloadd (%0,%1,1), %%tmm4", x, ld);
  ER_TILE_MEM("tileloadd (%0,%1,1), %%tmm5", chunk, 4 * kBlock);
  ER_TILE("tdpbsud %%tmm5, %%tmm4, %%tmm0");
  ER_TILE_MEM("tileloadd (%0,%1,1), %%tmm5", chunk + 64, 4 * kBlock);
  ER_TILE("tdpbsud %%tmm5, %%tmm4, %%tmm1");
  ER_TILE_MEM("tileloadd (%0,%1,1), %%tmm5", chunk + 128, 4 * kBlock);
  ER_TILE("tdpbsud %%tmm5, %%tmm4, %%tmm2");
  ER_TILE_MEM("tileloadd (%0,%1,1), %%tmm5", chunk + 192, 4 * kBlock);
  ER_TILE("tdpbsud %%tmm5, %%tmm4, %%tmm3");
}

// The sums into `out` [rows][64] int32 (a row every 256 bytes).
inline void store_sums(int32_t* out) {
  ER_TILE_MEM("tilestored %%tmm0, (%0,%1,1)", out, 4 * kBlock);
  ER_TILE_MEM("tilestored %%tmm1, (%0,%1,1)", out + 16, 4 * kBlock);
  ER_TILE_MEM("tilestored %%tmm2, (%0,%1,1)", out + 32, 4 * kBlock);
  ER_TILE_MEM("tilestored %%tmm3, (%0,%1,1)", out + 48, 4 * kBlock);
}

#undef ER_TILE
#undef ER_TILE_MEM

// Why the tiles cannot run here, or "" when they can: the CPU's AMX-TILE and AMX-INT8
// (CPUID 7.0 EDX bits 24, 25), the OS saving their state (XCR0 bits 17, 18), and Linux's
// permission for this process (arch_prctl ARCH_REQ_XCOMP_PERM, Linux 5.16 and later).
inline std::string unavailable() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25)))
    return "this CPU has no AMX-INT8";
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return "the OS does not enable XSAVE";
  uint32_t lo, hi;
  asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return "the OS does not save the AMX tiles' state";
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
  if (syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) != 0)
    return "Linux refused this process the AMX tiles (arch_prctl: Linux 5.16 or later needed)";
  return "";
}

}  // namespace amx

// Sets the rows from which the products take the AMX tiles (0: never); "" when set, else why
// the tiles cannot run here (and they stay off).
inline std::string amx_enable(int64_t min_rows) {
  static const std::string reason = amx::unavailable();  // asked once per process
  if (!reason.empty()) return reason;
  amx::min_rows.store(min_rows < 0 ? 0 : min_rows);
  return "";
}

inline int64_t amx_min_rows() { return amx::min_rows.load(std::memory_order_relaxed); }

}  // namespace er
