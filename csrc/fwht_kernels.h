// Per-ISA kernel entry points. Each is compiled in its own translation unit (fwht_<isa>.cc) from the
// template in fwht_kernel_impl.h; the driver (fwht.cc) picks a table at run time.
#pragma once

#include <cstdint>

#include "isa.h"

namespace dreidel {

// How the m x m factor H_m is applied (built once per call by the driver from the caller's matrix).
template <class T>
struct MixPlan {
  static constexpr int kMaxPairs = 14;
  int m = 1;                 // 1, 12, 20 or 28
  const T* dense = nullptr;  // H_m, row-major, m * m
  // Paley II structure (Paley 1933): H_m = C kron [[1, -1], [-1, -1]] + I kron [[1, 1], [1, -1]] with C a
  // symmetric conference matrix of order m / 2 (zero diagonal, +-1 elsewhere). When the caller's matrix has
  // that form, the mix costs about m / 2 operations per output instead of m.
  bool paley = false;
  int pairs = 0;                           // m / 2
  T conference[kMaxPairs * kMaxPairs] = {};  // C, row-major, pairs * pairs
  // C is the quadratic-residue conference matrix of a prime q = pairs - 1 (see paley_conference_sign),
  // the one dreidel builds for m = 12 and 28: its signs are then compiled into the kernel.
  bool quadratic_residue = false;
};

// The Paley conference matrix of order q + 1 for a prime q = 1 (mod 4): C = [[0, 1ᵀ], [1, Q]] with
// Q[x][y] = chi(y - x), chi the quadratic character mod q (Paley 1933). Returns C[a][b] in {-1, 0, 1}.
constexpr int paley_conference_sign(int q, int a, int b) {
  if (a == b) return 0;
  if (a == 0 || b == 0) return 1;
  const int r = ((b - a) % q + q) % q;
  for (int x = 1; x < q; ++x)
    if (x * x % q == r) return 1;
  return -1;
}

template <class T>
struct FwhtKernels {
  int lanes;  // SIMD width in elements of T
  // Every entry that takes a scale multiplies the sums of its last stage by it, as fwht_reference does (a
  // transform split over several calls passes its scale to the last one only, 1 to the others).
  //
  // dst = scale * H_len src for `rows` contiguous rows of power-of-two length `len`, each small enough to
  // stay in cache. src may equal dst. Rows of more than 16 registers prefetch the rows after them; the last
  // ones prefetch the input the caller transforms next, from `after` on (or nothing, if null): input of the
  // same thread only, since the prefetches are for writing.
  void (*rows_pow2)(const T* src, T* dst, int64_t rows, int64_t len, T scale, const T* after);
  // dst = scale * (H_m kron H_chunk) src for `rows` contiguous rows of length m * chunk (chunk a power of
  // two, a row small enough to stay in cache). src may equal dst; `after` as for rows_pow2.
  void (*rows_hadamard)(const T* src, T* dst, int64_t rows, int64_t chunk, const MixPlan<T>& plan, T scale,
                        const T* after);
  // Across `count` (a power of two) rows spaced `stride` apart, for the `width` contiguous columns at `in`
  // (width % lanes == 0), times scale, written to the same places at `out` (which may be `in`): the outer
  // factor H_count of a two-level transform of one long row. `scratch` holds count * (width + 64 /
  // sizeof(T)) values (unused, and may be null, when count <= 8).
  void (*columns_pow2)(const T* in, T* out, int64_t count, int64_t stride, int64_t width, T* scratch, T scale);
  // In place: chunk a of x (length `chunk`, a < m) <- scale * sum_a' H_m[a][a'] chunk a', for columns
  // [begin, end).
  void (*mix_chunks)(T* x, int64_t chunk, const MixPlan<T>& plan, int64_t begin, int64_t end, T scale);
  // x = scale * H x for one 16 KB row (a leaf of a long row) while the strip of `count` rows of `width`
  // values spaced `stride` apart at `strip` (or nothing, if null) is prefetched into L2 for reading, and the
  // same strip at `strip_out` (unless null: an out-of-place pass writes there) for writing, spread over the
  // work. Null where the ISA has fewer than 32 registers of 64 bytes (only AVX-512 has it).
  void (*leaf_prefetching_strip)(T* x, T scale, const T* strip, T* strip_out, int64_t count, int64_t stride,
                                 int64_t width);
  // dst = H src (no scale) for `rows` contiguous 16 KB rows (leaves; src may equal dst), the rows after them
  // prefetched as rows_pow2 does (`after` likewise), while H_8 runs in place across the 8 rows spaced
  // `stride` apart at `cross` over their first `width` columns (a multiple of lanes), a register of each row
  // at a time between the leaves' groups of registers. Those rows must not overlap src or dst. Null where
  // the ISA has fewer than 32 registers of 64 bytes (only AVX-512 has it).
  void (*leaves_crossing)(const T* src, T* dst, int64_t rows, const T* after, T* cross, int64_t stride,
                          int64_t width);
};

const FwhtKernels<float>& fwht_kernels_f32(Isa isa);
const FwhtKernels<double>& fwht_kernels_f64(Isa isa);

#define DREIDEL_DECLARE_KERNELS(name)                     \
  const FwhtKernels<float>& fwht_kernels_##name##_f32();  \
  const FwhtKernels<double>& fwht_kernels_##name##_f64();

DREIDEL_DECLARE_KERNELS(portable)
DREIDEL_DECLARE_KERNELS(avx2)
DREIDEL_DECLARE_KERNELS(avx512)

}  // namespace dreidel
