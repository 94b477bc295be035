// The operator schemas of the family and their CPU and CUDA implementations:
// each member's op plans its call (plan.cpp) and runs the one kernel family,
// generic over the member. The user-facing argument checks with friendly
// messages live in Python (focal_cuda/_checks.py, run in eager and under
// torch.compile alike); plan.cpp repeats those that memory safety depends on.
//
// Every member's op takes the same leading arguments (the Python autograd layer
// reads them by position), then its own loss options:
//   (Tensor input, Tensor targets, Tensor? scores, Tensor? weight, Tensor? divisor,
//    float scale, int reduction, int ignore_index, bool compute_grad,
//    float grad_prescale, bool acc_loss, <options>) -> (Tensor loss, Tensor grad)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../cpu/focal_cpu.h"
#include "ghmc_ops.h"
#include "plan.h"
#ifdef FOCAL_WITH_CUDA
#include "../cuda/focal_cuda.h"
#endif

namespace focal {
namespace {

// Elements per CPU work chunk. Fixed, so the chunks' partial sums (added in
// order) do not depend on the number of threads.
constexpr int64_t kCpuChunk = 16384;

using Outputs = std::tuple<at::Tensor, at::Tensor>;

void run_cpu(const ForwardPlan& plan) {
  const FocalParams& p = plan.p;
  const int64_t n = p.rows * p.cols;
  const int64_t nchunks = (n + kCpuChunk - 1) / kCpuChunk;
  std::vector<double> partials(nchunks, 0.0);
  const cpu::RangeFn fn = cpu::selected_kernel();
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) partials[c] = fn(p, c * kCpuChunk, std::min(n, (c + 1) * kCpuChunk));
  });
  if (p.reduction == Reduction::Sum) {
    double total = 0.0;
    for (double v : partials) total += v;
    double factor = p.scale;
    if (plan.divisor.defined()) factor /= plan.divisor.item<double>();  // a CPU tensor: no device sync
    plan.loss.fill_(total * factor);
  }
}

Outputs forward(const at::Tensor& input, const at::Tensor& targets, const std::optional<at::Tensor>& scores,
                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& divisor, double scale,
                int64_t reduction, int64_t ignore_index, bool compute_grad, double grad_prescale, bool acc_loss,
                LossKind kind, const LossOptions& options) {
  const ForwardArgs args{scale, reduction, ignore_index, compute_grad, grad_prescale, acc_loss};
  const ForwardPlan plan = plan_forward(input, targets, scores, weight, divisor, args, kind, options,
                                        input.is_cpu() ? Target::Cpu : Target::Cuda);
  if (plan.empty) return {plan.loss, plan.grad};
  if (input.is_cpu()) {
    run_cpu(plan);
    return {plan.loss, plan.grad};
  }
#ifdef FOCAL_WITH_CUDA
  if (input.is_cuda()) {
    const int device = input.get_device();
    at::Tensor partials;
    int64_t nblocks = 0;
    if (reduction != 0) {
      nblocks = cuda::forward_num_blocks(plan.p, device);
      partials = at::empty({nblocks}, input.options().dtype(at::kDouble));
    }
    cuda::forward(plan.p, device, partials.defined() ? partials.data_ptr() : nullptr, nblocks,
                  reduction != 0 ? plan.loss.data_ptr() : nullptr);
    return {plan.loss, plan.grad};
  }
#endif
  TORCH_CHECK(false, "focal_cuda: no kernel for device ", input.device());
}

// The members' ops: their options into LossOptions.
#define FOCAL_COMMON_PARAMS                                                                                          \
  const at::Tensor &input, const at::Tensor &targets, const std::optional<at::Tensor>&scores,                        \
      const std::optional<at::Tensor>&weight, const std::optional<at::Tensor>&divisor, double scale,                \
      int64_t reduction, int64_t ignore_index, bool compute_grad, double grad_prescale, bool acc_loss
#define FOCAL_COMMON_ARGS \
  input, targets, scores, weight, divisor, scale, reduction, ignore_index, compute_grad, grad_prescale, acc_loss

Outputs sigmoid_focal_loss_fwd(FOCAL_COMMON_PARAMS, double alpha, double gamma, double label_smoothing) {
  LossOptions o;
  o.alpha = alpha;
  o.gamma = gamma;
  o.smoothing = label_smoothing;
  return forward(FOCAL_COMMON_ARGS, LossKind::Focal, o);
}

Outputs quality_focal_loss_fwd(FOCAL_COMMON_PARAMS, double beta) {
  LossOptions o;
  o.beta = beta;
  return forward(FOCAL_COMMON_ARGS, LossKind::QualityFocal, o);
}

Outputs varifocal_loss_fwd(FOCAL_COMMON_PARAMS, double alpha, double gamma, bool iou_weighted, bool detach_weight) {
  LossOptions o;
  o.alpha = alpha;
  o.gamma = gamma;
  o.iou_weighted = iou_weighted;
  o.detach_weight = detach_weight;
  return forward(FOCAL_COMMON_ARGS, LossKind::Varifocal, o);
}

Outputs sigmoid_focal_loss_star_fwd(FOCAL_COMMON_PARAMS, double alpha, double gamma, double beta) {
  LossOptions o;
  o.alpha = alpha;
  o.gamma = gamma;
  o.beta = beta;
  return forward(FOCAL_COMMON_ARGS, LossKind::FocalStar, o);
}

Outputs iou_aware_bce_loss_fwd(FOCAL_COMMON_PARAMS, double alpha, double gamma) {
  LossOptions o;
  o.alpha = alpha;
  o.gamma = gamma;
  return forward(FOCAL_COMMON_ARGS, LossKind::IoUAwareBCE, o);
}

// GHM-C's loss pass: the member reads its bin weights, thresholds and edges from
// `table` (ghmc_weights' output; losses/ghmc.h).
Outputs ghmc_loss_fwd(FOCAL_COMMON_PARAMS, const at::Tensor& table) {
  TORCH_CHECK_VALUE(!scores, "focal_cuda.ghmc_loss: targets must be dense or class indices, not (labels, scores)");
  LossOptions o;
  o.bins = check_ghmc_table("focal_cuda.ghmc_loss", input, table);
  o.table = table.data_ptr();
  return forward(FOCAL_COMMON_ARGS, LossKind::GHMC, o);
}

#undef FOCAL_COMMON_PARAMS
#undef FOCAL_COMMON_ARGS

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

#define FOCAL_COMMON_SCHEMA                                                                            \
  "Tensor input, Tensor targets, Tensor? scores, Tensor? weight, Tensor? divisor, float scale, "       \
  "int reduction, int ignore_index, bool compute_grad, float grad_prescale, bool acc_loss"

TORCH_LIBRARY(focal_cuda, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("sigmoid_focal_loss_fwd(" FOCAL_COMMON_SCHEMA
        ", float alpha, float gamma, float label_smoothing) -> (Tensor, Tensor)",
        tags);
  m.def("quality_focal_loss_fwd(" FOCAL_COMMON_SCHEMA ", float beta) -> (Tensor, Tensor)", tags);
  m.def("varifocal_loss_fwd(" FOCAL_COMMON_SCHEMA
        ", float alpha, float gamma, bool iou_weighted, bool detach_weight) -> (Tensor, Tensor)",
        tags);
  m.def("sigmoid_focal_loss_star_fwd(" FOCAL_COMMON_SCHEMA ", float alpha, float gamma, float beta) -> (Tensor, Tensor)",
        tags);
  m.def("iou_aware_bce_loss_fwd(" FOCAL_COMMON_SCHEMA ", float alpha, float gamma) -> (Tensor, Tensor)", tags);
  m.def("ghmc_loss_fwd(" FOCAL_COMMON_SCHEMA ", Tensor table) -> (Tensor, Tensor)", tags);
  m.def("ghmc_histogram(Tensor input, Tensor targets, Tensor? weight, int bins, int ignore_index) -> Tensor", tags);
  m.def("ghmc_weights(Tensor counts, Tensor? acc_sum, float momentum, float norm, bool float64) -> (Tensor, Tensor)",
        tags);
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()", tags);
}

#undef FOCAL_COMMON_SCHEMA

#define FOCAL_IMPLS(m)                                                     \
  m.impl("sigmoid_focal_loss_fwd", &focal::sigmoid_focal_loss_fwd);         \
  m.impl("quality_focal_loss_fwd", &focal::quality_focal_loss_fwd);         \
  m.impl("varifocal_loss_fwd", &focal::varifocal_loss_fwd);                 \
  m.impl("sigmoid_focal_loss_star_fwd", &focal::sigmoid_focal_loss_star_fwd); \
  m.impl("iou_aware_bce_loss_fwd", &focal::iou_aware_bce_loss_fwd);         \
  m.impl("ghmc_loss_fwd", &focal::ghmc_loss_fwd);                           \
  m.impl("ghmc_histogram", &focal::ghmc_histogram);                         \
  m.impl("ghmc_weights", &focal::ghmc_weights);                             \
  m.impl("scale_grad_", &focal::scale_grad_);

TORCH_LIBRARY_IMPL(focal_cuda, CPU, m) { FOCAL_IMPLS(m) }

#ifdef FOCAL_WITH_CUDA
TORCH_LIBRARY_IMPL(focal_cuda, CUDA, m) { FOCAL_IMPLS(m) }
#endif
