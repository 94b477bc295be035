#include "grad_cache.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace focal::cpu {

void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kPage = 4096;
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  if (!t.is_cpu() || bytes < kLargeCpuBytes) return;
  const auto begin = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  const std::uintptr_t first = (begin + kPage - 1) / kPage * kPage;
  const std::uintptr_t last = (begin + static_cast<std::uintptr_t>(bytes)) / kPage * kPage;
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace focal::cpu
