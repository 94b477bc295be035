// The CUDA entry points (focal_cuda.h): the forward launches by dtype (the 16-
// and 32-bit dtypes' kernels in forward_<dtype>.cu, float64's here), the
// backward rescale and GHM-C's histogram and bin weights. The kernels are in
// kernels.cuh.
//
// FOCAL_CUDA_HOST_EMULATION: tests/cuda_emulation compiles this file as plain
// C++ (kernels.cuh says how); only the kernels and the launch choices remain.
#include "kernels.cuh"

namespace focal::cuda {
namespace {

// ------------------------------------------------------------------ GHM-C
// The histogram pass (losses/ghmc.h): each block counts its elements' bins in
// shared memory (integer atomics: the counts, and so the weights, are the same
// whatever the order), then adds its counts to the global ones (64-bit integer
// atomics). A thread carries a run of equal bins in a register and adds the run
// when the bin changes: detection batches are mostly easy negatives in the first
// bin, so a thread adds a few runs rather than one count per element. The block's
// thresholds and edges are computed into shared memory by the function that
// writes them into the loss pass's table, so both passes bin alike.
//
// The kernel is three phases separated by barriers; the emulation tests run the
// phases, not the kernel (it cannot emulate a barrier thread by thread).
template <class acc_t>
struct GhmcShared {
  unsigned long long* counts;  // bins + 1 (the last: valid elements)
  acc_t* thresholds;           // bins + 1
  acc_t* edges;                // bins + 1
};

// Bytes of dynamic shared memory for `bins` bins.
constexpr size_t ghmc_shared_bytes(int64_t bins) { return static_cast<size_t>(bins + 1) * 3 * sizeof(double); }

template <class acc_t>
__device__ __forceinline__ GhmcShared<acc_t> ghmc_shared(unsigned long long* smem, int bins) {
  acc_t* t = reinterpret_cast<acc_t*>(smem + bins + 1);
  return {smem, t, t + bins + 1};
}

template <class acc_t>
__device__ __forceinline__ void ghmc_hist_init(const GhmcShared<acc_t>& s, int bins) {
  for (int k = threadIdx.x; k <= bins; k += blockDim.x) {
    s.counts[k] = 0;
    s.thresholds[k] = ghmc_threshold<acc_t>(k, bins);
    s.edges[k] = ghmc_edge<acc_t>(k, bins);
  }
}

template <class scalar_t, class target_t>
__device__ __forceinline__ void ghmc_hist_count(const FocalParams& p, const GhmcShared<acc_type<scalar_t>>& s,
                                                int bins) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* __restrict__ x = static_cast<const scalar_t*>(p.input.data);
  const target_t* __restrict__ t = static_cast<const target_t*>(p.target.data);
  const acc_t* __restrict__ wd = static_cast<const acc_t*>(p.weight.data);
  const int64_t n = p.rows * p.cols;
  const int64_t cols = p.cols;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t dr = step / cols;
  const int64_t dc = step - dr * cols;
  const acc_t fbins = static_cast<acc_t>(bins);
  int64_t r = tid / cols;
  int64_t c = tid - r * cols;
  int run_bin = -1;
  unsigned long long run = 0, valid_count = 0;
  for (int64_t i = tid; i < n; i += step, advance(r, c, dr, dc, cols)) {
    int64_t xi, ti, wi;
    if (p.contiguous) {
      xi = i;
      ti = p.labels ? r : i;
      wi = r * p.weight.row_strides[0] + c * p.weight.col_stride;
    } else {
      int64_t ox, ot, ow;
      row_offsets(p, r, ox, ot, ow);
      xi = ox + c * p.input.col_stride;
      ti = ot + c * p.target.col_stride;  // (labels: col_stride 0)
      wi = ow + c * p.weight.col_stride;
    }
    if (wd != nullptr && wd[wi] == acc_t(0)) continue;
    const acc_t xv = static_cast<acc_t>(x[xi]);
    int b;
    if constexpr (std::is_integral_v<target_t>) {
      const int64_t label = static_cast<int64_t>(t[ti]);
      if (label == p.ignore_index || label < 0 || label > p.num_classes) continue;
      const acc_t xp = c == label ? -xv : xv;
      b = ghmc_bin_logit(xp, logistic<acc_t, acc_t>(xp).p, s.thresholds, bins, fbins);
    } else {
      const acc_t y = static_cast<acc_t>(t[ti]);
      if (y == acc_t(0) || y == acc_t(1)) {
        const acc_t xp = y == acc_t(1) ? -xv : xv;
        b = ghmc_bin_logit(xp, logistic<acc_t, acc_t>(xp).p, s.thresholds, bins, fbins);
      } else {
        const Logistic<acc_t> z = logistic<acc_t, acc_t>(xv);
        const acc_t pmy = p_minus_y<acc_t, acc_t>(xv, z, y);
        b = ghmc_bin_soft(pmy < acc_t(0) ? -pmy : pmy, s.edges, bins, fbins);
      }
    }
    ++valid_count;
    if (b < 0) continue;  // a NaN: counted as valid, in no bin (mmdet's tot)
    if (b != run_bin) {
      if (run != 0) atomicAdd(&s.counts[run_bin], run);
      run_bin = b;
      run = 0;
    }
    ++run;
  }
  if (run != 0) atomicAdd(&s.counts[run_bin], run);
  if (valid_count != 0) atomicAdd(&s.counts[bins], valid_count);
}

template <class acc_t>
__device__ __forceinline__ void ghmc_hist_flush(const GhmcShared<acc_t>& s, unsigned long long* __restrict__ counts,
                                                int bins) {
  for (int k = threadIdx.x; k <= bins; k += blockDim.x) {
    if (s.counts[k] != 0) atomicAdd(&counts[k], s.counts[k]);
  }
}

#ifndef FOCAL_CUDA_HOST_EMULATION
template <class scalar_t, class target_t>
__global__ void __launch_bounds__(kThreads) ghmc_hist_kernel(const FocalParams p, unsigned long long* counts) {
  extern __shared__ unsigned long long ghmc_smem[];
  const int bins = static_cast<int>(p.options.bins);
  const GhmcShared<acc_type<scalar_t>> s = ghmc_shared<acc_type<scalar_t>>(ghmc_smem, bins);
  ghmc_hist_init(s, bins);
  __syncthreads();
  ghmc_hist_count<scalar_t, target_t>(p, s, bins);
  __syncthreads();
  ghmc_hist_flush(s, counts, bins);
}
#endif

// The bins' weights (losses/ghmc.h, ghmc_bin_weight), the thresholds and the
// edges into the loss pass's table, and the running counts: one block, each
// thread a share of the bins (every thread first counts the non-empty bins).
// ghmc_grid_kernel then fills the grid from them.
template <class acc_t>
__global__ void __launch_bounds__(kThreads)
    ghmc_weights_kernel(const long long* __restrict__ counts, const float* __restrict__ acc_in,
                        float* __restrict__ acc_out, acc_t* __restrict__ table, int bins, double momentum,
                        double norm) {
  int n = 0;
  for (int k = 0; k < bins; ++k) n += counts[k] > 0 ? 1 : 0;
  const double tot = counts[bins] > 1 ? static_cast<double>(counts[bins]) : 1.0;
  for (int k = threadIdx.x; k < bins; k += blockDim.x) {
    const float acc = acc_in != nullptr ? acc_in[k] : 0.0f;
    table[k] = static_cast<acc_t>(
        ghmc_bin_weight(counts[k], acc, momentum, tot, n, norm, acc_out != nullptr ? acc_out + k : nullptr));
  }
  ghmc_fill_bounds(table, bins, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
}

// The table's grid of cell weights, from the weights and thresholds ghmc_weights_kernel wrote.
template <class acc_t>
__global__ void __launch_bounds__(kThreads) ghmc_grid_kernel(acc_t* __restrict__ table, int bins) {
  ghmc_fill_grid<acc_t>(table, bins, table, static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x),
                        static_cast<int>(gridDim.x * blockDim.x));
}
constexpr int kGhmcGridBlocks = kGhmcGrid / kThreads;

// f(Variant<scalar_t, target_t, GHMC>) for the histogram's dtypes: int64 labels or
// dense targets in the compute type (plan.cpp converts the rest).
template <class F>
void dispatch_ghmc(const FocalParams& p, F&& f) {
  auto by_target = [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    using acc_t = acc_type<scalar_t>;
    if (p.labels) return f(Variant<scalar_t, int64_t, GHMC<acc_t>>{});
    return f(Variant<scalar_t, acc_t, GHMC<acc_t>>{});
  };
  switch (p.input.kind) {
    case ScalarKind::Float16:
      return by_target(c10::Half{});
    case ScalarKind::BFloat16:
      return by_target(c10::BFloat16{});
    case ScalarKind::Float32:
      return by_target(float{});
    case ScalarKind::Float64:
      return by_target(double{});
    default:
      return;  // rejected by the op layer
  }
}

}  // namespace

#ifndef FOCAL_CUDA_HOST_EMULATION

int64_t forward_num_blocks(const FocalParams& p, int device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  switch (p.input.kind) {
    case ScalarKind::Float16:
      return forward_grid_half(p, device);
    case ScalarKind::BFloat16:
      return forward_grid_bfloat16(p, device);
    case ScalarKind::Float32:
      return forward_grid_float(p, device);
    case ScalarKind::Float64:
      return typed_forward_grid<double>(p, device);
    default:
      return 1;  // rejected by the op layer
  }
}

void forward(const FocalParams& p, int device, void* partials, int64_t nblocks, void* out) {
  if (p.rows * p.cols == 0) return;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  switch (p.input.kind) {
    case ScalarKind::Float16:
      return forward_half(p, device, partials, nblocks, out);
    case ScalarKind::BFloat16:
      return forward_bfloat16(p, device, partials, nblocks, out);
    case ScalarKind::Float32:
      return forward_float(p, device, partials, nblocks, out);
    case ScalarKind::Float64:
      return typed_forward<double>(p, device, partials, nblocks, out);
    default:
      return;  // rejected by the op layer
  }
}

void scale_grad(void* grad, ScalarKind kind, int64_t numel, const void* grad_output, ScalarKind go_kind,
                int device) {
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  const auto grid = static_cast<unsigned>(grid_size(numel, device, kScaleBlocksPerSm));
  const bool vectorized = aligned16(grad);
  const bool go_float32 = go_kind == ScalarKind::Float32;
  switch (kind) {
    case ScalarKind::Float16:
      launch_scale<c10::Half>(grad, numel, grad_output, go_float32, grid, vectorized, stream);
      break;
    case ScalarKind::BFloat16:
      launch_scale<c10::BFloat16>(grad, numel, grad_output, go_float32, grid, vectorized, stream);
      break;
    case ScalarKind::Float32:
      launch_scale<float>(grad, numel, grad_output, go_float32, grid, vectorized, stream);
      break;
    case ScalarKind::Float64:
      launch_scale<double>(grad, numel, grad_output, false, grid, vectorized, stream);
      break;
    default:
      return;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}


void ghmc_histogram(const FocalParams& p, int device, int64_t* counts) {
  if (p.rows * p.cols == 0) return;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  const size_t smem = ghmc_shared_bytes(p.options.bins);
  dispatch_ghmc(p, [&](auto v) {
    using V = decltype(v);
    const auto kernel = ghmc_hist_kernel<typename V::scalar_t, typename V::target_t>;
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, smem));
    const int64_t grid = grid_size(p.rows * p.cols, device, blocks);
    kernel<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(p, reinterpret_cast<unsigned long long*>(counts));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void ghmc_weights(const int64_t* counts, const float* acc_in, float* acc_out, void* table, bool float64, int bins,
                  double momentum, double norm, int device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  const auto* c = reinterpret_cast<const long long*>(counts);
  if (float64) {
    ghmc_weights_kernel<double><<<1, kThreads, 0, stream>>>(c, acc_in, acc_out, static_cast<double*>(table), bins,
                                                             momentum, norm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ghmc_grid_kernel<double><<<kGhmcGridBlocks, kThreads, 0, stream>>>(static_cast<double*>(table), bins);
  } else {
    ghmc_weights_kernel<float><<<1, kThreads, 0, stream>>>(c, acc_in, acc_out, static_cast<float*>(table), bins,
                                                            momentum, norm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ghmc_grid_kernel<float><<<kGhmcGridBlocks, kThreads, 0, stream>>>(static_cast<float*>(table), bins);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif  // FOCAL_CUDA_HOST_EMULATION

}  // namespace focal::cuda
