// The portable CPU kernel (CPU_CAPABILITY=DEFAULT), linked into _C, and the
// choice of build the op runs. Faster instruction-set builds live in their own
// extension modules (focal_cpu_avx2.cpp) and are swapped in at import time after
// a runtime CPU check.
#include <atomic>
#include <mutex>

#include "focal_cpu.h"
#include "focal_cpu_kernel.h"

namespace focal::cpu {

double focal_range_default(const FocalParams& p, int64_t begin, int64_t end) {
  return focal_range_dispatch(p, begin, end);
}

void ghmc_hist_default(const FocalParams& p, int64_t begin, int64_t end, int64_t* counts) {
  ghmc_hist_dispatch(p, begin, end, counts);
}

namespace {
std::atomic<RangeFn> g_kernel{&focal_range_default};
std::atomic<HistFn> g_hist{&ghmc_hist_default};
std::mutex g_name_mu;
std::string g_name = "default";
}  // namespace

RangeFn selected_kernel() { return g_kernel.load(); }

HistFn selected_hist_kernel() { return g_hist.load(); }

std::string selected_kernel_name() {
  std::lock_guard<std::mutex> lock(g_name_mu);
  return g_name;
}

void select_kernel(RangeFn fn, HistFn hist, const std::string& name) {
  std::lock_guard<std::mutex> lock(g_name_mu);
  g_kernel.store(fn);
  g_hist.store(hist);
  g_name = name;
}

}  // namespace focal::cpu
