// The arithmetic every family member is written in: the primitive operations
// per arithmetic type (MathOps), the log1p polynomial, and the one-exp
// logistic pieces (p, 1 - p, softplus) the members share. Used by the CUDA
// kernels (T = float/double on the device), the CPU kernel's scalar loops
// (T = float/double on the host) and its vector loops (T = at::vec's float
// vectors, whose MathOps specialisation lives in cpu/focal_cpu_kernel.h).
//
// Numerics, in one place (docs/design.md):
//  * one exp per element: e = exp(-|x|), r = 1/(1+e) gives p and 1-p each
//    without cancellation (p = r or e*r by the sign of x), and
//    softplus(+-x) = max(+-x, 0) + log1p(e);
//  * products of an infinite cross-entropy with a vanishing probability are
//    selected to 0 (their limit; mul_or_zero), so +-inf logits give finite
//    gradients.
#pragma once

#include <math.h>

#include <cstdint>
#include <type_traits>

#include "../cuda/tuning.h"
#include "params.h"

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
//  * trunc(x); gather(table, i): table[trunc(i)] for i in [0, 2^24) held in a
//    float lane (GHM-C's bin lookups); any_negative(x): whether a lane is below 0 (or -0).
#define FOCAL_SCALAR_COMMON(T)                                                                \
  static FOCAL_HD T exp_nonpos(T x) { return exp(x); }                                         \
  static FOCAL_HD T neg_abs(T x) { return -abs(x); }                                            \
  static FOCAL_HD T select_nonneg(T s, T a, T b) { return s >= T(0) ? a : b; }                 \
  static FOCAL_HD T select_nonpos(T s, T a, T b) { return s <= T(0) ? a : b; }                 \
  static FOCAL_HD T mul_or_zero(T a, T b) { return fmax(a * b, T(0)); }                      \
  static FOCAL_HD T trunc(T x) { return ::trunc(x); }                                           \
  static FOCAL_HD T gather(const T* table, T index) { return table[static_cast<int>(index)]; }  \
  static FOCAL_HD bool any_negative(T x) { return x < T(0); }

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
  static FOCAL_HD bool lt(float a, float b) { return a < b; }
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
  static FOCAL_HD bool lt(double a, double b) { return a < b; }
};
#undef FOCAL_SCALAR_COMMON

// p = sigmoid(x), q = 1 - p, and l1 = log1p(exp(-|x|)) from one exp:
// softplus(x) = -log(1 - p) = max(x, 0) + l1, softplus(-x) = -log(p) = max(-x, 0) + l1.
template <class T>
struct Logistic {
  T p;
  T q;
  T l1;
};

template <class T, class S>
FOCAL_HD Logistic<T> logistic(T x) {
  using O = MathOps<T>;
  const T e = O::exp_nonpos(O::neg_abs(x));
  const T r = O::recip_unit(T(S(1)) + e);
  const T er = e * r;
  return {O::select_nonneg(x, r, er), O::select_nonneg(x, er, r), O::log1p(e)};
}

// p - y for y in [0, 1], without the cancellation of p - y where p is near 1:
// there it is (1 - y) - (1 - p), both terms exact or accurate (1 - p is z.q).
template <class T, class S>
FOCAL_HD T p_minus_y(T x, const Logistic<T>& z, T y) {
  return MathOps<T>::select_nonneg(x, (T(S(1)) - y) - z.q, z.p - y);
}

// 1 - exp(L) for L <= 0, accurate where exp(L) is near 1: -expm1(L) in float64;
// in float32 (and its vectors) a series to L^5 for L > -1/16 (relative error
// below 2e-9), 1 - exp(L) beyond.
template <class T, class S>
FOCAL_HD T one_minus_exp(T L) {
  if constexpr (std::is_same_v<T, double>) {
    return -::expm1(L);
  } else {
    using O = MathOps<T>;
    const T series =
        T(S(0)) - L * (T(S(1)) + L * (T(S(0.5)) + L * (T(S(1.0 / 6)) + L * (T(S(1.0 / 24)) + L * T(S(1.0 / 120))))));
    return O::select(O::gt(L, T(S(-0.0625))), series, T(S(1)) - O::exp(L));
  }
}

// b^k for b >= 0: by products for an integer k in [0, 16] (k_int >= 0), else
// exp(-k * neg_log_b) from -log(b), which the callers have at hand (a softplus).
template <class T, class S>
FOCAL_HD T pow_nonneg(T b, T neg_log_b, S k, int k_int) {
  if (k_int >= 0) {
    T acc = T(S(1));
    for (int i = 0; i < k_int; ++i) acc = acc * b;
    return acc;
  }
  return MathOps<T>::exp(T(S(0)) - T(k) * neg_log_b);
}

// k as an integer in [0, 16], or -1.
inline int small_integer(double k) {
  return (k >= 0.0 && k <= 16.0 && k == static_cast<double>(static_cast<int>(k))) ? static_cast<int>(k) : -1;
}

// BCE-with-logits(x, y) = y softplus(-x) + (1 - y) softplus(x) for y in [0, 1],
// with 0 * inf read as 0 where y is exactly 0 or 1.
template <class T, class S>
FOCAL_HD T bce(T y, T sp_neg, T sp_pos) {
  using O = MathOps<T>;
  const T zero(S(0));
  const T one(S(1));
  return O::select(O::ne(y, zero), y * sp_neg, zero) + O::select(O::ne(y, one), (one - y) * sp_pos, zero);
}

}  // namespace focal
