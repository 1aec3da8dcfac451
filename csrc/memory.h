// Advice to the OS about memory the caller has just allocated.
#pragma once

#include <cstddef>

namespace dreidel {

// Asks Linux to back the 2 MB-aligned part of [data, data + bytes) with transparent huge pages when it is
// first written (madvise MADV_HUGEPAGE; the partial 2 MB at either end keep 4 KB pages), and never touches
// anything outside that range. For a fresh allocation of tens of megabytes that is about to be written
// whole: such blocks usually come straight from the OS, and writing them page-faults once per page. Only
// advice: the contents are unchanged, and it has no effect where THP is off ("never") or already on for all
// memory ("always"). Returns whether madvise accepted it (false where there is no whole 2 MB page in the
// range, or no MADV_HUGEPAGE: not Linux, or a kernel built without THP; Linux accepts it in "never" mode too).
bool advise_huge_pages(void* data, std::size_t bytes);

// Whether more than half of [data, data + bytes) is backed by huge pages (transparent or hugetlb), as Linux
// reports it through the PAGEMAP_SCAN ioctl on /proc/self/pagemap (Linux 6.7 and later; one page-table walk,
// microseconds for tens of megabytes). Pages not yet faulted in count as small. False wherever it cannot tell:
// an older kernel, a sandbox without /proc, another system.
bool mostly_on_huge_pages(const void* data, std::size_t bytes);

}  // namespace dreidel
