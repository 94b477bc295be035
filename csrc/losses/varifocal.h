// Varifocal loss (VarifocalNet, Zhang et al. 2021; RT-DETR; ultralytics):
//   w BCE(x, y);  positives: w = y (iou_weighted) or 1;  others: w = alpha |p - y|^gamma
// A positive is the label's column (also with a score of 0: weight 0, as RT-DETR),
// or y > 0 for dense targets (as mmdet). detach_weight: the gradient treats w as
// a constant (RT-DETR: sigmoid(x).detach()); otherwise the full derivative.
// Gradients: positive w (p - y); negative (y = 0), full alpha p^gamma [gamma (1-p) softplus(x) + p],
// detached alpha p^gamma p.
#pragma once

#include "../core/math_ops.h"

namespace focal {

template <class S>
struct Varifocal {
  S alpha;  // scale of the negatives (>= 0)
  S gamma;
  int gamma_int;
  bool iou_weighted;
  bool detach;

  static Varifocal make(const LossOptions& o) {
    return {static_cast<S>(o.alpha), static_cast<S>(o.gamma), small_integer(o.gamma), o.iou_weighted,
            o.detach_weight};
  }
  FOCAL_HD S neg_factor() const { return alpha; }

  // y = 0, alpha left out
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
    const T sp_neg = O::max(zero - x, zero) + z.l1;
    T ln, gn;
    negative_from(x, z, sp_pos, ln, gn);
    const T w = iou_weighted ? sc : T(S(1));
    const T lp = O::select(O::ne(w, zero), w * bce<T, S>(sc, sp_neg, sp_pos), zero);  // weight 0: exactly 0
    const T gp = w * p_minus_y<T, S>(x, z, sc);
    l = O::select(pos, lp, T(alpha) * ln);
    g = O::select(pos, gp, T(alpha) * gn);
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
    g = detach ? pg * z.p : pg * (z.p + T(gamma) * O::mul_or_zero(z.q, sp_pos));
  }
};

}  // namespace focal
