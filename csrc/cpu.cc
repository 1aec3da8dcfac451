#include <unistd.h>

#include "cache.h"
#include "isa.h"

namespace dreidel {

bool isa_available(Isa isa) {
  switch (isa) {
    case Isa::portable:
      return true;
#if defined(DREIDEL_X86)
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#endif
    default:
      return false;
  }
}

Isa best_isa() {
  static const Isa best = [] {
    if (isa_available(Isa::avx512)) return Isa::avx512;
    if (isa_available(Isa::avx2)) return Isa::avx2;
    return Isa::portable;
  }();
  return best;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "portable";
  }
}

CacheGeometry host_cache_geometry() noexcept {
  static const CacheGeometry geometry = [] {
    CacheGeometry g;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (l2 > 0) g.l2_bytes = int64_t(l2);
#endif
#if defined(_SC_LEVEL1_DCACHE_ASSOC)
    const long ways = sysconf(_SC_LEVEL1_DCACHE_ASSOC);
    if (ways > 0 && ways < 1024) g.l1d_ways = int(ways);
#endif
    return g;
  }();
  return geometry;
}

}  // namespace dreidel
