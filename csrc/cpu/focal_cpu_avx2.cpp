// The AVX2 + FMA build of the CPU kernel, as its own extension module
// (focal_cuda._cpu_avx2) compiled with -mavx2 -mfma -mf16c and
// CPU_CAPABILITY=AVX2, so at::vec uses 256-bit vectors and Sleef's exp/log1p.
//
// It is a separate shared object on purpose: inline functions compiled with
// AVX2 here can never be picked by the linker for the portable code in _C.
// Python imports it only when torch reports AVX2 (or better) for this CPU, then
// hands the kernel's address to _C (focal_cuda/_cpu_isa.py).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "focal_cpu.h"
#include "focal_cpu_kernel.h"

namespace {

double focal_range_avx2(const focal::FocalParams& p, int64_t begin, int64_t end) {
  return focal::cpu::focal_range_dispatch(p, begin, end);
}

void ghmc_hist_avx2(const focal::FocalParams& p, int64_t begin, int64_t end, int64_t* counts) {
  focal::cpu::ghmc_hist_dispatch(p, begin, end, counts);
}

}  // namespace

PYBIND11_MODULE(_cpu_avx2, m) {
  m.doc() = "focal_cuda CPU kernel built for AVX2 + FMA";
  m.def("kernel_address", [] {
    focal::cpu::RangeFn fn = &focal_range_avx2;
    return reinterpret_cast<std::uintptr_t>(fn);
  });
  m.def("hist_kernel_address", [] {
    focal::cpu::HistFn fn = &ghmc_hist_avx2;
    return reinterpret_cast<std::uintptr_t>(fn);
  });
  m.attr("lanes") = focal::cpu::kLanes;
}
