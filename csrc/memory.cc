#include "memory.h"

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace dreidel {

bool advise_huge_pages(void* data, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHugePage = std::uintptr_t(1) << 21;
  const std::uintptr_t start = reinterpret_cast<std::uintptr_t>(data);
  // Rounding start up must not wrap past zero, nor start + bytes overflow: then madvise would be asked about
  // memory outside the buffer.
  if (data == nullptr || start > UINTPTR_MAX - (kHugePage - 1) || bytes > UINTPTR_MAX - start) return false;
  const std::uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
  const std::uintptr_t end = (start + bytes) & ~(kHugePage - 1);
  if (end <= begin) return false;
  return madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) == 0;
#else
  (void)data;
  (void)bytes;
  return false;
#endif
}

}  // namespace dreidel
