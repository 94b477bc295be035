// GHM-C's ops besides its loss pass (family_ops.cpp): the histogram pass and
// the bin weights (losses/ghmc.h has the math and the table's layout).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace focal {

// The most bins GHM-C takes (the CUDA histogram keeps a block's counts,
// thresholds and edges in shared memory: 24 KiB at this many).
constexpr int64_t kGhmcMaxBins = 1024;

// Checks GHM-C's table (1-D, contiguous, ghmc_table_size(bins) values of the
// inputs' compute type, on their device) and returns its bin count.
int64_t check_ghmc_table(const char* op, const at::Tensor& input, const at::Tensor& table);

// counts[0..bins-1]: the valid elements of each bin; counts[bins]: all valid
// elements (int64, on the inputs' device). weight: label_weight > 0 as a 0/1
// tensor broadcastable to the inputs (valid where nonzero).
at::Tensor ghmc_histogram(const at::Tensor& input, const at::Tensor& targets, const std::optional<at::Tensor>& weight,
                          int64_t bins, int64_t ignore_index);

// (table, new running counts) from the counts: the table in float64 if float64,
// else float32; the running counts (float32 [bins]) only with momentum > 0 (else
// an empty tensor). norm > 0 folds the mean's normaliser norm / tot into the
// weights.
std::tuple<at::Tensor, at::Tensor> ghmc_weights(const at::Tensor& counts, const std::optional<at::Tensor>& acc_sum,
                                                double momentum, double norm, bool float64);

}  // namespace focal
