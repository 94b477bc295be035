// The portable CPU kernel (CPU_CAPABILITY=DEFAULT), linked into _C. Faster
// instruction-set builds live in their own extension modules (focal_cpu_avx2.cpp)
// and are swapped in at import time after a runtime CPU check.
#include "focal_cpu.h"
#include "focal_cpu_kernel.h"

namespace focal::cpu {

double focal_range_default(const FocalParams& p, int64_t begin, int64_t end) {
  return focal_range_dispatch(p, begin, end);
}

}  // namespace focal::cpu
