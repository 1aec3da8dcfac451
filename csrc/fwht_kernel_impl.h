// The FWHT kernel, written once over GCC/Clang vector extensions and compiled per ISA.
//
// Include this from exactly one translation unit per ISA (fwht_portable.cc, fwht_avx2.cc, ...), each
// compiled with its own -m flags. Everything here has internal linkage, so the copies built for
// different ISAs never meet at link time.
//
// Structure (after FFHT, Andoni et al. 2015, arXiv:1509.02897, "Practical and Optimal LSH for Angular
// Distance"):
//  * the strides below one SIMD register are done with in-register shuffles (one shuffle and one
//    multiply-add by a +-1 vector per stage);
//  * the first pass also does the first log2(8) cross-register strides (log2(16) for a row of 16
//    registers, and for a row of 128 with 16 registers: row_of_128), so a row of up to 16 registers is
//    finished in one load/store, and rows that short are batched with no per-row call;
//  * later strides go in radix-8/4 passes (up to three stages per load/store) while the row is in L1 (with
//    AVX-512's 32 registers, a 256-register row takes blocks of 16 and one radix-16 pass: row_of_256);
//  * a butterfly is an add and a subtract, both on the add ports; where the CPU has FMA, the radix passes
//    issue the differences of their last stage as fma(b, -1, a) (exact) on the multiply-add ports, which
//    are otherwise idle there. Measured on Zen 3, cycles per radix-8 group of 8 registers: 12.0 all on the
//    add ports, 10.0 with the last stage's 4 differences moved, 14-16 with every difference moved (the
//    longer FMA latency then costs more than the ports gain); radix-4 passes and the first pass (whose
//    lane stages already fill the multiply-add ports) measured fastest with none moved. The column passes
//    of long rows use the same radix-8 butterflies (not measured separately).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "fwht_kernels.h"

#if defined(__FMA__) && (defined(__x86_64__) || defined(__i386__))
#define DREIDEL_FMA_DIFFERENCE 1
#else
#define DREIDEL_FMA_DIFFERENCE 0
#endif

// Loops over a compile-time number of registers must be unrolled, or the registers live on the stack.
#define DREIDEL_UNROLL _Pragma("GCC unroll 64")
// And the helpers that take registers by pointer must be inlined, or the registers go through memory: GCC
// stops inlining them on its own once a file has a few more instantiations (measured on a Xeon with AVX-512:
// butterflies<16> called out of line made rows of 2^16..2^18 1.2-1.3x slower).
#define DREIDEL_REGISTER_HELPER static inline __attribute__((always_inline))

namespace dreidel {
namespace {

template <class T, int Bytes>
struct Kernel {
  static constexpr int W = Bytes / static_cast<int>(sizeof(T));
  typedef T V __attribute__((vector_size(Bytes), aligned(sizeof(T)), __may_alias__));

  static inline V load(const T* p) { return *reinterpret_cast<const V*>(p); }
  static inline void store(T* p, V v) { *reinterpret_cast<V*>(p) = v; }
  static inline V splat(T s) { return V{} + s; }

  // Keeps the optimiser from seeing a constant, so a multiply-add by +-1 is not folded back into an add or a
  // subtract (which would move it off the multiply-add ports).
  static inline void hide_from_optimiser(V& v) {
#if DREIDEL_FMA_DIFFERENCE
    asm("" : "+v"(v));  // "v": any vector register (with AVX-512, zmm16-31 too)
#else
    (void)v;
#endif
  }

  // a - b, as fma(b, -1, a) where the CPU has FMA (see the header comment).
  static inline V difference_on_fma_ports(V a, V b) {
#if DREIDEL_FMA_DIFFERENCE
    V minus_one = splat(T(-1));
    hide_from_optimiser(minus_one);
    return b * minus_one + a;
#else
    return a - b;
#endif
  }

  template <bool FmaDifference>
  DREIDEL_REGISTER_HELPER void butterfly(V& a, V& b) {
    const V sum = a + b;
    const V difference = FmaDifference ? difference_on_fma_ports(a, b) : a - b;
    a = sum;
    b = difference;
  }

  // One butterfly stage at lane stride S inside a register: lane i pairs with lane i ^ S.
  template <int S, std::size_t... I>
  DREIDEL_REGISTER_HELPER V lane_stage(V v, std::index_sequence<I...>) {
    const V partner = __builtin_shufflevector(v, v, (static_cast<int>(I) ^ S)...);
    const V sign = {((static_cast<int>(I) & S) ? T(-1) : T(1))...};
    // lower lane: x_i + x_{i+S}; upper lane: x_{i-S} - x_i, the same operations as the scalar butterfly.
    return partner + v * sign;
  }

  // The in-register stages at lane strides below `limit` (all of them by default).
  DREIDEL_REGISTER_HELPER V lane_stages(V v, int limit = W) {
    constexpr auto lanes = std::make_index_sequence<W>{};
    if constexpr (W >= 2) if (limit > 1) v = lane_stage<1>(v, lanes);
    if constexpr (W >= 4) if (limit > 2) v = lane_stage<2>(v, lanes);
    if constexpr (W >= 8) if (limit > 4) v = lane_stage<4>(v, lanes);
    if constexpr (W >= 16) if (limit > 8) v = lane_stage<8>(v, lanes);
    return v;
  }

  // log2(R) butterfly stages across R registers held in `r`; with FmaLast, the last stage's differences go
  // to the multiply-add ports.
  template <int R, bool FmaLast, int H = 1>
  DREIDEL_REGISTER_HELPER void butterflies(V* r) {
    if constexpr (H < R) {
      DREIDEL_UNROLL
      for (int i = 0; i < R; i += 2 * H) {
        DREIDEL_UNROLL
        for (int j = i; j < i + H; ++j) butterfly<FmaLast && 2 * H == R>(r[j], r[j + H]);
      }
      butterflies<R, FmaLast, 2 * H>(r);
    }
  }

  // The lane stage at stride S in each of G registers.
  template <int S, int G>
  DREIDEL_REGISTER_HELPER void lane_stage_all(V* r) {
    if constexpr (S < W) {
      DREIDEL_UNROLL
      for (int g = 0; g < G; ++g) r[g] = lane_stage<S>(r[g], std::make_index_sequence<W>{});
    }
  }

  // Each of the G registers in r times scale, if Scaled. Every transform scales its sums, after its last
  // stage, as fwht_reference does: scaling the inputs instead shrank subnormal values before they were
  // summed, which cost them bits (float32 inputs of 1e-40: 109x the reference's error at n = 4096).
  template <bool Scaled, int G>
  DREIDEL_REGISTER_HELPER void scale_all(V* r, V scale) {
    if constexpr (Scaled) {
      DREIDEL_UNROLL
      for (int g = 0; g < G; ++g) r[g] = r[g] * scale;
    }
  }

  // G consecutive registers (G * W values): log2(G) cross-register stages, then the in-lane stages at
  // strides below LaneLimit, one stride at a time across all G registers (that order measured 8% faster on
  // Zen 3 than in-lane stages register by register first: 26.5 against 28.9 cycles for 8 registers), then
  // the scale.
  template <int G, bool Scaled, int LaneLimit = W>
  static inline void block(const T* src, T* dst, V scale) {
    V r[G];
    DREIDEL_UNROLL
    for (int g = 0; g < G; ++g) r[g] = load(src + g * W);
    butterflies<G, false>(r);
    if constexpr (LaneLimit > 1) lane_stage_all<1, G>(r);
    if constexpr (LaneLimit > 2) lane_stage_all<2, G>(r);
    if constexpr (LaneLimit > 4) lane_stage_all<4, G>(r);
    if constexpr (LaneLimit > 8) lane_stage_all<8, G>(r);
    scale_all<Scaled, G>(r, scale);
    DREIDEL_UNROLL
    for (int g = 0; g < G; ++g) store(dst + g * W, r[g]);
  }

  // Stages at register strides s, 2s, ..., (R/2)s over a row of nvec registers, in place (the last stage's
  // differences on the multiply-add ports if FmaLast), the lane stage at stride Lane (none if 0; with
  // LaneStages 2 those at Lane and 2 Lane), then the scale if Scaled (the row's last pass). `slot()` is
  // called before each group of R registers: a prefetch spread over the pass issues its next share there.
  // (Slots are taken by value, their state in registers: a slot taken by reference kept its pointer in
  // memory, loaded and stored at every group, where radix_pass is not inlined.)
  template <int R, class Slot, int Lane = 0, bool Scaled = false, int LaneStages = 1, bool FmaLast = R == 8>
  static void radix_pass(T* x, int64_t nvec, int64_t s, Slot slot, V scale = V{}) {
    for (int64_t base = 0; base < nvec; base += R * s)
      for (int64_t j = base; j < base + s; ++j) {
        slot();
        V r[R];
        DREIDEL_UNROLL
        for (int i = 0; i < R; ++i) r[i] = load(x + (j + i * s) * W);
        butterflies<R, FmaLast>(r);
        if constexpr (Lane > 0) lane_stage_all<Lane, R>(r);
        if constexpr (Lane > 0 && LaneStages > 1) lane_stage_all<2 * Lane, R>(r);
        scale_all<Scaled, R>(r, scale);
        DREIDEL_UNROLL
        for (int i = 0; i < R; ++i) store(x + (j + i * s) * W, r[i]);
      }
  }

  // A radix pass (with the lane stage at stride Lane, and the scale if Scaled) that prefetches a line per
  // group from `prefetch` on (advanced past them), up to `end`.
  template <int R, int Lane, bool Scaled>
  static void radix_pass_prefetching(T* x, int64_t nvec, int64_t s, const char*& prefetch, const char* end,
                                     V scale) {
    auto none = [] {};
    if (prefetch < end) {
      auto line_per_group = [line = prefetch]() mutable {
        __builtin_prefetch(line, 1, 3);
        line += 64;
      };
      radix_pass<R, decltype(line_per_group), Lane, Scaled>(x, nvec, s, line_per_group, scale);
      prefetch += 64 * (nvec / R);
    } else {
      radix_pass<R, decltype(none), Lane, Scaled>(x, nvec, s, none, scale);
    }
  }

  template <int Lane, bool Scaled = false>
  static void radix_pass_prefetching(int radix, T* x, int64_t nvec, int64_t s, const char*& prefetch,
                                     const char* end, V scale = V{}) {
    switch (radix) {
      case 8: return radix_pass_prefetching<8, Lane, Scaled>(x, nvec, s, prefetch, end, scale);
      case 4: return radix_pass_prefetching<4, Lane, Scaled>(x, nvec, s, prefetch, end, scale);
      default: return radix_pass_prefetching<2, Lane, Scaled>(x, nvec, s, prefetch, end, scale);
    }
  }

  // The radices of the passes after the first (which covers register strides 1..4): as few passes as
  // radix 8 allows, the stages spread evenly over them (measured on a 1024-point AVX2 row, which now takes
  // row_of_128: two radix-4 passes, 16.7 cycles per 8 registers on Zen 3, against 18.1 for one radix-16
  // pass, which spills registers, and 17.9 for radix 8 then 2).
  static int later_radices(int64_t nvec, int* radices) {
    int bits = 0;
    while ((int64_t(8) << bits) < nvec) ++bits;
    const int passes = (bits + 2) / 3;
    for (int p = 0; p < passes; ++p) {
      const int stages = (bits + passes - 1 - p) / passes;  // larger shares first
      radices[p] = 1 << stages;
    }
    return passes;
  }

  // A row of nvec > 16 registers: blocks of 8, then radix passes while the row is in L1. Meanwhile `next`
  // (the next row, or nullptr) is prefetched, since the hardware prefetcher does not run ahead while a row
  // is worked on in L1. Rows of up to kBurstPrefetchBytes prefetch the whole next row during the first pass;
  // longer ones prefetch half of it then, and the rest a line per group of the later passes (the last such
  // pass may run into the row after it). Spread like that, the prefetches of a long row overlap the
  // arithmetic instead of filling the core's miss buffers: on Zen 3, 4096-point rows streamed from memory
  // ran 5-11% faster, 2048-point rows 1-9%, while 1024-point rows ran faster with the burst.
  static constexpr int64_t kBurstPrefetchBytes = 4096;

  template <bool Scaled>
  static void long_row(const T* src, T* dst, int64_t nvec, V scale, const T* next) {
    constexpr int64_t block_bytes = 8 * W * int64_t(sizeof(T));
    const int64_t row_bytes = nvec * W * int64_t(sizeof(T));
    const int64_t lines_per_block = row_bytes <= kBurstPrefetchBytes ? block_bytes / 64 : (block_bytes / 64 + 1) / 2;
    const char* prefetch = reinterpret_cast<const char*>(next);
    const char* const prefetch_end = next == nullptr ? nullptr : prefetch + row_bytes;
    int radices[32];
    const int passes = later_radices(nvec, radices);
    // kLaneStagesSpread: the lane stages at strides W / 4 and W / 2 move to the last two passes (a row of more
    // than 4 KB has at least 256 registers of 8 float32, so two later passes).
    const bool lanes_spread = kLaneStagesSpread && row_bytes > kBurstPrefetchBytes && passes >= 2;
    for (int64_t v0 = 0; v0 < nvec; v0 += 8) {
      if (prefetch != nullptr) {
        for (int64_t l = 0; l < lines_per_block; ++l) __builtin_prefetch(prefetch + 64 * l, 1, 3);
        prefetch += 64 * lines_per_block;
      }
      if (lanes_spread) block<8, false, W / 4>(src + v0 * W, dst + v0 * W, scale);
      else block<8, false>(src + v0 * W, dst + v0 * W, scale);
    }
    int64_t s = 8;
    for (int p = 0; p < passes; ++p) {
      if (p == passes - 1 && prefetch != nullptr) {
        // What the last pass's line per group will not reach (16 KB rows on AVX-512) is requested now.
        for (const char* line = prefetch + 64 * (nvec / radices[p]); line < prefetch_end; line += 64)
          __builtin_prefetch(line, 1, 3);
      }
      // The last pass scales (see scale_all).
      if (lanes_spread && p == passes - 1)
        radix_pass_prefetching<W / 2, Scaled>(radices[p], dst, nvec, s, prefetch, prefetch_end, scale);
      else if (lanes_spread && p == passes - 2)
        radix_pass_prefetching<W / 4>(radices[p], dst, nvec, s, prefetch, prefetch_end);
      else if (p == passes - 1)
        radix_pass_prefetching<0, Scaled>(radices[p], dst, nvec, s, prefetch, prefetch_end, scale);
      else
        radix_pass_prefetching<0>(radices[p], dst, nvec, s, prefetch, prefetch_end);
      s *= radices[p];
    }
  }

  // Vector registers the ISA has: 32 with AVX-512, 16 with AVX2 and the 16-byte ISAs.
  static constexpr int kRegisters = Bytes == 64 ? 32 : 16;

  // With 16 registers and 8 lanes (AVX2, float32), long_row's first pass on a row longer than
  // kBurstPrefetchBytes leaves the lane stages at the two largest strides to its later passes (the largest
  // to the last pass, the next to the one before it). The first pass, whose lane stages are a shuffle and a
  // multiply-add each, is the slowest pass per register; the radix passes wait on their stores (one per
  // register and pass) and have arithmetic to spare.
  // Measured on Zen 3, 4096-point rows: 1.63-1.64 ns per register in L1 against 1.84-1.86 (1.70 with the
  // largest stride alone moved), 1.05-1.08x from memory; 2048-point rows 1.0-1.1x. Rows of up to 4 KB, whose
  // first pass also prefetches the whole next row, ran up to 1.15x slower from memory (1024 points), and
  // with 4 lanes (AVX2 float64, SSE2 float32) the change measured within noise: both keep every lane stage
  // in the first pass.
  static constexpr bool kLaneStagesSpread = kRegisters < 32 && W == 8;

  // A row of exactly 256 registers where the ISA has 32 of them (AVX-512: 4096 float32 or 2048 float64, the
  // 16 KB leaves of every longer row): a first pass over blocks of 16 registers (four register stages, then
  // the lane stages), then one radix-16 pass, which holds its 16 registers without spilling: two passes
  // over L1 instead of long_row's three. `slot()` is called before each block and each group, kLeafSlots
  // times in all, so a prefetch spreads evenly over the row: the next row's, 8 lines a slot (with
  // long_row's catch-up before the last pass, 112 lines at once, the same passes ran 0.88-0.91x from
  // memory), or a strip's (leaf_prefetching_strip). Measured on a Xeon with AVX-512, A/B against long_row
  // in one process: float32, 9.3 against 9.7 cycles per register in L1; from memory, 1024 rows of 4096
  // 1.06x at 1 and at 2 threads, 64 rows of 2^16 (leaves) 1.04-1.05x, a 2^24 row 1.00-1.01x; float64,
  // 2048-point rows 1.01-1.11x, rows of 2^16 and 2^23 1.02-1.05x. 16-register first blocks measured slower
  // at the other lengths (float32 2^9: 0.92-0.97x, 2^11: 0.88-0.90x), which keep long_row.
  // The lane stages at the two largest strides (W / 4, W / 2) go to the radix-16 pass, and that pass's last
  // differences to the multiply-add ports: on Zen 4, which runs a 512-bit op as two 256-bit halves, a pass
  // over L1 costs about 4 cycles per register in loads and stores alone, and the first pass, with all four
  // lane stages (a shuffle and a multiply-add each), took about twice that. A/B in one process on an AMD
  // EPYC (Zen 4, AVX-512), float32, 1 thread: 16 rows of 4096 in L2 1.05x, 1024 rows from memory
  // 1.02-1.12x, 16 rows of 2^16 1.05-1.11x, the 2^24 row 0.96-1.06x (noise of a shared machine); a
  // standalone loop over one 16 KB row in L1 about 2700 against 3000 cycles. Not measured on a Xeon.
  static constexpr int64_t kLeafRegisters = 256, kLeafBlock = 16;
  static constexpr int64_t kLeafSlots = 2 * kLeafRegisters / kLeafBlock;

  template <bool Scaled, class Slot>
  static void row_of_256(const T* src, T* dst, V scale, Slot slot) {
    for (int64_t v0 = 0; v0 < kLeafRegisters; v0 += kLeafBlock) {
      slot();
      block<kLeafBlock, false, W / 4>(src + v0 * W, dst + v0 * W, scale);
    }
    radix_pass<kLeafBlock, Slot, W / 4, Scaled, 2, true>(dst, kLeafRegisters, kLeafBlock, slot, scale);
  }

  // The next row is prefetched into L2, not L1: with a 32 KB L1 (Zen 3 and 4), the row being worked on and
  // the next would fill it. A/B in one process on Zen 4 (AMD EPYC, AVX-512), float32, 1 thread: 1024 rows of
  // 4096 1.08-1.21x faster, the 2^24 row (whose leaves these are) 1.13-1.18x, 16 rows of 4096 repeated in L2
  // 0.88-1.01x. Not measured on a Xeon (48 KB L1), where the next row fitted in L1.
  template <bool Scaled>
  static void row_of_256_prefetching_next(const T* src, T* dst, V scale, const T* next) {
    constexpr int kLines = kLeafRegisters * W * int(sizeof(T)) / 64 / kLeafSlots;
    if (next == nullptr) return row_of_256<Scaled>(src, dst, scale, [] {});
    row_of_256<Scaled>(src, dst, scale, [line = reinterpret_cast<const char*>(next)]() mutable {
      DREIDEL_UNROLL
      for (int l = 0; l < kLines; ++l) __builtin_prefetch(line + 64 * l, 1, 2);
      line += 64 * kLines;
    });
  }

  // A row of exactly 128 registers where the ISA has 16 of them (AVX2: 1024 float32 or 512 float64; the
  // 16-byte portable build: 512 float32 or 256 float64): blocks of 16 registers (four register stages,
  // spilling a few values, then the lane stages), then one radix-8 pass: two passes over L1 instead of
  // long_row's three (8, 4, 4). The next row is prefetched whole during the first pass, as long_row does for
  // rows of up to kBurstPrefetchBytes. Measured on Zen 3, A/B against long_row in one process, 1 thread:
  // AVX2 float32 1024-point rows 1.08-1.09x from memory (16 MB), 1.07x in L2; AVX2 float64 512-point rows
  // 1.09x from memory, 1.02x in L2; the portable build's 512-point float32 rows 1.12x from memory, 1.02x in
  // L2. (A 4096-point AVX2 row with 16-register blocks keeps three passes, 16 + 8 + 4, and measured 1.01x: it
  // keeps long_row.)
  static constexpr int64_t kRowOf128Block = 16;

  template <bool Scaled>
  static void row_of_128(const T* src, T* dst, V scale, const T* next) {
    constexpr int kLinesPerBlock = kRowOf128Block * Bytes / 64;
    const char* prefetch = reinterpret_cast<const char*>(next);
    for (int64_t v0 = 0; v0 < 128; v0 += kRowOf128Block) {
      if (prefetch != nullptr) {
        DREIDEL_UNROLL
        for (int l = 0; l < kLinesPerBlock; ++l) __builtin_prefetch(prefetch + 64 * l, 1, 3);
        prefetch += 64 * kLinesPerBlock;
      }
      block<kRowOf128Block, false>(src + v0 * W, dst + v0 * W, scale);
    }
    auto none = [] {};
    radix_pass<8, decltype(none), 0, Scaled>(dst, 128, kRowOf128Block, none, scale);
  }

  // A slot callable (see row_of_256) that prefetches into L2, spread evenly over kLeafSlots calls, every line
  // the `count` rows of `width` values spaced `stride` apart at `start` touch (nullptr: none), for writing if
  // Write. From the line each row's start falls in (a misaligned buffer): the rows share that offset, since
  // their stride (a leaf) is a multiple of 64 bytes.
  template <int Write>
  static auto spread_prefetch(const T* start, int64_t count, int64_t stride, int64_t width) {
    const int64_t misalignment = int64_t(reinterpret_cast<uintptr_t>(start) % 64);
    const int64_t row_span = (misalignment + width * int64_t(sizeof(T)) + 63) / 64 * 64;
    const int64_t stride_bytes = stride * int64_t(sizeof(T));
    const int64_t lines = start == nullptr ? 0 : count * (row_span / 64);
    return [=, row = reinterpret_cast<const char*>(start) - misalignment, column = int64_t(0), issued = int64_t(0),
            slots = int64_t(0)]() mutable {
      for (const int64_t until = ++slots * lines / kLeafSlots; issued < until; ++issued) {
        __builtin_prefetch(row + column, Write, 1);
        column += 64;
        if (column >= row_span) {
          column = 0;
          row += stride_bytes;
        }
      }
    };
  }

  // A row of 256 registers (a 16 KB leaf) in place at x, scaled, while the strip of `count` rows of `width`
  // values spaced `stride` apart at `strip` (nullptr: none) is prefetched into L2 for reading, spread evenly
  // over the row's slots: the pipelined pass gathers that strip from memory next (see blocks_pipelined in
  // fwht.cc, which gives the figures). A burst of prefetches from memory before the row would fill the core's
  // miss buffers, and the row's own loads would then wait behind them. The same strip at `strip_out` (the
  // gather's destination, out of place, in no cache yet; nullptr: none) is prefetched for writing as well:
  // otherwise each of the gather's stores waits for its line to come from memory.
  static void leaf_prefetching_strip(T* x, T scale, const T* strip, T* strip_out, int64_t count, int64_t stride,
                                     int64_t width) {
    auto read = spread_prefetch<0>(strip, count, stride, width);
    if (strip_out == nullptr) {
      if (scale == T(1)) return row_of_256<false>(x, x, splat(scale), read);
      return row_of_256<true>(x, x, splat(scale), read);
    }
    const auto read_and_write = [read, write = spread_prefetch<1>(strip_out, count, stride, width)]() mutable {
      read();
      write();
    };
    if (scale == T(1)) return row_of_256<false>(x, x, splat(scale), read_and_write);
    return row_of_256<true>(x, x, splat(scale), read_and_write);
  }

  // See FwhtKernels::leaves_crossing: a pass across 8 rows in L2 (the stages across a group of 8 leaves of a
  // long row) runs beside the arithmetic of the next group's leaves instead of on its own. The leaves wait on
  // the vector ports (about 94 % of their bound on a Xeon with AVX-512), the pass on the traffic between L1
  // and L2 (about 3.9 cycles per register there, against 1.5 of arithmetic): side by side, each fills the
  // other's idle time. Each slot of a leaf (row_of_256) prefetches its share of the next leaf, as
  // row_of_256_prefetching_next does, then crosses its share of the columns.
  static void leaves_crossing(const T* src, T* dst, int64_t rows, const T* after, T* cross, int64_t stride,
                              int64_t width) {
    constexpr int kLines = kLeafRegisters * W * int(sizeof(T)) / 64 / kLeafSlots;
    constexpr int64_t leaf = kLeafRegisters * W;
    const int64_t chunks = width / W, slots = rows * kLeafSlots;
    int64_t slot = 0, done = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const T* next = r + 1 < rows ? src + (r + 1) * leaf : after;
      const char* line = reinterpret_cast<const char*>(next);
      row_of_256<false>(src + r * leaf, dst + r * leaf, V{}, [&]() {
        if (line != nullptr) {
          DREIDEL_UNROLL
          for (int l = 0; l < kLines; ++l) __builtin_prefetch(line + 64 * l, 1, 2);
          line += 64 * kLines;
        }
        for (const int64_t until = ++slot * chunks / slots; done < until; ++done) {
          T* const at = cross + done * W;
          columns<8, false>(at, stride, at, stride, W, V{});
        }
      });
    }
  }

  // The entries in the table: only where a 16 KB leaf is a row_of_256.
  static constexpr auto leaf_prefetching_strip_entry() {
    if constexpr (kRegisters >= 32 && kLeafRegisters * Bytes == 16384) return &leaf_prefetching_strip;
    else return static_cast<decltype(&leaf_prefetching_strip)>(nullptr);
  }

  static constexpr auto leaves_crossing_entry() {
    if constexpr (kRegisters >= 32 && kLeafRegisters * Bytes == 16384) return &leaves_crossing;
    else return static_cast<decltype(&leaves_crossing)>(nullptr);
  }

  static void scalar_rows(const T* src, T* dst, int64_t rows, int64_t len, T scale) {
    for (int64_t r = 0; r < rows; ++r, src += len, dst += len) {
      for (int64_t i = 0; i < len; ++i) dst[i] = src[i];
      for (int64_t h = 1; h < len; h <<= 1)
        for (int64_t i = 0; i < len; i += 2 * h)
          for (int64_t j = i; j < i + h; ++j) {
            const T a = dst[j], b = dst[j + h];
            dst[j] = a + b;
            dst[j + h] = a - b;
          }
      if (scale != T(1))
        for (int64_t i = 0; i < len; ++i) dst[i] *= scale;
    }
  }

  // The loops over rows in rows_pow2 prefetch this far ahead: a row's arithmetic is a long dependency chain,
  // so the hardware prefetcher alone leaves the memory bus idle part of the time. (A prefetch past the end
  // of the buffer never faults; at most it fetches a few lines the call does not use.)
  static constexpr int64_t kPrefetchBytes = 4096;

  // Rows shorter than a register: one register holds W / len whole rows, and the lane stages below len
  // never mix two rows. One prefetch per cache line, as block_rows: measured on a Xeon with AVX-512, A/B
  // against none, 2^20 rows of 8 float32 (32 MB, partly in the L3) 1.25-1.30x faster at 1 thread and
  // 1.30-1.32x at 2, 2^22 rows of 4 1.15x at 1 and 1.15-1.18x at 2; in L2, no slower.
  template <bool Scaled>
  static void short_rows(const T* src, T* dst, int64_t rows, int64_t len, V scale) {
    constexpr int64_t registers_per_line = Bytes >= 64 ? 1 : 64 / Bytes;
    const int64_t full = rows * len / W;
    for (int64_t v = 0; v < full; ++v) {
      if (v % registers_per_line == 0)
        __builtin_prefetch(reinterpret_cast<const char*>(src + v * W) + kPrefetchBytes, 1, 3);
      V x = lane_stages(load(src + v * W), static_cast<int>(len));
      if constexpr (Scaled) x = x * scale;
      store(dst + v * W, x);
    }
    const int64_t done = full * W / len;
    scalar_rows(src + done * len, dst + done * len, rows - done, len, scale[0]);
  }

  // Rows of G registers, one block each, prefetching kPrefetchBytes ahead (see short_rows).
  template <int G, bool Scaled>
  static void block_rows(const T* src, T* dst, int64_t rows, V scale) {
    constexpr int64_t row_bytes = G * W * int64_t(sizeof(T));
    for (int64_t r = 0; r < rows; ++r) {
      const char* ahead = reinterpret_cast<const char*>(src + r * G * W) + kPrefetchBytes;
      DREIDEL_UNROLL
      for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(ahead + b, 1, 3);
      block<G, Scaled>(src + r * G * W, dst + r * G * W, scale);
    }
  }

  template <bool Scaled>
  static void rows_pow2_impl(const T* src, T* dst, int64_t rows, int64_t len, T scale, const T* after) {
    const V sv = splat(scale);
    if (len < W) return short_rows<Scaled>(src, dst, rows, len, sv);
    const int64_t nvec = len / W;
    // Rows of up to 16 registers are one block each, in one pass. (16 registers spill a few values, but
    // measured on Zen 3 that beat two blocks of 8 and a radix-2 pass by 1.12-1.26x on 128-point rows and
    // 1.17-1.24x on 1536 = 12 x 128-point rows streamed from memory.)
    switch (nvec) {
      case 1: return block_rows<1, Scaled>(src, dst, rows, sv);
      case 2: return block_rows<2, Scaled>(src, dst, rows, sv);
      case 4: return block_rows<4, Scaled>(src, dst, rows, sv);
      case 8: return block_rows<8, Scaled>(src, dst, rows, sv);
      case 16: return block_rows<16, Scaled>(src, dst, rows, sv);
      default: {
        // The row prefetched is at least kPrefetchBytes ahead (256-point rows: 1.10x from memory, A/B on
        // Zen 3; longer rows prefetch the next one); the last rows prefetch from `after` on, if given (up to
        // kPrefetchBytes past it, so `after` must start at least that much of this thread's input).
        const int64_t ahead = std::max<int64_t>(1, kPrefetchBytes / (len * int64_t(sizeof(T))));
        for (int64_t r = 0; r < rows; ++r) {
          const T* next = r + ahead < rows ? src + (r + ahead) * len
                          : after != nullptr ? after + (r + ahead - rows) * len
                                             : nullptr;
          if constexpr (kRegisters >= 32) {
            if (nvec == kLeafRegisters) {
              row_of_256_prefetching_next<Scaled>(src + r * len, dst + r * len, sv, next);
              continue;
            }
          } else if (nvec == 128) {
            row_of_128<Scaled>(src + r * len, dst + r * len, sv, next);
            continue;
          }
          long_row<Scaled>(src + r * len, dst + r * len, nvec, sv, next);
        }
      }
    }
  }

  static void rows_pow2(const T* src, T* dst, int64_t rows, int64_t len, T scale, const T* after) {
    if (scale == T(1)) return rows_pow2_impl<false>(src, dst, rows, len, scale, after);
    rows_pow2_impl<true>(src, dst, rows, len, scale, after);
  }

  // ---- the H_m factor ----

  // Paley II form: for pairs (u_b, v_b) = (chunk 2b, chunk 2b+1), s_b = u_b + v_b, d_b = u_b - v_b, and
  // out_{2a} = s_a + sum_b C_ab d_b, out_{2a+1} = d_a - sum_b C_ab s_b (C has a zero diagonal), for the
  // columns [begin, end), times scale if Scaled. add_term(a, b, s_b, d_b, even, odd) adds the term of C_ab
  // (b != a) to both.
  template <int P, bool Scaled, class AddTerm>
  static inline void mix_paley_columns(T* x, int64_t chunk, int64_t begin, int64_t end, V scale,
                                       AddTerm add_term) {
    for (int64_t c = begin; c < end; c += W) {
      V s[P], d[P];
      DREIDEL_UNROLL
      for (int b = 0; b < P; ++b) {
        const V u = load(x + (2 * b) * chunk + c), v = load(x + (2 * b + 1) * chunk + c);
        s[b] = u + v;
        d[b] = u - v;
      }
      DREIDEL_UNROLL
      for (int a = 0; a < P; ++a) {
        V even = s[a], odd = d[a];
        DREIDEL_UNROLL
        for (int b = 0; b < P; ++b)
          if (b != a) add_term(a, b, s[b], d[b], even, odd);
        if constexpr (Scaled) {
          even = even * scale;
          odd = odd * scale;
        }
        store(x + (2 * a) * chunk + c, even);
        store(x + (2 * a + 1) * chunk + c, odd);
      }
    }
  }

  // C from the caller's matrix: every term a multiply-add by C_ab.
  template <int P, bool Scaled>
  static void mix_paley(T* x, int64_t chunk, const T* conference, int64_t begin, int64_t end, V scale) {
    mix_paley_columns<P, Scaled>(x, chunk, begin, end, scale, [conference](int a, int b, V s, V d, V& even, V& odd) {
      const V cab = splat(conference[a * P + b]);
      even += d * cab;
      odd -= s * cab;
    });
  }

  // C the quadratic-residue conference matrix of the prime P - 1, its signs known at compile time (the
  // loops are unrolled): (P - 2) / 2 of the P - 1 terms of each output are plain adds or subtracts (add
  // ports), the others multiply-adds by +-1 (FMA ports), which balances the two kinds of port; mix_paley
  // puts every term on the FMA ports. Measured on Zen 3, cycles per register of the mix (chunks of 32):
  // m = 12: 3.85 generic, 2.86 here; m = 28: 12.9 generic, 9.0 here (1, 2 or 3 add terms of 5 at m = 12
  // measured alike).
  template <int P, bool Scaled>
  static void mix_paley_quadratic_residue(T* x, int64_t chunk, int64_t begin, int64_t end, V scale) {
    V plus = splat(T(1)), minus = splat(T(-1));
    hide_from_optimiser(plus);
    hide_from_optimiser(minus);
    mix_paley_columns<P, Scaled>(x, chunk, begin, end, scale, [plus, minus](int a, int b, V s, V d, V& even, V& odd) {
      const bool positive = paley_conference_sign(P - 1, a, b) > 0;
      const int term = b < a ? b : b - 1;  // b's place among the P - 1 terms of output a
      if (term < (P - 2) / 2) {
        even = positive ? even + d : even - d;
        odd = positive ? odd - s : odd + s;
      } else {
        even = d * (positive ? plus : minus) + even;
        odd = s * (positive ? minus : plus) + odd;
      }
    });
  }

  template <int M, bool Scaled>
  static void mix_dense(T* x, int64_t chunk, const T* h, int64_t begin, int64_t end, V scale) {
    for (int64_t c = begin; c < end; c += W) {
      V in[M];
      DREIDEL_UNROLL
      for (int a = 0; a < M; ++a) in[a] = load(x + a * chunk + c);
      DREIDEL_UNROLL
      for (int a = 0; a < M; ++a) {
        V acc = in[0] * h[a * M];
        DREIDEL_UNROLL
        for (int b = 1; b < M; ++b) acc += in[b] * h[a * M + b];
        if constexpr (Scaled) acc = acc * scale;
        store(x + a * chunk + c, acc);
      }
    }
  }

  // The dense mix one value at a time, each output then scaled by `scale`. float32 sums are accumulated in
  // double and rounded once: this mix runs with at most 3 stages before it (chunks shorter than a register),
  // so its own roundings dominate the error, and with m - 1 of them in float32 a row of 20 alternating
  // values measured 3x the reference's error.
  static void mix_scalar(T* x, int m, int64_t chunk, const T* h, int64_t begin, int64_t end, T scale) {
    using Sum = std::conditional_t<std::is_same_v<T, float>, double, T>;
    T in[32];
    for (int64_t c = begin; c < end; ++c) {
      for (int a = 0; a < m; ++a) in[a] = x[a * chunk + c];
      for (int a = 0; a < m; ++a) {
        Sum acc = Sum(in[0]) * Sum(h[a * m]);
        for (int b = 1; b < m; ++b) acc += Sum(in[b]) * Sum(h[a * m + b]);
        x[a * chunk + c] = static_cast<T>(acc * Sum(scale));
      }
    }
  }

  // Whether mix_chunks mixes the columns [begin, end) one value at a time (they are not whole registers).
  static bool mixes_scalar(int64_t chunk, int64_t begin, int64_t end) {
    return chunk % W != 0 || begin % W != 0 || (end - begin) % W != 0;
  }

  template <bool Scaled>
  static void mix_chunks_impl(T* x, int64_t chunk, const MixPlan<T>& plan, int64_t begin, int64_t end, T scale) {
    const int m = plan.m;
    const V sv = splat(scale);
    if (plan.paley && plan.quadratic_residue) {
      switch (plan.pairs) {
        case 6: return mix_paley_quadratic_residue<6, Scaled>(x, chunk, begin, end, sv);
        case 14: return mix_paley_quadratic_residue<14, Scaled>(x, chunk, begin, end, sv);
        default: break;
      }
    }
    if (plan.paley) {
      switch (plan.pairs) {
        case 6: return mix_paley<6, Scaled>(x, chunk, plan.conference, begin, end, sv);
        case 10: return mix_paley<10, Scaled>(x, chunk, plan.conference, begin, end, sv);
        case 14: return mix_paley<14, Scaled>(x, chunk, plan.conference, begin, end, sv);
        default: break;
      }
    }
    switch (m) {
      case 12: return mix_dense<12, Scaled>(x, chunk, plan.dense, begin, end, sv);
      case 20: return mix_dense<20, Scaled>(x, chunk, plan.dense, begin, end, sv);
      case 28: return mix_dense<28, Scaled>(x, chunk, plan.dense, begin, end, sv);
      default: return mix_scalar(x, m, chunk, plan.dense, begin, end, scale);
    }
  }

  // The mix as the last step of a transform: its sums are scaled (see scale_all).
  static void mix_chunks(T* x, int64_t chunk, const MixPlan<T>& plan, int64_t begin, int64_t end, T scale) {
    if (mixes_scalar(chunk, begin, end)) return mix_scalar(x, plan.m, chunk, plan.dense, begin, end, scale);
    if (scale == T(1)) return mix_chunks_impl<false>(x, chunk, plan, begin, end, scale);
    mix_chunks_impl<true>(x, chunk, plan, begin, end, scale);
  }

  static void rows_hadamard(const T* src, T* dst, int64_t rows, int64_t chunk, const MixPlan<T>& plan,
                            T scale, const T* after) {
    const int64_t n = plan.m * chunk;
    for (int64_t r = 0; r < rows; ++r) {
      // The m chunks of one row are m contiguous rows of the power-of-two transform; then H_m mixes them
      // while the row is still in L1, and scales the sums. The last chunks prefetch the next row (chunks of
      // up to 4 KB: the next row's first chunks; without that, 1.1-1.2x slower at m = 12 on AVX2 and
      // portable builds).
      const T* next = r + 1 < rows ? src + (r + 1) * n : after;
      if (plan.m == 1) {
        rows_pow2(src + r * n, dst + r * n, 1, chunk, scale, next);
        continue;
      }
      rows_pow2(src + r * n, dst + r * n, plan.m, chunk, T(1), next);
      mix_chunks(dst + r * n, chunk, plan, 0, chunk, scale);
    }
  }

  // ---- the outer factor of a long row ----

  // H_R across the R rows in + i * in_step, written to out + i * out_step, over `width` columns. Rows are
  // addressed as base + i * step (not through an array of row pointers: with 2R pointers live, GCC kept some
  // on the stack and reloaded them in the inner loop, and on Zen 3 a radix-8 pass over 8 MB in the L3 then
  // took 2.2 ms per 64 MB against 1.2 ms written this way; 0.45 against 0.39 ns per register in L1).
  template <int R, bool Scaled>
  DREIDEL_REGISTER_HELPER void columns(const T* in, int64_t in_step, T* out, int64_t out_step, int64_t width,
                                       V scale) {
    for (int64_t c = 0; c < width; c += W) {
      V r[R];
      DREIDEL_UNROLL
      for (int i = 0; i < R; ++i) r[i] = load(in + i * in_step + c);
      butterflies<R, R == 8>(r);
      scale_all<Scaled, R>(r, scale);
      DREIDEL_UNROLL
      for (int i = 0; i < R; ++i) store(out + i * out_step + c, r[i]);
    }
  }

  // Stages at row strides s, ..., (R/2)s of `count` rows, `width` columns each, read from `in` and
  // written to `out` (which may be `in`), times scale if Scaled; every group reads all its rows before
  // writing them. No software
  // prefetch: each row is walked front to back, R sequential streams the hardware prefetcher follows (on
  // Zen 3, prefetching the next strip line for line made a radix-8 pass over a 64 MB row 1.3x slower, and
  // whole 2^22..2^24 rows 1.16-1.20x slower).
  template <int R, bool Scaled>
  static void column_pass(const T* in, int64_t in_stride, T* out, int64_t out_stride, int64_t count,
                          int64_t width, int64_t s, V scale) {
    const int64_t in_step = s * in_stride, out_step = s * out_stride;
    for (int64_t base = 0; base < count; base += R * s)
      for (int64_t j = base; j < base + s; ++j) {
        const T* rows_in = in + j * in_stride;
        T* rows_out = out + j * out_stride;
        // In place (every pass but the gathers and scatters of a scratch strip), one base and one step
        // serve both sides, in half the registers.
        if (rows_in == rows_out && in_step == out_step)
          columns<R, Scaled>(rows_out, out_step, rows_out, out_step, width, scale);
        else
          columns<R, Scaled>(rows_in, in_step, rows_out, out_step, width, scale);
      }
  }

  template <bool Scaled>
  static void column_pass_any(int radix, const T* in, int64_t in_stride, T* out, int64_t out_stride,
                              int64_t count, int64_t width, int64_t s, V scale) {
    switch (radix) {
      case 8: return column_pass<8, Scaled>(in, in_stride, out, out_stride, count, width, s, scale);
      case 4: return column_pass<4, Scaled>(in, in_stride, out, out_stride, count, width, s, scale);
      default: return column_pass<2, Scaled>(in, in_stride, out, out_stride, count, width, s, scale);
    }
  }

  // A column pass that scales if it is the transform's last (scale != 1 only there).
  static void column_pass_scaled(int radix, const T* in, int64_t in_stride, T* out, int64_t out_stride,
                                 int64_t count, int64_t width, int64_t s, T scale) {
    if (scale == T(1)) return column_pass_any<false>(radix, in, in_stride, out, out_stride, count, width, s, V{});
    column_pass_any<true>(radix, in, in_stride, out, out_stride, count, width, s, splat(scale));
  }

  static constexpr int64_t scratch_stride(int64_t width) { return width + 64 / int64_t(sizeof(T)); }

  // The strip is gathered into `scratch` by the first radix pass (so the middle passes run on a compact,
  // alias-free copy in L2) and scattered back by the last one, which also scales.
  static void columns_pow2(const T* in, T* out, int64_t count, int64_t stride, int64_t width, T* scratch,
                           T scale) {
    int radices[32];
    int passes = 0;
    int log2_count = 0;
    while ((int64_t(1) << log2_count) < count) ++log2_count;
    if (log2_count % 3 == 1) radices[passes++] = 2;
    if (log2_count % 3 == 2) radices[passes++] = 4;
    for (int i = 0; i < log2_count / 3; ++i) radices[passes++] = 8;
    if (passes == 0) {  // H_1: a copy, scaled
      if (scale != T(1)) {
        for (int64_t c = 0; c < width; ++c) out[c] = in[c] * scale;
      } else if (in != out) {
        std::memcpy(out, in, size_t(width) * sizeof(T));
      }
      return;
    }
    if (passes == 1) {
      column_pass_scaled(radices[0], in, stride, out, stride, count, width, 1, scale);
      return;
    }
    // Scratch rows are one cache line longer than the strip, so rows a power of two apart do not all fall
    // into the same L1 set.
    const int64_t ws = scratch_stride(width);
    int64_t s = 1;
    for (int p = 0; p < passes; ++p) {
      const bool first = p == 0, last = p == passes - 1;
      column_pass_scaled(radices[p], first ? in : scratch, first ? stride : ws, last ? out : scratch,
                         last ? stride : ws, count, width, s, last ? scale : T(1));
      s *= radices[p];
    }
  }

  static const FwhtKernels<T>& table() {
    static const FwhtKernels<T> t{W, &rows_pow2, &rows_hadamard, &columns_pow2, &mix_chunks,
                                  leaf_prefetching_strip_entry(), leaves_crossing_entry()};
    return t;
  }
};

}  // namespace
}  // namespace dreidel

// Defines fwht_kernels_<name>_f32/_f64 for a translation unit compiled with a register width of `bytes`.
#define DREIDEL_DEFINE_KERNELS(name, bytes)                                                           \
  namespace dreidel {                                                                                 \
  const FwhtKernels<float>& fwht_kernels_##name##_f32() { return Kernel<float, bytes>::table(); }    \
  const FwhtKernels<double>& fwht_kernels_##name##_f64() { return Kernel<double, bytes>::table(); }  \
  }
