// Host-side interface of the CUDA kernels (focal_cuda.cu, forward_<dtype>.cu).
// Plain types only, so the op layer (csrc/ops/) needs no CUDA headers to call them.
#pragma once

#include <cstdint>

#include "../core/params.h"

namespace focal::cuda {

// Number of per-block partial sums forward() writes for Reduction::Sum on this
// device (fixed for a given element count and GPU: part of determinism).
int64_t forward_num_blocks(const FocalParams& p, int device);

// Fused forward: writes p.grad (if set), p.loss (Reduction::None) or, for
// Reduction::Sum, the partial sums into `partials` (nblocks float64 values)
// and then the scaled total into `out` (a 0-d tensor of the input's dtype, or of
// the compute type where p.acc_loss is set).
// Runs on the current stream of `device`; never synchronises.
void forward(const FocalParams& p, int device, void* partials, int64_t nblocks, void* out);

// grad *= *grad_output, computed in float32 (float64 for float64), skipped on the
// device when grad_output is exactly 1. grad_output is of grad's kind or Float32.
void scale_grad(void* grad, ScalarKind kind, int64_t numel, const void* grad_output, ScalarKind go_kind, int device);

// GHM-C's histogram pass (losses/ghmc.h): adds each bin's valid elements to
// counts[0..bins-1] and all valid elements to counts[bins] (int64, zeroed by the
// caller). Never synchronises.
void ghmc_histogram(const FocalParams& p, int device, int64_t* counts);

// GHM-C's table (losses/ghmc.h: bin weights, thresholds, edges, the grid;
// float32 or float64) from the counts; with momentum > 0 the running counts
// acc_in -> acc_out (float32, bins). Two small kernels.
void ghmc_weights(const int64_t* counts, const float* acc_in, float* acc_out, void* table, bool float64, int bins,
                  double momentum, double norm, int device);

}  // namespace focal::cuda
