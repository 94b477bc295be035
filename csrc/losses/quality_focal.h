// Quality focal loss (GFL, Li et al. 2020; mmdet's QualityFocalLoss):
//   |y - p|^beta BCE(x, y)
// one formula for every y (background rows have y = 0 everywhere). Gradient,
// d = p - y:  sign(d) |d|^(beta-1) [d^2 + beta p (1-p) BCE] = d |d|^beta + beta sign(d) |d|^(beta-1) p (1-p) BCE.
// At d = 0 the gradient is 0 (for beta < 1 the true slope there is infinite:
// the cusp of |d|^beta; autograd through |d|^beta gives NaN there).
// For y = 0 (the all-negative packs): p^beta softplus(x), gradient
// p^beta [p + beta (1-p) softplus(x)], with p^beta = exp(-beta softplus(-x)).
#pragma once

#include "../core/math_ops.h"

namespace focal {

template <class S>
struct QualityFocal {
  S beta;
  int beta_int;

  static QualityFocal make(const LossOptions& o) { return {static_cast<S>(o.beta), small_integer(o.beta)}; }
  FOCAL_HD S neg_factor() const { return S(1); }

  template <class T>
  FOCAL_HD void negative(T x, T& l, T& g) const {
    using O = MathOps<T>;
    const T zero(S(0));
    const Logistic<T> z = logistic<T, S>(x);
    const T sp_pos = O::max(x, zero) + z.l1;
    const T pb = pow_nonneg<T, S>(z.p, O::max(zero - x, zero) + z.l1, beta, beta_int);
    l = pb * sp_pos;
    g = pb * (z.p + T(beta) * O::mul_or_zero(z.q, sp_pos));
  }

  template <class T>
  FOCAL_HD void dense(T x, T y, T& l, T& g) const {
    using O = MathOps<T>;
    const T zero(S(0));
    const Logistic<T> z = logistic<T, S>(x);
    const T sp_pos = O::max(x, zero) + z.l1;
    const T sp_neg = O::max(zero - x, zero) + z.l1;
    const T ce = bce<T, S>(y, sp_neg, sp_pos);
    const T d = p_minus_y<T, S>(x, z, y);
    const T ad = O::abs(d);
    T pw, g1;  // |d|^beta and |d|^(beta-1) (0 at d = 0)
    if (beta_int >= 0) {
      g1 = T(S(beta_int >= 1 ? 1 : 0));
      for (int i = 1; i < beta_int; ++i) g1 = g1 * ad;
      pw = beta_int >= 1 ? g1 * ad : T(S(1));
    } else {
      const T lad = O::log(ad);
      pw = O::exp(T(beta) * lad);
      g1 = O::exp(T(beta - S(1)) * lad);
    }
    g1 = O::select(O::ne(ad, zero), g1, zero);
    const T sg = O::select(O::ge(d, zero), g1, zero - g1);  // sign(d) |d|^(beta-1)
    l = pw * ce;
    g = d * pw + T(beta) * sg * O::mul_or_zero(z.p * z.q, ce);
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
