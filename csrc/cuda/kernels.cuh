// The fused CUDA kernels of every family member: forward (loss + gradient in
// one pass), the deterministic finalisation of block partial sums, and the
// backward rescale, with the launch choices around them. The member
// (csrc/losses/) is a template parameter L; its functor object, with its options
// in the compute type, is a kernel argument.
//
// Included by the CUDA translation units: focal_cuda.cu (the entry points, the
// float64 kernels, the backward rescale and GHM-C's histogram) and
// forward_half.cu, forward_bfloat16.cu, forward_float.cu (each one dtype's
// forward kernels, most of the build: a build compiles them side by side).
// Everything here has internal linkage, so each translation unit instantiates
// only the kernels it launches.
//
// Lean headers only (no torch/extension.h, no ATen/cuda/CUDAContext.h): the
// tensor work happens in the op layer (csrc/ops/), which hands over a FocalParams.
//
// Layout of the work: one grid-stride loop over the element grid. When the
// tensors are row-major contiguous and 16-byte aligned, each thread takes a
// 16-byte pack of logits (4 x fp32, 8 x fp16/bf16) per step, walks the pack's
// elements with a running (row, col) so that C need not be a multiple of the
// pack width, and writes the gradient pack back with one 16-byte store. The
// rest (the tail, strided or misaligned tensors, fp64) goes through a scalar
// loop with 64-bit indexing. Sums: a pack's few terms are added in the compute
// type, then into a per-thread float64 sum (one DADD per pack: a float thread
// sum over ~1000 grid-stride steps would lose ~1e-6 relative); each block
// reduces its threads' sums with CUB into partials[blockIdx.x] (float64) and
// a one-block kernel adds the partials in a fixed order. No atomics, no host
// synchronisation.
//
// FOCAL_CUDA_HOST_EMULATION: tests/cuda_emulation compiles focal_cuda.cu, and
// with it this file, as plain C++ (kernels run thread by thread on the CPU,
// with stand-ins for the CUDA built-ins and CUB), leaving out what needs the
// CUDA runtime: launches, the occupancy query and the public entry points.
#pragma once
#ifndef FOCAL_CUDA_HOST_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cub/block/block_reduce.cuh>
#endif
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cstring>
#include <type_traits>

#include "../core/math_ops.h"
#include "../losses/family.h"
#include "focal_cuda.h"
#include "tuning.h"

namespace focal::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kScaleBlocksPerSm = 8;  // 2048 resident threads per SM on sm_80 / sm_90 (the scale kernel is small)
constexpr int kMaxDevices = 64;

template <class scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <class T, int N>
struct alignas(16) Pack {
  T v[N];
};

template <class T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

// Element j of a pack in the compute type. bfloat16 is the top half of a
// float32: the odd element of each 32-bit word is masked in place (one
// instruction, where the generic conversion extracts it and shifts it back).
template <class acc_t, class T, int N>
__device__ __forceinline__ acc_t pack_element(const Pack<T, N>& v, int j) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint32_t word;
    memcpy(&word, &v.v[j & ~1], sizeof(word));
    return __uint_as_float((j & 1) ? (word & 0xffff0000u) : (word << 16));
  } else {
    return static_cast<acc_t>(v.v[j]);
  }
}

template <class T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// scale / *divisor (the normaliser, read on the device), or scale.
template <class acc_t>
__device__ __forceinline__ acc_t load_factor(const FocalParams& p, acc_t scale) {
  if (p.divisor != nullptr) scale = scale / *static_cast<const acc_t*>(p.divisor);
  return scale;
}

// The score of row r ((labels, scores) targets), read only where that row's
// class column is computed.
template <class acc_t>
__device__ __forceinline__ acc_t load_score(const FocalParams& p, int64_t r) {
  const int64_t o = p.contiguous ? r * p.scores.row_strides[0] : score_offset(p, r);
  return static_cast<const acc_t*>(p.scores.data)[o];
}

// The member's value at a label row's element: the class column (pos) holds y =
// the row's score (read here, for that column only) or 1 without scores.
template <class L, class acc_t>
__device__ __forceinline__ void label_value(const FocalParams& p, const L& fn, acc_t x, bool pos, int64_t r, acc_t& l,
                                            acc_t& g) {
  if (p.scores.data != nullptr) {
    fn.labelled(x, pos, pos ? load_score<acc_t>(p, r) : acc_t(0), l, g);
  } else {
    fn.binary(x, pos, l, g);
  }
}

// Loss and d loss / dx of element (r, col), weight applied (not the factor).
// Labels: ignore_index gives zeros, a label outside [0, C] gives NaN (the CPU
// path raises instead; the device never syncs to check, and reads nothing with it).
template <class L, class acc_t, class target_t>
__device__ __forceinline__ void element(const FocalParams& p, const L& fn, acc_t x, target_t t, int64_t r,
                                        int64_t col, acc_t w, acc_t& loss, acc_t& grad) {
  acc_t l, g;
  if constexpr (std::is_integral_v<target_t>) {
    const int64_t label = static_cast<int64_t>(t);
    if (label == p.ignore_index) {
      loss = acc_t(0);
      grad = acc_t(0);
      return;
    }
    if (label < 0 || label > p.num_classes) {
      loss = acc_t(NAN);
      grad = acc_t(NAN);
      return;
    }
    label_value(p, fn, x, col == label, r, l, g);
  } else {
    fn.dense(x, static_cast<acc_t>(t), l, g);
  }
  const bool keep = w != acc_t(0);  // a zero weight is an exact zero, even for an infinite loss
  loss = keep ? l * w : acc_t(0);
  grad = keep ? g * w : acc_t(0);
}

template <class acc_t>
__device__ __forceinline__ acc_t load_weight(const FocalParams& p, int64_t offset) {
  return p.weight.data == nullptr ? acc_t(1) : static_cast<const acc_t*>(p.weight.data)[offset];
}

// A label row, decided once per row on the vector path: the class that is
// positive in this row (C = background matches no column), the row's factor
// f (1; 0 for ignore_index; NaN for a label outside [0, C]), what a dropped
// element holds (0, or NaN for a bad label), whether the row counts at all,
// and whether its label is a class or background (then f == 1 and every
// element is computed; otherwise every element of the row is `dropped`).
template <class acc_t>
struct LabelRow {
  int64_t cls;
  acc_t f;
  acc_t dropped;
  bool keep;
  bool valid;
};

// Row a's or row b's, field by field: selecting the struct itself by a runtime
// condition (`second ? b : a` bound to a reference) takes one of two addresses,
// which puts both rows in local memory.
template <class acc_t>
__device__ __forceinline__ LabelRow<acc_t> pick_row(bool second, const LabelRow<acc_t>& a, const LabelRow<acc_t>& b) {
  return {second ? b.cls : a.cls, second ? b.f : a.f, second ? b.dropped : a.dropped, second ? b.keep : a.keep,
          second ? b.valid : a.valid};
}

// Without branches. cls is -1 for a row that is dropped (matches no column,
// and never overflows the column arithmetic the label-rows kernel does with it).
template <class acc_t, class target_t>
__device__ __forceinline__ LabelRow<acc_t> label_row(const FocalParams& p, target_t t) {
  const int64_t label = static_cast<int64_t>(t);
  const bool ignored = label == p.ignore_index;
  const bool in_range = static_cast<uint64_t>(label) <= static_cast<uint64_t>(p.num_classes);  // 0 <= label <= C
  const bool valid = !ignored && in_range;
  const acc_t dropped = ignored || in_range ? acc_t(0) : acc_t(NAN);  // NaN: a bad label
  return {valid ? label : -1, valid ? acc_t(1) : dropped, dropped, !ignored, valid};
}

// Vector-path element of label row r: same values as element() above. A zero
// weight or an ignored row gives exact zeros, even for an infinite loss.
template <bool kHasWeight, class L, class acc_t>
__device__ __forceinline__ void label_element(const FocalParams& p, const L& fn, acc_t x, bool pos,
                                              const LabelRow<acc_t>& row, int64_t r, acc_t w, acc_t& loss,
                                              acc_t& grad) {
  acc_t l, g;
  label_value(p, fn, x, pos, r, l, g);
  if constexpr (kHasWeight) {
    const bool keep = row.keep && w != acc_t(0);
    const acc_t wf = w * row.f;
    loss = keep ? l * wf : row.dropped;
    grad = keep ? g * wf : row.dropped;
  } else {
    loss = row.keep ? l * row.f : row.dropped;
    grad = row.keep ? g * row.f : row.dropped;
  }
}

// Advance a (row, col) position by a fixed number of elements, given as whole
// rows dr and a remainder dc < cols: no division in the loop.
__device__ __forceinline__ void advance(int64_t& r, int64_t& c, int64_t dr, int64_t dc, int64_t cols) {
  c += dc;
  r += dr;
  if (c >= cols) {
    c -= cols;
    ++r;
  }
}

// Loss and gradient of one pack of kVec elements starting at (r, c), weight
// applied (not the normaliser); kHasWeight: p.weight may be set (a null one
// reads as 1). A label row's label is read once per row the pack touches.
template <bool kHasWeight, int kVec, class L, class scalar_t, class target_t, class acc_t>
__device__ __forceinline__ void compute_pack(const FocalParams& p, const L& fn, const Pack<scalar_t, kVec>& xv,
                                             const Pack<target_t, std::is_integral_v<target_t> ? 1 : kVec>& tv,
                                             const target_t* __restrict__ t, int64_t r, int64_t c, int64_t w_rs,
                                             int64_t w_cs, acc_t (&l)[kVec], acc_t (&g)[kVec]) {
  constexpr bool kLabels = std::is_integral_v<target_t>;
  const acc_t* __restrict__ wd = static_cast<const acc_t*>(p.weight.data);
  [[maybe_unused]] LabelRow<acc_t> row;
  if constexpr (kLabels) row = label_row<acc_t>(p, tv.v[0]);
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    if (c == p.cols) {  // the pack runs into the next row (C need not divide the pack)
      c = 0;
      ++r;
      if constexpr (kLabels) row = label_row<acc_t>(p, t[r]);
    }
    const acc_t w = kHasWeight && wd != nullptr ? wd[r * w_rs + c * w_cs] : acc_t(1);
    if constexpr (kLabels) {
      label_element<kHasWeight>(p, fn, pack_element<acc_t>(xv, j), c == row.cls, row, r, w, l[j], g[j]);
    } else {
      element(p, fn, pack_element<acc_t>(xv, j), tv.v[j], r, c, w, l[j], g[j]);
    }
    ++c;
  }
}

// One pack's outputs: the gradient g * gf and, for Reduction::None, the loss
// l * lf, each with one 16-byte store.
template <int kVec, class scalar_t, class acc_t>
__device__ __forceinline__ void store_outputs(scalar_t* __restrict__ grad, scalar_t* __restrict__ loss, int64_t i0,
                                              const acc_t (&l)[kVec], const acc_t (&g)[kVec], acc_t lf, acc_t gf) {
  if (grad != nullptr) {
    Pack<scalar_t, kVec> gv;
#pragma unroll
    for (int j = 0; j < kVec; ++j) gv.v[j] = static_cast<scalar_t>(g[j] * gf);
    store_pack<scalar_t, kVec>(grad + i0, gv);
  }
  if (loss != nullptr) {
    Pack<scalar_t, kVec> lv;
#pragma unroll
    for (int j = 0; j < kVec; ++j) lv.v[j] = static_cast<scalar_t>(l[j] * lf);
    store_pack<scalar_t, kVec>(loss + i0, lv);
  }
}

// The vector path of the general kernel: kUnroll 16-byte packs per thread per
// step of the grid-stride loop, their loads all issued before the first is
// used (more bytes in flight); a thread's (row, col) advances without division.
template <bool kHasWeight, int kUnroll, class scalar_t, class target_t, class L, class acc_t>
__device__ __forceinline__ double vector_loop(const FocalParams& p, const L& fn, int64_t npacks, int64_t tid,
                                              int64_t step, acc_t factor, acc_t gfactor) {
  constexpr bool kLabels = std::is_integral_v<target_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const scalar_t* __restrict__ x = static_cast<const scalar_t*>(p.input.data);
  const target_t* __restrict__ t = static_cast<const target_t*>(p.target.data);
  scalar_t* __restrict__ grad = static_cast<scalar_t*>(p.grad);
  scalar_t* __restrict__ loss = p.reduction == Reduction::None ? static_cast<scalar_t*>(p.loss) : nullptr;
  const int64_t cols = p.cols;
  const int64_t w_rs = p.weight.row_strides[0];  // contiguous mode: ndim <= 1
  const int64_t w_cs = p.weight.col_stride;
  const int64_t stride = step * kVec;  // elements between a thread's consecutive packs
  const int64_t dr = stride / cols;
  const int64_t dc = stride - dr * cols;
  int64_t r0 = (tid * kVec) / cols;
  int64_t c0 = tid * kVec - r0 * cols;
  double sum = 0.0;
  for (int64_t v = tid; v < npacks; v += kUnroll * step) {
    Pack<scalar_t, kVec> xv[kUnroll];
    Pack<target_t, kLabels ? 1 : kVec> tv[kUnroll];
    int64_t rr[kUnroll], cc[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (u == 0) {
        rr[0] = r0;
        cc[0] = c0;
      } else {
        rr[u] = rr[u - 1];
        cc[u] = cc[u - 1];
        advance(rr[u], cc[u], dr, dc, cols);
      }
      if (v + u * step < npacks) {
        const int64_t i0 = (v + u * step) * kVec;
        xv[u] = load_pack<scalar_t, kVec>(x + i0);
        if constexpr (kLabels) {
          tv[u].v[0] = t[rr[u]];
        } else {
          tv[u] = load_pack<target_t, kVec>(t + i0);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v + u * step >= npacks) break;
      acc_t l[kVec], g[kVec];
      compute_pack<kHasWeight>(p, fn, xv[u], tv[u], t, rr[u], cc[u], w_rs, w_cs, l, g);
      acc_t pack_sum = l[0];  // (0 + l[0] would be an addition: -0.0)
#pragma unroll
      for (int j = 1; j < kVec; ++j) pack_sum += l[j];
      sum += static_cast<double>(pack_sum);
      store_outputs<kVec, scalar_t>(grad, loss, (v + u * step) * kVec, l, g, factor, gfactor);
    }
    r0 = rr[kUnroll - 1];
    c0 = cc[kUnroll - 1];
    advance(r0, c0, dr, dc, cols);
  }
  return sum;
}

// The forward kernels' factors in the compute type, made on the host, as the
// member's options are (its functor, made by with_loss): from FocalParams'
// doubles inside the kernel, nvcc converted them again at each use (it sank the
// conversion below the per-element alpha select: five instructions per element
// instead of one; and the gradient factor's per pack).
template <class acc_t>
struct KernelConsts {
  acc_t scale;
  acc_t grad_prescale;
};

template <class acc_t>
KernelConsts<acc_t> make_consts(const FocalParams& p) {
  return {static_cast<acc_t>(p.scale), static_cast<acc_t>(p.grad_prescale)};
}

template <class acc_t>
struct OutputFactors {
  acc_t loss;  // scale / divisor
  acc_t grad;  // the same, or grad_prescale (float16: the rest is applied in backward)
};

template <class acc_t>
__device__ __forceinline__ OutputFactors<acc_t> output_factors(const FocalParams& p, const KernelConsts<acc_t>& kc) {
  const acc_t factor = load_factor<acc_t>(p, kc.scale);
  return {factor, kc.grad_prescale > acc_t(0) ? kc.grad_prescale : factor};
}

// Reduction::Sum: the block's threads' sums, reduced with CUB, into partials[blockIdx.x].
__device__ __forceinline__ void write_block_partial(const FocalParams& p, double sum, double* __restrict__ partials) {
  if (p.reduction == Reduction::Sum) {
    using BlockReduce = cub::BlockReduce<double, kThreads>;
    __shared__ typename BlockReduce::TempStorage storage;
    const double block_sum = BlockReduce(storage).Sum(sum);
    if (threadIdx.x == 0) partials[blockIdx.x] = block_sum;
  }
}

// The general kernel: every dtype, target kind, weight and layout. The vector
// path above where the tensors allow it, then a scalar grid-stride loop with
// 64-bit indexing over the rest (all of it for strided, misaligned or float64
// tensors).
template <class scalar_t, class target_t, class L, int kUnroll>
__global__ void __launch_bounds__(kThreads)
    focal_forward_kernel(const FocalParams p, const L fn, const KernelConsts<acc_type<scalar_t>> kc, bool vectorized,
                         double* __restrict__ partials) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kLabels = std::is_integral_v<target_t>;

  const OutputFactors<acc_t> f = output_factors<acc_t>(p, kc);
  const int64_t n = p.rows * p.cols;
  const int64_t cols = p.cols;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const scalar_t* __restrict__ x = static_cast<const scalar_t*>(p.input.data);
  const target_t* __restrict__ t = static_cast<const target_t*>(p.target.data);
  scalar_t* __restrict__ grad = static_cast<scalar_t*>(p.grad);
  scalar_t* __restrict__ loss = p.reduction == Reduction::None ? static_cast<scalar_t*>(p.loss) : nullptr;
  const int64_t w_rs = p.weight.row_strides[0];  // contiguous mode: ndim <= 1
  const int64_t w_cs = p.weight.col_stride;

  double sum = 0.0;
  int64_t vector_end = 0;
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (vectorized) {
      constexpr int kVec = 16 / sizeof(scalar_t);
      const int64_t npacks = n / kVec;
      vector_end = npacks * kVec;
      // Labels: one vector loop for every weight (weighted labels, and unweighted ones with C below
      // the pack or misaligned: the label-rows kernel takes the rest). Dense targets: without a
      // weight (the common case) its own loop.
      if constexpr (kLabels) {
        sum = vector_loop<true, kUnroll, scalar_t, target_t>(p, fn, npacks, tid, step, f.loss, f.grad);
      } else if (p.weight.data != nullptr) {
        sum = vector_loop<true, kUnroll, scalar_t, target_t>(p, fn, npacks, tid, step, f.loss, f.grad);
      } else {
        sum = vector_loop<false, kUnroll, scalar_t, target_t>(p, fn, npacks, tid, step, f.loss, f.grad);
      }
    }
  }
  for (int64_t i = vector_end + tid; i < n; i += step) {
    const int64_t r = i / cols;
    const int64_t c = i - r * cols;
    int64_t ox, ot, ow;
    if (p.contiguous) {
      ox = i;
      ot = kLabels ? r : i;
      ow = r * w_rs;
    } else {
      row_offsets(p, r, ox, ot, ow);
      ox += c * p.input.col_stride;
      ot += c * p.target.col_stride;  // 0 for labels
    }
    ow += c * w_cs;
    acc_t l, g;
    element(p, fn, static_cast<acc_t>(x[ox]), t[ot], r, c, load_weight<acc_t>(p, ow), l, g);
    sum += static_cast<double>(l);
    if (grad != nullptr) grad[i] = static_cast<scalar_t>(g * f.grad);
    if (loss != nullptr) loss[i] = static_cast<scalar_t>(l * f.loss);
  }
  write_block_partial(p, sum, partials);
}

// The packs of one step of the label-rows kernel: logits, the label (and, with
// per-row weights, the weight) of the row each pack starts in and, where it
// runs into the next row, that row's, and the pack's first column.
template <class scalar_t, class target_t, int kUnroll>
struct RowStep {
  static constexpr int kVec = 16 / sizeof(scalar_t);
  using acc_t = acc_type<scalar_t>;
  Pack<scalar_t, kVec> x[kUnroll];
  target_t label[kUnroll];
  target_t next_label[kUnroll];
  acc_t w[kUnroll];
  acc_t next_w[kUnroll];
  int col[kUnroll];
};

// Where a thread's next pack to load is: its index v (packs are kVec elements),
// its row r and first column c. Moving by one grid stride is whole rows dr and
// columns dc < C: no division (C < 2^30, so c + dc does not overflow).
struct RowCursor {
  int64_t v;
  int64_t r;
  int c;
  __device__ __forceinline__ void next(int64_t step, int64_t dr, int dc, int cols) {
    v += step;
    r += dr;
    c += dc;
    if (c >= cols) {
      c -= cols;
      ++r;
    }
  }
};

// Issues the loads of kUnroll packs from the cursor on (those below npacks),
// moving it past them. kCross (C not a multiple of the pack): a pack that runs
// into the next row (C >= kVec: into one row at most) also loads that row's
// label; the row exists, as the pack lies inside the tensor. kRowWeight: each
// row's weight too, at wd[r * w_rs] (1 where wd is null).
template <bool kCross, bool kRowWeight, class scalar_t, class target_t, int kUnroll, class acc_t>
__device__ __forceinline__ void load_row_step(RowStep<scalar_t, target_t, kUnroll>& s, const scalar_t* __restrict__ x,
                                              const target_t* __restrict__ t, const acc_t* __restrict__ wd,
                                              int64_t w_rs, RowCursor& at, int64_t npacks, int64_t step, int64_t dr,
                                              int dc, int cols) {
  constexpr int kVec = RowStep<scalar_t, target_t, kUnroll>::kVec;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    s.col[u] = at.c;
    if (at.v < npacks) {
      s.x[u] = load_pack<scalar_t, kVec>(x + at.v * kVec);
      s.label[u] = t[at.r];
      if (kRowWeight) s.w[u] = wd != nullptr ? wd[at.r * w_rs] : acc_t(1);
      if (kCross && at.c + kVec > cols) {
        s.next_label[u] = t[at.r + 1];
        if (kRowWeight) s.next_w[u] = wd != nullptr ? wd[(at.r + 1) * w_rs] : acc_t(1);
      }
    }
    at.next(step, dr, dc, cols);
  }
}

// A pack with y = 0 everywhere: the member's negative form (for the focal loss
// no selects on the target), and its neg_factor (alpha) left to the caller.
template <int kVec, class L, class scalar_t, class acc_t>
__device__ __forceinline__ void all_negative_pack(const L& fn, const Pack<scalar_t, kVec>& xv, acc_t (&l)[kVec],
                                                  acc_t (&g)[kVec]) {
#pragma unroll
  for (int j = 0; j < kVec; ++j) fn.negative(pack_element<acc_t>(xv, j), l[j], g[j]);
}

// Loss and gradient of one pack of the label-rows kernel whose first element is
// column c of a row with label row.cls; if the pack runs into the next row
// (c + kVec > C), its elements from j = C - c on belong to the row with
// `next_label`. kRowWeight: w and next_w are those rows' weights. Returns a
// factor the caller applies to the whole pack (its sum and both outputs):
//  * both rows count, with one nonzero weight, and neither row's class lies in
//    the pack (almost every pack): the all-negative math, no selects on the
//    target, and alpha_neg (times the weight) left to that factor;
//  * a pack in one row that holds its class: compared column by column, the
//    weight left to the factor;
//  * otherwise (a pack that runs into the next row and holds a class, or meets
//    an ignored row, a bad label or another weight there), element by element
//    as the general kernel.
// A pack inside one ignored row, bad label or zero-weight row never gets here:
// the kernel fills it.
// i0: the pack's first element; its row, i0 / C, is computed only to read a
// score (a pack that holds a class column, with (labels, scores) targets).
template <bool kCross, bool kRowWeight, int kVec, class L, class scalar_t, class target_t, class acc_t>
__device__ __forceinline__ acc_t row_pack(const FocalParams& p, const L& fn, const Pack<scalar_t, kVec>& xv,
                                          const LabelRow<acc_t>& row, target_t next_label, acc_t w, acc_t next_w,
                                          int64_t i0, int c, int cols, acc_t (&l)[kVec], acc_t (&g)[kVec]) {
  const acc_t wf = kRowWeight ? w : acc_t(1);  // the pack's weight where it lies in one row
  if constexpr (!kCross) {  // C a multiple of the pack: one row, and it counts (the kernel filled the others)
    const int64_t rel = row.cls - c;  // the class's place in this pack, if it is in it
    if (rel < 0 || rel >= kVec) {
      all_negative_pack(fn, xv, l, g);
      return fn.neg_factor() * wf;
    }
    if (p.scores.data != nullptr) {
      const acc_t sc = load_score<acc_t>(p, i0 / cols);
#pragma unroll
      for (int j = 0; j < kVec; ++j) fn.labelled(pack_element<acc_t>(xv, j), j == rel, sc, l[j], g[j]);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) fn.binary(pack_element<acc_t>(xv, j), j == rel, l[j], g[j]);
    }
    return wf;
  }
  const bool cross = c + kVec > cols;
  const int split = cross ? cols - c : kVec;  // elements of the first row
  const LabelRow<acc_t> row2 = pick_row(cross, row, label_row<acc_t>(p, next_label));
  const acc_t w2 = kRowWeight && cross ? next_w : wf;
  // The first row's class is in the pack if rel is in [0, split) (background, C, lands on split); the
  // second row's if rel2 < kVec (background gives split + C > kVec). A dropped row (cls -1) matters not:
  // its pack is not all-negative, and no column j matches.
  const int64_t rel = row.cls - c;
  const int64_t rel2 = split + row2.cls;
  const bool weights_ok = !kRowWeight || (wf != acc_t(0) && w2 == wf);  // one nonzero weight over the pack
  const bool negative =
      row.valid && row2.valid && weights_ok && !(rel >= 0 && rel < split) && !(cross && rel2 < kVec);
  if (negative) {
    all_negative_pack(fn, xv, l, g);
    return fn.neg_factor() * wf;
  }
  const int64_t r = i0 / cols;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const bool second = j >= split;
    label_element<kRowWeight>(p, fn, pack_element<acc_t>(xv, j), second ? j == rel2 : j == rel,
                              pick_row(second, row, row2), second ? r + 1 : r, second ? w2 : wf, l[j], g[j]);
  }
  return acc_t(1);
}

// Blocks of 256 per SM asked of ptxas for the label-rows kernel (a register cap
// of 64K / 256 / blocks), set to the occupancy each kernel's natural register
// count allows, so that the hot loop does not spill. Uncapped, ptxas (nvcc 13,
// sm_90) gives the kernels without row crossing 73-88 registers (the focal
// loss 73-80) and those with it 88-120: 3 blocks (80 registers) and 2 (128).
// Caps below that spill inside the grid-stride loop: at 4 and 5 blocks the
// float32 and bfloat16 focal kernels of COCO stored and reloaded 15-19 values
// a step; at 3 blocks the kernels with row crossing keep 8-112 B on the stack,
// and the other members' float32 kernels without it (86-88) 8-24 B, which they
// keep rather than lose a third of their warps. tests/test_cuda_build.py
// checks the stack frames.
// (FOCAL_CUDA_ROW_MIN_BLOCKS in tuning.h overrides them all.)
template <bool kCross>
constexpr int kRowMinBlocks = FOCAL_CUDA_ROW_MIN_BLOCKS > 0 ? FOCAL_CUDA_ROW_MIN_BLOCKS : (kCross ? 2 : 3);

// The hot path, as its own kernel: class labels, no weight or one weight per
// row (kRowWeight: per anchor, as mmdet and the torchvision patch pass them),
// C >= the pack (and below 2^30), contiguous 16-byte-aligned tensors,
// 16/32-bit logits. Without the general kernel's other paths it needs far
// fewer registers (more warps per SM), and it loads each step's packs one step
// ahead, so a thread's next loads are in flight while it computes (a load
// issued in the same step gets sunk by ptxas behind the label's compare, into
// the branch that uses it). A pack inside one ignored row, bad label or
// zero-weight row is filled with LabelRow::dropped without math; others go
// through row_pack. kCross: C is not a multiple of the pack (a separate
// instantiation, so that C = 80 does not pay its registers); the last
// n % kVec elements then take a scalar loop.
template <class scalar_t, class target_t, class L, int kUnroll, bool kCross, bool kRowWeight>
__global__ void __launch_bounds__(kThreads, kRowMinBlocks<kCross>)
    focal_label_rows_kernel(const FocalParams p, const L fn, const KernelConsts<acc_type<scalar_t>> kc, bool,
                            double* __restrict__ partials) {
  static_assert(std::is_integral_v<target_t> && !std::is_same_v<scalar_t, double>);
  using acc_t = acc_type<scalar_t>;
  using Step = RowStep<scalar_t, target_t, kUnroll>;
  constexpr int kVec = Step::kVec;
  const OutputFactors<acc_t> f = output_factors<acc_t>(p, kc);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const scalar_t* __restrict__ x = static_cast<const scalar_t*>(p.input.data);
  const target_t* __restrict__ t = static_cast<const target_t*>(p.target.data);
  scalar_t* __restrict__ grad = static_cast<scalar_t*>(p.grad);
  scalar_t* __restrict__ loss = p.reduction == Reduction::None ? static_cast<scalar_t*>(p.loss) : nullptr;
  const int cols = static_cast<int>(p.cols);
  const int64_t n = p.rows * p.cols;
  const int64_t npacks = n / kVec;
  const int64_t dr = step * kVec / cols;
  const int dc = static_cast<int>(step * kVec - dr * cols);
  RowCursor at{tid, tid * kVec / cols, static_cast<int>(tid * kVec % cols)};
  const acc_t* __restrict__ wd = static_cast<const acc_t*>(p.weight.data);
  const int64_t w_rs = p.weight.row_strides[0];

  double sum = 0.0;
  Step cur;
  load_row_step<kCross, kRowWeight>(cur, x, t, wd, w_rs, at, npacks, step, dr, dc, cols);
  for (int64_t v = tid; v < npacks; v += kUnroll * step) {
    Step next;
    load_row_step<kCross, kRowWeight>(next, x, t, wd, w_rs, at, npacks, step, dr, dc, cols);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v + u * step >= npacks) break;
      const int64_t i0 = (v + u * step) * kVec;
      const LabelRow<acc_t> row = label_row<acc_t>(p, cur.label[u]);
      acc_t l[kVec], g[kVec];
      const bool dropped = !row.valid || (kRowWeight && cur.w[u] == acc_t(0));  // (then row.dropped: 0 or NaN)
      if (dropped && (!kCross || cur.col[u] + kVec <= cols)) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) l[j] = g[j] = row.dropped;
        sum += static_cast<double>(row.dropped);  // 0, or NaN
        store_outputs<kVec, scalar_t>(grad, loss, i0, l, g, f.loss, f.grad);
        continue;
      }
      const acc_t a = row_pack<kCross, kRowWeight>(p, fn, cur.x[u], row, cur.next_label[u], cur.w[u], cur.next_w[u],
                                                   i0, cur.col[u], cols, l, g);
      acc_t pack_sum = l[0];
#pragma unroll
      for (int j = 1; j < kVec; ++j) pack_sum += l[j];
      sum += static_cast<double>(pack_sum * a);
      store_outputs<kVec, scalar_t>(grad, loss, i0, l, g, f.loss * a, f.grad * a);
    }
    cur = next;
  }
  for (int64_t i = npacks * kVec + tid; kCross && i < n; i += step) {  // fewer than kVec elements
    const int64_t r = i / cols;
    acc_t l, g;
    const acc_t w = kRowWeight && wd != nullptr ? wd[r * w_rs] : acc_t(1);
    element(p, fn, static_cast<acc_t>(x[i]), t[r], r, i - r * cols, w, l, g);
    sum += static_cast<double>(l);
    if (grad != nullptr) grad[i] = static_cast<scalar_t>(g * f.grad);
    if (loss != nullptr) loss[i] = static_cast<scalar_t>(l * f.loss);
  }
  write_block_partial(p, sum, partials);
}

// One block adds the partials in a fixed order and writes sum * factor, in the
// input's type, or in the compute type where p.acc_loss asks for it.
template <class scalar_t>
__global__ void __launch_bounds__(kThreads) focal_finalize_kernel(const FocalParams p,
                                                                  const double* __restrict__ partials,
                                                                  int64_t nblocks, void* __restrict__ out) {
  using acc_t = acc_type<scalar_t>;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < nblocks; i += kThreads) s += partials[i];
  using BlockReduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const double total = BlockReduce(storage).Sum(s);
  if (threadIdx.x == 0) {
    const acc_t value = static_cast<acc_t>(total) * load_factor<acc_t>(p, static_cast<acc_t>(p.scale));
    if (p.acc_loss) {
      *static_cast<acc_t*>(out) = value;
    } else {
      *static_cast<scalar_t*>(out) = static_cast<scalar_t>(value);
    }
  }
}

// grad *= grad_output unless grad_output is exactly 1 (then no pass over memory).
// grad_output is of grad's dtype, or float32 (float16 gradients scaled in float32).
template <class scalar_t, class go_t>
__global__ void __launch_bounds__(kThreads)
    scale_grad_kernel(scalar_t* __restrict__ grad, int64_t n, const go_t* __restrict__ grad_output,
                      bool vectorized) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const acc_t s = static_cast<acc_t>(*grad_output);
  if (s == acc_t(1)) return;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t vector_end = 0;
  if (vectorized) {
    const int64_t npacks = n / kVec;
    vector_end = npacks * kVec;
    for (int64_t v = tid; v < npacks; v += step) {
      Pack<scalar_t, kVec> g = load_pack<scalar_t, kVec>(grad + v * kVec);
#pragma unroll
      for (int j = 0; j < kVec; ++j) g.v[j] = static_cast<scalar_t>(static_cast<acc_t>(g.v[j]) * s);
      store_pack<scalar_t, kVec>(grad + v * kVec, g);
    }
  }
  for (int64_t i = vector_end + tid; i < n; i += step) grad[i] = static_cast<scalar_t>(static_cast<acc_t>(grad[i]) * s);
}

#ifndef FOCAL_CUDA_HOST_EMULATION
template <class scalar_t>
void launch_scale(void* grad, int64_t numel, const void* grad_output, bool go_float32, unsigned grid, bool vectorized,
                  cudaStream_t stream) {
  if (go_float32 && !std::is_same_v<scalar_t, float>) {
    scale_grad_kernel<scalar_t, float><<<grid, kThreads, 0, stream>>>(
        static_cast<scalar_t*>(grad), numel, static_cast<const float*>(grad_output), vectorized);
  } else {
    scale_grad_kernel<scalar_t, scalar_t><<<grid, kThreads, 0, stream>>>(
        static_cast<scalar_t*>(grad), numel, static_cast<const scalar_t*>(grad_output), vectorized);
  }
}

int sm_count(int device) {
  static std::atomic<int> cache[kMaxDevices] = {};
  if (device >= 0 && device < kMaxDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < kMaxDevices) cache[device].store(sms, std::memory_order_relaxed);
  return sms;
}

// Grid size from the element count, the chip and the kernel only: at most as
// many blocks as the chip holds at once (one wave; each thread then strides over
// the rest), fewer for small inputs. With the vector path's alignment
// condition fixed for a given tensor, the partition of a sum -- and its bits --
// are the same run after run (a differently aligned copy of the same values may
// round differently in the last bits).
int64_t grid_size(int64_t n, int device, int resident_blocks_per_sm) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * 4;
  const int64_t wanted = (n + per_block - 1) / per_block;
  const int64_t cap = static_cast<int64_t>(sm_count(device)) * (resident_blocks_per_sm > 0 ? resident_blocks_per_sm : 1);
  return wanted < 1 ? 1 : (wanted < cap ? wanted : cap);
}

#endif  // FOCAL_CUDA_HOST_EMULATION

bool aligned16(const void* ptr) { return ptr == nullptr || (reinterpret_cast<std::uintptr_t>(ptr) % 16) == 0; }

template <class scalar_t, class L>
using ForwardKernel = void (*)(const FocalParams, const L, const KernelConsts<acc_type<scalar_t>>, bool, double*);

// One kernel variant: the logits' type, the targets' type and the member.
template <class S, class T, class L>
struct Variant {
  using scalar_t = S;
  using target_t = T;
  using loss_t = L;
};

// Calls f(Variant<scalar_t, target_t, L>{}, member) for p's dtypes and member.
// Function templates rather than nested generic lambdas (nvcc's front end
// mistakes a type taken from an outer lambda's parameter for a reference in the
// inner one), and no explicit lambda template parameters (C++20: torch before
// 2.12 builds extensions as C++17). Labels are int64 (plan.cpp converts int32
// ones: they are 1/C of the logits); dense targets are in the compute type,
// except that the focal loss also reads 16-bit dense targets with 16-bit
// logits in their own dtype (the op converts everything else).
template <class scalar_t, class L, class F>
void dispatch_target(const FocalParams& p, const L& fn, F& f) {
  using acc_t = acc_type<scalar_t>;
  if (p.labels) return f(Variant<scalar_t, int64_t, L>{}, fn);
  if constexpr (is_focal<L>::value && !std::is_same_v<scalar_t, acc_t>) {
    if (p.target.kind != ScalarKind::Float32) return f(Variant<scalar_t, scalar_t, L>{}, fn);
  }
  return f(Variant<scalar_t, acc_t, L>{}, fn);
}

template <class scalar_t, class F>
void dispatch_member(const FocalParams& p, F& f) {
  with_loss<acc_type<scalar_t>>(p, [&](const auto& fn) { dispatch_target<scalar_t>(p, fn, f); });
}

// Every dtype at once: the emulation's dispatch (tests/cuda_emulation). The
// entry points switch on the dtype in focal_cuda.cu instead, each dtype's
// kernels being instantiated in a translation unit of its own.
template <class F>
void dispatch_forward(const FocalParams& p, F&& f) {
  switch (p.input.kind) {
    case ScalarKind::Float16:
      return dispatch_member<c10::Half>(p, f);
    case ScalarKind::BFloat16:
      return dispatch_member<c10::BFloat16>(p, f);
    case ScalarKind::Float32:
      return dispatch_member<float>(p, f);
    case ScalarKind::Float64:
      return dispatch_member<double>(p, f);
    default:
      return;  // rejected by the op layer
  }
}

// Packs per thread per loop step of the general kernel and of the label-rows
// kernel (tuning.h).
template <class scalar_t>
constexpr int kUnrollPacks = sizeof(scalar_t) == 4 ? FOCAL_CUDA_PACKS_F32 : FOCAL_CUDA_PACKS_F16;
template <class scalar_t>
constexpr int kRowUnrollPacks = sizeof(scalar_t) == 4 ? FOCAL_CUDA_ROW_PACKS_F32 : FOCAL_CUDA_ROW_PACKS_F16;

// The kernel for a launch, and whether its tensors allow the vector path.
template <class scalar_t, class L>
struct ForwardLaunch {
  ForwardKernel<scalar_t, L> kernel;
  bool vectorized;
};

template <class scalar_t, class target_t, class L>
ForwardLaunch<scalar_t, L> forward_launch(const FocalParams& p) {
  if constexpr (std::is_same_v<scalar_t, double>) {  // no vector path
    return {focal_forward_kernel<scalar_t, target_t, L, 1>, false};
  } else {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vectorized = p.contiguous && aligned16(p.input.data) &&
                            (std::is_integral_v<target_t> || aligned16(p.target.data)) && aligned16(p.grad) &&
                            aligned16(p.loss);
    if constexpr (std::is_integral_v<target_t>) {
      const bool row_weight = p.weight.data != nullptr && p.weight.col_stride == 0;  // one weight per row
      if (FOCAL_CUDA_LABEL_ROWS && vectorized && p.cols >= kVec && p.cols < (int64_t(1) << 30) &&
          (p.weight.data == nullptr || row_weight)) {
        constexpr int kU = kRowUnrollPacks<scalar_t>;
        const bool cross = p.cols % kVec != 0;
        // The focal loss (the hot path) has kernels of its own without a weight; the other members
        // run one kernel for no weight and for one per row (a null weight reads as 1 there).
        if constexpr (is_focal<L>::value) {
          if (!row_weight) {
            if (cross) return {focal_label_rows_kernel<scalar_t, target_t, L, kU, true, false>, true};
            return {focal_label_rows_kernel<scalar_t, target_t, L, kU, false, false>, true};
          }
        }
        if (cross) return {focal_label_rows_kernel<scalar_t, target_t, L, kU, true, true>, true};
        return {focal_label_rows_kernel<scalar_t, target_t, L, kU, false, true>, true};
      }
    }
    return {focal_forward_kernel<scalar_t, target_t, L, kUnrollPacks<scalar_t>>, vectorized};
  }
}


#ifndef FOCAL_CUDA_HOST_EMULATION
template <class Kernel>
int resident_blocks(Kernel kernel) {
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0));
  return blocks;
}

// The grid of the forward launch for p (scalar_t: p's logits): the element count,
// the chip and the kernel's occupancy.
template <class scalar_t>
int64_t typed_forward_grid(const FocalParams& p, int device) {
  int64_t grid = 1;
  auto f = [&](auto v, const auto&) {
    using V = decltype(v);
    const auto kernel = forward_launch<scalar_t, typename V::target_t, typename V::loss_t>(p).kernel;
    grid = grid_size(p.rows * p.cols, device, resident_blocks(kernel));
  };
  dispatch_member<scalar_t>(p, f);
  return grid;
}

// The forward launch for p on the current stream, then for Reduction::Sum the
// finalisation. Reduction::Sum launches exactly nblocks blocks (one partial
// each), whatever forward_num_blocks said, so partials is never overrun.
template <class scalar_t>
void typed_forward(const FocalParams& p, int device, void* partials, int64_t nblocks, void* out) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  const int64_t grid = p.reduction == Reduction::Sum ? nblocks : typed_forward_grid<scalar_t>(p, device);
  auto f = [&](auto v, const auto& fn) {
    using V = decltype(v);
    const auto launch = forward_launch<scalar_t, typename V::target_t, typename V::loss_t>(p);
    launch.kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p, fn, make_consts<acc_type<scalar_t>>(p),
                                                                         launch.vectorized,
                                                                         static_cast<double*>(partials));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (p.reduction == Reduction::Sum) {
      focal_finalize_kernel<scalar_t><<<1, kThreads, 0, stream>>>(p, static_cast<const double*>(partials), nblocks,
                                                                  out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  dispatch_member<scalar_t>(p, f);
}
#endif  // FOCAL_CUDA_HOST_EMULATION

}  // namespace

#ifndef FOCAL_CUDA_HOST_EMULATION
// typed_forward_grid and typed_forward of the 16- and 32-bit dtypes, each defined in a
// translation unit of its own (forward_<dtype>.cu); the device is current.
int64_t forward_grid_half(const FocalParams& p, int device);
int64_t forward_grid_bfloat16(const FocalParams& p, int device);
int64_t forward_grid_float(const FocalParams& p, int device);
void forward_half(const FocalParams& p, int device, void* partials, int64_t nblocks, void* out);
void forward_bfloat16(const FocalParams& p, int device, void* partials, int64_t nblocks, void* out);
void forward_float(const FocalParams& p, int device, void* partials, int64_t nblocks, void* out);
#endif  // FOCAL_CUDA_HOST_EMULATION

}  // namespace focal::cuda
