// Per-ISA kernel entry points. Each is compiled in its own translation unit (fwht_<isa>.cc) from the
// template in fwht_kernel_impl.h; the driver (fwht.cc) picks a table at run time.
#pragma once

#include <cstdint>

#include "isa.h"

namespace dreidel {

template <class T>
struct FwhtKernels {
  int lanes;  // SIMD width in elements of T
  // Transform one contiguous row of length 2^k in cache: dst = scale * H_{2^k} src.
  void (*row_pow2)(const T* src, T* dst, int64_t len, T scale);
  // Transform across `count` rows spaced `stride` apart, for the `width` contiguous columns at x:
  // the outer factor of a two-level (cache-blocked) transform of one long row.
  void (*columns_pow2)(T* x, int64_t count, int64_t stride, int64_t width);
  // In place: chunk a of x (length `chunk`, a < m) <- sum_a' h[a][a'] chunk a', for columns [begin, end).
  void (*mix_chunks)(T* x, int m, int64_t chunk, const T* h, int64_t begin, int64_t end);
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
