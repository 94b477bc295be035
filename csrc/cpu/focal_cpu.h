// Host-side interface of the CPU kernels: one function pointer type shared by
// every instruction-set build of cpu/focal_cpu_kernel.h.
#pragma once

#include <cstdint>

#include "../focal_params.h"

namespace focal::cpu {

// Processes elements [begin, end) of the grid described by p; returns the sum
// of the weighted (unscaled) losses in that range.
using RangeFn = double (*)(const FocalParams& p, int64_t begin, int64_t end);

// The portable build, compiled into _C (focal_cpu_default.cpp).
double focal_range_default(const FocalParams& p, int64_t begin, int64_t end);

}  // namespace focal::cpu
