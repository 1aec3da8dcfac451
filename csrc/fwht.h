// Fast Walsh-Hadamard transform on contiguous CPU buffers. No Python or PyTorch types.
//
// Convention: a row of length n = m * 2^k is transformed by the matrix scale * (H_m kron H_{2^k}),
// where H_{2^k} is the Sylvester ("natural" order) Hadamard matrix, H_{2n} = [[H_n, H_n], [H_n, -H_n]],
// and H_m (m in {1, 12, 20, 28}) is a caller-supplied m x m Hadamard matrix. Element i of the row is
// (a, b) = (i / 2^k, i % 2^k): the 2^k-point transform runs along each contiguous chunk of length 2^k,
// then H_m mixes the m chunks.
#pragma once

#include <cstdint>

#include "cache.h"
#include "isa.h"

namespace dreidel {

template <class T>
struct FwhtProblem {
  const T* src;        // rows * n * interleave values, read once
  T* dst;              // as many; may equal src (in place)
  int64_t rows;
  int64_t n;           // m * 2^k
  int m;               // 1, 12, 20 or 28
  const T* hadamard_m; // m * m values (row-major); unused when m == 1
  T scale;             // applied to every output (1/sqrt(n) for the orthonormal transform)
  // Transforms interleaved in each row: with interleave c, each of the `rows` rows holds n * c values and c
  // transforms, value i of transform j at i * c + j (a dimension of a contiguous tensor other than the last,
  // transformed where it lies). 1: one transform per row, its values contiguous.
  int64_t interleave = 1;
};

// The most threads one call starts: more than any CPU dreidel runs on has hardware threads. A larger count
// (torch.set_num_threads(10**6), say) is taken as this many; libgomp would abort the process creating them.
constexpr int kMaxThreads = 1024;

// `requested` within [1, kMaxThreads].
constexpr int usable_threads(int requested) {
  return requested < 1 ? 1 : requested > kMaxThreads ? kMaxThreads : requested;
}

// Returns an error message for a malformed problem, or nullptr when it is valid.
const char* fwht_check(int64_t n, int m);

// Passes are chosen for `cache` (by default this CPU's); the result does not depend on it.
void fwht(const FwhtProblem<float>& p, int threads, Isa isa, const CacheGeometry& cache = host_cache_geometry());
void fwht(const FwhtProblem<double>& p, int threads, Isa isa, const CacheGeometry& cache = host_cache_geometry());

}  // namespace dreidel
