// GHM-C's histogram and bin-weight ops, CPU and CUDA (ghmc_ops.h).
#include "ghmc_ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../cpu/focal_cpu.h"
#include "../losses/ghmc.h"
#include "plan.h"
#ifdef FOCAL_WITH_CUDA
#include "../cuda/focal_cuda.h"
#endif

namespace focal {

namespace {

// Elements per CPU work chunk of the histogram: the vector counts of a chunk stay
// exact in float32 lanes (at most 2^24 per lane).
constexpr int64_t kHistChunk = 16384;

void check_bins(const char* op, int64_t bins) {
  TORCH_CHECK_VALUE(bins >= 1 && bins <= kGhmcMaxBins, op, ": bins must be in [1, ", kGhmcMaxBins, "], got ", bins);
}

// The histogram's CPU table: thresholds, edges and the grid of bin indices (no weights).
template <class S>
void fill_histogram_table(S* t, int bins) {
  for (int k = 0; k < bins; ++k) t[k] = S(0);
  ghmc_fill_bounds(t, bins, 0, 1);
  ghmc_fill_grid<S>(t, bins, nullptr, 0, 1);
}

}  // namespace

int64_t check_ghmc_table(const char* op, const at::Tensor& input, const at::Tensor& table) {
  const at::ScalarType acc = compute_dtype(input.scalar_type());
  TORCH_CHECK_TYPE(table.scalar_type() == acc, op, ": the bin table must be ", acc, " for ", input.scalar_type(),
                   " inputs, got ", table.scalar_type());
  const int64_t fixed = ghmc_table_size(0);
  TORCH_CHECK_VALUE(table.dim() == 1 && table.is_contiguous() && table.numel() > fixed &&
                        (table.numel() - fixed) % 3 == 0,
                    op, ": the bin table must be a contiguous 1-D tensor of 3 bins + ", fixed,
                    " values (ghmc_weights' output), got shape ", table.sizes());
  TORCH_CHECK_VALUE(table.device() == input.device(), op, ": the bin table must be on ", input.device(), ", got ",
                    table.device());
  const int64_t bins = (table.numel() - fixed) / 3;
  check_bins(op, bins);
  return bins;
}

at::Tensor ghmc_histogram(const at::Tensor& input, const at::Tensor& targets, const std::optional<at::Tensor>& weight,
                          int64_t bins, int64_t ignore_index) {
  const char* op = "focal_cuda.ghmc_histogram";
  check_bins(op, bins);
  TORCH_CHECK_TYPE(is_supported_float(input.scalar_type()), op,
                   ": inputs must be float16, bfloat16, float32 or float64 logits, got ", input.scalar_type());
  const at::ScalarType acc = compute_dtype(input.scalar_type());
  at::Tensor counts = at::zeros({bins + 1}, input.options().dtype(at::kLong));
  // the thresholds and edges the CPU kernel reads (the CUDA kernel computes its own)
  at::Tensor table;
  LossOptions o;
  o.bins = bins;
  if (input.is_cpu()) {
    table = at::empty({ghmc_table_size(bins)}, input.options().dtype(acc));
    if (acc == at::kDouble) {
      fill_histogram_table(table.data_ptr<double>(), static_cast<int>(bins));
    } else {
      fill_histogram_table(table.data_ptr<float>(), static_cast<int>(bins));
    }
    o.table = table.data_ptr();
  }
  const ForwardArgs args{1.0, 1, ignore_index, false, 0.0, false};
  const ForwardPlan plan = plan_forward(input, targets, std::nullopt, weight, std::nullopt, args, LossKind::GHMC, o,
                                        input.is_cpu() ? Target::Cpu : Target::Cuda);
  if (plan.empty) return counts;
  const FocalParams& p = plan.p;
  if (input.is_cpu()) {
    const int64_t n = p.rows * p.cols;
    const int64_t nchunks = (n + kHistChunk - 1) / kHistChunk;
    const int64_t width = bins + 1;
    std::vector<int64_t> partial(static_cast<size_t>(nchunks * width), 0);
    const cpu::HistFn fn = cpu::selected_hist_kernel();
    at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) fn(p, c * kHistChunk, std::min(n, (c + 1) * kHistChunk), &partial[c * width]);
    });
    int64_t* out = counts.data_ptr<int64_t>();
    for (int64_t c = 0; c < nchunks; ++c) {
      for (int64_t k = 0; k < width; ++k) out[k] += partial[c * width + k];
    }
    return counts;
  }
#ifdef FOCAL_WITH_CUDA
  if (input.is_cuda()) {
    cuda::ghmc_histogram(p, input.get_device(), counts.data_ptr<int64_t>());
    return counts;
  }
#endif
  TORCH_CHECK(false, "focal_cuda: no kernel for device ", input.device());
}

std::tuple<at::Tensor, at::Tensor> ghmc_weights(const at::Tensor& counts, const std::optional<at::Tensor>& acc_sum,
                                                double momentum, double norm, bool float64) {
  const char* op = "focal_cuda.ghmc_weights";
  TORCH_CHECK_TYPE(counts.scalar_type() == at::kLong, op, ": counts must be int64, got ", counts.scalar_type());
  TORCH_CHECK_VALUE(counts.dim() == 1 && counts.numel() >= 2, op, ": counts must be 1-D with bins + 1 entries, got ",
                    counts.sizes());
  const int64_t bins = counts.numel() - 1;
  check_bins(op, bins);
  TORCH_CHECK_VALUE(momentum >= 0.0 && momentum < 1.0, op, ": momentum must be in [0, 1), got ", momentum);
  TORCH_CHECK_VALUE(std::isfinite(norm) && norm >= 0.0, op, ": norm must be a finite number >= 0, got ", norm);
  const bool use_acc = momentum > 0.0;
  if (use_acc) {
    TORCH_CHECK_VALUE(acc_sum.has_value(), op, ": momentum > 0 needs acc_sum, the running counts");
    TORCH_CHECK_TYPE(acc_sum->scalar_type() == at::kFloat, op, ": acc_sum must be float32, got ",
                     acc_sum->scalar_type());
    TORCH_CHECK_VALUE(acc_sum->dim() == 1 && acc_sum->numel() == bins, op, ": acc_sum must have shape [", bins,
                      "], got ", acc_sum->sizes());
    TORCH_CHECK_VALUE(acc_sum->device() == counts.device(), op, ": acc_sum must be on ", counts.device(), ", got ",
                      acc_sum->device());
  }
  const at::Tensor c = counts.contiguous();
  const at::Tensor acc_in = use_acc ? acc_sum->contiguous() : at::Tensor();
  at::Tensor table = at::empty({ghmc_table_size(bins)}, counts.options().dtype(float64 ? at::kDouble : at::kFloat));
  at::Tensor acc_out = at::empty({use_acc ? bins : 0}, counts.options().dtype(at::kFloat));
  if (counts.is_cpu()) {
    const int64_t* cp = c.data_ptr<int64_t>();
    int n = 0;
    for (int64_t k = 0; k < bins; ++k) n += cp[k] > 0 ? 1 : 0;
    const double tot = cp[bins] > 1 ? static_cast<double>(cp[bins]) : 1.0;
    const int b = static_cast<int>(bins);
    auto fill = [&](auto* t) {
      using S = std::remove_pointer_t<decltype(t)>;
      ghmc_fill_bounds(t, b, 0, 1);
      for (int k = 0; k < b; ++k) {
        const float a = use_acc ? acc_in.data_ptr<float>()[k] : 0.0f;
        t[k] = static_cast<S>(
            ghmc_bin_weight(cp[k], a, momentum, tot, n, norm, use_acc ? acc_out.data_ptr<float>() + k : nullptr));
      }
      ghmc_fill_grid<S>(t, b, t, 0, 1);
    };
    if (float64) {
      fill(table.data_ptr<double>());
    } else {
      fill(table.data_ptr<float>());
    }
    return {table, acc_out};
  }
#ifdef FOCAL_WITH_CUDA
  if (counts.is_cuda()) {
    cuda::ghmc_weights(c.data_ptr<int64_t>(), use_acc ? acc_in.data_ptr<float>() : nullptr,
                       use_acc ? acc_out.data_ptr<float>() : nullptr, table.data_ptr(), float64,
                       static_cast<int>(bins), momentum, norm, counts.get_device());
    return {table, acc_out};
  }
#endif
  TORCH_CHECK(false, "focal_cuda: no kernel for device ", counts.device());
}

}  // namespace focal
