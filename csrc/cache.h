// Cache geometry of the CPU the process runs on, for the driver's choice of passes (fwht.cc).
#pragma once

#include <cstdint>

namespace dreidel {

// What the FWHT driver's choice of passes depends on. A test may pass another CPU's geometry to exercise
// the passes that CPU would take; the transform is the same either way.
struct CacheGeometry {
  int64_t l2_bytes = 0;  // a core's L2 cache; 0: not reported
  int l1d_ways = 0;      // associativity of the L1 data cache; 0: not reported
};

// As the C library reports it (glibc: sysconf(_SC_LEVEL2_CACHE_SIZE) and _SC_LEVEL1_DCACHE_ASSOC, from
// cpuid on x86), read once.
CacheGeometry host_cache_geometry() noexcept;

}  // namespace dreidel
