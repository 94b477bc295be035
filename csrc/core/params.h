// Plain description of one launch of a family member's fused kernel, shared by
// the CPU and CUDA kernels.
//
// No torch types here: the op layer (csrc/ops/plan.cpp) checks the tensors,
// collapses their shapes and fills this struct; kernels only read it. That
// keeps the .cu file on lean headers and lets the same struct drive every
// kernel and every member of the family.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FOCAL_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FOCAL_HD inline __attribute__((always_inline))
#else
#define FOCAL_HD inline
#endif

namespace focal {

// Leading dimensions (everything but the class dimension) after size-1 dims are
// dropped and mergeable neighbours are merged. More than this falls back to a
// contiguous copy in the op layer.
constexpr int kMaxDims = 8;

enum class ScalarKind : int32_t { Float16 = 0, BFloat16 = 1, Float32 = 2, Float64 = 3, Int32 = 4, Int64 = 5 };

// Mean is expressed as Sum with a divisor, so kernels only know these two.
enum class Reduction : int32_t { None = 0, Sum = 1 };

// The members of the family (csrc/losses/), one functor each.
enum class LossKind : int32_t {
  Focal = 0,         // sigmoid focal loss (RetinaNet)
  FocalSmooth = 1,   // the same with label smoothing (EfficientDet)
  QualityFocal = 2,  // GFL / RTMDet
  Varifocal = 3,     // VarifocalNet, RT-DETR, ultralytics
  FocalStar = 4,     // FL*, the RetinaNet paper's appendix
  IoUAwareBCE = 5,   // LW-DETR, RF-DETR
  GHMC = 6,          // GHM-C's loss pass (the bin weights from its histogram pass)
};

// Every member's options; each functor reads the ones it has (its make()).
struct LossOptions {
  double alpha = 0.25;  // focal, FL*: -1 = no alpha weighting; varifocal: scale of negatives; IoU-BCE: exponent
  double gamma = 2.0;
  double beta = 0.0;       // quality focal: the exponent; FL*: the shift
  double smoothing = 0.0;  // focal with label smoothing
  bool iou_weighted = true;
  bool detach_weight = false;
  // GHM-C: its table (losses/ghmc.h) in the compute type, on the logits' device, and its bin count
  const void* table = nullptr;
  int64_t bins = 0;
};

// One strided operand over the [rows, cols] element grid. An element (r, c)
// lives at data + row_offset(r) + c * col_stride (in elements, not bytes);
// row_offset comes from the shared leading sizes and this operand's row_strides.
struct Operand {
  const void* data = nullptr;
  ScalarKind kind = ScalarKind::Float32;
  int64_t col_stride = 0;
  int64_t row_strides[kMaxDims] = {};
};

struct FocalParams {
  // Element grid: rows x cols. For label targets cols == num_classes; dense
  // targets on fully contiguous tensors may be flattened to a single long row.
  int64_t rows = 0;
  int64_t cols = 0;
  int ndim = 0;                      // leading dims describing rows, outermost first
  int64_t row_sizes[kMaxDims] = {};  // product == rows

  Operand input;   // logits
  Operand target;  // dense targets [.., C] or class labels [..] (col_stride 0)
  Operand weight;  // float32 (float64 for float64 input); data == nullptr: no weight
  // (labels, scores) targets: one score per row in the compute type (col_stride
  // 0), read only for a row whose label is a class, and only where the row's
  // class column is computed; data == nullptr: plain labels (y = 1 there).
  Operand scores;

  bool labels = false;      // target holds one class index per row
  int64_t num_classes = 0;  // C, the valid label range is [0, C]; C means background
  int64_t ignore_index = -1;

  // ndim <= 1, input (and dense target) row-major dense: offset == row * cols + col.
  // Weight and scores may still be strided: offset row * row_strides[0] (+ col * col_stride).
  bool contiguous = false;

  // Outputs, always contiguous over the rows x cols grid, in the input's dtype.
  void* loss = nullptr;  // Reduction::None only
  void* grad = nullptr;  // nullptr: no gradient wanted
  // 0: the gradient includes scale / divisor. > 0: the gradient is
  // dloss/dx * weight * grad_prescale instead, and backward applies
  // scale / divisor / grad_prescale together with grad_output, in float32.
  // Used for float16, whose range cannot hold a gradient divided by a
  // normaliser and multiplied by a loss scale later.
  double grad_prescale = 0.0;

  LossKind loss_kind = LossKind::Focal;
  LossOptions options;

  Reduction reduction = Reduction::None;
  // Reduction::Sum: the 0-d total is written in the compute type (float32, float64
  // for float64 input) rather than the input's (the op's acc_loss: autocast).
  bool acc_loss = false;
  // Every loss and gradient value is multiplied by scale / *divisor (divisor:
  // optional 0-d device tensor of the compute type; float64 for float64 input,
  // else float32). Sums are taken before the factor is applied.
  double scale = 1.0;
  const void* divisor = nullptr;
};

// Offsets (in elements) of row r in the input, target and weight operands.
FOCAL_HD void row_offsets(const FocalParams& p, int64_t r, int64_t& ox, int64_t& ot, int64_t& ow) {
  ox = 0;
  ot = 0;
  ow = 0;
  for (int d = p.ndim - 1; d >= 0; --d) {
    const int64_t size = p.row_sizes[d];
    const int64_t i = (d == 0) ? r : r % size;
    r = (d == 0) ? 0 : r / size;
    ox += i * p.input.row_strides[d];
    ot += i * p.target.row_strides[d];
    ow += i * p.weight.row_strides[d];
  }
}

// Offset (in elements) of row r in operand o.
FOCAL_HD int64_t row_offset(const FocalParams& p, const Operand& o, int64_t r) {
  int64_t off = 0;
  for (int d = p.ndim - 1; d >= 0; --d) {
    const int64_t size = p.row_sizes[d];
    const int64_t i = (d == 0) ? r : r % size;
    r = (d == 0) ? 0 : r / size;
    off += i * o.row_strides[d];
  }
  return off;
}

// Offset (in elements) of row r's score.
FOCAL_HD int64_t score_offset(const FocalParams& p, int64_t r) { return row_offset(p, p.scores, r); }

}  // namespace focal
