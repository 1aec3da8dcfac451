// FWHT driver: validation, cache blocking and OpenMP threading around the per-ISA kernels.
#include "fwht.h"

#include <algorithm>
#include <stdexcept>

#include "cache.h"
#include "fwht_kernels.h"
#include "fwht_serial.h"
#include "memory.h"

namespace dreidel {

const FwhtKernels<float>& fwht_kernels_f32(Isa isa) {
  switch (isa) {
#if defined(DREIDEL_X86)
    case Isa::avx512: return fwht_kernels_avx512_f32();
    case Isa::avx2: return fwht_kernels_avx2_f32();
#endif
    default: return fwht_kernels_portable_f32();
  }
}

const FwhtKernels<double>& fwht_kernels_f64(Isa isa) {
  switch (isa) {
#if defined(DREIDEL_X86)
    case Isa::avx512: return fwht_kernels_avx512_f64();
    case Isa::avx2: return fwht_kernels_avx2_f64();
#endif
    default: return fwht_kernels_portable_f64();
  }
}

namespace {

inline const FwhtKernels<float>& kernels_for(Isa isa, float) { return fwht_kernels_f32(isa); }
inline const FwhtKernels<double>& kernels_for(Isa isa, double) { return fwht_kernels_f64(isa); }

// A power-of-two row (or chunk) of at most this many bytes is transformed in one go while it sits in L1;
// longer ones are split as H_count kron H_block (see long_pow2), recursively, into leaves of this size.
constexpr int64_t kLeafBytes = int64_t(1) << 14;
// At most this many blocks per level, so a column strip spans few rows and each row's part of it is
// several cache lines long (DRAM- and TLB-friendly).
constexpr int64_t kMaxCount = 64;
// Bytes of one column strip crossed in place (up to 8 rows in one radix-8 pass, more in two or more levels
// while the strip is in L2).
constexpr int64_t kStripBytes = int64_t(1) << 17;
// Bytes of each row of a strip gathered into a scratch buffer by blocks_pipelined (up to 64 rows: 16 KB, in
// L1). Measured on a Xeon with AVX-512 when the 64 blocks of a 2^24 float32 row were crossed through the same
// strip, 1 thread: 64, 128, 512 B, 1 KB and 2 KB ran 1.20, 1.03, 1.03, 1.20 and 1.21x slower than 256 B.
constexpr int64_t kScratchRowBytes = 256;
// The pipelined pass (blocks_pipelined) and the strip crossing of many blocks (blocks_by_strip) are taken
// only where the L1 data cache has at least this many ways. The pipelined pass gathers 16 to 64 rows a power
// of two apart at once, and such rows share L1 sets: on Zen 3 (32 KB, 8 ways; 512 KB L2) a pass over 16 of
// them ran 4-5x slower than a pass over 8, and every gather of 16 to 64 rows tried there lost to in-place
// radix-8 passes. The strip crossing (in place, 8 rows at a time) was measured only on a CPU with 12 ways.
// So was leaves_crossing (see long_pow2), whose 8 crossed lines, 16 KB apart, share an L1 set with the 4
// lines of the leaf being worked on. Where the associativity is not reported, none of them is taken.
constexpr int kWideL1Ways = 12;

inline bool has_wide_l1(const CacheGeometry& cache) { return cache.l1d_ways >= kWideL1Ways; }

// Blocks of 1 MB and more go in groups of 8 (the stages across a group done while it is in the outer cache,
// then a pass across the groups), except on a CPU with an L1 of kWideL1Ways or more and an L2 of at
// least this many bytes, where every block is done on its own and the stages across all of them (up to 64
// rows) are then one pass over memory, strip by strip: each strip of kStripBytes (2 KB of each of 64 rows)
// crossed in L2 by two in-place radix-8 levels before the next (cross_rows). That saves a pass over memory
// for one more over a strip in L2. Measured on a Xeon with AVX-512 (Emerald Rapids, 48 KB 12-way L1, 2 MB
// L2), 1 thread, float32 in place, A/B in one process: a 2^24 row 1.11-1.15x faster, 2^23 1.11-1.14x, 2^22
// and 4 rows of 2^22 1.12-1.21x, 2^25 1.01-1.12x; strips of 32 KB to 1 MB 1.08-1.15x on the 2^24 row. Not
// measured on a CPU with a smaller L2 or a narrower L1 (Zen 3 and Zen 4 keep the groups of 8 they were tuned
// with; a pass merged per strip over other levels measured slower on Zen 3). On huge pages, see
// kStripCrossingMaxBytesOnHugePages.
constexpr int64_t kStripCrossingMinL2Bytes = int64_t(2) << 20;
// On huge pages, rows 1 MB apart lie 1 MB apart physically too, so a column of them falls in one L2 set (16
// ways on the Xeon) and the strip no longer stays in L2 between its levels: there the strip crossing is
// taken only for rows of up to this many bytes. Measured on that Xeon, 1 thread, in place on a buffer
// advised onto huge pages, against groups of 8: 16 blocks of 1 MB 1.12x faster, 32 blocks 1.02x, but 64
// blocks (a 2^24 row) 0.94x, a 2^25 row 0.93x, the 2^24 row at 2 threads 0.92x.
constexpr int64_t kStripCrossingMaxBytesOnHugePages = int64_t(32) << 20;

// Whether the blocks of rows of `len` values (1 MB and more) are crossed strip by strip: on a CPU with an L1
// of kWideL1Ways or more and an L2 of kStripCrossingMinL2Bytes or more, unless the rows are longer than
// kStripCrossingMaxBytesOnHugePages and mostly on huge pages (the `bytes` at `x`, which the passes across
// blocks work on).
template <class T>
bool blocks_by_strip(const T* x, int64_t bytes, int64_t len, const CacheGeometry& cache) {
  if (!has_wide_l1(cache) || cache.l2_bytes < kStripCrossingMinL2Bytes) return false;
  return len * int64_t(sizeof(T)) <= kStripCrossingMaxBytesOnHugePages || !mostly_on_huge_pages(x, size_t(bytes));
}

// Leaves transformed together with the stages across them (see long_pow2).
constexpr int64_t kGroup = 8;
// Blocks above the leaf level are at least this large where the length allows (1 MB: 64 leaves, whose
// cross-leaf stages long_pow2 does with one pass over the outer cache); fewer, larger blocks mean fewer
// rows in the column passes above. Chosen by measurement on Zen 3, 1 thread, float32: with grouped leaves,
// rows of 2^16..2^24 ran 1.11-1.40x faster than with as many blocks as kMaxCount allows and whole-level
// column passes; 512 KB and 2 MB blocks gave uneven results (0.94-1.25x).
constexpr int64_t kMinBlockBytes = int64_t(1) << 20;
// Rows are handed to the kernel in batches of about this many bytes (short rows: no per-row call).
constexpr int64_t kBatchBytes = int64_t(1) << 14;
// Calls on at least this many bytes are taken to stream from memory, and out of place, rows of 256 KB up to
// what the L2 allows (512 KB on the Xeon, see kPipeliningL2Bytes) then go through
// blocks_pipelined (with AVX-512, on an L1 of kWideL1Ways or more); smaller calls, whose data a
// last-level cache may well hold, take the in-place passes in L2, faster there (measured in place, on a
// Xeon with AVX-512: blocks_pipelined 0.87-0.90x on 4 MB, 0.91-1.04x on 8 MB).
constexpr int64_t kPipelineMinBytes = int64_t(16) << 20;
// At most this many rows per task when threads share pipelined rows (pipelined_run). Chosen on a Xeon with
// AVX-512 for the 1 MB blocks of a 2^24 float32 row at 2 threads, when those were pipelined in place: runs
// of 4 to 32 blocks 1.12-1.16x faster than blocks one at a time, runs of 2 1.09x.
constexpr int64_t kPipelinedRun = 8;
// Out of place, the pipelined pass needs room in L2 for the src and dst lines of a block and of the strips
// of the next block gathered as the block's leaves are done: four times the block. On the Xeon's 2 MB L2
// that is blocks of up to 512 KB (a long row's 1 MB blocks take the grouped leaves); measured there, 1
// thread, against the grouped leaves (whose reads and writes are sequential): rows of 2^16 1.31-1.36x
// faster, 2^17 1.05x, but 64 rows of 2^18 0.85x, and in a long row's blocks, 16 rows of 2^20 0.85x and a
// 2^24 row 0.96x. A smaller L2 with a 12-way L1 (1.25 MB on Ice Lake-SP; none was available to measure)
// only turns the pass off for the blocks that overflow it. (The AVX-512 CPUs with a 1 MB L2, Skylake-SP to
// Cascade Lake and Zen 4, have 8-way L1s: no pipelined pass there, see kWideL1Ways.) A larger L2, or
// none reported, counts as the 2 MB measured: beyond it the limits are untested (the next larger blocks
// measured slower here).
constexpr int64_t kPipeliningL2Bytes = int64_t(2) << 20;

constexpr int64_t pipelining_l2_bytes(int64_t reported) {
  return reported > 0 && reported < kPipeliningL2Bytes ? reported : kPipeliningL2Bytes;
}

constexpr bool fits_l2(int64_t block_bytes, int64_t l2_bytes) { return block_bytes * 4 <= l2_bytes; }

// The limits measured on the Xeon, whatever L2 the build machine has.
static_assert(fits_l2(int64_t(512) << 10, pipelining_l2_bytes(int64_t(2) << 20)) &&
                  !fits_l2(int64_t(1) << 20, pipelining_l2_bytes(int64_t(2) << 20)),
              "on a 2 MB L2: blocks of 512 KB pipelined, 1 MB not");
static_assert(!fits_l2(int64_t(1) << 20, pipelining_l2_bytes(int64_t(32) << 20)) &&
                  fits_l2(int64_t(512) << 10, pipelining_l2_bytes(0)),
              "a larger L2, or none reported, counts as the 2 MB measured");
static_assert(!fits_l2(int64_t(512) << 10, pipelining_l2_bytes(int64_t(1) << 20)) &&
                  fits_l2(int64_t(256) << 10, pipelining_l2_bytes(int64_t(1) << 20)),
              "a 1 MB L2: blocks of 256 KB pipelined, 512 KB not");
// Threads take rows in grains of about this many bytes.
constexpr int64_t kGrainBytes = int64_t(1) << 18;
// Below this many elements in total, starting threads costs more than it saves.
constexpr int64_t kMinParallelElements = int64_t(1) << 15;

inline bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

inline int64_t ceil_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Recognise Paley II structure in the caller's H_m (see MixPlan); otherwise the dense matrix is used.
template <class T>
MixPlan<T> make_plan(int m, const T* h) {
  MixPlan<T> plan;
  plan.m = m;
  plan.dense = h;
  if (m < 4 || m % 2 != 0 || m / 2 > MixPlan<T>::kMaxPairs) return plan;
  const int pairs = m / 2;
  // Diagonal blocks [[1, 1], [1, -1]]; off-diagonal blocks c * [[1, -1], [-1, -1]], c = +-1.
  for (int a = 0; a < pairs; ++a)
    for (int b = 0; b < pairs; ++b) {
      const T h00 = h[(2 * a) * m + 2 * b], h01 = h[(2 * a) * m + 2 * b + 1];
      const T h10 = h[(2 * a + 1) * m + 2 * b], h11 = h[(2 * a + 1) * m + 2 * b + 1];
      if (a == b) {
        if (h00 != T(1) || h01 != T(1) || h10 != T(1) || h11 != T(-1)) return plan;
        plan.conference[a * pairs + b] = T(0);
      } else {
        if (h00 != T(1) && h00 != T(-1)) return plan;
        if (h01 != -h00 || h10 != -h00 || h11 != -h00) return plan;
        plan.conference[a * pairs + b] = h00;
      }
    }
  plan.paley = true;
  plan.pairs = pairs;
  plan.quadratic_residue = true;
  for (int a = 0; a < pairs; ++a)
    for (int b = 0; b < pairs; ++b)
      if (plan.conference[a * pairs + b] != T(paley_conference_sign(pairs - 1, a, b))) plan.quadratic_residue = false;
  return plan;
}

// How a long power-of-two length splits: len = count * block, H_len = H_count kron H_block.
struct Split {
  int64_t count, block;
};

// Columns per strip when `count` rows of a strip should take about `bytes`: at least a cache line and a
// register, at most the `span` there is.
template <class T>
int64_t strip_width(const FwhtKernels<T>& k, int64_t count, int64_t span, int64_t bytes) {
  const int64_t width = std::max<int64_t>({bytes / (count * int64_t(sizeof(T))), 64 / int64_t(sizeof(T)), k.lanes});
  return std::min<int64_t>(width, span);
}

// Blocks are at least kMinBlockBytes where the length allows, but at least `min_count` of them (enough
// tasks for the threads of long_pow2_parallel; rounded up to a power of two), and never fewer than two
// (each level must shrink).
template <class T>
Split split_of(int64_t len, int64_t min_count) {
  const int64_t leaf = kLeafBytes / int64_t(sizeof(T));
  Split sp;
  sp.count = std::min<int64_t>(kMaxCount, len / leaf);
  if (len / leaf > kMaxCount) {  // two or more levels below this one
    const int64_t at_min_size = len / (kMinBlockBytes / int64_t(sizeof(T)));
    sp.count = std::min<int64_t>(sp.count, ceil_pow2(std::max<int64_t>({2, min_count, at_min_size})));
  }
  sp.block = len / sp.count;
  return sp;
}

// Columns per strip of the stages across `count` rows spaced `span` apart (`span` columns each): a strip of
// kStripBytes in all, one radix pass in place for up to 8 rows, two or more for more.
template <class T>
int64_t cross_width(const FwhtKernels<T>& k, int64_t count, int64_t span) {
  return strip_width(k, count, span, kStripBytes);
}

// The stages across `count` rows spaced `stride` apart (H_count on each column), over the `span` columns at
// src (a multiple of the register width), written to the same places at dst (the same memory, in place, or
// apart), in strips of `width`; the sums times `scale` (1 unless these are the transform's last stages). More
// than 8 rows are crossed 8 at a time, H_count = H_(count / 8) kron H_8 (the smaller strides first), every
// level of one strip before the next strip: the strip stays in L2 between its levels. The first level reads
// src, the others dst.
template <class T>
void cross_rows(const FwhtKernels<T>& k, const T* src, T* dst, int64_t count, int64_t stride, int64_t span,
                int64_t width, T scale) {
  for (int64_t column = 0; column < span; column += width) {
    const int64_t strip_width = std::min(width, span - column);
    T* strip = dst + column;
    int64_t inner = 1;
    do {  // one row is a level of H_1: it only scales (or copies)
      const T* in = inner == 1 ? src + column : strip;
      const int64_t radix = std::min<int64_t>(8, count / inner);
      const T level_scale = inner * radix < count ? T(1) : scale;
      for (int64_t first = 0; first < count; first += radix * inner)
        for (int64_t i = 0; i < inner; ++i)
          k.columns_pow2(in + (first + i) * stride, strip + (first + i) * stride, radix, inner * stride,
                         strip_width, nullptr, level_scale);
      inner *= radix;
    } while (inner < count);
  }
}

template <class T>
void long_pow2(const FwhtKernels<T>& k, const T* src, T* dst, int64_t len, T scale, const T* after, bool by_strip,
               bool overlap);

// Blocks per group (see long_pow2): kGroup; where blocks are crossed by strip (blocks_by_strip), as many as
// fit in kMinBlockBytes, the size of a block done in L2, but at most kGroup: blocks of 1 MB or more then go
// one at a time.
template <class T>
int64_t group_of(const Split& sp, bool by_strip) {
  int64_t group = std::min<int64_t>(kGroup, sp.count);
  if (!by_strip) return group;
  while (group > 1 && group * sp.block * int64_t(sizeof(T)) > kMinBlockBytes) group /= 2;
  return group;
}

// Blocks first .. first + group - 1 of a split row (recursively; leaves are rows in L1), then the stages
// across them while they are still in an inner cache, which scale the sums (a group of one block scales its
// own last stages); `overlap` as for long_pow2. `after` is the input this thread transforms next (nullptr if none): the last leaf
// prefetches its start, which then arrives while the stages across the group run in L2 (a 2^24 row, 1
// thread: 1.02-1.06x, A/B on a Xeon with AVX-512). Never another thread's input: prefetched for writing, its
// lines would be taken from the core working on them (rows of 2^16 to 2^19 at 2 threads ran up to 1.3x
// slower).
template <class T>
void group_pow2(const FwhtKernels<T>& k, const T* src, T* dst, const Split& sp, int64_t first, int64_t group,
                T scale, const T* after, bool by_strip, bool overlap) {
  const int64_t offset = first * sp.block;
  const T block_scale = group == 1 ? scale : T(1);
  if (sp.block * int64_t(sizeof(T)) <= kLeafBytes) {
    k.rows_pow2(src + offset, dst + offset, group, sp.block, block_scale, after);
  } else {
    for (int64_t b = 0; b < group; ++b) {
      const T* block = src + offset + b * sp.block;
      long_pow2(k, block, dst + offset + b * sp.block, sp.block, block_scale,
                b + 1 < group ? block + sp.block : after, by_strip, overlap);
    }
  }
  if (group > 1)
    cross_rows(k, dst + offset, dst + offset, group, sp.block, sp.block, cross_width(k, group, sp.block), scale);
}

// Whether rows (or blocks) of `len` values go through blocks_pipelined: only out of place, in a call that
// streams from memory (kPipelineMinBytes), with more than kGroup leaves, few enough for one strip of the
// scratch buffer, and a leaf_prefetching_strip kernel (AVX-512); and only where the L2 holds the src and dst
// lines of a row and of the strips of the next gathered as its leaves are done (fits_l2), and the L1 is
// wide enough for gathers of many rows (kWideL1Ways). In place, the grouped leaves and their in-place
// passes in L2 are faster: on a Xeon with AVX-512 (Emerald Rapids, 48 KB 12-way L1, 2 MB L2), 1 thread, in
// place, 16 MB to 64 MB of rows of 2^16 to 2^18 float32 1.03-1.29x, of 2^17 float64 1.30x (December 2026,
// eighteenth sitting, against the in-place passes as they have been since the sixth; the pipelined pass had
// been chosen in place against the slower passes before it). Out of place it still wins there: 256 rows of
// 2^16 1.19-1.37x, 128 rows of 2^17 1.05-1.22x, 64 rows of 2^18 (not pipelined: 1 MB) 0.98-1.01x. With the
// AVX2 and portable kernels, whose leaves take longer, the pipelined pass measured slower (0.84-0.94x in
// place, on the Xeon of an earlier sitting); it has not been measured on a CPU without AVX-512.
template <class T>
bool pipelined(const FwhtKernels<T>& k, int64_t len, bool from_memory, bool in_place, const CacheGeometry& cache) {
  const int64_t leaves = len / (kLeafBytes / int64_t(sizeof(T)));
  return !in_place && from_memory && k.leaf_prefetching_strip != nullptr && leaves > kGroup &&
         leaves <= kMaxCount && has_wide_l1(cache) &&
         fits_l2(len * int64_t(sizeof(T)), pipelining_l2_bytes(cache.l2_bytes));
}

// Rows per task when threads share pipelined rows: up to kPipelinedRun, but at least two runs per thread
// (the first row of a run is gathered with no leaves to alternate with).
inline int64_t pipelined_run(int64_t count, int threads) {
  return std::max<int64_t>(1, std::min<int64_t>(kPipelinedRun, count / (2 * int64_t(threads))));
}

// Columns per strip of the gather across `count` leaves of blocks_pipelined: kScratchRowBytes of each.
template <class T>
int64_t scratch_width(const FwhtKernels<T>& k, int64_t count, int64_t span) {
  return strip_width(k, count, span, count * kScratchRowBytes);
}

// The scratch buffer columns_pow2 needs for a strip of up to kMaxCount rows of at most kScratchRowBytes
// each (a scratch_width strip), padded as columns_pow2 pads it. It lives on the stack (20 KB): the passes
// allocate nothing, so nothing can throw inside a parallel region.
template <class T>
struct CrossScratch {
  alignas(64) T values[kMaxCount * (kScratchRowBytes + 64) / sizeof(T)];
};

// Rows first .. last - 1 of `block` values each (kGroup < leaves <= kMaxCount leaves) transformed whole,
// src to dst, by one thread (see pipelined for when). A row's stages across its leaves come first, straight
// from memory: strips of all its leaves gathered into the scratch buffer, crossed there and written to dst;
// then its leaves, now in L2, one at a time in L1 (the stages commute, so their order is free). The leaves
// of one row alternate with the gather of the next, a strip of it before each leaf, and each leaf prefetches
// the strips gathered after it, in src for reading and in dst for writing, spread over its work
// (leaf_prefetching_strip): without the prefetch for writing, 16-64 MB of rows of 2^16 or 2^17 ran
// 1.24-1.41x slower, each of the gather's stores waiting for its line. Against the grouped leaves (whose
// reads of src and writes of dst are sequential), out of place, on a Xeon with AVX-512: rows of 2^16
// 1.19-1.37x faster, of 2^17 1.05-1.22x. Taken in place too until December 2026 (measured then against the
// slower in-place passes of the time, docs/ARCHITECTURE.md).
template <class T>
__attribute__((noinline)) void blocks_pipelined(const FwhtKernels<T>& k, const T* src, T* dst, int64_t block,
                                                int64_t first, int64_t last, T scale) {
  const int64_t leaf = kLeafBytes / int64_t(sizeof(T));
  const int64_t leaves = block / leaf;
  const int64_t width = scratch_width(k, leaves, leaf);
  const int64_t strips = leaf / width;
  CrossScratch<T> scratch;
  const auto gather = [&](int64_t b, int64_t strip) {
    const int64_t at = b * block + strip * width;
    k.columns_pow2(src + at, dst + at, leaves, leaf, width, scratch.values, T(1));
  };
  for (int64_t strip = 0; strip < strips; ++strip) gather(first, strip);
  for (int64_t b = first; b < last; ++b) {
    int64_t gathered = 0;
    for (int64_t i = 0; i < leaves; ++i) {
      // The strips gathered before the next leaf (of this block or the next) are prefetched while this one
      // runs: columns of every leaf, at next_strips.
      const T* next_strips = nullptr;
      if (b + 1 < last) {
        for (const int64_t until = (i + 1) * strips / leaves; gathered < until; ++gathered) gather(b + 1, gathered);
        if (gathered < strips) next_strips = src + (b + 1) * block + gathered * width;
        else if (b + 2 < last) next_strips = src + (b + 2) * block;
      }
      // The same strips in dst, where the gather writes them (they are in no cache yet).
      T* next_strips_out = next_strips == nullptr ? nullptr : dst + (next_strips - src);
      // The leaf is in dst now (and in L2). The leaves are the row's last stages: they scale.
      k.leaf_prefetching_strip(dst + b * block + i * leaf, scale, next_strips, next_strips_out, leaves, leaf,
                               strips / leaves * width);
    }
  }
}

// One thread: dst = scale * H_len src for a power-of-two len > kLeafBytes, as H_count kron H_block: the
// blocks, then the stages across them; `after` as for group_pow2. Leaves (rows in L1) go in groups of kGroup
// (group_pow2): 8 leaves, 128 KB of float32, stay in L2 for an in-place radix-8 pass across them, and the
// pass across the groups is another. Blocks above the leaves (1 MB, each done in L2) likewise go in groups
// of 8, crossed while the group is in the outer cache, and a last radix-8 pass crosses the groups: a 2^24
// row takes three passes over memory. Where blocks_by_strip, the blocks are done one at a time and
// the stages across all of them are one pass over memory, strip by strip: two. With `overlap` (in place, the
// kernels have leaves_crossing, an L1 of kWideL1Ways), the pass across each group of 8 leaves but the last
// runs beside the next group's leaves instead of on its own. Threads sharing one row (long_pow2_parallel) do
// not take it.
template <class T>
void long_pow2(const FwhtKernels<T>& k, const T* src, T* dst, int64_t len, T scale, const T* after, bool by_strip,
               bool overlap) {
  const Split sp = split_of<T>(len, 1);
  const int64_t group = group_of<T>(sp, by_strip);
  const int64_t groups = sp.count / group;
  // The last stages scale: those across the groups, or, where all blocks form one group, those across them.
  const T group_scale = groups == 1 ? scale : T(1);
  if (overlap && sp.block * int64_t(sizeof(T)) == kLeafBytes && group == kGroup && groups > 1) {
    // Each group's leaves beside the stages across the group before it (leaves_crossing); the last group's
    // are crossed on their own.
    for (int64_t g = 0; g < sp.count; g += group) {
      const T* next = g + group < sp.count ? src + (g + group) * sp.block : after;
      if (g == 0) {
        k.rows_pow2(src, dst, group, sp.block, T(1), next);
        continue;
      }
      k.leaves_crossing(src + g * sp.block, dst + g * sp.block, group, next, dst + (g - group) * sp.block, sp.block,
                        sp.block);
    }
    T* const last = dst + (sp.count - group) * sp.block;
    cross_rows(k, last, last, group, sp.block, sp.block, cross_width(k, group, sp.block), T(1));
  } else {
    for (int64_t g = 0; g < sp.count; g += group)
      group_pow2(k, src, dst, sp, g, group, group_scale,
                 g + group < sp.count ? src + (g + group) * sp.block : after, by_strip, overlap);
    if (groups == 1) return;
  }
  // Each group is one contiguous row of group * block values for the stages across groups.
  const int64_t span = group * sp.block;
  const bool leaves = sp.block * int64_t(sizeof(T)) <= kLeafBytes;
  const int64_t width = leaves ? strip_width(k, groups, span, kLeafBytes) : cross_width(k, groups, span);
  cross_rows(k, dst, dst, groups, span, span, width, scale);
}

// The same with all threads inside one row: the groups of blocks split among threads, then the strips of
// the stages across groups. Groups shrink below kGroup until every thread has at least two; more than 8
// groups are crossed in place 8 rows at a time, strip by strip.
template <class T>
void long_pow2_parallel(const FwhtKernels<T>& k, const T* src, T* dst, int64_t len, T scale, int threads,
                        bool by_strip) {
  const Split sp = split_of<T>(len, 8 * int64_t(threads));
  int64_t group = group_of<T>(sp, by_strip);
  while (group > 1 && sp.count / group < 2 * int64_t(threads)) group /= 2;
  const int64_t groups = sp.count / group;
  const int64_t span = group * sp.block;
  const int64_t width = cross_width(k, groups, span);
  const int64_t strips = span / width;
  // Threads take strips in grains of about kGrainBytes, but at least four grains per thread.
  const int64_t strips_per_grain = std::max<int64_t>(
      1, std::min<int64_t>(kGrainBytes / (groups * width * int64_t(sizeof(T))), strips / (4 * int64_t(threads))));
  // The stages across the groups (two or more: sp.count >= 2) are the last: they scale.
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < groups; ++g)
      group_pow2(k, src, dst, sp, g * group, group, T(1), static_cast<const T*>(nullptr), by_strip, false);
#pragma omp for schedule(dynamic, 1)
    for (int64_t s = 0; s < strips; s += strips_per_grain) {
      const int64_t grain_span = std::min(strips - s, strips_per_grain) * width;
      cross_rows(k, dst + s * width, dst + s * width, groups, span, grain_span, width, scale);
    }
  }
}

// m once n and m are checked (and H_m given where m > 1): make_plan reads the m x m matrix, so the constructor
// checks its arguments before its member initialisers run.
template <class T>
int checked_factor(int64_t n, int m, const T* hadamard_m) {
  if (const char* err = fwht_check(n, m)) throw std::invalid_argument(err);
  if (m > 1 && hadamard_m == nullptr) throw std::invalid_argument("missing hadamard_m");
  return m;
}

}  // namespace

template <class T>
SerialFwht<T>::SerialFwht(int64_t n, int m, const T* hadamard_m, T scale, Isa isa, bool from_memory,
                          const CacheGeometry& cache)
    : kernels_(&kernels_for(isa, T())),
      plan_(make_plan(checked_factor(n, m, hadamard_m), hadamard_m)),
      n_(n),
      chunk_(0),
      scale_(scale),
      from_memory_(from_memory),
      cache_(cache) {
  if (!isa_available(isa)) throw std::invalid_argument("requested ISA is not available on this CPU");
  chunk_ = n / m;
}

template <class T>
bool SerialFwht<T>::pipelines(bool in_place) const {
  return plan_.m == 1 && pipelined(*kernels_, n_, from_memory_, in_place, cache_);
}

template <class T>
void SerialFwht<T>::operator()(const T* src, T* dst, int64_t rows) const {
  const FwhtKernels<T>& k = *kernels_;
  const int m = plan_.m;
  if (chunk_ * int64_t(sizeof(T)) <= kLeafBytes) {
    if (m == 1) {
      // One call: rows longer than 8 registers prefetch the next row themselves.
      k.rows_pow2(src, dst, rows, n_, scale_, nullptr);
      return;
    }
    // Cache-sized batches: a row (all m chunks, then their mixing) never leaves the cache in between. Each
    // batch's last row prefetches the next batch of this call.
    const int64_t batch = std::max<int64_t>(1, kBatchBytes / (n_ * int64_t(sizeof(T))));
    for (int64_t r = 0; r < rows; r += batch)
      k.rows_hadamard(src + r * n_, dst + r * n_, std::min(batch, rows - r), chunk_, plan_, scale_,
                      r + batch < rows ? src + (r + batch) * n_ : nullptr);
    return;
  }
  // Out of place, rows of 256 KB up to what the L2 allows, when there are many, go through the pipelined
  // pass, one row's leaves alternating with the next row's gather.
  if (pipelines(src == dst)) {
    blocks_pipelined(k, src, dst, n_, 0, rows, scale_);
    return;
  }
  const bool by_strip = blocks_by_strip(dst, rows * n_ * int64_t(sizeof(T)), chunk_, cache_);
  const bool overlap = src == dst && k.leaves_crossing != nullptr && has_wide_l1(cache_);
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * n_;
    T* d = dst + r * n_;
    for (int a = 0; a < m; ++a) {
      // What follows this chunk: the next chunk, or the next row of this call.
      const T* after = a + 1 < m || r + 1 < rows ? s + (a + 1) * chunk_ : nullptr;
      long_pow2(k, s + a * chunk_, d + a * chunk_, chunk_, m > 1 ? T(1) : scale_, after, by_strip, overlap);
    }
    if (m > 1) k.mix_chunks(d, chunk_, plan_, 0, chunk_, scale_);  // the last stage: it scales
  }
}

template class SerialFwht<float>;
template class SerialFwht<double>;

namespace {

// The scalar part of an interleaved transform: cross_rows for `width` columns fewer than a register holds.
// Level by level over all the columns, so each row's line serves them all while it is in cache.
template <class T>
void cross_rows_scalar(const T* src, T* dst, int64_t count, int64_t stride, int64_t width, T scale) {
  if (src != dst)
    for (int64_t i = 0; i < count; ++i)
      for (int64_t c = 0; c < width; ++c) dst[i * stride + c] = src[i * stride + c];
  for (int64_t h = 1; h < count; h *= 2)
    for (int64_t first = 0; first < count; first += 2 * h)
      for (int64_t i = first; i < first + h; ++i)
        for (int64_t c = 0; c < width; ++c) {
          const T a = dst[i * stride + c], b = dst[(i + h) * stride + c];
          dst[i * stride + c] = a + b;
          dst[(i + h) * stride + c] = a - b;
        }
  if (scale != T(1))
    for (int64_t i = 0; i < count; ++i)
      for (int64_t c = 0; c < width; ++c) dst[i * stride + c] *= scale;
}

// task(i) for every i in [0, tasks), in order, on up to `threads` threads taking `grain` consecutive tasks at a
// time (dynamic: the machine may be shared); no OpenMP region at all for one thread (see run).
template <class Task>
void parallel_tasks(int64_t tasks, int threads, int64_t grain, const Task& task) {
  const int used = static_cast<int>(std::min<int64_t>(threads, (tasks + grain - 1) / grain));
  if (used <= 1) {
    for (int64_t i = 0; i < tasks; ++i) task(i);
    return;
  }
#pragma omp parallel for num_threads(used) schedule(dynamic, grain)
  for (int64_t i = 0; i < tasks; ++i) task(i);
}

// The grain of parallel_tasks over the `strips` strips of each of `rows` rows (taken row by row): whole rows
// where there are at least two a thread, so threads work on rows far apart. Two threads on the strips of
// the same rows scaled 1.0-1.1x from 1 thread, against 1.96-1.98x on rows of their own ((32, 256, 1024) and
// (16, 384, 2048) along dim 1, float32, on a Xeon with AVX-512); and one thread took its strips fastest row
// by row (1.08-1.17x against strip by strip across rows).
inline int64_t strip_grain(int64_t rows, int64_t strips, int threads) {
  return rows >= 2 * int64_t(threads) ? strips : 1;
}

// H_m across the m chunks of `chunk` values of each of `rows` rows (m * chunk values each) at x, the sums
// times `scale` (the transform's last stage), threads taking strips of 1024 columns.
template <class T>
void mix_in_strips(const FwhtKernels<T>& k, const MixPlan<T>& plan, T* x, int64_t rows, int64_t chunk, T scale,
                   int threads) {
  const int64_t width = std::max<int64_t>(k.lanes, 1024);
  const int64_t strips = (chunk + width - 1) / width;
  parallel_tasks(rows * strips, threads, strip_grain(rows, strips, threads), [&](int64_t task) {
    const int64_t row = task / strips, s = task % strips;
    k.mix_chunks(x + row * plan.m * chunk, chunk, plan, s * width, std::min(chunk, (s + 1) * width), scale);
  });
}

// An interleaved transform's strips take about this fraction of L2 (the values of a strip for all n rows
// of a column; where no L2 size is reported, of kPipeliningL2Bytes), and each row's part of a strip at
// least kInterleavedRowBytes (or the whole row, if shorter): DRAM- and TLB-friendly runs. Where n such runs
// would not fit, the transform goes in two passes (run_interleaved). Measured on a Xeon with AVX-512
// (Emerald Rapids, 2 MB L2), float32 in place, 1 thread, against strips of 1 MB and rows of at least 256 B:
// 4096 x 1024 along dim 0 1.8x faster (two passes instead of one with 256 B runs), 1024 x 4096 1.25-1.5x,
// 16384 x 256 1.1x, (32, 256, 1024) along dim 1 0.9-1.0x; strips of L2 / 8 lost on (16, 384, 2048) along dim 1
// (0.66-0.90x). Gathering each strip into a contiguous scratch buffer (columns_pow2's scratch) helped 4096 x
// 1024 but lost 1.26-1.49x on (256, 256, 64), (32, 256, 1024) and (8, 4096, 32) along dim 1.
constexpr int64_t kInterleavedL2Fraction = 4;
constexpr int64_t kInterleavedRowBytes = 1024;

// One pass of an interleaved transform (see FwhtProblem::interleave): each row's columns in strips of about
// `strip_bytes` for the n values of each column, every stage of a strip done while it is in L2 (cross_rows;
// a rest narrower than a register scalar), then H_m across the strip's m chunks. Threads take strips.
template <class T>
void interleaved_pass(const FwhtKernels<T>& k, const MixPlan<T>& plan, const T* src, T* dst, int64_t rows,
                      int64_t n, int64_t columns, T scale, int threads, int64_t strip_bytes) {
  const int64_t count = n / plan.m;
  const int64_t vector_columns = columns / k.lanes * k.lanes;
  const int64_t width = std::max<int64_t>(k.lanes, strip_width(k, n, vector_columns, strip_bytes) / k.lanes * k.lanes);
  const int64_t vector_strips = (vector_columns + width - 1) / width;
  const int64_t strips = vector_strips + (vector_columns < columns ? 1 : 0);  // the scalar rest: one more
  const int64_t row_size = n * columns;
  const T chunk_scale = plan.m > 1 ? T(1) : scale;
  const auto strip = [&](int64_t task) {
    const int64_t row = task / strips, s = task % strips;
    const int64_t begin = s < vector_strips ? s * width : vector_columns;
    const int64_t end = s < vector_strips ? std::min(begin + width, vector_columns) : columns;
    const T* in = src + row * row_size;
    T* out = dst + row * row_size;
    for (int a = 0; a < plan.m; ++a) {
      const int64_t at = a * count * columns + begin;
      if (s < vector_strips) cross_rows(k, in + at, out + at, count, columns, end - begin, end - begin, chunk_scale);
      else cross_rows_scalar(in + at, out + at, count, columns, end - begin, chunk_scale);
    }
    if (plan.m > 1)
      for (int64_t i = 0; i < count; ++i)
        k.mix_chunks(out, count * columns, plan, i * columns + begin, i * columns + end, scale);
  };
  parallel_tasks(rows * strips, threads, strip_grain(rows, strips, threads), strip);
}

// An interleaved transform (FwhtProblem::interleave > 1), `plan` its H_m. One pass (interleaved_pass) where a
// strip with kInterleavedRowBytes of each of the n rows fits `strip_bytes`; otherwise H_count = H_A kron H_B
// in two: blocks of B consecutive rows (B rows of `columns` values, contiguous, up to `strip_bytes`) each in
// one pass, then the stages across the A blocks (recursively: those are an interleaved transform of A rows of
// B * columns values), then H_m across the m chunks, a third pass where m > 1.
template <class T>
void run_interleaved(const FwhtKernels<T>& k, const MixPlan<T>& plan, const T* src, T* dst, int64_t rows, int64_t n,
                     int64_t columns, T scale, int threads, int64_t strip_bytes) {
  const int64_t count = n / plan.m;
  const int64_t run_bytes = std::min<int64_t>(kInterleavedRowBytes, columns * int64_t(sizeof(T)));
  if (count <= kGroup || n * run_bytes <= strip_bytes)
    return interleaved_pass(k, plan, src, dst, rows, n, columns, scale, threads, strip_bytes);
  int64_t block = 2;
  while (block * 2 < count && block * 2 * columns * int64_t(sizeof(T)) <= strip_bytes) block *= 2;
  const MixPlan<T> no_mix = make_plan<T>(1, nullptr);
  const T pow2_scale = plan.m > 1 ? T(1) : scale;
  interleaved_pass(k, no_mix, src, dst, rows * plan.m * (count / block), block, columns, T(1), threads, strip_bytes);
  run_interleaved(k, no_mix, static_cast<const T*>(dst), dst, rows * plan.m, count / block, block * columns, pow2_scale,
                  threads, strip_bytes);
  if (plan.m > 1) mix_in_strips(k, plan, dst, rows, count * columns, scale, threads);
}

template <class T>
void run(const FwhtProblem<T>& p, int threads, Isa isa, const CacheGeometry& cache) {
  if (const char* err = fwht_check(p.n, p.m)) throw std::invalid_argument(err);
  if (p.rows <= 0 || p.n <= 0) return;
  if (!isa_available(isa)) throw std::invalid_argument("requested ISA is not available on this CPU");
  if (p.interleave < 1) throw std::invalid_argument("interleave must be at least 1");
  const FwhtKernels<T>& k = kernels_for(isa, T());
  threads = usable_threads(threads);
  if (p.rows * p.n * p.interleave < kMinParallelElements) threads = 1;
  if (p.interleave > 1) {
    const int64_t l2 = cache.l2_bytes > 0 ? cache.l2_bytes : kPipeliningL2Bytes;
    return run_interleaved(k, make_plan(p.m, p.hadamard_m), p.src, p.dst, p.rows, p.n, p.interleave, p.scale, threads,
                           l2 / kInterleavedL2Fraction);
  }
  const int64_t chunk = p.n / p.m;  // the power-of-two part
  const bool from_memory = p.rows * p.n * int64_t(sizeof(T)) >= kPipelineMinBytes;

  if (chunk * int64_t(sizeof(T)) <= kLeafBytes || p.rows >= threads) {
    // Threads take grains of whole rows (dynamic: the machine may be shared, and a late thread should not
    // hold up the others): short rows by the few hundred kilobytes, long rows one at a time.
    // Rows that SerialFwht pipelines go in runs (pipelined_run).
    const bool long_rows = chunk * int64_t(sizeof(T)) > kLeafBytes;
    const SerialFwht<T> transform(p.n, p.m, p.hadamard_m, p.scale, isa, from_memory, cache);  // shared: no mutable state
    const int64_t run = transform.pipelines(p.src == p.dst) ? pipelined_run(p.rows, threads) : 1;
    const int64_t grain = long_rows ? run : std::max<int64_t>(1, kGrainBytes / (p.n * int64_t(sizeof(T))));
    const int64_t grains = (p.rows + grain - 1) / grain;
    const int row_threads = static_cast<int>(std::min<int64_t>(threads, grains));
    // One thread: no OpenMP region at all (entering even a serialised one runs cold runtime code, which
    // costs microseconds right after a large memory operation, when the call is most common).
    if (row_threads == 1) return transform(p.src, p.dst, p.rows);
#pragma omp parallel for num_threads(row_threads) schedule(dynamic, 1)
    for (int64_t g = 0; g < grains; ++g) {
      const int64_t begin = g * grain, end = std::min(p.rows, begin + grain);
      transform(p.src + begin * p.n, p.dst + begin * p.n, end - begin);
    }
    return;
  }

  const MixPlan<T> plan = make_plan(p.m, p.hadamard_m);
  // Fewer long rows than threads: all threads work inside one row at a time, a leaf each at least.
  threads = static_cast<int>(std::min<int64_t>(threads, chunk * int64_t(sizeof(T)) / kLeafBytes));
  const bool by_strip = blocks_by_strip(p.dst, p.rows * p.n * int64_t(sizeof(T)), chunk, cache);
  for (int64_t r = 0; r < p.rows; ++r) {
    const T* src = p.src + r * p.n;
    T* dst = p.dst + r * p.n;
    for (int a = 0; a < p.m; ++a)
      long_pow2_parallel(k, src + a * chunk, dst + a * chunk, chunk, p.m > 1 ? T(1) : p.scale, threads, by_strip);
    if (p.m > 1) mix_in_strips(k, plan, dst, 1, chunk, p.scale, threads);
  }
}

}  // namespace

const char* fwht_check(int64_t n, int m) {
  if (m != 1 && m != 12 && m != 20 && m != 28) return "m must be 1, 12, 20 or 28";
  if (n <= 0 || n % m != 0 || !is_pow2(n / m)) return "n must be m * 2^k";
  if (n / m > (int64_t(1) << 30)) return "n / m must be at most 2^30";
  return nullptr;
}

void fwht(const FwhtProblem<float>& p, int threads, Isa isa, const CacheGeometry& cache) {
  run(p, threads, isa, cache);
}
void fwht(const FwhtProblem<double>& p, int threads, Isa isa, const CacheGeometry& cache) {
  run(p, threads, isa, cache);
}

}  // namespace dreidel
