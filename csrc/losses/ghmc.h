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
// The table (LossOptions::table, in the compute type): the B bin weights, then
// the B + 1 thresholds t_0 = -inf .. t_B = +inf, then the B + 1 edges e_k.
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
constexpr int64_t ghmc_table_size(int64_t bins) { return 3 * bins + 2; }

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
  int bins;
  S fbins;

  static GHMC make(const LossOptions& o) {
    const S* t = static_cast<const S*>(o.table);
    const int b = static_cast<int>(o.bins);
    return {t, t + b, t + 2 * b + 1, b, static_cast<S>(b)};
  }
  FOCAL_HD S neg_factor() const { return S(1); }

  // The weight of a binary-target element (NaN for a NaN logit).
  FOCAL_HD S weight_logit(S xp, S g_estimate) const {
    const int b = ghmc_bin_logit(xp, g_estimate, thresholds, bins, fbins);
    return b < 0 ? S(NAN) : weights[b];
  }
  // The weight of a dense-target element: y = 0 or 1 as binary targets, soft y by g = |p - y|.
  FOCAL_HD S weight_dense(S x, S y, S p, S p_minus_y) const {
    if (y == S(0)) return weight_logit(x, p);
    if (y == S(1)) return weight_logit(-x, S(1) - p);
    const S g = p_minus_y < S(0) ? -p_minus_y : p_minus_y;
    const int b = ghmc_bin_soft(g, edges, bins, fbins);
    return b < 0 ? S(NAN) : weights[b];
  }

  template <class T>
  FOCAL_HD void negative(T x, T& l, T& g) const {
    using O = MathOps<T>;
    const Logistic<T> z = logistic<T, S>(x);
    const T w = O::lanewise2([this](S a, S b) { return weight_logit(a, b); }, x, z.p);
    l = w * (O::max(x, T(S(0))) + z.l1);
    g = w * z.p;
  }
  template <class T>
  FOCAL_HD void binary(T x, typename MathOps<T>::Mask pos, T& l, T& g) const {
    using O = MathOps<T>;
    const T zero(S(0));
    const Logistic<T> z = logistic<T, S>(x);
    const T xp = O::select(pos, zero - x, x);
    const T w = O::lanewise2([this](S a, S b) { return weight_logit(a, b); }, xp, O::select(pos, z.q, z.p));
    l = w * (O::max(xp, zero) + z.l1);  // softplus(x') = BCE
    g = w * O::select(pos, zero - z.q, z.p);
  }
  template <class T>
  FOCAL_HD void labelled(T x, typename MathOps<T>::Mask pos, T sc, T& l, T& g) const {
    dense(x, MathOps<T>::select(pos, sc, T(S(0))), l, g);
  }
  template <class T>
  FOCAL_HD void dense(T x, T y, T& l, T& g) const {
    using O = MathOps<T>;
    const T zero(S(0));
    const Logistic<T> z = logistic<T, S>(x);
    const T pmy = p_minus_y<T, S>(x, z, y);
    const T w = O::lanewise4([this](S a, S b, S c, S d) { return weight_dense(a, b, c, d); }, x, y, z.p, pmy);
    l = w * bce<T, S>(y, O::max(zero - x, zero) + z.l1, O::max(x, zero) + z.l1);
    g = w * pmy;
  }
};

}  // namespace focal
