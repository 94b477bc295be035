// The CUDA kernels of csrc/cuda/focal_cuda.cu compiled as plain C++ and run on
// the CPU, one thread after another: tests of their indexing, branching and
// kernel choice on machines without a GPU (tests/test_cuda_emulation.py).
//
// Stand-ins: the CUDA built-in indices are thread-local globals set by the
// launcher below; the kernel qualifiers are empty; CUB's block reduction adds
// the block's threads' sums, which the launcher runs from the last thread down
// to thread 0, so that thread 0 holds the block's total as with CUB. The math
// is focal_math.h's host branch (IEEE reciprocal and log1pf where the device
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

namespace focal::cuda {
namespace {

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

ScalarKind kind_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return ScalarKind::Float16;
    case at::kBFloat16: return ScalarKind::BFloat16;
    case at::kFloat: return ScalarKind::Float32;
    case at::kDouble: return ScalarKind::Float64;
    case at::kInt: return ScalarKind::Int32;
    case at::kLong: return ScalarKind::Int64;
    default: TORCH_CHECK(false, "emulate: unsupported dtype ", t.scalar_type());
  }
}

// Forward of the fused op on contiguous [rows, C] logits, with label targets
// [rows] or dense targets [rows, C], an optional weight [C] or [rows, C] and an
// optional 0-d divisor, on a grid of `grid` blocks. Weights: [C], [rows, 1] or [rows, C]. The tensors may start at
// any element (the vector path needs 16-byte alignment). Returns the loss
// (elementwise, or the scaled sum), the gradient (or an empty tensor) and the
// kernel the launch chose: "label_rows", "label_rows_cross" (and "_w" with
// per-row weights) or "general".
std::tuple<at::Tensor, at::Tensor, std::string> emulate_forward(at::Tensor input, at::Tensor targets,
                                                                 std::optional<at::Tensor> weight, double alpha, double gamma,
                                                         int64_t ignore_index, bool sum, bool want_grad, double scale,
                                                         std::optional<at::Tensor> divisor, int64_t grid,
                                                         bool acc_loss) {
  TORCH_CHECK(input.dim() == 2 && input.is_contiguous() && targets.is_contiguous(), "emulate: contiguous [rows, C]");
  const bool labels = !targets.is_floating_point();
  FocalParams p;
  p.rows = input.size(0);
  p.cols = input.size(1);
  p.ndim = 1;
  p.row_sizes[0] = p.rows;
  p.input = {input.data_ptr(), kind_of(input), 1, {p.cols}};
  p.target = {targets.data_ptr(), kind_of(targets), labels ? 0 : 1, {labels ? 1 : p.cols}};
  if (weight) {
    TORCH_CHECK(weight->is_contiguous() && (weight->dim() == 1 || weight->dim() == 2),
                "emulate: weight [C], [rows, 1] or [rows, C]");
    if (weight->dim() == 1) {
      p.weight = {weight->data_ptr(), kind_of(*weight), 1, {0}};  // per class
    } else if (weight->size(1) == 1) {
      p.weight = {weight->data_ptr(), kind_of(*weight), 0, {1}};  // per row
    } else {
      p.weight = {weight->data_ptr(), kind_of(*weight), 1, {p.cols}};  // per element
    }
  }
  p.labels = labels;
  p.num_classes = p.cols;
  p.ignore_index = ignore_index;
  p.contiguous = true;
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto loss = sum ? at::zeros({}, input.options().dtype(acc_loss ? acc : input.scalar_type())) : at::empty_like(input);
  p.acc_loss = sum && acc_loss;
  auto grad = want_grad ? at::empty_like(input) : at::empty({0}, input.options());
  p.loss = sum ? nullptr : loss.data_ptr();
  p.grad = want_grad ? grad.data_ptr() : nullptr;
  p.alpha_pos = alpha >= 0 ? alpha : 1.0;
  p.alpha_neg = alpha >= 0 ? 1.0 - alpha : 1.0;
  p.gamma = gamma;
  p.gamma_int = (gamma == std::floor(gamma) && gamma >= 0 && gamma <= 16) ? static_cast<int>(gamma) : -1;
  p.reduction = sum ? Reduction::Sum : Reduction::None;
  p.scale = scale;
  if (divisor) p.divisor = divisor->data_ptr();
  std::string chosen = "general";
  std::vector<double> partials(static_cast<size_t>(grid), 0.0);
  dispatch_forward(p, [&](auto v) {
    using V = decltype(v);
    using scalar_t = typename V::scalar_t;
    using target_t = typename V::target_t;
    constexpr int GK = V::GK;
    const ForwardLaunch<scalar_t> l = forward_launch<scalar_t, target_t, GK>(p);
    if constexpr (std::is_integral_v<target_t> && !std::is_same_v<scalar_t, double>) {
      constexpr int kU = kRowUnrollPacks<scalar_t>;
      if (l.kernel == focal_label_rows_kernel<scalar_t, target_t, GK, kU, false, false>) chosen = "label_rows";
      if (l.kernel == focal_label_rows_kernel<scalar_t, target_t, GK, kU, true, false>) chosen = "label_rows_cross";
      if (l.kernel == focal_label_rows_kernel<scalar_t, target_t, GK, kU, false, true>) chosen = "label_rows_w";
      if (l.kernel == focal_label_rows_kernel<scalar_t, target_t, GK, kU, true, true>) chosen = "label_rows_cross_w";
    }
    launch(l.kernel, grid, p, make_consts<acc_type<scalar_t>>(p), l.vectorized, partials.data());
    if (sum) {
      launch(focal_finalize_kernel<scalar_t>, 1, p, static_cast<const double*>(partials.data()), grid,
             loss.data_ptr());
    }
  });
  return {loss, grad, chosen};
}

}  // namespace
}  // namespace focal::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("forward", &focal::cuda::emulate_forward); }
