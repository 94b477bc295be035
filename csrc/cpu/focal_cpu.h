// Host-side interface of the CPU kernels: one function pointer type shared by
// every instruction-set build of cpu/focal_cpu_kernel.h, and the build in use.
#pragma once

#include <cstdint>
#include <string>

#include "../core/params.h"

namespace focal::cpu {

// Processes elements [begin, end) of the grid described by p; returns the sum
// of the weighted (unscaled) losses in that range.
using RangeFn = double (*)(const FocalParams& p, int64_t begin, int64_t end);

// The portable build, compiled into _C (focal_cpu_default.cpp).
double focal_range_default(const FocalParams& p, int64_t begin, int64_t end);

// The build the op runs: the portable one until focal_cuda/_cpu_isa.py picks
// another after its runtime CPU check.
RangeFn selected_kernel();
std::string selected_kernel_name();
void select_kernel(RangeFn fn, const std::string& name);

}  // namespace focal::cpu
