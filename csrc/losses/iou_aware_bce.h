// IoU-aware BCE (LW-DETR, RF-DETR; HF transformers' LW-DETR loss):
//   positives: BCE(x, t),  t = max(p^alpha y^(1-alpha), 0.01), t a constant for the gradient
//   others:    p^gamma softplus(x)  (full derivative)
// A positive is the label's column (also with a score of 0: then t = 0.01, or
// p for alpha = 1), or y > 0 for dense targets.
// Gradients: positive p - t; negative p^gamma [gamma (1-p) softplus(x) + p].
// t = exp(-alpha softplus(-x) + (1 - alpha) log y), clamped below at 0.01.
// t is at least 0.01, so its product with an infinite softplus(-x) is the true inf.
#pragma once

#include "../core/math_ops.h"

namespace focal {

template <class S>
struct IoUAwareBCE {
  S alpha;  // in [0, 1]: the exponent of p in t
  S gamma;
  int gamma_int;

  static IoUAwareBCE make(const LossOptions& o) {
    return {static_cast<S>(o.alpha), static_cast<S>(o.gamma), small_integer(o.gamma)};
  }
  FOCAL_HD S neg_factor() const { return S(1); }

  template <class T>
  FOCAL_HD void negative(T x, T& l, T& g) const {
    const T zero(S(0));
    const Logistic<T> z = logistic<T, S>(x);
    negative_from(x, z, MathOps<T>::max(x, zero) + z.l1, l, g);
  }

  template <class T>
  FOCAL_HD void labelled(T x, typename MathOps<T>::Mask pos, T sc, T& l, T& g) const {
    using O = MathOps<T>;
    const T zero(S(0));
    const Logistic<T> z = logistic<T, S>(x);
    const T sp_pos = O::max(x, zero) + z.l1;
    const T sp_neg = O::max(zero - x, zero) + z.l1;  // -log(p)
    T ln, gn;
    negative_from(x, z, sp_pos, ln, gn);
    // log t = alpha log p + (1 - alpha) log y; a zero exponent drops its term (0 * inf). 1 - t by
    // one_minus_exp, so that BCE(x, t) and p - t = (1 - t) - (1 - p) keep their accuracy where t -> 1.
    T log_t = zero;
    if (alpha != S(0)) log_t = log_t - T(alpha) * sp_neg;
    if (alpha != S(1)) log_t = log_t + T(S(1) - alpha) * O::log(sc);  // log 0 = -inf: t = 0, clamped
    const T t_raw = O::exp(log_t);
    const auto low = O::lt(t_raw, T(S(0.01)));  // (false for a NaN score: it stays NaN)
    const T t = O::select(low, T(S(0.01)), t_raw);
    const T omt = O::select(low, T(S(0.99)), one_minus_exp<T, S>(log_t));
    const T lp = t * sp_neg + O::select(O::ne(omt, zero), omt * sp_pos, zero);
    l = O::select(pos, lp, ln);
    g = O::select(pos, omt - z.q, gn);
  }
  template <class T>
  FOCAL_HD void binary(T x, typename MathOps<T>::Mask pos, T& l, T& g) const {
    labelled(x, pos, T(S(1)), l, g);
  }
  template <class T>
  FOCAL_HD void dense(T x, T y, T& l, T& g) const {
    labelled(x, MathOps<T>::gt(y, T(S(0))), y, l, g);
  }

 private:
  template <class T>
  FOCAL_HD void negative_from(T x, const Logistic<T>& z, T sp_pos, T& l, T& g) const {
    using O = MathOps<T>;
    const T zero(S(0));
    const T pg = pow_nonneg<T, S>(z.p, O::max(zero - x, zero) + z.l1, gamma, gamma_int);
    l = pg * sp_pos;
    g = pg * (z.p + T(gamma) * O::mul_or_zero(z.q, sp_pos));
  }
};

}  // namespace focal
