// Operator schemas, the checks every kernel relies on, and the tensor-level
// planning shared by the CPU and CUDA kernels: collapse shapes, allocate
// outputs, fill FocalParams, launch.
//
// The user-facing argument checks with friendly messages live in Python
// (focal_cuda/_checks.py, run in eager and under torch.compile alike); the
// checks here guard memory safety for anyone calling torch.ops.focal_cuda.*
// directly, and also name the argument, what was expected and what was given.
#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <string>
#include <vector>

#include "cpu/focal_cpu.h"
#include "focal_params.h"
#ifdef FOCAL_WITH_CUDA
#include "cuda/focal_cuda.h"
#endif

#ifndef FOCAL_CUDA_ARCHS
#define FOCAL_CUDA_ARCHS ""
#endif
#ifndef FOCAL_CUDA_TUNING
#define FOCAL_CUDA_TUNING ""
#endif

namespace focal {
namespace {

// Elements per CPU work chunk. Fixed, so the chunks' partial sums (added in
// order) do not depend on the number of threads.
constexpr int64_t kCpuChunk = 16384;

std::atomic<cpu::RangeFn> g_cpu_range{&cpu::focal_range_default};
std::string g_cpu_isa = "default";

ScalarKind scalar_kind(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return ScalarKind::Float16;
    case at::kBFloat16:
      return ScalarKind::BFloat16;
    case at::kFloat:
      return ScalarKind::Float32;
    case at::kDouble:
      return ScalarKind::Float64;
    case at::kInt:
      return ScalarKind::Int32;
    case at::kLong:
      return ScalarKind::Int64;
    default:
      TORCH_CHECK_TYPE(false, "focal_cuda: unsupported dtype ", t);
  }
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const at::Tensor& input, const at::Tensor& targets, const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& divisor, double alpha, double gamma, int64_t reduction) {
  TORCH_CHECK_TYPE(is_supported_float(input.scalar_type()),
                   "focal_cuda: inputs must be float16, bfloat16, float32 or float64 logits, got ",
                   input.scalar_type());
  TORCH_CHECK_VALUE(input.dim() >= 1, "focal_cuda: inputs must have at least one dimension [..., C], got a 0-d tensor");
  const bool labels = targets.scalar_type() == at::kInt || targets.scalar_type() == at::kLong;
  if (labels) {
    const auto lead = input.sizes().slice(0, input.dim() - 1);
    TORCH_CHECK_VALUE(targets.sizes() == lead, "focal_cuda: class-index targets must have shape inputs.shape[:-1] = ",
                      lead, ", got ", targets.sizes());
  } else {
    TORCH_CHECK_TYPE(at::isFloatingType(targets.scalar_type()),
                     "focal_cuda: targets must be floating (same shape as inputs) or int32/int64 class indices, got ",
                     targets.scalar_type());
    TORCH_CHECK_VALUE(targets.sizes() == input.sizes(), "focal_cuda: floating targets must have the shape of inputs ",
                      input.sizes(), ", got ", targets.sizes());
  }
  TORCH_CHECK_VALUE(targets.device() == input.device(), "focal_cuda: targets must be on ", input.device(),
                    " like inputs, got ", targets.device());
  if (weight) {
    TORCH_CHECK_TYPE(at::isFloatingType(weight->scalar_type()), "focal_cuda: weight must be floating, got ",
                     weight->scalar_type());
    TORCH_CHECK_VALUE(at::is_expandable_to(weight->sizes(), input.sizes()), "focal_cuda: weight of shape ",
                      weight->sizes(), " does not broadcast to inputs of shape ", input.sizes());
    TORCH_CHECK_VALUE(weight->device() == input.device(), "focal_cuda: weight must be on ", input.device(),
                      ", got ", weight->device());
  }
  if (divisor) {
    TORCH_CHECK_VALUE(divisor->numel() == 1, "focal_cuda: divisor must have one element, got shape ",
                      divisor->sizes());
    TORCH_CHECK_TYPE(divisor->scalar_type() == compute_dtype(input.scalar_type()), "focal_cuda: divisor must be ",
                     compute_dtype(input.scalar_type()), " for ", input.scalar_type(), " inputs, got ",
                     divisor->scalar_type());
    TORCH_CHECK_VALUE(divisor->device() == input.device(), "focal_cuda: divisor must be on ", input.device(),
                      ", got ", divisor->device());
  }
  TORCH_CHECK_VALUE(gamma >= 0.0 && std::isfinite(gamma), "focal_cuda: gamma must be a finite number >= 0, got ",
                    gamma);
  TORCH_CHECK_VALUE((alpha >= 0.0 && alpha <= 1.0) || alpha == -1.0,
                    "focal_cuda: alpha must be in [0, 1], or -1 for no alpha weighting, got ", alpha);
  TORCH_CHECK_VALUE(reduction == 0 || reduction == 1, "focal_cuda: reduction must be 0 (none) or 1 (sum), got ",
                    reduction);
}

// Raises ValueError naming the first label outside [0, C] that is not ignore_index.
// One pass over the labels. (Five ATen ops, as this was first written, cost ~20 us
// of a tiny input's 34 us call, and 0.7 ms on 200k labels, with their temporaries.)
template <class T>
void check_labels(const T* p, int64_t n, int64_t num_classes, int64_t ignore_index) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = static_cast<int64_t>(p[i]);
    TORCH_CHECK_VALUE((v >= 0 && v <= num_classes) || v == ignore_index, "focal_cuda: targets holds class index ", v,
                      " at flat position ", i, "; expected 0..", num_classes - 1, " (a class), ", num_classes,
                      " (background) or ignore_index=", ignore_index);
  }
}

void check_labels_cpu(const at::Tensor& labels_, int64_t num_classes, int64_t ignore_index) {
  const at::Tensor labels = labels_.contiguous();  // (a copy only for strided labels)
  if (labels.scalar_type() == at::kInt) {
    check_labels(labels.const_data_ptr<int32_t>(), labels.numel(), num_classes, ignore_index);
  } else {
    check_labels(labels.const_data_ptr<int64_t>(), labels.numel(), num_classes, ignore_index);
  }
}

// Leading (row) dimensions of the input, dense target / labels and weight, with
// size-1 dims dropped and neighbours merged where every operand allows it.
struct RowLayout {
  std::vector<int64_t> sizes;                  // outermost first
  std::vector<std::array<int64_t, 3>> strides;  // per dim: input, target, weight
};

RowLayout collapse_rows(const at::Tensor& input, const at::Tensor& target, const at::Tensor* weight) {
  RowLayout out;
  const int64_t lead = input.dim() - 1;
  for (int64_t d = 0; d < lead; ++d) {
    if (input.size(d) == 1) continue;
    // labels have exactly the leading dims, so their dim d is the logits' dim d
    const std::array<int64_t, 3> s = {input.stride(d), target.stride(d), weight ? weight->stride(d) : 0};
    if (!out.sizes.empty()) {
      // merge into the previous (outer) dim if the outer stride == inner stride * inner size
      auto& ps = out.strides.back();
      const int64_t size = input.size(d);
      bool mergeable = true;
      for (int k = 0; k < 3; ++k) mergeable = mergeable && ps[k] == s[k] * size;
      if (mergeable) {
        out.sizes.back() *= size;
        ps = s;
        continue;
      }
    }
    out.sizes.push_back(input.size(d));
    out.strides.push_back(s);
  }
  return out;
}

void fill_operand(Operand& o, const at::Tensor& t, const RowLayout& rows, int k, int64_t col_stride) {
  o.data = t.data_ptr();
  o.kind = scalar_kind(t.scalar_type());
  o.col_stride = col_stride;
  for (size_t d = 0; d < rows.sizes.size(); ++d) o.row_strides[d] = rows.strides[d][k];
}

// Fresh CPU outputs of tens of MB cost as much in page faults as the kernel's
// own work (measured: 12 ms of a 64 MB gradient's 20 ms first write, 2 cores).
// Asking for transparent huge pages cuts the faults 512-fold where the kernel
// allows it (THP "madvise" mode); elsewhere the advice is a no-op.
// CPU outputs at least this large get huge pages (and, for the gradient, the cache below).
constexpr int64_t kLargeCpuBytes = int64_t(8) << 20;

void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kPage = 4096;
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  if (!t.is_cpu() || bytes < kLargeCpuBytes) return;
  const auto begin = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  const std::uintptr_t first = (begin + kPage - 1) / kPage * kPage;
  const std::uintptr_t last = (begin + static_cast<std::uintptr_t>(bytes)) / kPage * kPage;
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

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

int32_t integer_gamma(double gamma) {
  return (gamma == std::floor(gamma) && gamma <= 16.0) ? static_cast<int32_t>(gamma) : -1;
}

std::tuple<at::Tensor, at::Tensor> sigmoid_focal_loss_fwd(const at::Tensor& input_, const at::Tensor& targets_,
                                                          const std::optional<at::Tensor>& weight_,
                                                          const std::optional<at::Tensor>& divisor_, double scale,
                                                          double alpha, double gamma, int64_t reduction,
                                                          int64_t ignore_index, bool compute_grad,
                                                          double grad_prescale, bool acc_loss) {
  check_inputs(input_, targets_, weight_, divisor_, alpha, gamma, reduction);
  at::Tensor input = input_;
  at::Tensor targets = targets_;
  const bool labels = targets.scalar_type() == at::kInt || targets.scalar_type() == at::kLong;
  const at::ScalarType acc = compute_dtype(input.scalar_type());
  if (!labels && targets.scalar_type() != input.scalar_type() && targets.scalar_type() != at::kFloat) {
    // the kernels read dense targets in the logits' dtype or in float32: convert others to
    // the compute dtype (float32, float64 for float64), never down to a 16-bit type
    targets = targets.to(acc);
  } else if (!labels && targets.scalar_type() == at::kFloat && acc == at::kDouble) {
    targets = targets.to(acc);
  }
  at::Tensor weight;
  if (weight_) weight = weight_->to(acc).expand(input.sizes());
  const int64_t num_classes = input.size(-1);

  const auto opts = input.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad;
  bool grad_advised = false;  // the cache's buffers come with huge pages advised
  if (!compute_grad) {
    grad = at::empty({0}, opts);
  } else if (input.is_cpu() && CpuGradCache::get().enabled() &&
             static_cast<size_t>(input.numel()) * input.element_size() >= CpuGradCache::kMinBytes) {
    grad = CpuGradCache::get().empty(input.sizes(), opts);
    grad_advised = true;
  } else {
    grad = at::empty(input.sizes(), opts);
  }
  // Under autocast a reduced loss comes back in float32 (acc_loss), as PyTorch's own losses do.
  at::Tensor loss = reduction == 0 ? at::empty(input.sizes(), opts)
                                   : at::empty({}, opts.dtype(acc_loss ? acc : input.scalar_type()));
  if (input.numel() == 0) {
    if (reduction != 0) loss.zero_();
    return {loss, grad};
  }
  if (compute_grad && !grad_advised) advise_huge_pages(grad);
  if (reduction == 0) advise_huge_pages(loss);
  if (labels && input.is_cpu()) check_labels_cpu(targets, num_classes, ignore_index);

  RowLayout rows = collapse_rows(input, targets, weight.defined() ? &weight : nullptr);
  if (static_cast<int>(rows.sizes.size()) > kMaxDims) {  // exotic layouts: make them simple
    input = input.contiguous();
    targets = targets.contiguous();
    if (weight.defined()) weight = weight.contiguous();
    rows = collapse_rows(input, targets, weight.defined() ? &weight : nullptr);
  }

  FocalParams p;
  p.cols = num_classes;
  p.rows = input.numel() / num_classes;
  p.ndim = static_cast<int>(rows.sizes.size());
  for (int d = 0; d < p.ndim; ++d) p.row_sizes[d] = rows.sizes[d];
  const auto col_stride = [&](const at::Tensor& t) { return num_classes == 1 ? 1 : t.stride(-1); };
  fill_operand(p.input, input, rows, 0, col_stride(input));
  fill_operand(p.target, targets, rows, 1, labels ? 0 : col_stride(targets));
  if (weight.defined()) fill_operand(p.weight, weight, rows, 2, col_stride(weight));
  p.labels = labels;
  p.num_classes = num_classes;
  p.ignore_index = ignore_index;
  const bool dense_rows = p.ndim == 0 || p.input.row_strides[0] == p.cols;
  const bool dense_target = labels ? (p.ndim == 0 || p.target.row_strides[0] == 1)
                                   : (p.target.col_stride == 1 && (p.ndim == 0 || p.target.row_strides[0] == p.cols));
  p.contiguous = p.ndim <= 1 && p.input.col_stride == 1 && dense_rows && dense_target;
  // Dense targets over fully contiguous tensors: one long row (long vector runs even for small C).
  const bool weight_flat = !weight.defined() || p.ndim == 0 || p.weight.row_strides[0] == p.weight.col_stride * p.cols;
  if (p.contiguous && !labels && weight_flat && p.ndim == 1) {
    p.cols = p.rows * p.cols;
    p.rows = 1;
    p.ndim = 0;
  }
  p.loss = reduction == 0 ? loss.data_ptr() : nullptr;
  p.grad = compute_grad ? grad.data_ptr() : nullptr;
  TORCH_CHECK_VALUE(grad_prescale >= 0.0 && std::isfinite(grad_prescale),
                    "focal_cuda: grad_prescale must be a finite number >= 0, got ", grad_prescale);
  p.grad_prescale = grad_prescale;
  p.alpha_pos = alpha >= 0 ? alpha : 1.0;
  p.alpha_neg = alpha >= 0 ? 1.0 - alpha : 1.0;
  p.gamma = gamma;
  p.gamma_int = integer_gamma(gamma);
  p.reduction = reduction == 0 ? Reduction::None : Reduction::Sum;
  p.acc_loss = reduction != 0 && acc_loss;
  p.scale = scale;
  at::Tensor divisor;
  if (divisor_) {
    divisor = divisor_->reshape({});
    p.divisor = divisor.data_ptr();
  }

  if (input.is_cpu()) {
    const int64_t n = p.rows * p.cols;
    const int64_t nchunks = (n + kCpuChunk - 1) / kCpuChunk;
    std::vector<double> partials(nchunks, 0.0);
    const cpu::RangeFn fn = g_cpu_range.load();
    at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) partials[c] = fn(p, c * kCpuChunk, std::min(n, (c + 1) * kCpuChunk));
    });
    if (reduction != 0) {
      double total = 0.0;
      for (double v : partials) total += v;
      double factor = scale;
      if (divisor.defined()) factor /= divisor.item<double>();  // CPU tensor: no device sync
      loss.fill_(total * factor);
    }
    return {loss, grad};
  }
#ifdef FOCAL_WITH_CUDA
  if (input.is_cuda()) {
    const int device = input.get_device();
    at::Tensor partials;
    int64_t nblocks = 0;
    if (reduction != 0) {
      nblocks = cuda::forward_num_blocks(p, device);
      partials = at::empty({nblocks}, input.options().dtype(at::kDouble));
    }
    cuda::forward(p, device, partials.defined() ? partials.data_ptr() : nullptr, nblocks,
                  reduction != 0 ? loss.data_ptr() : nullptr);
    return {loss, grad};
  }
#endif
  TORCH_CHECK(false, "focal_cuda: no kernel for device ", input.device());
}

void scale_grad_(at::Tensor grad, const at::Tensor& grad_output) {
  TORCH_CHECK_VALUE(grad_output.numel() == 1, "focal_cuda.scale_grad_: grad_output must have one element, got shape ",
                    grad_output.sizes());
  TORCH_CHECK_VALUE(grad_output.device() == grad.device(), "focal_cuda.scale_grad_: grad_output must be on ",
                    grad.device(), ", got ", grad_output.device());
  TORCH_CHECK_TYPE(is_supported_float(grad.scalar_type()), "focal_cuda.scale_grad_: grad must be floating, got ",
                   grad.scalar_type());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == grad.scalar_type() ||
                       (grad_output.scalar_type() == at::kFloat && grad.scalar_type() != at::kDouble),
                   "focal_cuda.scale_grad_: grad_output must be ", grad.scalar_type(), " or float32, got ",
                   grad_output.scalar_type());
  if (grad.numel() == 0) return;
  if (grad.is_cpu()) {
    const double s = grad_output.item<double>();  // a CPU tensor: no device sync
    // By a 0-d tensor, not a Scalar: aten::mul_.Scalar rounds the factor to a 16-bit grad's
    // dtype first (1.12e-7 becomes float16's 1.19e-7: 6% off); mul_.Tensor computes in float32.
    if (s != 1.0) grad.mul_(at::scalar_tensor(s, at::kDouble));
    return;
  }
#ifdef FOCAL_WITH_CUDA
  if (grad.is_cuda()) {
    TORCH_CHECK_VALUE(grad.is_contiguous(), "focal_cuda.scale_grad_: grad must be contiguous");
    const at::Tensor go = grad_output.reshape({});
    cuda::scale_grad(grad.data_ptr(), scalar_kind(grad.scalar_type()), grad.numel(), go.data_ptr(),
                     scalar_kind(go.scalar_type()), grad.get_device());
    return;
  }
#endif
  TORCH_CHECK(false, "focal_cuda: no kernel for device ", grad.device());
}

}  // namespace
}  // namespace focal

TORCH_LIBRARY(focal_cuda, m) {
  m.def(
      "sigmoid_focal_loss_fwd(Tensor input, Tensor targets, Tensor? weight, Tensor? divisor, float scale, "
      "float alpha, float gamma, int reduction, int ignore_index, bool compute_grad, "
      "float grad_prescale=0.0, bool acc_loss=False) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()", {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(focal_cuda, CPU, m) {
  m.impl("sigmoid_focal_loss_fwd", &focal::sigmoid_focal_loss_fwd);
  m.impl("scale_grad_", &focal::scale_grad_);
}

#ifdef FOCAL_WITH_CUDA
TORCH_LIBRARY_IMPL(focal_cuda, CUDA, m) {
  m.impl("sigmoid_focal_loss_fwd", &focal::sigmoid_focal_loss_fwd);
  m.impl("scale_grad_", &focal::scale_grad_);
}
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
  d["cpu_kernel"] = focal::g_cpu_isa;
  d["cpu_threads"] = at::get_num_threads();
  return d;
}

void set_cpu_kernel(std::uintptr_t address, const std::string& name) {
  TORCH_CHECK_VALUE(address != 0, "focal_cuda: null CPU kernel address");
  focal::g_cpu_range.store(reinterpret_cast<focal::cpu::RangeFn>(address));
  focal::g_cpu_isa = name;
}

void set_cpu_grad_cache(bool enabled) { focal::CpuGradCache::get().set_enabled(enabled); }

pybind11::dict cpu_grad_cache_info() {
  pybind11::dict d;
  d["enabled"] = focal::CpuGradCache::get().enabled();
  d["held_bytes"] = focal::CpuGradCache::get().held_bytes();
  d["min_bytes"] = focal::CpuGradCache::kMinBytes;
  return d;
}

void reset_cpu_kernel() {
  focal::g_cpu_range.store(&focal::cpu::focal_range_default);
  focal::g_cpu_isa = "default";
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "focal_cuda native ops (registered as torch.ops.focal_cuda.*)";
  m.def("build_info", &build_info, "How this extension was built");
  m.def("_set_cpu_kernel", &set_cpu_kernel, "Use the CPU kernel at this address (an ISA module's)");
  m.def("_reset_cpu_kernel", &reset_cpu_kernel, "Go back to the portable CPU kernel");
  m.def("_set_cpu_grad_cache", &set_cpu_grad_cache, "Keep (True) or free and stop keeping (False) a freed CPU gradient");
  m.def("_cpu_grad_cache_info", &cpu_grad_cache_info, "The CPU gradient cache's state");
}
