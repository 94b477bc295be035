// The tensor-level planning shared by every member, device and kernel: check
// the tensors and options (what memory safety depends on, with messages that
// name the argument), convert what the kernels read in one type only, collapse
// the shapes, allocate the outputs and fill FocalParams. The op (family_ops.cpp)
// then launches the CPU or CUDA kernels; the CUDA emulation tests
// (tests/cuda_emulation) plan the same way and run the emulated kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../core/params.h"

namespace focal {

// The arguments every member's op takes besides its tensors and loss options.
struct ForwardArgs {
  double scale = 1.0;
  int64_t reduction = 0;  // 0 none, 1 sum
  int64_t ignore_index = -1;
  bool compute_grad = false;
  double grad_prescale = 0.0;
  bool acc_loss = false;
};

// How the kernels will run: on the CPU (labels checked, any label dtype), or as
// the CUDA kernels (bad labels left to the kernels' NaN; members other than the
// focal loss read int64 labels only).
enum class Target { Cpu, Cuda };

struct ForwardPlan {
  FocalParams p;
  at::Tensor loss;  // the op's outputs
  at::Tensor grad;
  // converted or collapsed inputs the kernels read, kept alive while they run
  at::Tensor input, targets, scores, weight, divisor;
  bool empty = false;  // nothing to compute: the outputs are final
};

ForwardPlan plan_forward(const at::Tensor& input, const at::Tensor& targets, const std::optional<at::Tensor>& scores,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& divisor,
                         const ForwardArgs& args, LossKind kind, const LossOptions& options, Target target);

ScalarKind scalar_kind(at::ScalarType t);
at::ScalarType compute_dtype(at::ScalarType t);
bool is_supported_float(at::ScalarType t);

}  // namespace focal
