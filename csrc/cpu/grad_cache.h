// CPU output memory: transparent huge pages for large outputs, and the
// one-slot cache of the last freed CPU gradient buffer.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <cstdlib>

namespace focal::cpu {

// CPU outputs at least this large get huge pages (and, for the gradient, the cache below).
constexpr int64_t kLargeCpuBytes = int64_t(8) << 20;

// Fresh CPU outputs of tens of MB cost as much in page faults as the kernel's
// own work (measured: 12 ms of a 64 MB gradient's 20 ms first write, 2 cores).
// Asking for transparent huge pages cuts the faults 512-fold where the kernel
// allows it (THP "madvise" mode); elsewhere the advice is a no-op.
void advise_huge_pages(const at::Tensor& t);

// The most recently freed large CPU gradient buffer, kept for the next call.
//
// A training step allocates a gradient of the same size every iteration. A
// fresh one comes from the OS: page faults, and the OS zeroing every page
// before the kernel overwrites it. Measured on the 2-core CI machine (COCO b1,
// 64 MB): 7.5 ms of a 30 ms forward+backward, with huge pages already advised.
// Kept: one buffer of at least 8 MB (2 MB aligned, huge pages advised), reused
// when the next gradient needs between 2/3 of it and all of it; anything else
// is freed. So at most one gradient's worth (x1.5) stays allocated between
// steps, like the CUDA caching allocator does on the GPU.
// focal_cuda.set_cpu_grad_cache(False) (or FOCAL_CUDA_CPU_GRAD_CACHE=0) frees it
// and turns this off.
class CpuGradCache {
 public:
  static constexpr size_t kMinBytes = static_cast<size_t>(kLargeCpuBytes);
  static constexpr size_t kAlign = size_t(2) << 20;

  // Never destroyed: a gradient may be freed after static destruction.
  static CpuGradCache& get() {
    static CpuGradCache* cache = new CpuGradCache();
    return *cache;
  }

  // A CPU tensor of these sizes backed by a kept or new buffer.
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
    const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(opts.dtype().toScalarType());
    size_t capacity = 0;
    void* data = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      data = held_;
      capacity = held_bytes_;
      held_ = nullptr;
      held_bytes_ = 0;
    }
    if (data && !(capacity >= bytes && capacity / 3 * 2 <= bytes)) {
      std::free(data);  // before the new allocation: never both at once
      data = nullptr;
    }
    if (!data) {
      capacity = (bytes + kAlign - 1) / kAlign * kAlign;
      data = std::aligned_alloc(kAlign, capacity);
      TORCH_CHECK(data != nullptr, "focal_cuda: out of memory allocating a ", bytes, "-byte gradient");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(data, capacity, MADV_HUGEPAGE);
#endif
    }
    return at::from_blob(data, sizes, [capacity](void* p) { CpuGradCache::get().give(p, capacity); }, opts);
  }

  void give(void* p, size_t capacity) {
    void* drop = p;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (enabled_) {
        drop = held_;  // keep the newest
        held_ = p;
        held_bytes_ = capacity;
      }
    }
    std::free(drop);
  }

  void set_enabled(bool on) {
    void* drop = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      enabled_ = on;
      if (!on) {
        drop = held_;
        held_ = nullptr;
        held_bytes_ = 0;
      }
    }
    std::free(drop);
  }

  bool enabled() {
    std::lock_guard<std::mutex> lock(mu_);
    return enabled_;
  }

  size_t held_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return held_bytes_;
  }

 private:
  std::mutex mu_;
  bool enabled_ = true;
  void* held_ = nullptr;
  size_t held_bytes_ = 0;
};


}  // namespace focal::cpu
