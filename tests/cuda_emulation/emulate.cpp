// The CUDA kernels (csrc/cuda/kernels.cuh, through focal_cuda.cu) compiled as plain C++ and run on
// the CPU, one thread after another: tests of their indexing, branching and
// kernel choice on machines without a GPU (tests/test_cuda_emulation.py). The
// call is planned by the op's own planning (csrc/ops/plan.cpp, compiled with
// this file).
//
// Stand-ins: the CUDA built-in indices are thread-local globals set by the
// launcher below; the kernel qualifiers are empty; CUB's block reduction adds
// the block's threads' sums, which the launcher runs from the last thread down
// to thread 0, so that thread 0 holds the block's total as with CUB. The math
// is core/math_ops.h's host branch (IEEE reciprocal and log1pf where the device
// uses rcp.approx and a polynomial), so values match the device to rounding,
// and the CPU kernel closely; what is tested exactly is which element gets
// which label, pack, factor and output, and that no thread touches memory
// outside the tensors (run it under ASan or valgrind for that: the tensors are
// plain allocations).
#include <torch/extension.h>

#include <cstring>
#include <string>

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuDim3 blockIdx, threadIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Integer atomics: one thread runs at a time.
template <class T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

namespace cub {
template <class T, int kThreadsPerBlock>
struct BlockReduce {
  struct TempStorage {};
  explicit BlockReduce(TempStorage&) {}
  T Sum(T v) {
    static thread_local T acc;
    if (threadIdx.x == kThreadsPerBlock - 1) acc = T(0);  // the first thread the launcher runs
    acc += v;
    return acc;  // thread 0, run last, gets the block's total
  }
};
}  // namespace cub

#define FOCAL_CUDA_HOST_EMULATION
#include "../../csrc/cuda/focal_cuda.cu"
// the op's planning and the CPU gradient cache it uses, in this translation unit (one parse of the
// torch headers instead of three)
#include "../../csrc/cpu/grad_cache.cpp"
#include "../../csrc/ops/plan.cpp"

namespace focal::cuda {
namespace {

// Calls f(Variant, member) as the CUDA entry point does. FOCAL_EMULATION_FOCAL_ONLY (the knob builds
// of tests/test_cuda_emulation.py, which test the focal loss at gamma = 2) instantiates only that
// member's kernels: a fraction of the compile time.
template <class F>
void emulated_dispatch(const FocalParams& p, F&& f) {
#ifdef FOCAL_EMULATION_FOCAL_ONLY
  TORCH_CHECK(p.loss_kind == LossKind::Focal && small_integer(p.options.gamma) == 2 &&
                  p.input.kind != ScalarKind::Float64,
              "this emulation build has the focal loss at gamma = 2 only, for 16- and 32-bit logits");
  auto by_dtype = [&](auto scalar_tag) {
    using S = decltype(scalar_tag);
    dispatch_target<S>(p, Focal<kGammaTwo, float>::make(p.options), f);
  };
  switch (p.input.kind) {
    case ScalarKind::Float16:
      return by_dtype(c10::Half{});
    case ScalarKind::BFloat16:
      return by_dtype(c10::BFloat16{});
    default:
      return by_dtype(float{});
  }
#else
  dispatch_forward(p, f);
#endif
}

template <class Kernel, class... Args>
void launch(Kernel kernel, int64_t grid, Args... args) {
  gridDim.x = static_cast<unsigned>(grid);
  blockDim.x = kThreads;
  for (int64_t b = 0; b < grid; ++b) {
    blockIdx.x = static_cast<unsigned>(b);
    for (int t = kThreads - 1; t >= 0; --t) {
      threadIdx.x = static_cast<unsigned>(t);
      kernel(args...);
    }
  }
}

// Forward of a member's op, planned exactly as the op plans it (csrc/ops/plan.cpp,
// as for a CUDA device: labels unchecked, int32 labels converted to int64), then
// the chosen kernels emulated on a grid of `grid` blocks.
// Returns the loss (elementwise, or the scaled sum), the gradient (or an empty
// tensor) and the kernel the launch chose: "label_rows", "label_rows_cross" (and
// "_w" for the kernels that read per-row weights: every label-rows kernel of the
// members other than the focal loss) or "general".
std::tuple<at::Tensor, at::Tensor, std::string> emulate_forward(
    const at::Tensor& input, const at::Tensor& targets, const std::optional<at::Tensor>& scores,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& divisor, double scale, int64_t reduction,
    int64_t ignore_index, bool compute_grad, bool acc_loss, int64_t loss_kind, double alpha, double gamma, double beta,
    double label_smoothing, bool iou_weighted, bool detach_weight, const std::optional<at::Tensor>& table,
    int64_t grid) {
  LossOptions o;
  if (table) {  // GHM-C's loss pass
    o.table = table->data_ptr();
    o.bins = (table->numel() - ghmc_table_size(0)) / 3;
  }
  o.alpha = alpha;
  o.gamma = gamma;
  o.beta = beta;
  o.smoothing = label_smoothing;
  o.iou_weighted = iou_weighted;
  o.detach_weight = detach_weight;
  const ForwardArgs args{scale, reduction, ignore_index, compute_grad, 0.0, acc_loss};
  const ForwardPlan plan = plan_forward(input, targets, scores, weight, divisor, args,
                                        static_cast<LossKind>(loss_kind), o, Target::Cuda);
  if (plan.empty) return {plan.loss, plan.grad, "none"};
  const FocalParams& p = plan.p;
  std::string chosen = "general";
  std::vector<double> partials(static_cast<size_t>(grid), 0.0);
  emulated_dispatch(p, [&](auto v, const auto& fn) {
    using V = decltype(v);
    using scalar_t = typename V::scalar_t;
    using target_t = typename V::target_t;
    using L = typename V::loss_t;
    const auto l = forward_launch<scalar_t, target_t, L>(p);
    if constexpr (std::is_integral_v<target_t> && !std::is_same_v<scalar_t, double>) {
      constexpr int kU = kRowUnrollPacks<scalar_t>;
      if constexpr (is_focal<L>::value) {  // (the other members have only the "_w" kernels)
        if (l.kernel == focal_label_rows_kernel<scalar_t, target_t, L, kU, false, false>) chosen = "label_rows";
        if (l.kernel == focal_label_rows_kernel<scalar_t, target_t, L, kU, true, false>) chosen = "label_rows_cross";
      }
      if (l.kernel == focal_label_rows_kernel<scalar_t, target_t, L, kU, false, true>) chosen = "label_rows_w";
      if (l.kernel == focal_label_rows_kernel<scalar_t, target_t, L, kU, true, true>) chosen = "label_rows_cross_w";
    }
    launch(l.kernel, grid, p, fn, make_consts<acc_type<scalar_t>>(p), l.vectorized, partials.data());
    if (reduction != 0) {
      launch(focal_finalize_kernel<scalar_t>, 1, p, static_cast<const double*>(partials.data()), grid,
             plan.loss.data_ptr());
    }
  });
  return {plan.loss, plan.grad, chosen};
}

// GHM-C's histogram pass as the op plans it, the kernel's three phases run for
// each block in turn (every thread through a phase before the next phase: the
// kernel's barriers), its shared memory a local array. Returns the int64 counts.
at::Tensor emulate_ghmc_histogram(const at::Tensor& input, const at::Tensor& targets,
                                  const std::optional<at::Tensor>& weight, int64_t bins, int64_t ignore_index,
                                  int64_t grid) {
  LossOptions o;
  o.bins = bins;
  const ForwardArgs args{1.0, 1, ignore_index, false, 0.0, false};
  const ForwardPlan plan =
      plan_forward(input, targets, std::nullopt, weight, std::nullopt, args, LossKind::GHMC, o, Target::Cuda);
  at::Tensor counts = at::zeros({bins + 1}, input.options().dtype(at::kLong));
  if (plan.empty) return counts;
  const FocalParams& p = plan.p;
  const int b = static_cast<int>(bins);
  std::vector<unsigned long long> smem(ghmc_shared_bytes(bins) / sizeof(unsigned long long));
  auto* out = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  dispatch_ghmc(p, [&](auto v) {
    using V = decltype(v);
    using scalar_t = typename V::scalar_t;
    using acc_t = acc_type<scalar_t>;
    gridDim.x = static_cast<unsigned>(grid);
    blockDim.x = kThreads;
    for (int64_t blk = 0; blk < grid; ++blk) {
      blockIdx.x = static_cast<unsigned>(blk);
      std::fill(smem.begin(), smem.end(), 0xdeadbeefdeadbeefull);  // the init phase must set what is read
      const GhmcShared<acc_t> s = ghmc_shared<acc_t>(smem.data(), b);
      for (int t = kThreads - 1; t >= 0; --t) {
        threadIdx.x = static_cast<unsigned>(t);
        ghmc_hist_init(s, b);
      }
      for (int t = kThreads - 1; t >= 0; --t) {
        threadIdx.x = static_cast<unsigned>(t);
        ghmc_hist_count<scalar_t, typename V::target_t>(p, s, b);
      }
      for (int t = kThreads - 1; t >= 0; --t) {
        threadIdx.x = static_cast<unsigned>(t);
        ghmc_hist_flush(s, out, b);
      }
    }
  });
  return counts;
}

// GHM-C's bin-weight kernel (one block) and grid kernel. Returns (table, new running counts).
std::tuple<at::Tensor, at::Tensor> emulate_ghmc_weights(const at::Tensor& counts, const std::optional<at::Tensor>& acc,
                                                        double momentum, double norm, bool float64) {
  const int64_t bins = counts.numel() - 1;
  at::Tensor table = at::empty({ghmc_table_size(bins)}, counts.options().dtype(float64 ? at::kDouble : at::kFloat));
  const bool use_acc = momentum > 0.0;
  at::Tensor acc_out = at::empty({use_acc ? bins : 0}, counts.options().dtype(at::kFloat));
  const auto* c = reinterpret_cast<const long long*>(counts.data_ptr<int64_t>());
  const float* in = use_acc ? acc->data_ptr<float>() : nullptr;
  float* out = use_acc ? acc_out.data_ptr<float>() : nullptr;
  if (float64) {
    launch(ghmc_weights_kernel<double>, 1, c, in, out, table.data_ptr<double>(), static_cast<int>(bins), momentum,
           norm);
    launch(ghmc_grid_kernel<double>, kGhmcGridBlocks, table.data_ptr<double>(), static_cast<int>(bins));
  } else {
    launch(ghmc_weights_kernel<float>, 1, c, in, out, table.data_ptr<float>(), static_cast<int>(bins), momentum,
           norm);
    launch(ghmc_grid_kernel<float>, kGhmcGridBlocks, table.data_ptr<float>(), static_cast<int>(bins));
  }
  return {table, acc_out};
}

}  // namespace
}  // namespace focal::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("forward", &focal::cuda::emulate_forward, py::arg("input"), py::arg("targets"), py::arg("scores") = py::none(),
        py::arg("weight") = py::none(), py::arg("divisor") = py::none(), py::arg("scale") = 1.0,
        py::arg("reduction") = 0, py::arg("ignore_index") = -1, py::arg("compute_grad") = true,
        py::arg("acc_loss") = false, py::arg("loss_kind") = 0, py::arg("alpha") = 0.25, py::arg("gamma") = 2.0,
        py::arg("beta") = 0.0, py::arg("label_smoothing") = 0.0, py::arg("iou_weighted") = true,
        py::arg("detach_weight") = false, py::arg("table") = py::none(), py::arg("grid") = 1);
  m.def("ghmc_histogram", &focal::cuda::emulate_ghmc_histogram, py::arg("input"), py::arg("targets"),
        py::arg("weight") = py::none(), py::arg("bins") = 10, py::arg("ignore_index") = -1, py::arg("grid") = 1);
  m.def("ghmc_weights", &focal::cuda::emulate_ghmc_weights, py::arg("counts"), py::arg("acc_sum") = py::none(),
        py::arg("momentum") = 0.0, py::arg("norm") = 1.0, py::arg("float64") = false);
}
