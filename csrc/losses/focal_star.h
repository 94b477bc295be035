// FL* (the RetinaNet paper's appendix A; fvcore's sigmoid_focal_loss_star):
//   alpha_t (-log sigmoid(gamma y' x + beta)) / gamma = alpha_t softplus(-z) / gamma,
//   z = gamma y' x + beta,  y' = 2y - 1  (fvcore's form for soft y as well).
// Gradient: -alpha_t y' sigmoid(-z). For y = 0: softplus(gamma x - beta) / gamma,
// gradient sigmoid(gamma x - beta), alpha_neg applied by the caller.
// One exp per element: e = exp(-|u|) gives softplus(u) and sigmoid(u).
#pragma once

#include "../core/math_ops.h"

namespace focal {

template <class S>
struct FocalStar {
  S alpha_pos;
  S alpha_neg;
  S gamma;  // > 0
  S inv_gamma;
  S beta;

  static FocalStar make(const LossOptions& o) {
    const bool weighted = o.alpha >= 0;
    return {static_cast<S>(weighted ? o.alpha : 1.0), static_cast<S>(weighted ? 1.0 - o.alpha : 1.0),
            static_cast<S>(o.gamma), static_cast<S>(1.0 / o.gamma), static_cast<S>(o.beta)};
  }
  FOCAL_HD S neg_factor() const { return alpha_neg; }

  template <class T>
  FOCAL_HD void negative(T x, T& l, T& g) const {
    softplus_sigmoid(T(gamma) * x - T(beta), l, g);
    l = l * T(inv_gamma);
  }

  template <class T>
  FOCAL_HD void dense(T x, T y, T& l, T& g) const {
    using O = MathOps<T>;
    const T zero(S(0));
    const T one(S(1));
    const T yp = y + y - one;                         // y'
    const T yx = O::select(O::ne(yp, zero), yp * x, zero);  // y' x, 0 for y = 1/2 even at x = +-inf
    T sp, sig;
    softplus_sigmoid(zero - T(gamma) * yx - T(beta), sp, sig);  // of u = -z
    const T at = y * T(alpha_pos) + (one - y) * T(alpha_neg);
    l = at * sp * T(inv_gamma);
    g = (zero - at) * yp * sig;
  }
  template <class T>
  FOCAL_HD void binary(T x, typename MathOps<T>::Mask pos, T& l, T& g) const {
    dense(x, MathOps<T>::select(pos, T(S(1)), T(S(0))), l, g);
  }
  template <class T>
  FOCAL_HD void labelled(T x, typename MathOps<T>::Mask pos, T sc, T& l, T& g) const {
    dense(x, MathOps<T>::select(pos, sc, T(S(0))), l, g);
  }

 private:
  // softplus(u) and sigmoid(u) from one exp
  template <class T>
  FOCAL_HD static void softplus_sigmoid(T u, T& sp, T& sig) {
    using O = MathOps<T>;
    const T zero(S(0));
    const T e = O::exp_nonpos(O::neg_abs(u));
    const T r = O::recip_unit(T(S(1)) + e);
    sp = O::max(u, zero) + O::log1p(e);
    sig = O::select_nonneg(u, r, e * r);
  }
};

}  // namespace focal
