// The sigmoid focal loss and its derivative for one element: the only place the
// math lives. Used by the CUDA kernel (T = float/double on the device), the CPU
// kernel's scalar loops (T = float/double on the host) and its vector loops
// (T = at::vec::Vectorized<float>, whose MathOps specialisation lives in
// cpu/focal_cpu_kernel.h).
//
// Notation (docs/design.md): p = sigmoid(x), p_t = p*y + (1-p)*(1-y), q = 1 - p_t,
// ce = BCE-with-logits(x, y), alpha_t = alpha*y + (1-alpha)*(1-y),
// FL = alpha_t * q^gamma * ce.
//
// Numerics, in one place:
//  * one exp: e = exp(-|x|), r = 1/(1+e) gives p and 1-p each without
//    cancellation (p = r or e*r by the sign of x), and
//    softplus(+-x) = max(+-x, 0) + log1p(e);
//  * q^gamma by multiplication for integer gamma (gamma = 2 specialised), else
//    by exp(-gamma * softplus) reusing the softplus already computed;
//  * the derivative is written so that no factor q^(gamma-1) appears:
//      binary y:  dFL/dx = -y' alpha_t q^gamma (gamma p_t ce + q),  y' = +-1
//      soft y:    dFL/dx = alpha_t q^gamma ((p - y) + gamma ce (1-2y) t),
//                 t = p(1-p)/q  (<= 1 whenever y is in [0, 1])
//    so gamma < 1 never produces 0 * inf when p_t reaches 1;
//  * products of an infinite cross-entropy with a vanishing probability are
//    selected to 0 (their limit), so +-inf logits give finite gradients.
#pragma once

#include <math.h>

#include <cstdint>

#include "cuda/tuning.h"
#include "focal_params.h"

namespace focal {

// Primitive operations per arithmetic type; scalar versions here, the CPU
// vector one beside the CPU kernel. A struct (not overloads) so that the
// vector specialisation may be declared after these templates.
template <class T>
struct MathOps;

// log1p(e) for e in [0, 1] (e = exp(-|x|), the only argument the math passes):
// log1p(e) = 2 atanh(s), s = e / (2 + e) in [0, 1/3], and atanh(s) / s = P(s^2)
// with P of degree 4 fitted on [0, 1/9] for this project (relative error
// 7.6e-9), so relative accuracy holds down to tiny e (unlike log(1 + e)). One
// reciprocal and five multiply-adds instead of a general log1pf. Used by the
// CPU vector kernel and by the CUDA kernels' float math. (A direct degree-8
// polynomial in e, nine multiply-adds and no reciprocal, measured no faster on
// the CPU kernel, and would change the GPU-proven kernel.)
constexpr float kLog1pP4 = 0.14080727100372314f;
constexpr float kLog1pP3 = 0.13982172310352325f;
constexpr float kLog1pP2 = 0.20012325048446655f;
constexpr float kLog1pP1 = 0.3333316147327423f;

// That polynomial, written once for every T whose MathOps has recip_unit and fma.
// It evaluates 2 P (coefficients doubled, exactly) so that 2 s P(z) is s * (2 P):
// bitwise the same as (s + s) * P, one addition less.
template <class T>
FOCAL_HD T log1p_unit_poly(T e) {
  using O = MathOps<T>;
  const T s = e * O::recip_unit(T(2.0f) + e);
  const T z = s * s;
  T p = O::fma(T(2.0f * kLog1pP4), z, T(2.0f * kLog1pP3));
  p = O::fma(p, z, T(2.0f * kLog1pP2));
  p = O::fma(p, z, T(2.0f * kLog1pP1));
  p = O::fma(p, z, T(2.0f));
  return s * p;
}

// The primitives the vector types implement with fewer instructions, in their
// plain scalar form (the CUDA kernels and the CPU scalar loops use these):
//  * exp_nonpos(x): exp(x) for x <= 0 (or NaN); neg_abs(x): -|x|;
//  * select_nonneg(s, a, b): s >= 0 ? a : b, and select_nonpos(s, a, b):
//    s <= 0 ? a : b, both for a == b wherever s is +-0 or NaN (so a vector may
//    read the sign bit alone);
//  * mul_or_zero(a, b): a * b for a, b >= 0, read as 0 where the product is
//    NaN (a = 0 with b infinite: the limit of p * ce where p vanishes and ce
//    grows without bound; or a NaN input, which the other terms still carry).
#define FOCAL_SCALAR_COMMON(T)                                                                \
  static FOCAL_HD T exp_nonpos(T x) { return exp(x); }                                         \
  static FOCAL_HD T neg_abs(T x) { return -abs(x); }                                            \
  static FOCAL_HD T select_nonneg(T s, T a, T b) { return s >= T(0) ? a : b; }                 \
  static FOCAL_HD T select_nonpos(T s, T a, T b) { return s <= T(0) ? a : b; }                 \
  static FOCAL_HD T mul_or_zero(T a, T b) { return fmax(a * b, T(0)); }

template <>
struct MathOps<float> {
  using Mask = bool;
  static FOCAL_HD float exp(float x) { return ::expf(x); }
#if defined(__CUDA_ARCH__)
  // Device: 1/u from the hardware's approximate reciprocal refined by one
  // Newton step (about 1 ulp on [1, 3]) instead of an IEEE division, and
  // log1p on [0, 1] by the polynomial above: together they cut the
  // instructions per element enough for the kernel to be bound by memory.
  static __device__ __forceinline__ float recip_unit(float u) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(u));
    return fmaf(r, fmaf(-u, r, 1.0f), r);
  }
#if FOCAL_CUDA_LOG1P_NEWTON
  static __device__ __forceinline__ float log1p(float e) { return log1p_unit_poly(e); }
#else
  // (tuning.h) the polynomial's reciprocal from rcp.approx alone, without the Newton step
  static __device__ __forceinline__ float log1p(float e) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(2.0f + e));
    const float s = e * r;
    const float z = s * s;
    float q = fmaf(2.0f * kLog1pP4, z, 2.0f * kLog1pP3);
    q = fmaf(q, z, 2.0f * kLog1pP2);
    q = fmaf(q, z, 2.0f * kLog1pP1);
    q = fmaf(q, z, 2.0f);
    return s * q;
  }
#endif
#else
  static FOCAL_HD float log1p(float x) { return ::log1pf(x); }
  static FOCAL_HD float recip_unit(float u) { return 1.0f / u; }  // 1/u, u in [1, 3]
#endif
  static FOCAL_HD float fma(float a, float b, float c) { return ::fmaf(a, b, c); }
  static FOCAL_HD float log(float x) { return ::logf(x); }
  static FOCAL_HD float abs(float x) { return ::fabsf(x); }
  FOCAL_SCALAR_COMMON(float)
  static FOCAL_HD float max(float a, float b) { return a > b ? a : b; }
  static FOCAL_HD float select(bool m, float a, float b) { return m ? a : b; }
  static FOCAL_HD bool ge(float a, float b) { return a >= b; }
  static FOCAL_HD bool gt(float a, float b) { return a > b; }
  static FOCAL_HD bool ne(float a, float b) { return a != b; }
};

template <>
struct MathOps<double> {
  using Mask = bool;
  static FOCAL_HD double exp(double x) { return ::exp(x); }
  static FOCAL_HD double log1p(double x) { return ::log1p(x); }
  static FOCAL_HD double log(double x) { return ::log(x); }
  static FOCAL_HD double abs(double x) { return ::fabs(x); }
  FOCAL_SCALAR_COMMON(double)
  static FOCAL_HD double recip_unit(double u) { return 1.0 / u; }  // 1/u, u in [1, 3]
  static FOCAL_HD double max(double a, double b) { return a > b ? a : b; }
  static FOCAL_HD double select(bool m, double a, double b) { return m ? a : b; }
  static FOCAL_HD bool ge(double a, double b) { return a >= b; }
  static FOCAL_HD bool gt(double a, double b) { return a > b; }
  static FOCAL_HD bool ne(double a, double b) { return a != b; }
};
#undef FOCAL_SCALAR_COMMON

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
FOCAL_HD FocalCoeffs<S> make_coeffs(const FocalParams& p) {
  return FocalCoeffs<S>{static_cast<S>(p.alpha_pos), static_cast<S>(p.alpha_neg), static_cast<S>(p.gamma),
                        p.gamma_int};
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

}  // namespace focal
