#include "memory.h"

#include <cstdint>

#if defined(__linux__)
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
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

#if defined(__linux__)
namespace {

// Linux's PAGEMAP_SCAN interface (include/uapi/linux/fs.h since 6.7), declared here because the C library's
// kernel headers may predate it; the layout and numbers are a stable kernel ABI.
struct PageRegion {
  std::uint64_t start, end, categories;
};
struct PagemapScanArg {
  std::uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted, category_mask,
      category_anyof_mask, return_mask;
};
constexpr unsigned long kPagemapScan = _IOWR('f', 16, PagemapScanArg);
constexpr std::uint64_t kPageIsHuge = std::uint64_t(1) << 6;

}  // namespace
#endif

bool mostly_on_huge_pages(const void* data, std::size_t bytes) {
#if defined(__linux__)
  const std::uintptr_t start = reinterpret_cast<std::uintptr_t>(data);
  const long page = sysconf(_SC_PAGESIZE);
  if (data == nullptr || bytes == 0 || page <= 0) return false;
  const std::uintptr_t page_mask = std::uintptr_t(page) - 1;  // the ioctl takes whole pages
  if (bytes > UINTPTR_MAX - page_mask - start) return false;
  const int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  // Only the huge regions are reported, merged where adjacent; the walk resumes at walk_end when they
  // overflow the vector.
  PageRegion regions[32];
  PagemapScanArg arg = {};
  arg.size = sizeof(arg);
  arg.start = start & ~page_mask;
  arg.end = (start + bytes + page_mask) & ~page_mask;
  arg.vec = reinterpret_cast<std::uintptr_t>(regions);
  arg.vec_len = sizeof(regions) / sizeof(regions[0]);
  arg.category_mask = kPageIsHuge;
  arg.return_mask = kPageIsHuge;
  std::uint64_t huge = 0;
  while (arg.start < arg.end) {
    const int found = ioctl(fd, kPagemapScan, &arg);
    if (found < 0) break;  // no such ioctl (before Linux 6.7): nothing counted
    for (int i = 0; i < found; ++i) huge += regions[i].end - regions[i].start;
    if (arg.walk_end <= arg.start) break;
    arg.start = arg.walk_end;
  }
  close(fd);
  return huge * 2 > bytes;
#else
  (void)data;
  (void)bytes;
  return false;
#endif
}

}  // namespace dreidel
