// Single-threaded FWHT of contiguous rows, for native code that runs its own thread loop and transforms
// small pieces between other work (the spectral layers transform each row's blocks between gathers).
// Same kernels, cache blocking and convention as dreidel::fwht (see fwht.h).
#pragma once

#include <cstdint>

#include "cache.h"
#include "fwht_kernels.h"
#include "isa.h"

namespace dreidel {

template <class T>
class SerialFwht {
 public:
  // n = m * 2^k (checked: throws std::invalid_argument), hadamard_m is m x m and must outlive this object,
  // `isa` must be available. `from_memory`: the rows are far larger than the caches, as a whole (the
  // transform then picks passes that stream better, see fwht.cc); `cache`: the CPU the passes are chosen
  // for. Instances hold no mutable state.
  SerialFwht(int64_t n, int m, const T* hadamard_m, T scale, Isa isa, bool from_memory = false,
             const CacheGeometry& cache = host_cache_geometry());
  // dst = scale * (H_m kron H_{n/m}) src for `rows` contiguous rows; src may equal dst.
  void operator()(const T* src, T* dst, int64_t rows) const;
  // Whether operator() streams the rows through the pipelined pass (only ever out of place: `in_place` false):
  // a thread loop should then hand them out in runs (see fwht.cc).
  bool pipelines(bool in_place) const;
  int64_t n() const { return n_; }

 private:
  const FwhtKernels<T>* kernels_;
  MixPlan<T> plan_;
  int64_t n_, chunk_;
  T scale_;
  bool from_memory_;
  CacheGeometry cache_;
};

extern template class SerialFwht<float>;
extern template class SerialFwht<double>;

}  // namespace dreidel
