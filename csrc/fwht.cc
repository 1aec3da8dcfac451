// FWHT driver: validation, cache blocking and OpenMP threading around the per-ISA kernels.
#include "fwht.h"

#include <omp.h>

#include <algorithm>
#include <stdexcept>

#include "fwht_kernels.h"

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

// A row whose power-of-two part fits in this many bytes is transformed in one go (it stays in L2);
// longer rows are split into blocks of this size and done in two passes over memory.
constexpr int64_t kInCacheBytes = int64_t(1) << 18;
constexpr int64_t kBlockBytes = int64_t(1) << 17;
// Width of a column strip in the second pass: the strip of `count` rows should fit in L2.
constexpr int64_t kStripBytes = int64_t(1) << 18;
// Below this many elements in total, starting threads costs more than it saves.
constexpr int64_t kMinParallelElements = int64_t(1) << 15;

inline bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// Two-level transform of one long power-of-two row (len = count * block): first every contiguous block
// (H_block), then across blocks in column strips (H_count); H_len = H_count kron H_block.
template <class T>
void long_row_pow2(const FwhtKernels<T>& k, const T* src, T* dst, int64_t len, T scale, int threads) {
  const int64_t block = std::min<int64_t>(len, kBlockBytes / int64_t(sizeof(T)));
  const int64_t count = len / block;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t b = 0; b < count; ++b) k.row_pow2(src + b * block, dst + b * block, block, scale);
  if (count == 1) return;
  int64_t width = kStripBytes / (count * int64_t(sizeof(T)));
  width = std::max<int64_t>(width, 64 / int64_t(sizeof(T)));  // at least one cache line
  width = std::max<int64_t>(width, k.lanes);
  width = std::min<int64_t>(width, block);
  const int64_t strips = block / width;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t s = 0; s < strips; ++s) k.columns_pow2(dst + s * width, count, block, width);
}

template <class T>
void run(const FwhtProblem<T>& p, int threads, Isa isa) {
  if (const char* err = fwht_check(p.n, p.m)) throw std::invalid_argument(err);
  if (p.rows <= 0 || p.n <= 0) return;
  if (!isa_available(isa)) throw std::invalid_argument("requested ISA is not available on this CPU");
  const FwhtKernels<T>& k = kernels_for(isa, T());
  threads = std::max(1, threads);
  if (p.rows * p.n < kMinParallelElements) threads = 1;

  const int m = p.m;
  const int64_t chunk = p.n / m;  // the power-of-two part
  const bool long_rows = chunk * int64_t(sizeof(T)) > kInCacheBytes ||
                         (p.rows < threads && chunk * int64_t(sizeof(T)) > kBlockBytes);

  if (!long_rows) {
    // Each thread takes whole rows; a row (all m chunks, then their mixing) never leaves its cache.
    const int row_threads = static_cast<int>(std::min<int64_t>(threads, p.rows));
#pragma omp parallel for num_threads(row_threads) schedule(static) if (row_threads > 1)
    for (int64_t r = 0; r < p.rows; ++r) {
      const T* src = p.src + r * p.n;
      T* dst = p.dst + r * p.n;
      for (int a = 0; a < m; ++a) k.row_pow2(src + a * chunk, dst + a * chunk, chunk, p.scale);
      if (m > 1) k.mix_chunks(dst, m, chunk, p.hadamard_m, 0, chunk);
    }
    return;
  }

  // Long rows: all threads work inside one row at a time.
  for (int64_t r = 0; r < p.rows; ++r) {
    const T* src = p.src + r * p.n;
    T* dst = p.dst + r * p.n;
    for (int a = 0; a < m; ++a) long_row_pow2(k, src + a * chunk, dst + a * chunk, chunk, p.scale, threads);
    if (m > 1) {
      const int64_t width = std::max<int64_t>(k.lanes, 1024);
      const int64_t strips = (chunk + width - 1) / width;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
      for (int64_t s = 0; s < strips; ++s)
        k.mix_chunks(dst, m, chunk, p.hadamard_m, s * width, std::min(chunk, (s + 1) * width));
    }
  }
}

}  // namespace

const char* fwht_check(int64_t n, int m) {
  if (m != 1 && m != 12 && m != 20 && m != 28) return "m must be 1, 12, 20 or 28";
  if (n <= 0 || n % m != 0 || !is_pow2(n / m)) return "n must be m * 2^k";
  if (n / m > (int64_t(1) << 30)) return "n / m must be at most 2^30";
  return nullptr;
}

void fwht(const FwhtProblem<float>& p, int threads, Isa isa) { run(p, threads, isa); }
void fwht(const FwhtProblem<double>& p, int threads, Isa isa) { run(p, threads, isa); }

}  // namespace dreidel
