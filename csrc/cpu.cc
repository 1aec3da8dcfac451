#include <unistd.h>

#include <cstdio>
#include <string>

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

namespace {

// The size of the level-2 data or unified cache of cpu0 in Linux's sysfs ("2048K"), or 0.
int64_t l2_from_sysfs() {
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    int level = 0;
    char type[32] = {}, unit = 0;
    long long size = 0;
    FILE* f = std::fopen((dir + "level").c_str(), "r");
    if (f == nullptr) break;
    const bool read_level = std::fscanf(f, "%d", &level) == 1;
    std::fclose(f);
    if (!read_level || level != 2) continue;
    if ((f = std::fopen((dir + "type").c_str(), "r")) == nullptr) continue;
    const bool read_type = std::fscanf(f, "%31s", type) == 1;
    std::fclose(f);
    if (!read_type || std::string(type) == "Instruction") continue;
    if ((f = std::fopen((dir + "size").c_str(), "r")) == nullptr) continue;
    const int fields = std::fscanf(f, "%lld%c", &size, &unit);
    std::fclose(f);
    if (fields < 1 || size <= 0) continue;
    if (fields == 2 && unit == 'K') size <<= 10;
    if (fields == 2 && unit == 'M') size <<= 20;
    return size;
  }
  return 0;
}

}  // namespace

int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (reported > 0) return int64_t(reported);
#endif
    return l2_from_sysfs();
  }();
  return bytes;
}

}  // namespace dreidel
