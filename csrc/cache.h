// Cache sizes of the CPU the process runs on, for the cache-blocking decisions of the driver (fwht.cc).
#pragma once

#include <cstdint>

namespace dreidel {

// Bytes of the L2 cache of one core, as the OS reports it (sysconf, else Linux's sysfs), read once;
// 0 where neither reports it (the driver then assumes no room to spare).
int64_t l2_cache_bytes();

}  // namespace dreidel
