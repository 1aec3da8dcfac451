// Advice to the OS about memory the caller has just allocated.
#pragma once

#include <cstddef>

namespace dreidel {

// Asks Linux to back the 2 MB-aligned part of [data, data + bytes) with transparent huge pages when it is
// first written (madvise MADV_HUGEPAGE; the partial 2 MB at either end keep 4 KB pages). For a fresh
// allocation of tens of megabytes that is about to be written whole: such blocks come straight from the OS,
// and writing them page-faults once per page. Only advice: the contents and the mapping are unchanged, and
// it does nothing where THP is off ("never"), already on for everything ("always"), or not Linux. Returns
// whether the kernel took the advice.
bool advise_huge_pages(void* data, std::size_t bytes);

}  // namespace dreidel
