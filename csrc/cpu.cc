#include <unistd.h>

#if defined(DREIDEL_X86)
#include <cpuid.h>
#endif

#include "cache.h"
#include "isa.h"

namespace dreidel {

#if defined(DREIDEL_X86)
namespace {

// What the CPU reports through CPUID and the OS has enabled in XCR0 (read with XGETBV): an instruction set
// runs only where both hold, since the OS must save its registers on a context switch. Read directly
// rather than through the compiler runtime's __builtin_cpu_supports, which not every toolchain fills in
// (a Zig-built Clang module saw no AVX2 or AVX-512 on an AVX-512 Xeon and dispatched to the portable
// kernels). Bits from the Intel SDM, vol. 2A (CPUID leaves 1 and 7) and vol. 1, 13.3 (XCR0).
struct X86Support {
  bool avx2_fma = false;     // AVX2 and FMA, with the XMM and YMM state enabled
  bool avx512_f_dq = false;  // and AVX-512 F and DQ, with the opmask and both halves of the ZMM state
};

X86Support x86_support() {
  X86Support s;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return s;
  const bool fma = ecx & bit_FMA, osxsave = ecx & bit_OSXSAVE, avx = ecx & bit_AVX;
  if (!osxsave || !avx) return s;  // no XGETBV, or no AVX state to enable
  unsigned xcr0_low = 0, xcr0_high = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
  constexpr unsigned kYmmState = 0x6;    // XMM (bit 1) and YMM upper halves (bit 2)
  constexpr unsigned kZmmState = 0xe6;   // those, the opmask (5), ZMM0-15 upper halves (6), ZMM16-31 (7)
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return s;
  s.avx2_fma = (xcr0_low & kYmmState) == kYmmState && fma && (ebx & bit_AVX2);
  s.avx512_f_dq = s.avx2_fma && (xcr0_low & kZmmState) == kZmmState && (ebx & bit_AVX512F) && (ebx & bit_AVX512DQ);
  return s;
}

}  // namespace
#endif

bool isa_available(Isa isa) {
#if defined(DREIDEL_X86)
  static const X86Support support = x86_support();
#endif
  switch (isa) {
    case Isa::portable:
      return true;
#if defined(DREIDEL_X86)
    case Isa::avx2:
      return support.avx2_fma;
    case Isa::avx512:
      // The AVX-512 kernels are also compiled with -mavx2 -mfma (see CMakeLists.txt).
      return support.avx512_f_dq;
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
