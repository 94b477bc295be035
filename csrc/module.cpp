// The Python module focal_cuda._C: loading it registers the ops
// (torch.ops.focal_cuda.*, ops/family_ops.cpp); its own functions report the
// build and switch the CPU kernel and gradient cache.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cpu/focal_cpu.h"
#include "cpu/grad_cache.h"

#ifndef FOCAL_CUDA_ARCHS
#define FOCAL_CUDA_ARCHS ""
#endif
#ifndef FOCAL_CUDA_TUNING
#define FOCAL_CUDA_TUNING ""
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
#ifdef FOCAL_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
  d["cuda_archs"] = std::string(FOCAL_CUDA_ARCHS);
  d["cuda_tuning"] = std::string(FOCAL_CUDA_TUNING);
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["cpu_kernel"] = focal::cpu::selected_kernel_name();
  d["cpu_threads"] = at::get_num_threads();
  return d;
}

void set_cpu_kernel(std::uintptr_t address, std::uintptr_t hist_address, const std::string& name) {
  TORCH_CHECK_VALUE(address != 0 && hist_address != 0, "focal_cuda: null CPU kernel address");
  focal::cpu::select_kernel(reinterpret_cast<focal::cpu::RangeFn>(address),
                            reinterpret_cast<focal::cpu::HistFn>(hist_address), name);
}

void reset_cpu_kernel() {
  focal::cpu::select_kernel(&focal::cpu::focal_range_default, &focal::cpu::ghmc_hist_default, "default");
}

void set_cpu_grad_cache(bool enabled) { focal::cpu::CpuGradCache::get().set_enabled(enabled); }

pybind11::dict cpu_grad_cache_info() {
  pybind11::dict d;
  d["enabled"] = focal::cpu::CpuGradCache::get().enabled();
  d["held_bytes"] = focal::cpu::CpuGradCache::get().held_bytes();
  d["min_bytes"] = focal::cpu::CpuGradCache::kMinBytes;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "focal_cuda native ops (registered as torch.ops.focal_cuda.*)";
  m.def("build_info", &build_info, "How this extension was built");
  m.def("_set_cpu_kernel", &set_cpu_kernel, "Use the CPU kernels at these addresses (an ISA module's)");
  m.def("_reset_cpu_kernel", &reset_cpu_kernel, "Go back to the portable CPU kernel");
  m.def("_set_cpu_grad_cache", &set_cpu_grad_cache, "Keep (True) or free and stop keeping (False) a freed CPU gradient");
  m.def("_cpu_grad_cache_info", &cpu_grad_cache_info, "The CPU gradient cache's state");
}
