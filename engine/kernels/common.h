// What every kernel shares whatever the instruction set: prefetches, bfloat16 bits, the head-size
// dispatch, the packed int8 weights and quantized activations (engine/linear.py `pack_int8`),
// and the int4 KV cache's block layout (engine/kv_cache.py). Each ISA's kernels (avx512/,
// avx2/) read and write these layouts alike, so a cache or a packed weight means the same bytes
// on every CPU.
#pragma once

#include <ATen/Parallel.h>
#include <xmmintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace er {

// Asking ahead for a stream's lines: into L2 (T1), not L1 (T0). A T0 request holds one of the
// core's few L1 miss buffers until its line arrives; the int8 products and the attention ask for
// many lines at once, and with T0 the core stalled on its own prefetches (perf: 15% of the int4
// attention's samples on one prefetch). With T1, a whole step is x1.11-1.13 faster on Zen 4 (int8
// weights and cache, 2 and 4 rows, in turns in one process), x1.14-1.35 for the AVX2 build on
// the same CPU. The int4 product asks into L1 (int4_gemm.h): there T1 was slower.
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

// Asking ahead into L1 (T0): the AMX tiles' weight stream (avx512/int8_gemm.h `block_amx`), whose
// tile loads (16 lines each, 256 bytes apart) run slower from L2 than from L1. One int8 station
// end to end x0.960-0.988 the time of T1 there (five runs); every stream into L1 gained less,
// x0.985 (Xeon, in turns in one process: `bench/kernel_ab.py --parts stream-int8`).
inline void prefetch_l1(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

// Asking for a line that this core is about to write, in the exclusive state (PREFETCHW): a
// store to a line that another core holds, or that is only in memory, waits for it first. The
// KV cache's new positions: a step writes 11 lines per (row, head) of an int4 cache, lines last
// touched a step ago by either core; one station's 32 (row, head) items, written by one member
// with no prefetch, took 11 us a layer, 9 of them in the stores (Xeon, int8 weights and int4
// cache); by the members that attend them, asked for first, 3 us. The instruction is a NOP on
// x86-64 CPUs that lack it.
inline void prefetch_for_write(const void* p) {
  asm volatile("prefetchw %0" : : "m"(*static_cast<const char*>(p)));
}

// A positive finite float rounded to bfloat16 (nearest even, as torch's conversion): its bits.
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

inline float bf16_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// fn(std::integral_constant<int, n>{}) for n in 1..8 (larger: 8): a loop's count as a constant.
template <class Fn>
inline void with_up_to_8(int64_t n, Fn&& fn) {
  switch (n) {
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

// fn(std::integral_constant<int, NC>{}) for a head of D = NC * 16 floats, NC in 1..8.
template <class Fn>
inline void with_head_chunks(int64_t D, Fn&& fn) {
  with_up_to_8(D / 16, fn);
}

// ---- packed int8 weights ------------------------------------------------------------------------
// w [N, K] -> blocks of 64 output features; within a block, for each group of 4 inputs, 64 x 4
// bytes: [N/64][K/4][64][4]. Each byte is w + 128 (w in [-127, 127]). N and K are padded to
// multiples of 64 and 4 (weight 0). Activations are int8 per row, x ~ scale * q, q in [-127, 127].

constexpr int64_t kBlock = 64;  // output features per packed block

struct PackedInt8 {
  const uint8_t* data;  // [ceil(N / 64)][Kp / 4][64][4]
  const float* scales;  // [N]: w[n] ~ scales[n] * q[n]
  int64_t N;  // output features
  int64_t Kp;  // input features, padded to a multiple of 4
  int64_t blocks() const { return (N + kBlock - 1) / kBlock; }
};

struct QuantRows {  // M rows of activations, int8 with one scale per row
  const int8_t* q;  // [M][ld], zero past K
  int64_t ld;
  const float* scale;  // [M]: x[m] ~ scale[m] * q[m]
  const int32_t* comp;  // [M]: 128 * sum(q[m]), what the weights' +128 adds to an unsigned sum
};

enum class Out { Store, Add, Gelu };  // y = v, y += v, y = gelu(v)

// Work split in contiguous shares, one per intra-op thread: each thread takes its own share's
// items from the front, and once it is done, the items left at the back of the others'. A
// share's [front, back) is one word (back << 32 | front), so that the owner's take from the front
// and a helper's from the back can never both take the same item.
class Shares {
 public:
  static constexpr int64_t kMax = 64;  // threads

  void set(int64_t t, int64_t begin, int64_t end) {
    shares_[t].range.store(static_cast<uint64_t>(end) << 32 | static_cast<uint64_t>(begin),
                           std::memory_order_relaxed);
  }

  // An item of share t, or -1 when none is left.
  int64_t take(int64_t t, bool from_front) {
    uint64_t r = shares_[t].range.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t front = r & 0xFFFFFFFFu, back = r >> 32;
      if (front >= back) return -1;
      const uint64_t next = from_front ? (back << 32 | (front + 1)) : ((back - 1) << 32 | front);
      if (shares_[t].range.compare_exchange_weak(r, next, std::memory_order_relaxed))
        return static_cast<int64_t>(from_front ? front : back - 1);
    }
  }

  // On each of `threads` threads: own(item, share, first) for its share's items, then helped(item,
  // share, first) for the others' leftovers (the next share first), in the order they are taken;
  // `first` for the first item taken from a share (the others follow it one by one).
  template <class Own, class Helped>
  void run(int64_t threads, Own&& own, Helped&& helped) {
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        bool first = true;
        for (int64_t i; (i = take(t, true)) >= 0; first = false) own(i, t, first);
      }
      for (int64_t u = 1; u < threads; ++u) {
        const int64_t other = (t0 + u) % threads;
        bool first = true;
        for (int64_t i; (i = take(other, false)) >= 0; first = false) helped(i, other, first);
      }
    });
  }

 private:
  struct alignas(64) Share {
    std::atomic<uint64_t> range;
  };
  std::array<Share, kMax> shares_;
};

// fn(b) for every block b in [0, blocks), split across the intra-op threads in contiguous
// shares (thread t the t-th chunk of divup(blocks, threads)), a thread done with its share
// taking the blocks left at the back of the others' (`Shares`; a decode step's team splits its
// products the same way, team.h). The threads of a streamed
// product finish at different times (the bus is not shared evenly), and without this the first
// one done waited for the other at every product: an int8 step x1.04-1.06 faster with it on Zen
// 4 (2 and 4 rows, in turns in one process), a prefill x1.04; int4 steps the same. Each block is
// done by one thread, whole: the sums are those of a static split.
template <class Fn>
inline void parallel_blocks(int64_t blocks, Fn&& fn) {
  const int64_t threads =
      std::clamp<int64_t>(std::min<int64_t>(at::get_num_threads(), blocks), 1, Shares::kMax);
  if (threads == 1) {
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) fn(b);
    });
    return;
  }
  Shares shares;
  const int64_t chunk = (blocks + threads - 1) / threads;
  for (int64_t t = 0; t < threads; ++t)
    shares.set(t, std::min(blocks, t * chunk), std::min(blocks, (t + 1) * chunk));
  const auto each = [&](int64_t b, int64_t, bool) { fn(b); };
  shares.run(threads, each, each);
}

// Where a self-attention item sits in the run of items its thread takes: what it may ask for
// early (the keys of `next`, the item this thread expects to take after it, or -1; part `part`
// of `parts` of the thread's own next bytes, `parts` 0 for an item taken from another's share),
// and whether it is the first of a run (no item before it asked for its keys).
struct ItemRun {
  int64_t next, part, parts;
  bool first;
};

// Contiguous shares of the B * H (row, head) self-attention items, of about equal cost, one per
// thread: item i reads its row's positions [0, pos[i / H]]; thread t's share is
// [bounds[t], bounds[t + 1]) (bounds: threads + 1 entries).
inline void position_bounds(const int64_t* pos, int64_t B, int64_t H, int64_t threads,
                            int64_t* bounds) {
  const int64_t items = B * H;
  int64_t total = 0, done = 0, t = 1;
  for (int64_t b = 0; b < B; ++b) total += (pos[b] + 1) * H;
  bounds[0] = 0;
  for (int64_t i = 0; i < items && t < threads; ++i) {
    done += pos[i / H] + 1;
    while (t < threads && done * threads >= total * t) bounds[t++] = i + 1;
  }
  while (t <= threads) bounds[t++] = items;
}

// fn(i, ItemRun) for every one of the B * H (row, head) self-attention items, item i reading its
// row's positions [0, pos[i / H]]: contiguous shares of about equal cost, one per thread (rows at
// different points of their windows, stations and a stream's warm rows, split evenly by count
// would leave one thread waiting on the other at every layer), and a thread done with its share
// takes the items left at the back of the others' (`Shares`): the threads share the bus unevenly,
// and in the radio the encoders take one thread's core now and then (perf of `radio serve`, two
// int4 stations: a fifth of the OpenMP worker's waiting was for the other thread's attention).
// With it, that serve's two-thread chunks x1.01-1.04 faster (in turns, chunk by chunk); the
// engine alone the same (x1.005).
template <class Fn>
inline void parallel_by_position(const int64_t* pos, int64_t B, int64_t H, Fn&& fn) {
  const int64_t items = B * H;
  const int64_t threads =
      std::clamp<int64_t>(std::min<int64_t>(at::get_num_threads(), items), 1, Shares::kMax);
  if (threads == 1) {
    for (int64_t i = 0; i < items; ++i) fn(i, ItemRun{i + 1 < items ? i + 1 : -1, i, items, i == 0});
    return;
  }
  int64_t bounds[Shares::kMax + 1];  // thread t's share is [bounds[t], bounds[t + 1])
  position_bounds(pos, B, H, threads, bounds);
  Shares shares;
  for (int64_t s = 0; s < threads; ++s) shares.set(s, bounds[s], bounds[s + 1]);
  shares.run(
      threads,
      [&](int64_t i, int64_t share, bool first) {  // own items go up from the front
        const int64_t s0 = bounds[share], s1 = bounds[share + 1];
        fn(i, ItemRun{i + 1 < s1 ? i + 1 : -1, i - s0, s1 - s0, first});
      },
      [&](int64_t i, int64_t share, bool first) {  // a helper's go down from the back
        fn(i, ItemRun{i - 1 >= bounds[share] ? i - 1 : -1, 0, 0, first});
      });
}

// ---- int4 KV cache (heads of 64) --------------------------------------------------------------
// A key or value vector is 64 nibbles u = round(x / s) + 8 with its own scale s = max|x| / 7 in
// bfloat16 (quantize_q4): 32 bytes, byte r holding dims r and r + 32. A head's positions go by
// blocks of 16, each block one 1088-byte (17-line) record, the head's blocks one after another:
//
//   [0, 512)     keys [8 j][16 l][4 b]: byte 4j + b of position l
//   [512, 1024)  values [4 G][2 h][16 j][4 p]: byte 16h + j of position 4G + p
//   [1024, 1056) the keys' scales, bfloat16 [16]
//   [1056, 1088) the values' scales, bfloat16 [16]
//
// so that attention reads one sequential stream, and each dot product finds what it multiplies
// in one load (each ISA's attention.h says how it reads it). The attention goes by chunks of
// kQ4Chunk blocks with an online softmax; the softmax weights times the values' scales are
// rounded to 8 bits, a step of 1/255 of the chunk's largest, on every ISA alike.
constexpr int64_t kQ4Head = 64, kQ4Block = 16, kQ4BlockBytes = 1088;
constexpr int64_t kQ4Values = 512, kQ4KeyScales = 1024, kQ4ValueScales = 1056;
constexpr int64_t kQ4Chunk = 4;  // blocks whose scores, weights and sums go together

// Byte offsets, within its block, of key byte r (a multiple of 4) and value byte r of position
// l (l < 16).
inline int64_t q4_key_offset(int64_t l, int64_t r) { return r / 4 * 64 + l * 4; }
inline int64_t q4_value_offset(int64_t l, int64_t r) {
  return kQ4Values + (l / 4 * 2 + r / 16) * 64 + r % 16 * 4 + l % 4;
}

// The bytes of a head's first T positions (whole blocks).
inline int64_t q4_bytes(int64_t T) { return (T + kQ4Block - 1) / kQ4Block * kQ4BlockBytes; }

// How far ahead (bytes) a cached head's keys and values are prefetched while it is read. Each
// (row, head) is one or two short streams (64 KB at 1000 positions) that the hardware
// prefetcher ramps up on too late: 4 KB ahead, and both streams' first lines at once, made 24
// layers of attention over 1000 positions ~25% faster on Zen 4 (3.9 -> 2.9 ms). The best
// distance is the CPU maker's, measured end to end in turns in one process (`bench/kernel_ab.py
// --parts stream-int8,stream-int8-kv4,...`): on the Intel Xeon (AMX) 1 KB, one int8 station
// x0.966-0.978 the time of 4 KB ahead (2 KB x0.983-0.986, 512 bytes x0.974, 8 KB x0.998); on
// Zen 4 4 KB, x0.979-0.982 the time of 1 KB ahead with int8 weights (the same build against
// itself x1.000-1.006; 8 KB as 4 KB). Zen 3 ran on 4 KB; other Intel CPUs are not measured.
inline int64_t attend_prefetch_for_this_cpu() {
  __builtin_cpu_init();  // (this runs among the module's constructors)
  return __builtin_cpu_is("amd") ? 4096 : 1024;
}
// (static: each build of the kernels loaded in one process, bench/kernel_ab.py's two, its own)
static const int64_t kAttendPrefetch = attend_prefetch_for_this_cpu();

// How far ahead an int4 cache head's blocks are asked for, a line at a time beside the loads that
// read the blocks (`Q4Ahead`). Asked for a chunk (68 lines) at once, as the other caches' lines
// are, the reads and the arithmetic took turns: the attention over 1000 positions of 6 rows ran
// at the sum of its read alone and its arithmetic alone (in L2), ~18 GB/s on 2 Zen 4 cores, and
// asking further ahead in bursts gained 2-5%. A line at a time, 16 KB ahead, it runs at the read
// alone's speed (x0.68-0.72 its time on Zen 4, the AVX2 build x0.56-0.64); 8 KB x0.78, 4 KB
// x0.89. The same on Intel CPUs (not measured there: their 1 KB `kAttendPrefetch`, a line at a
// time, would ask for less ahead than the chunks did).
constexpr int64_t kAttendQ4Prefetch = 16384;

// Asks for the line `kAttendQ4Prefetch` ahead of a byte of one head's blocks, running on into
// the blocks this thread reads next (`next`, or nullptr) past the head's end.
struct Q4Ahead {
  const uint8_t* head;
  int64_t used;  // the head's bytes read (q4_bytes(T))
  const uint8_t* next;
  void operator()(int64_t at) const {
    const int64_t ahead = at + kAttendQ4Prefetch;
    if (ahead < used)
      prefetch(head + ahead);
    else if (next)
      prefetch(next + ahead - used);
  }
};

// The first lines of the first head a thread attends (each head asks for the next one's).
inline void prefetch_q4_start(const uint8_t* head, int64_t T) {
  for (int64_t line = 0; line < kAttendQ4Prefetch && line < q4_bytes(T); line += 64) prefetch(head + line);
}

// Ask, for writing, for the lines store_q4 writes at position `at` of an int4 cache head: the key
// bytes' 8, the values' 2, the scales' 1.
inline void prefetch_q4_position(uint8_t* head, int64_t at) {
  uint8_t* blk = head + at / kQ4Block * kQ4BlockBytes;
  const int64_t l = at % kQ4Block;
  for (int64_t r = 0; r < 32; r += 4) prefetch_for_write(blk + q4_key_offset(l, r));
  prefetch_for_write(blk + q4_value_offset(l, 0));
  prefetch_for_write(blk + q4_value_offset(l, 16));
  prefetch_for_write(blk + kQ4KeyScales);  // both scales' line
}

// Write one position's quantized key and value (32 bytes each, `quantize_q4`'s layout) and
// their scales' bits into its block of an int4 cache head.
inline void store_q4(uint8_t* head, int64_t at, const uint8_t* key, uint16_t key_scale,
                     const uint8_t* value, uint16_t value_scale) {
  uint8_t* blk = head + at / kQ4Block * kQ4BlockBytes;
  const int64_t l = at % kQ4Block;
  std::memcpy(blk + kQ4KeyScales + 2 * l, &key_scale, 2);
  for (int r = 0; r < 32; r += 4) std::memcpy(blk + q4_key_offset(l, r), key + r, 4);
  std::memcpy(blk + kQ4ValueScales + 2 * l, &value_scale, 2);
  for (int r = 0; r < 32; ++r) blk[q4_value_offset(l, r)] = value[r];
}

}  // namespace er
