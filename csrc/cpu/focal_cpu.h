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

// GHM-C's histogram pass over elements [begin, end): adds each bin's valid
// elements to counts[0..bins-1] and all valid elements to counts[bins]
// (p.options.table holds the thresholds and edges; losses/ghmc.h).
using HistFn = void (*)(const FocalParams& p, int64_t begin, int64_t end, int64_t* counts);

// The portable build, compiled into _C (focal_cpu_default.cpp).
double focal_range_default(const FocalParams& p, int64_t begin, int64_t end);
void ghmc_hist_default(const FocalParams& p, int64_t begin, int64_t end, int64_t* counts);

// The build the ops run: the portable one until focal_cuda/_cpu_isa.py picks
// another after its runtime CPU check.
RangeFn selected_kernel();
HistFn selected_hist_kernel();
std::string selected_kernel_name();
void select_kernel(RangeFn fn, HistFn hist, const std::string& name);

}  // namespace focal::cpu
