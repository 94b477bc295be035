// The sigmoid focal loss with label smoothing (EfficientDet):
//   alpha_t (1 - p_t)^gamma BCE(x, y_s),  y_s = y (1 - s) + s / 2,
// with alpha_t and p_t from the unsmoothed y. Its own functor, so that the plain
// focal loss keeps its instructions (smoothing adds two per logit).
//
// Gradient, q = 1 - p_t, t = p (1 - p) / q, ce_s = BCE(x, y_s):
//   alpha_t q^gamma [(p - y_s) + gamma ce_s (1 - 2y) t]
// and for y = 0 (h = s / 2): alpha_neg p^gamma [(p - h) + gamma (1 - p) BCE(x, h)].
// With s > 0 the cross-entropy is infinite at infinite logits (the true value),
// and its products with a vanishing q^gamma are read as their limit, 0.
#pragma once

#include "../core/math_ops.h"

namespace focal {

template <class S>
struct FocalSmooth {
  S alpha_pos;  // alpha_t of y = 1 (1 without alpha weighting)
  S alpha_neg;  // alpha_t of y = 0
  S gamma;
  S s;  // the smoothing
  S h;  // s / 2: y_s of a negative
  int gamma_int;

  static FocalSmooth make(const LossOptions& o) {
    const bool weighted = o.alpha >= 0;
    return {static_cast<S>(weighted ? o.alpha : 1.0), static_cast<S>(weighted ? 1.0 - o.alpha : 1.0),
            static_cast<S>(o.gamma), static_cast<S>(o.smoothing), static_cast<S>(o.smoothing / 2),
            small_integer(o.gamma)};
  }
  FOCAL_HD S neg_factor() const { return alpha_neg; }

  template <class T>
  FOCAL_HD void negative(T x, T& l, T& g) const {
    using O = MathOps<T>;
    const T zero(S(0));
    const Logistic<T> z = logistic<T, S>(x);
    const T sp_neg = O::max(zero - x, zero) + z.l1;  // -log(p)
    // BCE(x, h) = (1-h) softplus(x) + h softplus(-x) = x (x >= 0 ? 1-h : -h) + log1p(e): +inf at
    // both infinite logits (h > 0 here: a zero smoothing runs the plain focal loss)
    const T ce = x * O::select_nonneg(x, T(S(1) - h), zero - T(h)) + z.l1;
    const T pg = pow_nonneg<T, S>(z.p, sp_neg, gamma, gamma_int);  // q^gamma, q = p
    l = O::mul_or_zero(pg, ce);
    g = pg * (z.p - T(h)) + T(gamma) * O::mul_or_zero(pg, O::mul_or_zero(z.q, ce));
  }

  template <class T>
  FOCAL_HD void dense(T x, T y, T& l, T& g) const {
    using O = MathOps<T>;
    const T zero(S(0));
    const T one(S(1));
    const Logistic<T> z = logistic<T, S>(x);
    const T sp_pos = O::max(x, zero) + z.l1;
    const T sp_neg = O::max(zero - x, zero) + z.l1;
    const T ny = one - y;
    const T ys = y * T(S(1) - s) + T(h);
    const T ce = bce<T, S>(ys, sp_neg, sp_pos);
    const T q = ny * z.p + y * z.q;  // 1 - p_t as a sum of non-negative terms
    const T qg = gamma_int >= 0 ? pow_nonneg<T, S>(q, zero, gamma, gamma_int) : O::exp(T(gamma) * O::log(q));
    const T t = O::select(O::ne(q, zero), z.p * z.q / q, zero);
    const T a = y * T(alpha_pos) + ny * T(alpha_neg);
    const T aqg = a * qg;
    l = O::mul_or_zero(aqg, ce);
    g = aqg * p_minus_y<T, S>(x, z, ys) + T(gamma) * (one - y - y) * O::mul_or_zero(aqg, O::mul_or_zero(ce, t));
  }
  template <class T>
  FOCAL_HD void binary(T x, typename MathOps<T>::Mask pos, T& l, T& g) const {
    dense(x, MathOps<T>::select(pos, T(S(1)), T(S(0))), l, g);
  }
  template <class T>
  FOCAL_HD void labelled(T x, typename MathOps<T>::Mask pos, T sc, T& l, T& g) const {
    dense(x, MathOps<T>::select(pos, sc, T(S(0))), l, g);
  }
};

}  // namespace focal
