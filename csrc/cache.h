// Cache sizes of the CPU the process runs on, for the driver's choice of passes (fwht.cc).
#pragma once

#include <cstdint>

namespace dreidel {

// Bytes of the L2 cache a core uses, as the C library reports it (glibc: sysconf(_SC_LEVEL2_CACHE_SIZE),
// from cpuid on x86), read once; 0 where it reports none.
int64_t l2_cache_bytes() noexcept;

}  // namespace dreidel
