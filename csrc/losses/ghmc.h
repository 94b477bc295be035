// GHM-C, the gradient harmonizing mechanism's classification loss (Li, Liu and
// Wang, AAAI 2019), with mmdet's GHMC semantics: each valid element's gradient
// norm g = |sigmoid(x) - y| falls in one of B equal bins of [0, 1]; the element
// costs w_bin BCE(x, y) and its gradient is w_bin (p - y), the bin weights w
// being constants for the gradient. The weights come from a histogram of the
// whole batch, so GHM-C runs as three ops (csrc/ops/ghmc_ops.cpp): the histogram
// pass (integer counts), the bin weights (a few scalars, on the device), and this
// member, the loss + gradient pass, reading the weights from a table.
//
// Bins, exactly and the same in every pass and kernel. mmdet tests
// e_k <= g < e_k+1 with e_k = k / B in float32. For y = 0 or 1, g is
// sigmoid(x') with x' = x or -x, and sigmoid(x') >= e_k <=> x' >= t_k = logit(e_k):
// the bin is found from a cheap estimate (B g, any rounding) moved onto the
// thresholds t_k by exact comparisons of x' -- so the bin of an element does not
// depend on how its sigmoid was rounded (vector or scalar math, CPU or GPU, the
// histogram or the loss pass). Soft targets (0 < y < 1) compare g itself against
// the float32 edges e_k, as mmdet does.
//
// Fast path: a grid of kGhmcGrid equal cells over x' in [t_1 - 1, t_B-1 + 1]
// (values outside clamp to the end cells) holds, per cell, the weight of the
// one bin all of the cell falls in -- or -1 where a threshold crosses the cell
// (with a margin for the rounding of the cell index). One lookup per element; a
// -1 sends that element to the exact search above.
//
// The table (LossOptions::table, in the compute type): the B bin weights, the
// B + 1 thresholds t_0 = -inf .. t_B = +inf, the B + 1 edges e_k, the grid's
// origin and cells per unit, then the grid (the histogram op's table holds bin
// indices there, -1 for a crossed cell, instead of weights).
#pragma once

#include <math.h>

#include "../core/math_ops.h"

namespace focal {

// e_k = k / B in float32, as torch.arange(B + 1).float() / B (mmdet's edges; the
// last one, 1 + 1e-6 there, is never compared: g <= 1 is always in the last bin).
template <class S>
FOCAL_HD S ghmc_edge(int k, int bins) {
  return static_cast<S>(static_cast<float>(k) / static_cast<float>(bins));
}

// t_k = logit(e_k), computed in float64 and rounded to S; -inf and +inf at the ends.
template <class S>
FOCAL_HD S ghmc_threshold(int k, int bins) {
  if (k <= 0) return static_cast<S>(-INFINITY);
  if (k >= bins) return static_cast<S>(INFINITY);
  const double e = static_cast<double>(ghmc_edge<float>(k, bins));
  return static_cast<S>(::log(e / (1.0 - e)));
}

// Table layout (see above).
constexpr int kGhmcGrid = 4096;
constexpr int kGhmcSelectBins = 16;  // up to this many bins the loss pass compares with every threshold
constexpr int64_t ghmc_table_size(int64_t bins) { return 3 * bins + 4 + kGhmcGrid; }
constexpr int64_t ghmc_thresholds_at(int64_t bins) { return bins; }
constexpr int64_t ghmc_edges_at(int64_t bins) { return 2 * bins + 1; }
constexpr int64_t ghmc_grid_origin_at(int64_t bins) { return 3 * bins + 2; }  // origin, then cells per unit
constexpr int64_t ghmc_grid_at(int64_t bins) { return 3 * bins + 4; }

// max { b < B : t_b <= v } for v in float64 against the stored thresholds (a binary search).
template <class S>
FOCAL_HD int ghmc_bin_exact(double v, const S* thresholds, int bins) {
  int lo = 0, hi = bins - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (static_cast<double>(thresholds[mid]) <= v) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// The grid's origin and cells per unit of x'.
template <class S>
FOCAL_HD void ghmc_grid_params(const S* thresholds, int bins, S& origin, S& per_unit) {
  const double a = bins >= 2 ? static_cast<double>(thresholds[1]) - 1.0 : -1.0;
  const double b = bins >= 2 ? static_cast<double>(thresholds[bins - 1]) + 1.0 : 1.0;
  origin = static_cast<S>(a);
  per_unit = static_cast<S>(kGhmcGrid / (b - a));
}

// The bin all of grid cell k falls in, or -1 where a threshold crosses it. The cell is widened by
// 1/100 of a cell each side: the cell index (x' - origin) * per_unit is off by far less in float32.
template <class S>
FOCAL_HD int ghmc_cell_bin(int k, const S* thresholds, int bins, S origin, S per_unit) {
  const double o = static_cast<double>(origin), u = static_cast<double>(per_unit);
  const double lo = k == 0 ? -INFINITY : o + (k - 0.01) / u;
  const double hi = k == kGhmcGrid - 1 ? INFINITY : o + (k + 1.01) / u;
  const int a = ghmc_bin_exact(lo, thresholds, bins);
  return a == ghmc_bin_exact(hi, thresholds, bins) ? a : -1;
}

// Fills a table's thresholds and edges; the grid origin and the grid with bin indices (weights ==
// nullptr) or with the bins' weights (>= 0), -1 for crossed cells, for cells [first, kGhmcGrid) in
// steps of `step`.
template <class S>
FOCAL_HD void ghmc_fill_bounds(S* table, int bins, int first, int step) {
  for (int k = first; k <= bins; k += step) {
    table[ghmc_thresholds_at(bins) + k] = ghmc_threshold<S>(k, bins);
    table[ghmc_edges_at(bins) + k] = ghmc_edge<S>(k, bins);
  }
}
template <class S>
FOCAL_HD void ghmc_fill_grid(S* table, int bins, const S* weights, int first, int step) {
  const S* t = table + ghmc_thresholds_at(bins);
  S origin, per_unit;
  ghmc_grid_params(t, bins, origin, per_unit);
  if (first == 0) {
    table[ghmc_grid_origin_at(bins)] = origin;
    table[ghmc_grid_origin_at(bins) + 1] = per_unit;
  }
  S* grid = table + ghmc_grid_at(bins);
  for (int k = first; k < kGhmcGrid; k += step) {
    const int b = ghmc_cell_bin(k, t, bins, origin, per_unit);
    grid[k] = weights == nullptr || b < 0 ? static_cast<S>(b) : weights[b];
  }
}

// The first estimate of a bin from an approximate g: B g, clamped to [0, B - 1]
// (a NaN estimate gives 0; the callers sort NaN out first).
template <class S>
FOCAL_HD int ghmc_estimate(S g, int bins, S fbins) {
  const S v = g * fbins;
  if (v >= fbins) return bins - 1;
  return v > S(0) ? static_cast<int>(v) : 0;
}

// The bin of x' (binary targets: x' = x for y = 0, -x for y = 1) given g ~ sigmoid(x');
// -1 for NaN.
template <class S>
FOCAL_HD int ghmc_bin_logit(S xp, S g_estimate, const S* thresholds, int bins, S fbins) {
  if (!(xp == xp)) return -1;
  int b = ghmc_estimate(g_estimate, bins, fbins);
  while (b > 0 && xp < thresholds[b]) --b;
  while (b + 1 < bins && xp >= thresholds[b + 1]) ++b;
  return b;
}

// The bin of a soft target's g = |p - y| against the edges; -1 for NaN.
template <class S>
FOCAL_HD int ghmc_bin_soft(S g, const S* edges, int bins, S fbins) {
  if (!(g == g)) return -1;
  int b = ghmc_estimate(g, bins, fbins);
  while (b > 0 && g < edges[b]) --b;
  while (b + 1 < bins && g >= edges[b + 1]) ++b;
  return b;
}

// mmdet's weight of bin k from its count c: tot / c, or with momentum m > 0 the
// running count acc' = m acc + (1 - m) c (kept in float32, as mmdet's buffer) and
// tot / acc'; then / n (the non-empty bins), and, where norm > 0, times norm / tot
// (the mean's normaliser folded in; norm = the world size when the counts are
// summed over ranks). An empty bin: weight 0, its running count unchanged.
// tot = max(valid elements, 1).
FOCAL_HD double ghmc_bin_weight(int64_t c, float acc, double momentum, double tot, int n, double norm,
                                float* acc_out) {
  if (c <= 0) {
    if (acc_out != nullptr) *acc_out = acc;
    return 0.0;
  }
  double w;
  if (momentum > 0.0) {
    const float a = static_cast<float>(momentum * static_cast<double>(acc) + (1.0 - momentum) * static_cast<double>(c));
    if (acc_out != nullptr) *acc_out = a;
    w = tot / static_cast<double>(a);
  } else {
    w = tot / static_cast<double>(c);
  }
  w = w / static_cast<double>(n);
  return norm > 0.0 ? w * (norm / tot) : w;
}

template <class S>
struct GHMC {
  const S* weights;     // [B]: the bins' weights (normaliser included where the op asks)
  const S* thresholds;  // [B + 1]
  const S* edges;       // [B + 1]
  const S* grid;        // [kGhmcGrid]: per cell, its bin's weight, or -1 where a threshold crosses it
  int bins;
  S fbins;
  S origin;
  S per_unit;

  static GHMC make(const LossOptions& o) {
    const S* t = static_cast<const S*>(o.table);
    const int b = static_cast<int>(o.bins);
    return {t,
            t + ghmc_thresholds_at(b),
            t + ghmc_edges_at(b),
            t + ghmc_grid_at(b),
            b,
            static_cast<S>(b),
            t[ghmc_grid_origin_at(b)],
            t[ghmc_grid_origin_at(b) + 1]};
  }

  // A binary-target element's weight. Up to kGhmcSelectBins bins: x' against every threshold, the
  // weight of the last one it reaches (no table lookup: on the CPU a vector gather costs more than
  // these compares). More bins: the grid's, or the exact search's where a threshold crosses the
  // element's cell. Both give max{k : t_k <= x'}, the histogram's bin.
  template <class T>
  FOCAL_HD T weight_logit(T xp, T g_estimate) const {
    using O = MathOps<T>;
    if (bins <= kGhmcSelectBins) {
      T w(weights[0]);
      for (int k = 1; k < bins; ++k) w = O::select(O::ge(xp, T(thresholds[k])), T(weights[k]), w);
      return w;  // (a NaN x' reaches no threshold: bin 0's weight, and a NaN loss)
    }
    const T top(S(kGhmcGrid - 1));
    const T c = (xp - T(origin)) * T(per_unit);
    const T w = O::gather(grid, O::select(O::lt(c, top), O::max(c, T(S(0))), top));  // (gather truncates)
    if (!O::any_negative(w)) return w;
    return O::select_nonneg(w, w, bin_weight(xp, g_estimate, thresholds));  // -1: a crossed cell
  }
  FOCAL_HD S neg_factor() const { return S(1); }

  // The weight of the bin max{b < B : bounds_b <= v} (bounds_0 = -inf or 0), found from the estimate
  // B g (g ~ the gradient norm) moved by one step against the bounds: exact whenever the estimate is
  // within one bin of the truth, i.e. for any g off by less than 1 / B (the logistic's rounding is
  // ~1e-7). Lanes stay in [0, B - 1] whatever the input (a NaN gives the last bin: its loss is NaN).
  template <class T>
  FOCAL_HD T bin_weight(T v, T g_estimate, const S* bounds) const {
    using O = MathOps<T>;
    const T zero(S(0));
    const T one(S(1));
    const T top(fbins - S(1));
    const T e = g_estimate * T(fbins);
    T b = O::trunc(O::select(O::lt(e, top), O::max(e, zero), top));
    b = b - O::select(O::lt(v, O::gather(bounds, b)), one, zero) +
        O::select(O::ge(v, O::gather(bounds, b + one)), one, zero);
    b = O::select(O::lt(b, top), O::max(b, zero), top);
    return O::gather(weights, b);
  }

  template <class T>
  FOCAL_HD void negative(T x, T& l, T& g) const {
    using O = MathOps<T>;
    const Logistic<T> z = logistic<T, S>(x);
    const T w = weight_logit(x, z.p);
    l = w * (O::max(x, T(S(0))) + z.l1);
    g = w * z.p;
  }
  template <class T>
  FOCAL_HD void binary(T x, typename MathOps<T>::Mask pos, T& l, T& g) const {
    using O = MathOps<T>;
    const T zero(S(0));
    const Logistic<T> z = logistic<T, S>(x);
    const T xp = O::select(pos, zero - x, x);
    const T w = weight_logit(xp, O::select(pos, z.q, z.p));
    l = w * (O::max(xp, zero) + z.l1);  // softplus(x') = BCE
    g = w * O::select(pos, zero - z.q, z.p);
  }
  template <class T>
  FOCAL_HD void labelled(T x, typename MathOps<T>::Mask pos, T sc, T& l, T& g) const {
    dense(x, MathOps<T>::select(pos, sc, T(S(0))), l, g);
  }
  // y = 0 or 1 as binary targets; a soft y by g = |p - y| against the edges.
  template <class T>
  FOCAL_HD void dense(T x, T y, T& l, T& g) const {
    using O = MathOps<T>;
    const T zero(S(0));
    const T one(S(1));
    const Logistic<T> z = logistic<T, S>(x);
    const T pmy = p_minus_y<T, S>(x, z, y);
    const typename O::Mask not1 = O::ne(y, one);
    const T w_binary = weight_logit(O::select(not1, x, zero - x), O::select(not1, z.p, z.q));
    const T gn = O::abs(pmy);
    const T w_soft = bin_weight(gn, gn, edges);
    const T w = O::select(O::ne(y, zero), O::select(not1, w_soft, w_binary), w_binary);
    l = w * bce<T, S>(y, O::max(zero - x, zero) + z.l1, O::max(x, zero) + z.l1);
    g = w * pmy;
  }
};

}  // namespace focal
