// The sigmoid focal loss (Lin et al. 2017) and its derivative for one element,
// and its functor for the family's kernels.
//
// Notation (docs/design.md): p = sigmoid(x), p_t = p*y + (1-p)*(1-y), q = 1 - p_t,
// ce = BCE-with-logits(x, y), alpha_t = alpha*y + (1-alpha)*(1-y),
// FL = alpha_t * q^gamma * ce.
//
//  * q^gamma by multiplication for integer gamma (gamma = 2 specialised), else
//    by exp(-gamma * softplus) reusing the softplus already computed;
//  * the derivative is written so that no factor q^(gamma-1) appears:
//      binary y:  dFL/dx = -y' alpha_t q^gamma (gamma p_t ce + q),  y' = +-1
//      soft y:    dFL/dx = alpha_t q^gamma ((p - y) + gamma ce (1-2y) t),
//                 t = p(1-p)/q  (<= 1 whenever y is in [0, 1])
//    so gamma < 1 never produces 0 * inf when p_t reaches 1.
#pragma once

#include "../core/math_ops.h"

namespace focal {

// Gamma classes the kernels specialise on; everything else is a runtime option.
enum GammaKind : int { kGammaAny = 0, kGammaTwo = 2 };

// Loss options in the compute precision S (float, or double for float64 input).
template <class S>
struct FocalCoeffs {
  S alpha_pos;  // alpha_t for a positive (y = 1); 1 when alpha is disabled
  S alpha_neg;  // alpha_t for a negative (y = 0); 1 when alpha is disabled
  S gamma;
  int gamma_int;  // gamma as an integer in [0, 16], or -1
};

template <class S>
inline FocalCoeffs<S> make_coeffs(double alpha, double gamma) {
  const bool weighted = alpha >= 0;  // -1: no alpha weighting
  return FocalCoeffs<S>{static_cast<S>(weighted ? alpha : 1.0), static_cast<S>(weighted ? 1.0 - alpha : 1.0),
                        static_cast<S>(gamma), small_integer(gamma)};
}

// q^gamma. neg_log_q must hold -log(q) when the general (non-integer) path may
// be taken; callers without it pass a negative value and get log(q) computed.
template <int GK, class T, class S>
FOCAL_HD T pow_gamma(T q, T neg_log_q, bool have_neg_log_q, const FocalCoeffs<S>& k) {
  using O = MathOps<T>;
  if (GK == kGammaTwo) return q * q;
  if (k.gamma_int >= 0) {
    T acc = T(S(1));
    for (int i = 0; i < k.gamma_int; ++i) acc = acc * q;
    return acc;
  }
  const T nl = have_neg_log_q ? neg_log_q : T(S(0)) - O::log(q);
  return O::exp(T(S(0)) - T(k.gamma) * nl);
}

// Which binary targets one call covers. The math below reads y only through
// these: the signed logit s = y' x (y' = +-1, p_t = sigmoid(s)), -s, a select
// on s >= 0, alpha_t (times q^gamma), and the sign of the gradient.
//  * YMask: y = 1 where the mask is set, else 0 (one element, or a vector);
//  * YNegative: y = 0 everywhere, as in every vector of a label row that does
//    not hold the row's class (almost all of them); no selects on y at all.
//    With kAlpha = false, alpha_t (= alpha_neg) is left to the caller, who
//    folds it into the factors it applies anyway (one multiply less).
template <class T, class S>
struct YMask {
  typename MathOps<T>::Mask pos;
  FOCAL_HD T signed_x(T x) const { return MathOps<T>::select(pos, x, T(S(0)) - x); }
  FOCAL_HD T neg_signed_x(T, T s) const { return T(S(0)) - s; }
  FOCAL_HD T select_s_nonneg(T, T s, T a, T b) const { return MathOps<T>::select_nonneg(s, a, b); }
  FOCAL_HD T alpha_times(const FocalCoeffs<S>& k, T v) const {
    return MathOps<T>::select(pos, T(k.alpha_pos), T(k.alpha_neg)) * v;
  }
  FOCAL_HD T signed_grad(T mag) const { return MathOps<T>::select(pos, T(S(0)) - mag, mag); }
};

template <class T, class S, bool kAlpha = true>
struct YNegative {
  FOCAL_HD T signed_x(T x) const { return T(S(0)) - x; }
  FOCAL_HD T neg_signed_x(T x, T) const { return x; }
  FOCAL_HD T select_s_nonneg(T x, T, T a, T b) const { return MathOps<T>::select_nonpos(x, a, b); }
  FOCAL_HD T alpha_times(const FocalCoeffs<S>& k, T v) const {
    if constexpr (kAlpha) {
      return T(k.alpha_neg) * v;
    } else {
      return v;
    }
  }
  FOCAL_HD T signed_grad(T mag) const { return mag; }
};

// Binary target y given by Y (above).
template <int GK, class T, class S, class Y>
FOCAL_HD void focal_binary_y(T x, const Y& y, const FocalCoeffs<S>& k, T& loss, T& dloss) {
  using O = MathOps<T>;
  const T zero(S(0));
  const T one(S(1));
  const T s = y.signed_x(x);  // y' * x: p_t = sigmoid(s)
  const T e = O::exp_nonpos(O::neg_abs(x));
  const T r = O::recip_unit(one + e);
  const T er = e * r;
  const T pt = y.select_s_nonneg(x, s, r, er);
  const T q = y.select_s_nonneg(x, s, er, r);  // 1 - p_t
  const T l1 = O::log1p(e);
  const T ce = O::max(y.neg_signed_x(x, s), zero) + l1;  // -log(p_t)
  const T neg_log_q = O::max(s, zero) + l1;               // -log(q)
  const T qg = pow_gamma<GK>(q, neg_log_q, true, k);
  const T aqg = y.alpha_times(k, qg);
  loss = aqg * ce;
  const T pce = O::mul_or_zero(pt, ce);  // p_t * ce -> 0 as p_t -> 0
  const T mag = aqg * (T(k.gamma) * pce + q);
  dloss = y.signed_grad(mag);
}

// Binary target: pos is true where y = 1, false where y = 0.
template <int GK, class T, class S>
FOCAL_HD void focal_binary(T x, typename MathOps<T>::Mask pos, const FocalCoeffs<S>& k, T& loss, T& dloss) {
  focal_binary_y<GK, T, S>(x, YMask<T, S>{pos}, k, loss, dloss);
}

// Dense (possibly soft) target y; exact for y in {0, 1} as well, and follows
// torchvision's formula for any real y.
template <int GK, class T, class S>
FOCAL_HD void focal_soft(T x, T y, const FocalCoeffs<S>& k, T& loss, T& dloss) {
  using O = MathOps<T>;
  const T zero(S(0));
  const T one(S(1));
  const T e = O::exp_nonpos(O::neg_abs(x));
  const T r = O::recip_unit(one + e);
  const T er = e * r;
  const T pm = O::select_nonneg(x, r, er);  // p
  const T qm = O::select_nonneg(x, er, r);  // 1 - p
  const T l1 = O::log1p(e);
  const T sp_neg = O::max(zero - x, zero) + l1;  // -log(p)
  const T sp_pos = O::max(x, zero) + l1;         // -log(1 - p)
  const T ny = one - y;
  // y*sp_neg + (1-y)*sp_pos, with 0 * inf read as 0 when y is exactly 0 or 1.
  const T ce = O::select(O::ne(y, zero), y * sp_neg, zero) + O::select(O::ne(y, one), ny * sp_pos, zero);
  const T q = ny * pm + y * qm;  // 1 - p_t as a sum of non-negative terms
  const T d = ny * pm - y * qm;  // p - y
  const T qg = pow_gamma<GK>(q, zero, false, k);
  const T t = O::select(O::ne(q, zero), pm * qm / q, zero);
  const T ct = O::select(O::ne(t, zero), ce * t, zero);  // ce * t -> 0 as t -> 0
  const T a = y * T(k.alpha_pos) + ny * T(k.alpha_neg);
  const T aqg = a * qg;
  loss = aqg * ce;
  dloss = aqg * (d + T(k.gamma) * ct * (one - y - y));
}


// The family functor (csrc/losses/family.h describes the interface). GK: the
// gamma class it is compiled for (gamma = 2 is its own instantiation).
template <int GK, class S>
struct Focal {
  FocalCoeffs<S> k;

  static Focal make(const LossOptions& o) { return {make_coeffs<S>(o.alpha, o.gamma)}; }
  FOCAL_HD S neg_factor() const { return k.alpha_neg; }

  template <class T>
  FOCAL_HD void negative(T x, T& l, T& g) const {
    focal_binary_y<GK, T, S>(x, YNegative<T, S, false>{}, k, l, g);
  }
  template <class T>
  FOCAL_HD void binary(T x, typename MathOps<T>::Mask pos, T& l, T& g) const {
    focal_binary<GK, T, S>(x, pos, k, l, g);
  }
  template <class T>
  FOCAL_HD void labelled(T x, typename MathOps<T>::Mask pos, T s, T& l, T& g) const {
    focal_soft<GK, T, S>(x, MathOps<T>::select(pos, s, T(S(0))), k, l, g);
  }
  template <class T>
  FOCAL_HD void dense(T x, T y, T& l, T& g) const {
    focal_soft<GK, T, S>(x, y, k, l, g);
  }
};

}  // namespace focal
