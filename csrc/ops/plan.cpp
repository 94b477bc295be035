// Tensor-level planning of a member's forward (see plan.h).
#include "plan.h"

#include <ATen/ExpandUtils.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../cpu/grad_cache.h"

namespace focal {

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

namespace {

const char* op_name(LossKind kind) {
  switch (kind) {
    case LossKind::QualityFocal:
      return "focal_cuda.quality_focal_loss";
    case LossKind::Varifocal:
      return "focal_cuda.varifocal_loss";
    case LossKind::FocalStar:
      return "focal_cuda.sigmoid_focal_loss_star";
    case LossKind::IoUAwareBCE:
      return "focal_cuda.iou_aware_bce_loss";
    case LossKind::GHMC:
      return "focal_cuda.ghmc_loss";
    default:
      return "focal_cuda.sigmoid_focal_loss";
  }
}

void check_tensors(const char* op, const at::Tensor& input, const at::Tensor& targets,
                   const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& divisor) {
  TORCH_CHECK_TYPE(is_supported_float(input.scalar_type()), op,
                   ": inputs must be float16, bfloat16, float32 or float64 logits, got ", input.scalar_type());
  TORCH_CHECK_VALUE(input.dim() >= 1, op, ": inputs must have at least one dimension [..., C], got a 0-d tensor");
  const bool labels = targets.scalar_type() == at::kInt || targets.scalar_type() == at::kLong;
  if (labels) {
    const auto lead = input.sizes().slice(0, input.dim() - 1);
    TORCH_CHECK_VALUE(targets.sizes() == lead, op, ": class-index targets must have shape inputs.shape[:-1] = ", lead,
                      ", got ", targets.sizes());
  } else {
    TORCH_CHECK_TYPE(at::isFloatingType(targets.scalar_type()), op,
                     ": targets must be floating (same shape as inputs) or int32/int64 class indices, got ",
                     targets.scalar_type());
    TORCH_CHECK_VALUE(targets.sizes() == input.sizes(), op, ": floating targets must have the shape of inputs ",
                      input.sizes(), ", got ", targets.sizes());
  }
  TORCH_CHECK_VALUE(targets.device() == input.device(), op, ": targets must be on ", input.device(),
                    " like inputs, got ", targets.device());
  if (scores) {
    TORCH_CHECK_VALUE(labels, op, ": scores come with class-index targets (labels, scores), got floating targets");
    TORCH_CHECK_TYPE(at::isFloatingType(scores->scalar_type()), op, ": scores must be floating, got ",
                     scores->scalar_type());
    TORCH_CHECK_VALUE(scores->sizes() == targets.sizes(), op, ": scores must have the labels' shape ",
                      targets.sizes(), ", got ", scores->sizes());
    TORCH_CHECK_VALUE(scores->device() == input.device(), op, ": scores must be on ", input.device(), ", got ",
                      scores->device());
  }
  if (weight) {
    TORCH_CHECK_TYPE(at::isFloatingType(weight->scalar_type()), op, ": weight must be floating, got ",
                     weight->scalar_type());
    TORCH_CHECK_VALUE(at::is_expandable_to(weight->sizes(), input.sizes()), op, ": weight of shape ",
                      weight->sizes(), " does not broadcast to inputs of shape ", input.sizes());
    TORCH_CHECK_VALUE(weight->device() == input.device(), op, ": weight must be on ", input.device(), ", got ",
                      weight->device());
  }
  if (divisor) {
    TORCH_CHECK_VALUE(divisor->numel() == 1, op, ": divisor must have one element, got shape ", divisor->sizes());
    TORCH_CHECK_TYPE(divisor->scalar_type() == compute_dtype(input.scalar_type()), op, ": divisor must be ",
                     compute_dtype(input.scalar_type()), " for ", input.scalar_type(), " inputs, got ",
                     divisor->scalar_type());
    TORCH_CHECK_VALUE(divisor->device() == input.device(), op, ": divisor must be on ", input.device(), ", got ",
                      divisor->device());
  }
}

bool finite_at_least(double v, double lo) { return std::isfinite(v) && v >= lo; }
bool alpha_or_off(double a) { return (a >= 0.0 && a <= 1.0) || a == -1.0; }

// Each member's options, as the Python layer checks them (these guard direct op callers).
void check_options(const char* op, LossKind kind, const LossOptions& o) {
  switch (kind) {
    case LossKind::Focal:
    case LossKind::FocalSmooth:
      TORCH_CHECK_VALUE(alpha_or_off(o.alpha), op, ": alpha must be in [0, 1], or -1 for no alpha weighting, got ",
                        o.alpha);
      TORCH_CHECK_VALUE(finite_at_least(o.gamma, 0.0), op, ": gamma must be a finite number >= 0, got ", o.gamma);
      TORCH_CHECK_VALUE(o.smoothing >= 0.0 && o.smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
                        o.smoothing);
      break;
    case LossKind::QualityFocal:
      TORCH_CHECK_VALUE(finite_at_least(o.beta, 0.0), op, ": beta must be a finite number >= 0, got ", o.beta);
      break;
    case LossKind::Varifocal:
      TORCH_CHECK_VALUE(finite_at_least(o.alpha, 0.0), op, ": alpha must be a finite number >= 0, got ", o.alpha);
      TORCH_CHECK_VALUE(finite_at_least(o.gamma, 0.0), op, ": gamma must be a finite number >= 0, got ", o.gamma);
      break;
    case LossKind::FocalStar:
      TORCH_CHECK_VALUE(alpha_or_off(o.alpha), op, ": alpha must be in [0, 1], or -1 for no alpha weighting, got ",
                        o.alpha);
      TORCH_CHECK_VALUE(std::isfinite(o.gamma) && o.gamma > 0.0, op, ": gamma must be a finite number > 0, got ",
                        o.gamma);
      TORCH_CHECK_VALUE(std::isfinite(o.beta), op, ": beta must be a finite number, got ", o.beta);
      break;
    case LossKind::IoUAwareBCE:
      TORCH_CHECK_VALUE(o.alpha >= 0.0 && o.alpha <= 1.0, op, ": alpha must be in [0, 1], got ", o.alpha);
      TORCH_CHECK_VALUE(finite_at_least(o.gamma, 0.0), op, ": gamma must be a finite number >= 0, got ", o.gamma);
      break;
    case LossKind::GHMC:  // (the table tensor itself is checked by the ops, ghmc_ops.cpp)
      TORCH_CHECK_VALUE(o.bins >= 1, op, ": bins must be >= 1, got ", o.bins);
      break;
  }
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

// Leading (row) dimensions of the input, dense target / labels, weight and
// scores, with size-1 dims dropped and neighbours merged where every operand
// allows it.
constexpr int kOperands = 4;

struct RowLayout {
  std::vector<int64_t> sizes;                           // outermost first
  std::vector<std::array<int64_t, kOperands>> strides;  // per dim: input, target, weight, scores
};

RowLayout collapse_rows(const at::Tensor& input, const at::Tensor& target, const at::Tensor* weight,
                        const at::Tensor* scores) {
  RowLayout out;
  const int64_t lead = input.dim() - 1;
  for (int64_t d = 0; d < lead; ++d) {
    if (input.size(d) == 1) continue;
    // labels have exactly the leading dims, so their dim d is the logits' dim d
    const std::array<int64_t, kOperands> s = {input.stride(d), target.stride(d), weight ? weight->stride(d) : 0,
                                              scores ? scores->stride(d) : 0};
    if (!out.sizes.empty()) {
      // merge into the previous (outer) dim if the outer stride == inner stride * inner size
      auto& ps = out.strides.back();
      const int64_t size = input.size(d);
      bool mergeable = true;
      for (int k = 0; k < kOperands; ++k) mergeable = mergeable && ps[k] == s[k] * size;
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

}  // namespace

ForwardPlan plan_forward(const at::Tensor& input_, const at::Tensor& targets_, const std::optional<at::Tensor>& scores_,
                         const std::optional<at::Tensor>& weight_, const std::optional<at::Tensor>& divisor_,
                         const ForwardArgs& args, LossKind kind, const LossOptions& options, Target target) {
  const char* op = op_name(kind);
  check_tensors(op, input_, targets_, scores_, weight_, divisor_);
  check_options(op, kind, options);
  TORCH_CHECK_VALUE(args.reduction == 0 || args.reduction == 1, op, ": reduction must be 0 (none) or 1 (sum), got ",
                    args.reduction);
  TORCH_CHECK_VALUE(args.grad_prescale >= 0.0 && std::isfinite(args.grad_prescale), op,
                    ": grad_prescale must be a finite number >= 0, got ", args.grad_prescale);

  ForwardPlan plan;
  at::Tensor input = input_;
  at::Tensor targets = targets_;
  const bool labels = targets.scalar_type() == at::kInt || targets.scalar_type() == at::kLong;
  const at::ScalarType acc = compute_dtype(input.scalar_type());
  // the member that runs: the focal loss with label smoothing is a functor of its own
  if (kind == LossKind::Focal && options.smoothing > 0.0) kind = LossKind::FocalSmooth;
  const bool focal = kind == LossKind::Focal;
  if (!labels) {
    // The focal loss reads dense targets in the logits' dtype or in float32 (AMP keeps one-hot targets
    // in float32); the other members in the compute type only. Never down to a 16-bit type.
    const at::ScalarType t = targets.scalar_type();
    const bool direct = focal ? (t == input.scalar_type() || (t == at::kFloat && acc == at::kFloat)) : t == acc;
    if (!direct) targets = targets.to(acc);
  } else if (target == Target::Cuda && targets.scalar_type() == at::kInt) {
    targets = targets.to(at::kLong);  // the CUDA kernels read int64 labels (one build of each, not two)
  }
  at::Tensor scores;
  if (scores_) scores = scores_->scalar_type() == acc ? *scores_ : scores_->to(acc);
  at::Tensor weight;
  if (weight_) weight = weight_->to(acc).expand(input.sizes());
  const int64_t num_classes = input.size(-1);

  const auto opts = input.options().memory_format(at::MemoryFormat::Contiguous);
  bool grad_advised = false;  // the cache's buffers come with huge pages advised
  if (!args.compute_grad) {
    plan.grad = at::empty({0}, opts);
  } else if (input.is_cpu() && cpu::CpuGradCache::get().enabled() &&
             static_cast<size_t>(input.numel()) * input.element_size() >= cpu::CpuGradCache::kMinBytes) {
    plan.grad = cpu::CpuGradCache::get().empty(input.sizes(), opts);
    grad_advised = true;
  } else {
    plan.grad = at::empty(input.sizes(), opts);
  }
  // Under autocast a reduced loss comes back in float32 (acc_loss), as PyTorch's own losses do.
  plan.loss = args.reduction == 0 ? at::empty(input.sizes(), opts)
                                  : at::empty({}, opts.dtype(args.acc_loss ? acc : input.scalar_type()));
  if (input.numel() == 0) {
    if (args.reduction != 0) plan.loss.zero_();
    plan.empty = true;
    return plan;
  }
  if (args.compute_grad && !grad_advised) cpu::advise_huge_pages(plan.grad);
  if (args.reduction == 0) cpu::advise_huge_pages(plan.loss);
  if (labels && target == Target::Cpu) check_labels_cpu(targets, num_classes, args.ignore_index);

  const at::Tensor* wp = weight.defined() ? &weight : nullptr;
  const at::Tensor* sp = scores.defined() ? &scores : nullptr;
  RowLayout rows = collapse_rows(input, targets, wp, sp);
  if (static_cast<int>(rows.sizes.size()) > kMaxDims) {  // exotic layouts: make them simple
    input = input.contiguous();
    targets = targets.contiguous();
    if (weight.defined()) weight = weight.contiguous();
    if (scores.defined()) scores = scores.contiguous();
    rows = collapse_rows(input, targets, wp, sp);
  }

  FocalParams& p = plan.p;
  p.cols = num_classes;
  p.rows = input.numel() / num_classes;
  p.ndim = static_cast<int>(rows.sizes.size());
  for (int d = 0; d < p.ndim; ++d) p.row_sizes[d] = rows.sizes[d];
  const auto col_stride = [&](const at::Tensor& t) { return num_classes == 1 ? 1 : t.stride(-1); };
  fill_operand(p.input, input, rows, 0, col_stride(input));
  fill_operand(p.target, targets, rows, 1, labels ? 0 : col_stride(targets));
  if (weight.defined()) fill_operand(p.weight, weight, rows, 2, col_stride(weight));
  if (scores.defined()) fill_operand(p.scores, scores, rows, 3, 0);
  p.labels = labels;
  p.num_classes = num_classes;
  p.ignore_index = args.ignore_index;
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
  p.loss = args.reduction == 0 ? plan.loss.data_ptr() : nullptr;
  p.grad = args.compute_grad ? plan.grad.data_ptr() : nullptr;
  p.grad_prescale = args.grad_prescale;
  p.loss_kind = kind;
  p.options = options;
  p.reduction = args.reduction == 0 ? Reduction::None : Reduction::Sum;
  p.acc_loss = args.reduction != 0 && args.acc_loss;
  p.scale = args.scale;
  if (divisor_) {
    plan.divisor = divisor_->reshape({});
    p.divisor = plan.divisor.data_ptr();
  }
  plan.input = input;
  plan.targets = targets;
  plan.scores = scores;
  plan.weight = weight;
  return plan;
}

}  // namespace focal
