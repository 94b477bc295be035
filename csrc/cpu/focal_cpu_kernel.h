// The fused CPU kernel: one pass over a range of elements writes the gradient
// (and the elementwise loss) and returns the range's partial sum.
//
// This header is compiled once per CPU instruction set (CPU_CAPABILITY =
// DEFAULT inside _C, AVX2 in the separate _cpu_avx2 module built with
// -mavx2 -mfma), so everything in it sits in an inline namespace named after
// the capability, like ATen's own vectorised kernels.
//
// The caller (focal_op.cpp) splits the element range into fixed chunks and sums
// the chunks' partials in order, so the loss is bitwise the same whatever the
// thread count. Inside a chunk, the elements go through row segments (one row,
// a run of columns): per segment the row offsets are computed once, then a
// vector loop (Vectorized<float>) runs over unit-stride columns and a scalar
// loop over the rest.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../focal_math.h"
#include "../focal_params.h"

namespace focal {

template <>
struct MathOps<at::vec::Vectorized<float>> {
  using V = at::vec::Vectorized<float>;
  using Mask = V;
  static V exp(V x) { return x.exp(); }  // Sleef, u10, on AVX2 / AVX-512
  static V log1p(V x) { return x.log1p(); }
  static V log(V x) { return x.log(); }
  static V abs(V x) { return x.abs(); }
  static V max(V a, V b) { return at::vec::maximum(a, b); }
  static V select(V m, V a, V b) { return V::blendv(b, a, m); }
  static V ge(V a, V b) { return a >= b; }
  static V gt(V a, V b) { return a > b; }
  static V ne(V a, V b) { return a != b; }
};

namespace cpu {
inline namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
constexpr int kLanes = Vec::size();

// Storage <-> float32 vectors for unit-stride runs of kLanes elements.
template <class scalar_t>
inline Vec load_float(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float<scalar_t>(p, out);
    return out;
  }
}

template <class scalar_t>
inline void store_float(scalar_t* p, Vec v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, kLanes);
  }
}

template <class label_t>
inline int64_t read_label(const FocalParams& p, int64_t offset) {
  return static_cast<int64_t>(static_cast<const label_t*>(p.target.data)[offset]);
}

// Loss/gradient of one element in compute precision acc_t, weight and factor applied.
// A zero weight and an ignored label give exactly zero, whatever the logit.
template <int GK, class acc_t, class target_t>
inline void element(const FocalParams& p, const FocalCoeffs<acc_t>& k, acc_t x, const target_t* tgt, int64_t t_off,
                    int64_t label, int64_t col, acc_t w, acc_t factor, acc_t& loss, acc_t& grad) {
  acc_t l, g;
  if (p.labels) {
    if (label == p.ignore_index) {
      loss = acc_t(0);
      grad = acc_t(0);
      return;
    }
    focal_binary<GK, acc_t, acc_t>(x, col == label, k, l, g);
  } else {
    focal_soft<GK, acc_t, acc_t>(x, static_cast<acc_t>(tgt[t_off]), k, l, g);
  }
  const bool keep = w != acc_t(0);
  loss = keep ? l * w : acc_t(0);
  grad = keep ? g * w * factor : acc_t(0);
}

// One row segment [c0, c1) of row r. Returns nothing; accumulates into the sums.
template <class scalar_t, class target_t, int GK>
struct Segment {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  static constexpr bool kVector = std::is_same_v<acc_t, float>;

  static void run(const FocalParams& p, const FocalCoeffs<acc_t>& k, acc_t factor, int64_t r, int64_t c0, int64_t c1,
                  Vec& vsum, double& ssum) {
    int64_t ox, ot, ow;
    if (p.contiguous) {
      ox = r * p.cols;
      ot = p.labels ? r : r * p.cols;
      ow = p.ndim == 0 ? 0 : r * p.weight.row_strides[0];
    } else {
      row_offsets(p, r, ox, ot, ow);
    }
    const scalar_t* x = static_cast<const scalar_t*>(p.input.data) + ox;
    const target_t* t = p.labels ? nullptr : static_cast<const target_t*>(p.target.data) + ot;
    const acc_t* w = p.weight.data ? static_cast<const acc_t*>(p.weight.data) + ow : nullptr;
    const int64_t xcs = p.input.col_stride, tcs = p.target.col_stride, wcs = p.weight.col_stride;
    const int64_t out0 = r * p.cols;  // outputs are contiguous over the grid
    scalar_t* grad = static_cast<scalar_t*>(p.grad);
    scalar_t* loss = p.reduction == Reduction::None ? static_cast<scalar_t*>(p.loss) : nullptr;

    int64_t label = -1;
    if (p.labels) {
      label = p.target.kind == ScalarKind::Int32 ? read_label<int32_t>(p, ot) : read_label<int64_t>(p, ot);
      if (label == p.ignore_index) {  // the whole segment is ignored
        for (int64_t c = c0; c < c1; ++c) {
          if (grad) grad[out0 + c] = scalar_t(0);
          if (loss) loss[out0 + c] = scalar_t(0);
        }
        return;
      }
      if (label < 0 || label > p.num_classes) label = -2;  // unreachable on CPU (checked); never matches
    }

    int64_t c = c0;
    if constexpr (kVector) {
      const bool unit = xcs == 1 && (p.labels || tcs == 1) && (!w || wcs == 0 || wcs == 1);
      if (unit) {
        const Vec vfactor(factor);
        const Vec zero(0.0f);
        const Vec lanes = Vec::arange(0.0f, 1.0f);
        const Vec vlabel(static_cast<float>(label));
        for (; c + kLanes <= c1; c += kLanes) {
          const Vec vx = load_float(x + c);
          Vec l, g;
          if (p.labels) {
            const Vec cols = Vec(static_cast<float>(c)) + lanes;  // exact: C < 2^24
            focal_binary<GK, Vec, float>(vx, cols == vlabel, k, l, g);
          } else {
            focal_soft<GK, Vec, float>(vx, load_float(t + c), k, l, g);
          }
          if (w) {
            const Vec vw = wcs == 0 ? Vec(w[0]) : Vec::loadu(w + c);
            const Vec keep = vw != zero;
            l = Vec::blendv(zero, l * vw, keep);
            g = Vec::blendv(zero, g * vw, keep);
          }
          vsum = vsum + l;
          if (grad) store_float(grad + out0 + c, g * vfactor);
          if (loss) store_float(loss + out0 + c, l * vfactor);
        }
      }
    }
    for (; c < c1; ++c) {
      acc_t l, g;
      const acc_t wv = w ? w[c * wcs] : acc_t(1);
      element<GK, acc_t, target_t>(p, k, static_cast<acc_t>(x[c * xcs]), t, c * tcs, label, c, wv, factor, l, g);
      ssum += static_cast<double>(l);
      if (grad) grad[out0 + c] = static_cast<scalar_t>(g);
      if (loss) loss[out0 + c] = static_cast<scalar_t>(l * factor);
    }
  }
};

// Processes elements [begin, end) of the grid; returns the unscaled sum of the
// weighted losses in that range (in a fixed order for a given range).
template <class scalar_t, class target_t, int GK>
double focal_range(const FocalParams& p, int64_t begin, int64_t end) {
  using Seg = Segment<scalar_t, target_t, GK>;
  using acc_t = typename Seg::acc_t;
  const FocalCoeffs<acc_t> k = make_coeffs<acc_t>(p);
  acc_t factor = static_cast<acc_t>(p.scale);
  if (p.divisor) factor = factor / *static_cast<const acc_t*>(p.divisor);
  Vec vsum(0.0f);
  double ssum = 0.0;
  int64_t i = begin;
  while (i < end) {
    const int64_t r = i / p.cols;
    const int64_t c0 = i - r * p.cols;
    const int64_t c1 = std::min<int64_t>(p.cols, c0 + (end - i));
    Seg::run(p, k, factor, r, c0, c1, vsum, ssum);
    i += c1 - c0;
  }
  float lanes[kLanes];
  vsum.store(lanes);
  double total = ssum;
  for (int j = 0; j < kLanes; ++j) total += static_cast<double>(lanes[j]);
  return total;
}

// Entry point with the same signature in every capability namespace: picks the
// instantiation for the storage dtype, target kind and gamma class.
inline double focal_range_dispatch(const FocalParams& p, int64_t begin, int64_t end) {
  const bool two = p.gamma_int == 2;
  auto by_gamma = [&](auto scalar_tag, auto target_tag) -> double {
    using S = decltype(scalar_tag);
    using Tg = decltype(target_tag);
    return two ? focal_range<S, Tg, kGammaTwo>(p, begin, end) : focal_range<S, Tg, kGammaAny>(p, begin, end);
  };
  auto by_target = [&](auto scalar_tag) -> double {
    using S = decltype(scalar_tag);
    if (p.labels || p.target.kind != ScalarKind::Float32 || std::is_same_v<S, float>) {
      // labels are read through read_label; dense targets share the input's dtype
      return by_gamma(scalar_tag, S{});
    }
    return by_gamma(scalar_tag, float{});  // reduced-precision logits with float32 targets
  };
  switch (p.input.kind) {
    case ScalarKind::Float16:
      return by_target(c10::Half{});
    case ScalarKind::BFloat16:
      return by_target(c10::BFloat16{});
    case ScalarKind::Float32:
      return by_target(float{});
    case ScalarKind::Float64:
      return by_target(double{});
    default:
      return 0.0;  // rejected by the op layer
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace focal
