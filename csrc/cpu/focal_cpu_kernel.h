// The fused CPU kernel of every family member: one pass over a range of
// elements writes the gradient (and the elementwise loss) and returns the
// range's partial sum. The member (csrc/losses/) is a template parameter L.
//
// This header is compiled once per CPU instruction set (CPU_CAPABILITY =
// DEFAULT inside _C, AVX2 in the separate _cpu_avx2 module built with
// -mavx2 -mfma), so everything in it sits in an inline namespace named after
// the capability, like ATen's own vectorised kernels.
//
// The caller (focal_op.cpp) splits the element range into fixed chunks and sums
// the chunks' partials in order, so the loss is bitwise the same whatever the
// thread count. Inside a chunk:
//  * contiguous label or dense targets without a weight (the common case) run
//    flat over the elements, three vectors per step (labels_flat, dense_flat);
//  * everything else goes through row segments (one row, a run of columns): per
//    segment the row offsets are computed once, then vectors (two in lockstep)
//    run over unit-stride columns, one padded vector takes the remainder, and a
//    scalar loop handles strided columns. Weighted class labels with C < 16
//    skip the segments and run flat, building each vector's masks lane by lane.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../core/math_ops.h"
#include "../core/params.h"
#include "../losses/family.h"

namespace focal {

namespace cpu {
inline namespace CPU_CAPABILITY {

#if defined(CPU_CAPABILITY_AVX2)
// exp(x) for float32 lanes with x already clamped to [-88, 88.3], inline (a call
// into Sleef would cut the long dependency chain of the loss into pieces the CPU
// cannot overlap). Range reduction x = n ln2 + r, |r| <= ln2/2, with ln2 split in
// a 9-bit head (n * head is exact) and a tail; exp(r) by a degree-6 polynomial
// fitted (weighted least squares on Chebyshev nodes, relative error 1.8e-8) for
// this project; 2^n built in the exponent bits of a float that multiplies the
// polynomial, so a NaN input stays NaN. At the clamp's low end n = -127, whose
// 2^n built here is the bit pattern of +0.0: everything below -87.7, -inf
// included, gives exactly 0 (the true values there are below float32's smallest
// normal; the math relies on p_t == 0 at x = -inf).
inline __m256 exp_clamped(__m256 xc) {
  const __m256 shifter = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23
  const __m256 t = _mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), shifter);
  const __m256 n = _mm256_sub_ps(t, shifter);  // round(x / ln2), in [-127, 127]
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(0.0013829420786350965f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.008374771103262901f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.0416683591902256f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.1666642129421234f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.49999991059303284f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // t's low mantissa bits hold n; shifted into the exponent field: 2^n
  const __m256i two_n = _mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(t), 23), _mm256_set1_epi32(127 << 23));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}
#endif

// exp(x); x > 88.3 saturates at exp(88.3). max/min return their second operand
// when either is NaN, so a NaN x stays NaN.
FOCAL_HD at::vec::Vectorized<float> vec_exp(at::vec::Vectorized<float> x) {
#if defined(CPU_CAPABILITY_AVX2)
  return exp_clamped(_mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(_mm256_set1_ps(-88.0f), x)));
#else
  return x.exp();
#endif
}

// exp(x) for x <= 0 (or NaN), the argument of e = exp(-|x|): no upper clamp.
FOCAL_HD at::vec::Vectorized<float> vec_exp_nonpos(at::vec::Vectorized<float> x) {
#if defined(CPU_CAPABILITY_AVX2)
  return exp_clamped(_mm256_max_ps(_mm256_set1_ps(-88.0f), x));
#else
  return x.exp();
#endif
}

// mask ? a : b by the sign bit of each mask lane. Written as an instruction:
// GCC 12 rewrites _mm256_blendv_ps into a compare-and-select and then needs an
// extra integer compare to rebuild the mask (one more instruction per select).
FOCAL_HD at::vec::Vectorized<float> vec_blend(at::vec::Vectorized<float> mask, at::vec::Vectorized<float> a,
                                              at::vec::Vectorized<float> b) {
#if defined(CPU_CAPABILITY_AVX2)
  __m256 out;
  asm("vblendvps %3, %2, %1, %0" : "=x"(out) : "x"(static_cast<__m256>(b)), "x"(static_cast<__m256>(a)),
      "x"(static_cast<__m256>(mask)));
  return out;
#else
  return at::vec::Vectorized<float>::blendv(b, a, mask);
#endif
}

// 1/u for u in [1, 3] (the only arguments the math passes): the approximate
// reciprocal refined by one Newton step (about 2 ulp) instead of a division,
// which costs several times more on the CPUs this runs on.
FOCAL_HD at::vec::Vectorized<float> vec_recip_unit(at::vec::Vectorized<float> u) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 uv = u;
  const __m256 r0 = _mm256_rcp_ps(uv);
  return _mm256_mul_ps(r0, _mm256_fnmadd_ps(uv, r0, _mm256_set1_ps(2.0f)));
#else
  return at::vec::Vectorized<float>(1.0f) / u;
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu

template <>
struct MathOps<at::vec::Vectorized<float>> {
  using V = at::vec::Vectorized<float>;
  using Mask = V;
  FOCAL_HD static V exp(V x) { return cpu::vec_exp(x); }
  // log1p(e) for e = exp(-|x|) in [0, 1], the only argument the math uses:
  // the atanh polynomial of core/math_ops.h (Sleef's general log1pf costs ~4x the
  // rest of the kernel).
  FOCAL_HD static V log1p(V e) { return log1p_unit_poly(e); }
  FOCAL_HD static V exp_nonpos(V x) { return cpu::vec_exp_nonpos(x); }
  FOCAL_HD static V neg_abs(V x) {
#if defined(CPU_CAPABILITY_AVX2)
    return V(_mm256_or_ps(x, _mm256_set1_ps(-0.0f)));  // set the sign bit
#else
    return V(0.0f) - x.abs();
#endif
  }
  // s's sign bit picks b: a == b where that differs from s >= 0 (s = -0, NaN)
  FOCAL_HD static V select_nonneg(V s, V a, V b) {
#if defined(CPU_CAPABILITY_AVX2)
    return cpu::vec_blend(s, b, a);
#else
    return V::blendv(b, a, s >= V(0.0f));
#endif
  }
  FOCAL_HD static V select_nonpos(V s, V a, V b) {
#if defined(CPU_CAPABILITY_AVX2)
    return cpu::vec_blend(s, a, b);
#else
    return V::blendv(b, a, s <= V(0.0f));
#endif
  }
  // a * b for a, b >= 0; a NaN product (0 * inf, or NaN inputs) becomes 0: max
  // returns its second operand when either is NaN. NaN inputs still reach the
  // results through the other terms.
  FOCAL_HD static V mul_or_zero(V a, V b) {
#if defined(CPU_CAPABILITY_AVX2)
    return V(_mm256_max_ps(a * b, _mm256_setzero_ps()));
#else
    return V::blendv(V(0.0f), a * b, a > V(0.0f));
#endif
  }
  FOCAL_HD static V fma(V a, V b, V c) { return at::vec::fmadd(a, b, c); }
  FOCAL_HD static V recip_unit(V u) { return cpu::vec_recip_unit(u); }
  FOCAL_HD static V log(V x) { return x.log(); }
  FOCAL_HD static V abs(V x) { return x.abs(); }
  // max(a, 0) feeds a sum with log1p(e), which is NaN whenever x is: no NaN bookkeeping needed.
  FOCAL_HD static V max(V a, V b) {
#if defined(CPU_CAPABILITY_AVX2)
    return V(_mm256_max_ps(a, b));
#else
    return at::vec::maximum(a, b);
#endif
  }
  FOCAL_HD static V select(V m, V a, V b) { return cpu::vec_blend(m, a, b); }
  FOCAL_HD static V ge(V a, V b) { return a >= b; }
  FOCAL_HD static V gt(V a, V b) { return a > b; }
  FOCAL_HD static V ne(V a, V b) { return a != b; }
  FOCAL_HD static V lt(V a, V b) { return a < b; }
  FOCAL_HD static V trunc(V x) {
#if defined(CPU_CAPABILITY_AVX2)
    return V(_mm256_round_ps(x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC));
#else
    return x.trunc();
#endif
  }
  // whether a lane's sign bit is set (x < 0, or -0)
  FOCAL_HD static bool any_negative(V x) {
#if defined(CPU_CAPABILITY_AVX2)
    return _mm256_movemask_ps(x) != 0;
#else
    return (x < V(0.0f)).zero_mask() != (1 << V::size()) - 1;
#endif
  }
  // table[i] per lane, i a whole number held in the lane (GHM-C's bin lookups)
  FOCAL_HD static V gather(const float* table, V index) {
#if defined(CPU_CAPABILITY_AVX2)
    return V(_mm256_i32gather_ps(table, _mm256_cvttps_epi32(index), 4));
#else
    float idx[V::size()], out[V::size()];
    index.store(idx);
    for (int i = 0; i < V::size(); ++i) out[i] = table[static_cast<int>(idx[i])];
    return V::loadu(out);
#endif
  }
};

namespace cpu {
inline namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
constexpr int kLanes = Vec::size();

// N float vectors in lockstep: each operation is issued for all N before the
// next one, so N independent dependency chains sit side by side in the
// instruction stream. The loss is one long chain (exp, reciprocals, two
// polynomials); small out-of-order windows (Zen 1: measured 5.5 -> 3.9 ns per
// element for N = 2) then find parallel work they would otherwise miss.
template <int N>
struct VecN {
  Vec v[N];
  VecN() = default;
  FOCAL_HD explicit VecN(float s) {
    for (int i = 0; i < N; ++i) v[i] = Vec(s);
  }
#define FOCAL_VECN_BINOP(op)                                  \
  FOCAL_HD friend VecN operator op(const VecN& a, const VecN& b) { \
    VecN o;                                                   \
    for (int i = 0; i < N; ++i) o.v[i] = a.v[i] op b.v[i];    \
    return o;                                                 \
  }
  FOCAL_VECN_BINOP(+)
  FOCAL_VECN_BINOP(-)
  FOCAL_VECN_BINOP(*)
  FOCAL_VECN_BINOP(/)
#undef FOCAL_VECN_BINOP
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu

template <int N>
struct MathOps<cpu::VecN<N>> {
  using T = cpu::VecN<N>;
  using VO = MathOps<at::vec::Vectorized<float>>;
  using Mask = T;
#define FOCAL_VECN_MAP(name, params, args)     \
  FOCAL_HD static T name params {              \
    T o;                                       \
    for (int i = 0; i < N; ++i) o.v[i] = VO::name args; \
    return o;                                  \
  }
  FOCAL_VECN_MAP(exp, (const T& a), (a.v[i]))
  FOCAL_VECN_MAP(log1p, (const T& a), (a.v[i]))
  FOCAL_VECN_MAP(log, (const T& a), (a.v[i]))
  FOCAL_VECN_MAP(abs, (const T& a), (a.v[i]))
  FOCAL_VECN_MAP(recip_unit, (const T& a), (a.v[i]))
  FOCAL_VECN_MAP(max, (const T& a, const T& b), (a.v[i], b.v[i]))
  FOCAL_VECN_MAP(ge, (const T& a, const T& b), (a.v[i], b.v[i]))
  FOCAL_VECN_MAP(gt, (const T& a, const T& b), (a.v[i], b.v[i]))
  FOCAL_VECN_MAP(ne, (const T& a, const T& b), (a.v[i], b.v[i]))
  FOCAL_VECN_MAP(lt, (const T& a, const T& b), (a.v[i], b.v[i]))
  FOCAL_VECN_MAP(select, (const T& m, const T& a, const T& b), (m.v[i], a.v[i], b.v[i]))
  FOCAL_VECN_MAP(exp_nonpos, (const T& a), (a.v[i]))
  FOCAL_VECN_MAP(neg_abs, (const T& a), (a.v[i]))
  FOCAL_VECN_MAP(select_nonneg, (const T& s, const T& a, const T& b), (s.v[i], a.v[i], b.v[i]))
  FOCAL_VECN_MAP(select_nonpos, (const T& s, const T& a, const T& b), (s.v[i], a.v[i], b.v[i]))
  FOCAL_VECN_MAP(mul_or_zero, (const T& a, const T& b), (a.v[i], b.v[i]))
  FOCAL_VECN_MAP(trunc, (const T& a), (a.v[i]))
#undef FOCAL_VECN_MAP
  FOCAL_HD static bool any_negative(const T& a) {
    bool any = false;
    for (int i = 0; i < N; ++i) any = any || VO::any_negative(a.v[i]);
    return any;
  }
  FOCAL_HD static T gather(const float* table, const T& index) {
    T o;
    for (int i = 0; i < N; ++i) o.v[i] = VO::gather(table, index.v[i]);
    return o;
  }
};

namespace cpu {
inline namespace CPU_CAPABILITY {

// Storage <-> float32 vectors for unit-stride runs of kLanes elements.
template <class scalar_t>
inline Vec load_float(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return Vec::loadu(p);
#if defined(CPU_CAPABILITY_AVX2)
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // 8 values in one 16-byte load (at::vec::load_to_float goes through a stack buffer: a 16-byte
    // store read back by a 32-byte load, which store forwarding cannot serve: about 10 cycles a
    // vector, 27% of a bfloat16 forward once the logits are staged); bfloat16 is the top half of a float32
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
  } else {
    Vec out;
    at::vec::load_to_float<scalar_t>(p, out);
    return out;
  }
}

template <class scalar_t>
inline void store_float(scalar_t* p, Vec v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    v.store(p);
#if defined(CPU_CAPABILITY_AVX2)
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // 8 values in one 16-byte store (Vectorized<BFloat16>::store(p, 8) goes through a buffer:
    // measured 7 ms of a 30 ms bf16 forward+backward)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_bf16(static_cast<__m256>(v)));
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_fp16(static_cast<__m256>(v)));
#endif
  } else {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, kLanes);
  }
}

// Weight a vector's loss and gradient; a zero weight gives an exact zero even
// where the unweighted value is infinite (or, for padding lanes, meaningless).
FOCAL_HD void apply_weight(Vec& l, Vec& g, Vec w) {
  const Vec zero(0.0f);
  const Vec keep = w != zero;
  l = Vec::blendv(zero, l * w, keep);
  g = Vec::blendv(zero, g * w, keep);
}

// Moves a vector of float partial sums into the double accumulator. Called
// every few dozen vectors, so no float lane ever adds up more than ~64 terms:
// a chunk's 2048 terms per lane in float alone measured 5e-6 relative error on
// RetinaNet-like sums (millions of tiny, nearly equal terms).
inline void flush(Vec& vsum, double& acc) {
  float lanes[kLanes];
  vsum.store(lanes);
  for (int j = 0; j < kLanes; ++j) acc += static_cast<double>(lanes[j]);
  vsum = Vec(0.0f);
}

template <class label_t>
inline int64_t read_label(const FocalParams& p, int64_t offset) {
  return static_cast<int64_t>(static_cast<const label_t*>(p.target.data)[offset]);
}

// The score of row r, for (labels, scores) targets: read only for a row whose
// label is a class, where that class's column is computed.
template <class acc_t>
inline acc_t read_score(const FocalParams& p, int64_t r) {
  const int64_t o = p.contiguous ? r * p.scores.row_strides[0] : score_offset(p, r);
  return static_cast<const acc_t*>(p.scores.data)[o];
}

// Loss/gradient of one element in compute precision acc_t; weight applied to
// both, gfactor to the gradient (the caller scales the loss). score: the row's
// score where p.scores is set and col is its label's column.
// A zero weight and an ignored label give exactly zero, whatever the logit.
template <class L, class acc_t, class target_t>
inline void element(const FocalParams& p, const L& fn, acc_t x, const target_t* tgt, int64_t t_off, int64_t label,
                    acc_t score, int64_t col, acc_t w, acc_t gfactor, acc_t& loss, acc_t& grad) {
  acc_t l, g;
  if (p.labels) {
    if (label == p.ignore_index) {
      loss = acc_t(0);
      grad = acc_t(0);
      return;
    }
    if (p.scores.data) {
      fn.labelled(x, col == label, score, l, g);
    } else {
      fn.binary(x, col == label, l, g);
    }
  } else {
    fn.dense(x, static_cast<acc_t>(tgt[t_off]), l, g);
  }
  const bool keep = w != acc_t(0);
  loss = keep ? l * w : acc_t(0);
  grad = keep ? g * w * gfactor : acc_t(0);
}

// The portable build on x86-64 is the fallback for CPUs without AVX2 (the AVX2
// build serves the others): there the members other than the focal loss take
// the scalar loop only. Each vector instantiation of the portable build costs
// several seconds of compile time (at::vec's portable vectors are loops the
// compiler unrolls); elsewhere (aarch64: NEON vectors) every member is vectorised.
template <class L>
constexpr bool kScalarOnly =
#if defined(__x86_64__) && defined(CPU_CAPABILITY_DEFAULT)
    !is_focal<L>::value;
#else
    false;
#endif

// Whether the focal loss's flat label loop is also built for 16-bit logits (below): not in the
// portable x86-64 build, the fallback for CPUs without AVX2, where it cost 50 s of compile time.
constexpr bool kFlat16 =
#if defined(__x86_64__) && defined(CPU_CAPABILITY_DEFAULT)
    false;
#else
    true;
#endif

// One row segment [c0, c1) of row r. Returns nothing; accumulates into the sums.
template <class scalar_t, class target_t, class L>
struct Segment {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  static constexpr bool kVector = std::is_same_v<acc_t, float> && !kScalarOnly<L>;

  // factor scales the elementwise loss, gfactor the gradient (they differ when
  // the gradient is left unnormalised for backward).
  static void run(const FocalParams& p, const L& fn, acc_t factor, acc_t gfactor, int64_t r, int64_t c0,
                  int64_t c1, Vec& vsum_io, double& ssum_io) {
    // Locals, not references: the compiler cannot tell that the output stores
    // leave them alone, and would keep the sum in memory.
    const bool labels = p.labels;
    Vec vsum = vsum_io;
    double ssum = ssum_io;
    int64_t ox, ot, ow;
    if (p.contiguous) {
      ox = r * p.cols;
      ot = p.labels ? r : r * p.cols;
      ow = p.ndim == 0 ? 0 : r * p.weight.row_strides[0];
    } else {
      row_offsets(p, r, ox, ot, ow);
    }
    const scalar_t* x = static_cast<const scalar_t*>(p.input.data) + ox;
    const target_t* t = p.labels ? nullptr : static_cast<const target_t*>(p.target.data) + ot;
    const acc_t* w = p.weight.data ? static_cast<const acc_t*>(p.weight.data) + ow : nullptr;
    const int64_t xcs = p.input.col_stride, tcs = p.target.col_stride, wcs = p.weight.col_stride;
    const int64_t out0 = r * p.cols;  // outputs are contiguous over the grid
    scalar_t* grad = static_cast<scalar_t*>(p.grad);
    scalar_t* loss = p.reduction == Reduction::None ? static_cast<scalar_t*>(p.loss) : nullptr;

    int64_t label = -1;
    if (p.labels) {
      label = p.target.kind == ScalarKind::Int32 ? read_label<int32_t>(p, ot) : read_label<int64_t>(p, ot);
      if (label == p.ignore_index) {  // the whole segment is ignored
        for (int64_t c = c0; c < c1; ++c) {
          if (grad) grad[out0 + c] = scalar_t(0);
          if (loss) loss[out0 + c] = scalar_t(0);
        }
        return;
      }
      if (label < 0 || label > p.num_classes) label = -2;  // unreachable on CPU (checked); never matches
    }
    // the row's score, where its class column lies in this segment
    const acc_t score = p.scores.data && label >= c0 && label < c1 ? read_score<acc_t>(p, r) : acc_t(0);
    const acc_t nf = fn.neg_factor();

    int64_t c = c0;
    if constexpr (kVector) {
      const bool unit = xcs == 1 && (p.labels || tcs == 1) && (!w || wcs == 0 || wcs == 1);
      if (unit) {
        const Vec vfactor(factor);
        const Vec vgfactor(gfactor);
        const Vec lanes = Vec::arange(0.0f, 1.0f);
        const Vec vlabel(static_cast<float>(label));
        const Vec vscore(static_cast<float>(score));
        const bool scores = p.scores.data != nullptr;
        // N vectors (N * kLanes elements from column cc) in lockstep.
        auto step = [&](auto n_tag, int64_t cc) __attribute__((always_inline)) {
          constexpr int N = decltype(n_tag)::value;
          VecN<N> vx, l, g;
          for (int i = 0; i < N; ++i) vx.v[i] = load_float(x + cc + i * kLanes);
          if (labels) {
            if (label >= cc && label < cc + N * kLanes) {
              VecN<N> pos;
              for (int i = 0; i < N; ++i) {
                const Vec cols = Vec(static_cast<float>(cc + i * kLanes)) + lanes;  // exact: C < 2^24
                pos.v[i] = cols == vlabel;
              }
              if (scores) {
                VecN<N> vs;
                for (int i = 0; i < N; ++i) vs.v[i] = vscore;
                fn.labelled(vx, pos, vs, l, g);
              } else {
                fn.binary(vx, pos, l, g);
              }
            } else {  // no positive among these columns: most of a row
              fn.negative(vx, l, g);
              const VecN<N> vnf(static_cast<float>(nf));
              l = l * vnf;
              g = g * vnf;
            }
          } else {
            VecN<N> vt;
            for (int i = 0; i < N; ++i) vt.v[i] = load_float(t + cc + i * kLanes);
            fn.dense(vx, vt, l, g);
          }
          for (int i = 0; i < N; ++i) {
            const int64_t ci = cc + i * kLanes;
            Vec li = l.v[i], gi = g.v[i];
            if (w) apply_weight(li, gi, wcs == 0 ? Vec(w[0]) : Vec::loadu(w + ci));
            vsum = vsum + li;
            if (grad) store_float(grad + out0 + ci, gi * vgfactor);
            if (loss) store_float(loss + out0 + ci, li * vfactor);
          }
        };
        for (int n = 1; c + 2 * kLanes <= c1; c += 2 * kLanes, ++n) {
          step(std::integral_constant<int, 2>{}, c);
          if (n % 32 == 0) flush(vsum, ssum);  // long (flattened dense) segments
        }
        for (; c + kLanes <= c1; c += kLanes) step(std::integral_constant<int, 1>{}, c);
        if (c < c1) {
          // The row's last c1 - c < kLanes elements (C = 91: 3 per row) as one padded vector rather
          // than a scalar loop; padding lanes get weight 0, an exact zero in the sum.
          const int n = static_cast<int>(c1 - c);
          float xb[kLanes] = {}, tb[kLanes] = {}, wb[kLanes] = {};
          for (int i = 0; i < n; ++i) {
            xb[i] = static_cast<float>(x[c + i]);
            if (!p.labels) tb[i] = static_cast<float>(t[c + i]);
            wb[i] = w ? (wcs == 0 ? w[0] : w[c + i]) : 1.0f;
          }
          Vec l, g;
          if (p.labels) {
            const Vec pos = (Vec(static_cast<float>(c)) + lanes) == vlabel;
            if (scores) {
              fn.labelled(Vec::loadu(xb), pos, vscore, l, g);
            } else {
              fn.binary(Vec::loadu(xb), pos, l, g);
            }
          } else {
            fn.dense(Vec::loadu(xb), Vec::loadu(tb), l, g);
          }
          apply_weight(l, g, Vec::loadu(wb));
          vsum = vsum + l;
          float gb[kLanes], lb[kLanes];
          (g * vgfactor).store(gb);
          (l * vfactor).store(lb);
          for (int i = 0; i < n; ++i) {
            if (grad) grad[out0 + c + i] = static_cast<scalar_t>(gb[i]);
            if (loss) loss[out0 + c + i] = static_cast<scalar_t>(lb[i]);
          }
          c = c1;
        }
        flush(vsum, ssum);
      }
    }
    for (; c < c1; ++c) {
      acc_t l, g;
      const acc_t wv = w ? w[c * wcs] : acc_t(1);
      element<L, acc_t, target_t>(p, fn, static_cast<acc_t>(x[c * xcs]), t, c * tcs, label, score, c, wv, gfactor, l,
                                  g);
      ssum += static_cast<double>(l);
      if (grad) grad[out0 + c] = static_cast<scalar_t>(g);
      if (loss) loss[out0 + c] = static_cast<scalar_t>(l * factor);
    }
    vsum_io = vsum;
    ssum_io = ssum;
  }
};

// What the flat paths below share: the outputs of a group of vectors (scaled by
// the given factors), and the loss sum kept in two parts, groups of the
// all-negative math (its neg_factor, alpha for the focal loss, left out: it
// multiplies that part once at the end)
// and the rest, each flushed into float64 every kFlushSteps groups.
// Vectors per step of the flat paths (see labels_flat for the measurement).
constexpr int kFlatVectors = 3;

template <class scalar_t>
struct FlatOut {
  static constexpr int kFlushSteps = 20;  // kFlatVectors terms per lane per step: at most 60
  scalar_t* grad;
  scalar_t* loss;
  Vec sum = Vec(0.0f), sum_neg = Vec(0.0f);
  double total = 0.0, total_neg = 0.0;
  int steps = 0;

  FlatOut(const FocalParams& p)
      : grad(static_cast<scalar_t*>(p.grad)),
        loss(p.reduction == Reduction::None ? static_cast<scalar_t*>(p.loss) : nullptr) {}
  FOCAL_HD void emit(int64_t i, Vec l, Vec g, Vec lf, Vec gf) {
    if (grad) store_float(grad + i, g * gf);
    if (loss) store_float(loss + i, l * lf);
  }
  FOCAL_HD void step() {
    if (++steps == kFlushSteps) {
      flush(sum, total);
      flush(sum_neg, total_neg);
      steps = 0;
    }
  }
  double result(float neg_factor) {
    flush(sum, total);
    flush(sum_neg, total_neg);
    return total + static_cast<double>(neg_factor) * total_neg;
  }
};

// Contiguous class labels without a weight: the elements of [begin, end) run
// flat, kGroup = 3 vectors at a time, whatever C is (no per-row work). A group
// that holds no "special" element (a row's positive class, or any element of
// an ignored row) takes the all-negative math, with the member's neg_factor
// (alpha) folded into the output factors and into the sum of those groups; a
// group inside an ignored
// row is written as zeros; the few groups left (about one per positive row
// and two per ignored row) build their masks by vector selects when C >= kGroup
// (a group then spans at most two rows), else lane by lane. Three vectors in
// lockstep measured fastest here (Zen 1, in cache: 3.08 / 2.90 / 2.93 ns per
// element for 2 / 3 / 4; more independent work per step, still no spills).
// Returns the range's unscaled loss sum.
template <class scalar_t, class L>
double labels_flat(const FocalParams& p, const L& fn, float factor, float gfactor, int64_t begin, int64_t end) {
  constexpr int kN = kFlatVectors;
  constexpr int kGroup = kN * kLanes;
  const int64_t C = p.cols;
  const scalar_t* x = static_cast<const scalar_t*>(p.input.data);
  const Vec vfactor(factor), vgfactor(gfactor);
  const Vec neg_factor(fn.neg_factor() * factor), neg_gfactor(fn.neg_factor() * gfactor);
  const bool scores = p.scores.data != nullptr;
  FlatOut<scalar_t> out(p);
  auto label_of = [&](int64_t row) {
    return p.target.kind == ScalarKind::Int32 ? read_label<int32_t>(p, row) : read_label<int64_t>(p, row);
  };
  // The next special interval [sb, se), in row srow; ignored: it is that whole (ignored) row.
  int64_t srow = 0, sb = 0, se = 0;
  bool ignored = false;
  auto find_special = [&](int64_t row) {
    for (; row < p.rows; ++row) {
      const int64_t lab = label_of(row);
      if (lab == p.ignore_index) {
        srow = row, sb = row * C, se = sb + C, ignored = true;
        return;
      }
      if (lab >= 0 && lab < C) {
        srow = row, sb = row * C + lab, se = sb + 1, ignored = false;
        return;
      }
    }
    srow = p.rows, sb = se = INT64_MAX, ignored = false;
  };
  const Vec lanes = Vec::arange(0.0f, 1.0f);
  // i / C, by a 32-bit division where it fits (several times faster than a 64-bit one on older x86)
  auto row_of = [C](int64_t i) -> int64_t {
    if (i <= INT32_MAX && C <= INT32_MAX) return static_cast<uint32_t>(i) / static_cast<uint32_t>(C);
    return i / C;
  };
  find_special(begin / C);
  for (int64_t i = begin; i < end; i += kGroup) {
    while (se <= i) find_special(srow + 1);
    if (i + kGroup <= end && i + kGroup <= sb) {  // all negative
      VecN<kN> vx, l, g;
      for (int j = 0; j < kN; ++j) vx.v[j] = load_float(x + i + j * kLanes);
      fn.negative(vx, l, g);
      for (int j = 0; j < kN; ++j) {
        out.sum_neg = out.sum_neg + l.v[j];
        out.emit(i + j * kLanes, l.v[j], g.v[j], neg_factor, neg_gfactor);
      }
    } else if (ignored && sb <= i && i + kGroup <= std::min(se, end)) {  // inside an ignored row
      for (int j = 0; j < kN; ++j) out.emit(i + j * kLanes, Vec(0.0f), Vec(0.0f), vfactor, vgfactor);
    } else if (const int64_t r = row_of(i), c = i - r * C; i + kGroup <= end && C >= kGroup) {
      // C >= kGroup: the group spans row r from column c and, past lane b = C - c, the start of
      // row r + 1. Each lane's column, label and keep flag by vector selects on the lane index.
      auto label_value = [&](int64_t row) {  // as a float column; -1 matches none (background, bad)
        const int64_t lab = row < p.rows ? label_of(row) : C;
        return lab >= 0 && lab < C ? static_cast<float>(lab) : -1.0f;
      };
      auto ignored_row = [&](int64_t row) { return row < p.rows && label_of(row) == p.ignore_index; };
      // a row's score where its class column lies in [lo, hi) (the group's part of the row)
      auto score_value = [&](int64_t row, int64_t lo, int64_t hi) {
        if (!scores || row >= p.rows) return 0.0f;
        const int64_t lab = label_of(row);
        return lab >= lo && lab < hi && lab < C ? read_score<float>(p, row) : 0.0f;
      };
      const Vec b(static_cast<float>(C - c));  // exact: C < 2^24
      const Vec lab0(label_value(r)), lab1(label_value(r + 1));
      const Vec keep0(ignored_row(r) ? 0.0f : 1.0f), keep1(ignored_row(r + 1) ? 0.0f : 1.0f);
      Vec s0(0.0f), s1(0.0f);
      if (scores) {
        s0 = Vec(score_value(r, c, c + kGroup));
        s1 = Vec(score_value(r + 1, 0, kGroup - (C - c)));
      }
      VecN<kN> vx, pos, vs, l, g;
      Vec keep[kN];
      for (int j = 0; j < kN; ++j) {
        vx.v[j] = load_float(x + i + j * kLanes);
        const Vec lane = Vec(static_cast<float>(j * kLanes)) + lanes;
        const Vec first = lane < b;  // lane in row r
        const Vec col = Vec::blendv(lane - b, lane + Vec(static_cast<float>(c)), first);
        pos.v[j] = col == Vec::blendv(lab1, lab0, first);
        keep[j] = Vec::blendv(keep1, keep0, first);
        vs.v[j] = Vec::blendv(s1, s0, first);
      }
      if (scores) {
        fn.labelled(vx, pos, vs, l, g);
      } else {
        fn.binary(vx, pos, l, g);
      }
      for (int j = 0; j < kN; ++j) {
        apply_weight(l.v[j], g.v[j], keep[j]);
        out.sum = out.sum + l.v[j];
        out.emit(i + j * kLanes, l.v[j], g.v[j], vfactor, vgfactor);
      }
    } else {  // lane by lane; lanes past end are padding with weight 0
      const int n = static_cast<int>(std::min<int64_t>(kGroup, end - i));
      float xb[kGroup] = {}, posb[kGroup] = {}, keepb[kGroup] = {}, sb[kGroup] = {};
      int64_t row = r, col = c;  // of element i, from the condition above
      int64_t lab = label_of(row);
      for (int j = 0; j < n; ++j) {
        xb[j] = static_cast<float>(x[i + j]);
        posb[j] = col == lab ? 1.0f : 0.0f;
        keepb[j] = lab == p.ignore_index ? 0.0f : 1.0f;
        if (scores && col == lab) sb[j] = read_score<float>(p, row);  // the class column's lane only
        if (++col == C && j + 1 < n) {
          col = 0;
          lab = label_of(++row);
        }
      }
      VecN<kN> vx, pos, vs, l, g;
      for (int j = 0; j < kN; ++j) {
        vx.v[j] = Vec::loadu(xb + j * kLanes);
        pos.v[j] = Vec::loadu(posb + j * kLanes) == Vec(1.0f);
        vs.v[j] = Vec::loadu(sb + j * kLanes);
      }
      if (scores) {
        fn.labelled(vx, pos, vs, l, g);
      } else {
        fn.binary(vx, pos, l, g);
      }
      for (int j = 0; j < kN; ++j) {
        apply_weight(l.v[j], g.v[j], Vec::loadu(keepb + j * kLanes));
        out.sum = out.sum + l.v[j];
      }
      if (n == kGroup) {
        for (int j = 0; j < kN; ++j) out.emit(i + j * kLanes, l.v[j], g.v[j], vfactor, vgfactor);
      } else {
        float gb[kGroup], lb[kGroup];
        for (int j = 0; j < kN; ++j) {
          (g.v[j] * vgfactor).store(gb + j * kLanes);
          (l.v[j] * vfactor).store(lb + j * kLanes);
        }
        for (int j = 0; j < n; ++j) {
          if (out.grad) out.grad[i + j] = static_cast<scalar_t>(gb[j]);
          if (out.loss) out.loss[i + j] = static_cast<scalar_t>(lb[j]);
        }
      }
    }
    out.step();
  }
  return out.result(fn.neg_factor());
}

// Contiguous dense targets without a weight, over [begin, end) with end - begin
// a multiple of kGroup (the caller runs the rest): three vectors per step, and a
// step whose targets are all exactly 0 (most of a one-hot tensor) takes the
// all-negative math of the label path, neg_factor folded in; other steps the
// general (soft-target) math. Both give the same values up to float rounding.
template <class scalar_t, class target_t, class L>
double dense_flat(const FocalParams& p, const L& fn, float factor, float gfactor, int64_t begin, int64_t end) {
  constexpr int kN = kFlatVectors;
  constexpr int kGroup = kN * kLanes;
  constexpr int kAllZero = (1 << kLanes) - 1;
  const scalar_t* x = static_cast<const scalar_t*>(p.input.data);
  const target_t* t = static_cast<const target_t*>(p.target.data);
  const Vec vfactor(factor), vgfactor(gfactor);
  const Vec neg_factor(fn.neg_factor() * factor), neg_gfactor(fn.neg_factor() * gfactor);
  FlatOut<scalar_t> out(p);
  for (int64_t i = begin; i < end; i += kGroup) {
    VecN<kN> vx, vt, l, g;
    bool negative = true;
    for (int j = 0; j < kN; ++j) {
      vx.v[j] = load_float(x + i + j * kLanes);
      vt.v[j] = load_float(t + i + j * kLanes);
      negative = negative && vt.v[j].zero_mask() == kAllZero;  // -0 counts as 0; NaN does not
    }
    if (negative) {
      fn.negative(vx, l, g);
      for (int j = 0; j < kN; ++j) {
        out.sum_neg = out.sum_neg + l.v[j];
        out.emit(i + j * kLanes, l.v[j], g.v[j], neg_factor, neg_gfactor);
      }
    } else {
      fn.dense(vx, vt, l, g);
      for (int j = 0; j < kN; ++j) {
        out.sum = out.sum + l.v[j];
        out.emit(i + j * kLanes, l.v[j], g.v[j], vfactor, vgfactor);
      }
    }
    out.step();
  }
  return out.result(fn.neg_factor());
}

// Processes elements [begin, end) of the grid; returns the unscaled sum of the
// weighted losses in that range (in a fixed order for a given range).
// The factors of the elementwise loss (scale / divisor) and of the gradient (the
// same, or grad_prescale), in the compute type.
template <class acc_t>
inline void output_factors(const FocalParams& p, acc_t& factor, acc_t& gfactor) {
  factor = static_cast<acc_t>(p.scale);
  if (p.divisor) factor = factor / *static_cast<const acc_t*>(p.divisor);
  gfactor = p.grad_prescale > 0 ? static_cast<acc_t>(p.grad_prescale) : factor;
}

template <class scalar_t, class target_t, class L>
double focal_range(const FocalParams& p, const L& fn, int64_t begin, int64_t end) {
  using Seg = Segment<scalar_t, target_t, L>;
  using acc_t = typename Seg::acc_t;
  acc_t factor, gfactor;
  output_factors(p, factor, gfactor);
  if constexpr (Seg::kVector) {
    if (p.labels && p.contiguous && p.input.col_stride == 1 && !p.weight.data) {
      return labels_flat<scalar_t, L>(p, fn, factor, gfactor, begin, end);
    }
  }
  Vec vsum(0.0f);
  double ssum = 0.0;
  int64_t i = begin;
  if constexpr (Seg::kVector) {
    if (!p.labels && p.contiguous && p.input.col_stride == 1 && p.target.col_stride == 1 && !p.weight.data) {
      constexpr int64_t kGroup = kFlatVectors * kLanes;
      i = begin + (end - begin) / kGroup * kGroup;
      ssum = dense_flat<scalar_t, target_t, L>(p, fn, factor, gfactor, begin, i);
    }
  }
  if constexpr (Seg::kVector) {
    // Weighted class labels with fewer classes than two vectors (C = 1..15; unweighted ones
    // took labels_flat above): rows are too short for row segments, so run flat over the
    // elements and build each vector's positive mask and weights lane by lane, carrying
    // (row, col) along.
    if (p.labels && p.contiguous && p.cols < 2 * kLanes && p.input.col_stride == 1) {
      const scalar_t* x = static_cast<const scalar_t*>(p.input.data);
      scalar_t* grad = static_cast<scalar_t*>(p.grad);
      scalar_t* loss = p.reduction == Reduction::None ? static_cast<scalar_t*>(p.loss) : nullptr;
      const float* w = static_cast<const float*>(p.weight.data);
      const Vec one(1.0f), vfactor(factor), vgfactor(gfactor);
      int64_t r = i / p.cols;
      int64_t c = i - r * p.cols;
      auto label_of = [&](int64_t row) {
        return p.target.kind == ScalarKind::Int32 ? read_label<int32_t>(p, row) : read_label<int64_t>(p, row);
      };
      int64_t label = label_of(r);
      const bool scores = p.scores.data != nullptr;
      for (; i + kLanes <= end; i += kLanes) {
        float posb[kLanes], wb[kLanes], sb[kLanes];
        for (int j = 0; j < kLanes; ++j) {
          posb[j] = c == label ? 1.0f : 0.0f;
          sb[j] = scores && c == label ? read_score<float>(p, r) : 0.0f;  // the class column's lane only
          const float wj = w ? w[r * p.weight.row_strides[0] + c * p.weight.col_stride] : 1.0f;
          wb[j] = label == p.ignore_index ? 0.0f : wj;
          if (++c == p.cols) {
            c = 0;
            if (++r < p.rows) label = label_of(r);
          }
        }
        Vec l, g;
        if (scores) {
          fn.labelled(load_float(x + i), Vec::loadu(posb) == one, Vec::loadu(sb), l, g);
        } else {
          fn.binary(load_float(x + i), Vec::loadu(posb) == one, l, g);
        }
        apply_weight(l, g, Vec::loadu(wb));
        vsum = vsum + l;
        if (grad) store_float(grad + i, g * vgfactor);
        if (loss) store_float(loss + i, l * vfactor);
        if (((i - begin) / kLanes) % 64 == 63) flush(vsum, ssum);
      }
    }
  }
  while (i < end) {
    const int64_t r = i / p.cols;
    const int64_t c0 = i - r * p.cols;
    const int64_t c1 = std::min<int64_t>(p.cols, c0 + (end - i));
    Seg::run(p, fn, factor, gfactor, r, c0, c1, vsum, ssum);
    i += c1 - c0;
  }
  flush(vsum, ssum);
  return ssum;
}

// ------------------------------------------------------------------ 16-bit logits
// float16 and bfloat16 logits run the float32 instantiations: kStageElems
// elements at a time, the logits (and 16-bit dense targets) are converted into
// float32 buffers laid out like the element grid, the float32 kernel runs on
// them, and its gradient (and elementwise loss) is converted back. The math is
// in float32 either way and every conversion rounds once, so the values are
// those a 16-bit instantiation of the kernel computes; the build has no 16-bit
// copy of the kernels (half of the CPU compile time went into them). The
// conversions run on L1-resident blocks: a few percent of the element's cost.
constexpr int64_t kStageElems = 3072;  // a multiple of the flat paths' group of vectors

// operand o's elements [b, e) of the grid, in storage type scalar_t, into dst[0, e - b) as float32
template <class scalar_t>
void stage_in(const FocalParams& p, const Operand& o, int64_t b, int64_t e, float* dst) {
  const scalar_t* src = static_cast<const scalar_t*>(o.data);
  for (int64_t i = b; i < e;) {  // one row segment [c0, c1) of row r per step
    int64_t off, stride, n;
    if (p.contiguous) {  // the grid is the tensor's layout
      off = i, stride = 1, n = e - i;
    } else {
      const int64_t r = i / p.cols, c0 = i - r * p.cols;
      n = std::min<int64_t>(p.cols - c0, e - i);
      off = row_offset(p, o, r) + c0 * o.col_stride, stride = o.col_stride;
    }
    float* out = dst + (i - b);
    int64_t j = 0;
    if (stride == 1) {
      for (; j + kLanes <= n; j += kLanes) load_float(src + off + j).store(out + j);
    }
    for (; j < n; ++j) out[j] = static_cast<float>(src[off + j * stride]);
    i += n;
  }
}

// src[0, n) into dst[0, n), rounded to scalar_t
template <class scalar_t>
void stage_out(const float* src, scalar_t* dst, int64_t n) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) store_float(dst + j, Vec::loadu(src + j));
  for (; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
}

// A float32 buffer that holds grid elements [b, b + kStageElems) as the
// address of element 0 (the kernels index operands by grid position).
inline void* grid_base(float* buf, int64_t b) {
  return reinterpret_cast<void*>(reinterpret_cast<std::uintptr_t>(buf) - static_cast<std::uintptr_t>(b) * sizeof(float));
}

// p with the logits (and 16-bit dense targets) described as float32 buffers
// laid out like the grid; the data pointers are set per block.
inline FocalParams staged_params(const FocalParams& p, bool stage_targets) {
  FocalParams q = p;
  auto grid_layout = [&](Operand& o) {
    o.kind = ScalarKind::Float32;
    o.col_stride = 1;
    int64_t stride = p.cols;
    for (int d = p.ndim - 1; d >= 0; --d) {
      o.row_strides[d] = stride;
      stride *= p.row_sizes[d];
    }
  };
  grid_layout(q.input);
  if (stage_targets) grid_layout(q.target);
  return q;
}

// run(q, b, e) per block; with_outputs: converts the gradient (and the
// elementwise loss) the kernel wrote back into the outputs.
template <class scalar_t, class Run>
void staged_blocks(const FocalParams& p, int64_t begin, int64_t end, bool with_outputs, Run&& run) {
  alignas(64) float xb[kStageElems], tb[kStageElems], gb[kStageElems], lb[kStageElems];
  const bool stage_targets = !p.labels && p.target.kind != ScalarKind::Float32;  // (else float32, read in place)
  FocalParams q = staged_params(p, stage_targets);
  scalar_t* grad = with_outputs ? static_cast<scalar_t*>(p.grad) : nullptr;
  scalar_t* loss = with_outputs && p.reduction == Reduction::None ? static_cast<scalar_t*>(p.loss) : nullptr;
  for (int64_t b = begin; b < end; b += kStageElems) {
    const int64_t e = std::min(end, b + kStageElems);
    stage_in<scalar_t>(p, p.input, b, e, xb);
    q.input.data = grid_base(xb, b);
    if (stage_targets) {
      stage_in<scalar_t>(p, p.target, b, e, tb);
      q.target.data = grid_base(tb, b);
    }
    q.grad = grad ? grid_base(gb, b) : nullptr;
    q.loss = loss ? grid_base(lb, b) : nullptr;
    if (p.contiguous) {  // the next block's logits and targets on their way while this one computes
      const int64_t nb = std::min(end, e + kStageElems);
      for (int64_t i = e; i < nb; i += 64 / sizeof(scalar_t)) {
        __builtin_prefetch(static_cast<const scalar_t*>(p.input.data) + i, 0, 2);
        if (stage_targets) __builtin_prefetch(static_cast<const scalar_t*>(p.target.data) + i, 0, 2);
      }
    }
    run(q, b, e);
    if (grad) stage_out(gb, grad + b, e - b);
    if (loss) stage_out(lb, loss + b, e - b);
  }
}

// Entry point with the same signature in every capability namespace: picks the
// instantiation for the member (and, for the focal loss, its gamma class), in
// float32 or float64; 16-bit logits are staged through float32.
inline double focal_range_dispatch(const FocalParams& p, int64_t begin, int64_t end) {
  auto run = [](auto acc_tag, const FocalParams& q, int64_t b, int64_t e) -> double {
    using acc_t = decltype(acc_tag);  // storage = compute type; dense targets arrive in it
    return with_loss<acc_t>(q, [&](const auto& fn) -> double {
      return focal_range<acc_t, acc_t, std::decay_t<decltype(fn)>>(q, fn, b, e);
    });
  };
  auto run_16bit = [&](auto scalar_tag) -> double {
    using S = decltype(scalar_tag);
    if constexpr (kFlat16) {
      // The plain focal loss on contiguous class labels without a weight (its hot path) keeps a
      // 16-bit instantiation of the flat label loop: staged, it measured 16-28% slower on a 2-core
      // AMD EPYC (the conversions are a tenth of that fast loop's work, and its DRAM reads no longer
      // overlap its math). Every other 16-bit call is staged.
      if (p.loss_kind == LossKind::Focal && p.labels && p.contiguous && p.input.col_stride == 1 && !p.weight.data) {
        return with_loss<float>(p, [&](const auto& fn) -> double {
          using L = std::decay_t<decltype(fn)>;
          if constexpr (is_focal<L>::value) {
            float factor, gfactor;
            output_factors(p, factor, gfactor);
            return labels_flat<S, L>(p, fn, factor, gfactor, begin, end);
          } else {
            return 0.0;  // (unreachable: p.loss_kind is Focal)
          }
        });
      }
    }
    double sum = 0.0;
    staged_blocks<S>(p, begin, end, true, [&](const FocalParams& q, int64_t b, int64_t e) { sum += run(float{}, q, b, e); });
    return sum;
  };
  switch (p.input.kind) {
    case ScalarKind::Float32:
      return run(float{}, p, begin, end);
    case ScalarKind::Float64:
      return run(double{}, p, begin, end);
    case ScalarKind::Float16:
      return run_16bit(c10::Half{});
    case ScalarKind::BFloat16:
      return run_16bit(c10::BFloat16{});
    default:
      return 0.0;  // rejected by the op layer
  }
}

// ------------------------------------------------------------------ GHM-C histogram
// GHM-C's first pass (losses/ghmc.h): over elements [begin, end), adds the valid
// elements of each bin to counts[0..B-1] and all valid elements (NaN logits
// included, as mmdet's tot) to counts[B]. Valid: a nonzero weight (the op passes
// label_weight > 0 as a 0/1 weight) and a label that is not ignore_index. The
// bins are those the loss pass (GHMC::weight_*) finds: binary targets (labels;
// dense y = 0 or 1) by exact comparisons of x' (x, or -x where y = 1) with the
// thresholds, soft dense targets by g = |p - y| against the edges.
//
// Float32 unit-stride runs take a vector at a time. Up to kGhmcCumBins bins:
// for each threshold k, how many lanes have x' >= t_k (bin b then holds
// cum_b - cum_b+1), no per-lane work: a compare and an integer subtract of the
// mask per threshold, every threshold (stopping at the vector's largest x', as
// most elements are easy negatives, measured slower: the branch costs more than
// the compares it saves). More bins: each lane's bin from the
// table's grid of cells in x' (one gather; a lane whose cell a threshold
// crosses takes the exact search), counted in per-lane tallies (no two
// consecutive increments hit the same counter, so they do not wait on each
// other). Everything else is counted element by element by the exact search.
constexpr int kGhmcCumBins = 64;

template <class acc_t>
struct GhmcCounter {
  static constexpr bool kVector = std::is_same_v<acc_t, float>;
#if defined(CPU_CAPABILITY_AVX2)
  using Count = __m256i;  // per-lane int32 counts
#else
  using Count = Vec;  // per-lane float counts (exact: a chunk puts at most 2^24 elements in a lane)
#endif
  const acc_t* t;     // thresholds t_0 .. t_B
  const acc_t* e;     // edges e_0 .. e_B
  const acc_t* grid;  // per cell: its bin, or -1
  int bins;
  bool cumulative;
  int64_t* direct;  // B bins, then the valid count
  // cumulative: per threshold k >= 1, the lanes' counts of x' >= t_k; cum[0]: valid lanes, not NaN
  Vec tv[kGhmcCumBins];
  Count cum[kGhmcCumBins];
  Count valid_count;
  // tallies, per lane: B bins, a slot for NaN logits (valid, in no bin), one for invalid lanes
  std::vector<uint32_t> tally;
  Vec origin, per_unit, top, nan_slot, invalid_slot;

  GhmcCounter(const acc_t* table, int b, int64_t* counts)
      : t(table + ghmc_thresholds_at(b)),
        e(table + ghmc_edges_at(b)),
        grid(table + ghmc_grid_at(b)),
        bins(b),
        cumulative(b <= kGhmcCumBins),
        direct(counts) {
    if constexpr (kVector) {
      if (cumulative) {
        for (int k = 0; k < bins; ++k) {
          tv[k] = Vec(static_cast<float>(t[k]));
          cum[k] = zero_count();
        }
        valid_count = zero_count();
      } else {
        tally.assign(static_cast<size_t>(kLanes) * (b + 2), 0u);
        origin = Vec(static_cast<float>(table[ghmc_grid_origin_at(b)]));
        per_unit = Vec(static_cast<float>(table[ghmc_grid_origin_at(b) + 1]));
        top = Vec(static_cast<float>(kGhmcGrid - 1));
        nan_slot = Vec(static_cast<float>(b));
        invalid_slot = Vec(static_cast<float>(b + 1));
      }
    }
  }

  static Count zero_count() {
#if defined(CPU_CAPABILITY_AVX2)
    return _mm256_setzero_si256();
#else
    return Vec(0.0f);
#endif
  }
  // c + 1 in the lanes where mask is set
  FOCAL_HD static Count count_if(Count c, Vec mask) {
#if defined(CPU_CAPABILITY_AVX2)
    return _mm256_sub_epi32(c, _mm256_castps_si256(mask));  // a set lane is -1
#else
    return c + (mask & Vec(1.0f));
#endif
  }
  static int64_t total(Count c) {
    int64_t s = 0;
#if defined(CPU_CAPABILITY_AVX2)
    int32_t lanes[kLanes];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), c);
    for (int j = 0; j < kLanes; ++j) s += lanes[j];
#else
    float lanes[kLanes];
    c.store(lanes);
    for (int j = 0; j < kLanes; ++j) s += static_cast<int64_t>(lanes[j]);
#endif
    return s;
  }

  int bin_logit(acc_t xp) const { return xp == xp ? ghmc_bin_exact(static_cast<double>(xp), t, bins) : -1; }
  int bin_soft(acc_t g) const { return g == g ? ghmc_bin_exact(static_cast<double>(g), e, bins) : -1; }
  void add_bin(int b) {
    ++direct[bins];
    if (b >= 0) ++direct[b];
  }
  // One valid element with target y (binary: 0 or 1; else soft).
  void element(acc_t x, acc_t y) {
    if (y == acc_t(0)) return add_bin(bin_logit(x));
    if (y == acc_t(1)) return add_bin(bin_logit(-x));
    const Logistic<acc_t> z = logistic<acc_t, acc_t>(x);
    const acc_t pmy = p_minus_y<acc_t, acc_t>(x, z, y);
    add_bin(bin_soft(pmy < acc_t(0) ? -pmy : pmy));
  }
  // A vector of binary-target elements x' (valid: a lane mask).
  FOCAL_HD void add(Vec xp, Vec valid) {
    if (cumulative) {
      valid_count = count_if(valid_count, valid);
      const Vec m = valid & (xp == xp);  // valid, not NaN
      cum[0] = count_if(cum[0], m);
      const Vec v = Vec::blendv(Vec(-INFINITY), xp, m);  // the others pass no threshold
      for (int k = 1; k < bins; ++k) cum[k] = count_if(cum[k], v >= tv[k]);
      return;
    }
    using O = MathOps<Vec>;
    const Vec c = (xp - origin) * per_unit;
    Vec code = O::gather(grid, O::select(O::lt(c, top), O::max(c, Vec(0.0f)), top));
    code = O::select(xp != xp, nan_slot, code);          // NaN: the NaN slot
    code = O::select(valid, code, invalid_slot);         // not valid: discarded
    if ((code < Vec(0.0f)).zero_mask() != (1 << kLanes) - 1) {  // a cell a threshold crosses: exact search
      float xb[kLanes], cb[kLanes];
      xp.store(xb);
      code.store(cb);
      for (int j = 0; j < kLanes; ++j) {
        if (cb[j] < 0.0f) cb[j] = static_cast<float>(ghmc_bin_exact(static_cast<double>(xb[j]), t, bins));
      }
      code = Vec::loadu(cb);
    }
    uint32_t* base = tally.data();
    int32_t idx[kLanes];
#if defined(CPU_CAPABILITY_AVX2)
    const __m256i lane_offset = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bins + 2));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx), _mm256_add_epi32(_mm256_cvttps_epi32(code), lane_offset));
#else
    float cb[kLanes];
    code.store(cb);
    for (int j = 0; j < kLanes; ++j) idx[j] = j * (bins + 2) + static_cast<int32_t>(cb[j]);
#endif
    for (int j = 0; j < kLanes; ++j) ++base[idx[j]];
  }
  // The vector counts into direct.
  void finish() {
    if constexpr (kVector) {
      if (cumulative) {
        int64_t next = 0;
        for (int k = bins - 1; k >= 0; --k) {
          const int64_t c = total(cum[k]);
          direct[k] += c - next;
          next = c;
        }
        direct[bins] += total(valid_count);
        return;
      }
      for (int j = 0; j < kLanes; ++j) {
        const uint32_t* lane = tally.data() + j * (bins + 2);
        for (int k = 0; k <= bins; ++k) {  // the bins, and the NaN slot: valid, in no bin
          if (k < bins) direct[k] += lane[k];
          direct[bins] += lane[k];
        }
      }
    }
  }
};

template <class scalar_t>
void ghmc_hist_range_t(const FocalParams& p, int64_t begin, int64_t end, int64_t* counts) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int bins = static_cast<int>(p.options.bins);
  GhmcCounter<acc_t> cnt(static_cast<const acc_t*>(p.options.table), bins, counts);
  const int64_t xcs = p.input.col_stride, tcs = p.target.col_stride, wcs = p.weight.col_stride;
  int64_t r = begin / p.cols;
  int64_t c0 = begin - r * p.cols;
  for (int64_t i = begin; i < end; ++r, c0 = 0) {  // one row segment [c0, c1) of row r per step
    const int64_t c1 = std::min<int64_t>(p.cols, c0 + (end - i));
    i += c1 - c0;
    int64_t ox, ot, ow;
    if (p.contiguous) {
      ox = r * p.cols;
      ot = p.labels ? r : r * p.cols;
      ow = p.ndim == 0 ? 0 : r * p.weight.row_strides[0];
    } else {
      row_offsets(p, r, ox, ot, ow);
    }
    const scalar_t* x = static_cast<const scalar_t*>(p.input.data) + ox;
    const acc_t* t = p.labels ? nullptr : static_cast<const acc_t*>(p.target.data) + ot;
    const acc_t* w = p.weight.data ? static_cast<const acc_t*>(p.weight.data) + ow : nullptr;
    int64_t label = -1;
    if (p.labels) {
      label = p.target.kind == ScalarKind::Int32 ? read_label<int32_t>(p, ot) : read_label<int64_t>(p, ot);
      if (label == p.ignore_index || label < 0 || label > p.num_classes) continue;  // (bad labels: checked before)
    }
    int64_t c = c0;
    if constexpr (GhmcCounter<acc_t>::kVector) {
      if (xcs == 1 && (p.labels || tcs == 1) && (!w || wcs == 0 || wcs == 1)) {
        const Vec zero(0.0f), one(1.0f), all = Vec(0.0f) == Vec(0.0f);
        const Vec lanes = Vec::arange(0.0f, 1.0f);
        for (; c + kLanes <= c1; c += kLanes) {
          const Vec vx = load_float(x + c);
          Vec valid = all;
          if (w) valid = (wcs == 0 ? Vec(w[0]) : Vec::loadu(w + c)) != zero;
          if (p.labels) {
            if (label >= c && label < c + kLanes) {  // the positive column: counted on its own
              if (!w || w[label * wcs] != acc_t(0)) cnt.add_bin(cnt.bin_logit(-static_cast<acc_t>(x[label])));
              valid = valid & ((Vec(static_cast<float>(c)) + lanes) != Vec(static_cast<float>(label)));
            }
            cnt.add(vx, valid);
          } else {
            const Vec y = Vec::loadu(t + c);
            const Vec is1 = y == one;
            const Vec binary = (y == zero) | is1;  // lanes all ones, or 0 (a soft target)
            if (binary.zero_mask() != 0) {  // some soft targets: those lanes one by one
              float vb[kLanes], bb[kLanes];
              valid.store(vb);
              binary.store(bb);
              for (int j = 0; j < kLanes; ++j) {
                uint32_t vbits, bbits;
                std::memcpy(&vbits, &vb[j], 4);
                std::memcpy(&bbits, &bb[j], 4);
                if (vbits && !bbits) cnt.element(static_cast<acc_t>(x[c + j]), t[c + j]);
              }
              valid = valid & binary;
            }
            cnt.add(Vec::blendv(vx, zero - vx, is1), valid);
          }
        }
      }
    }
    for (; c < c1; ++c) {
      if (w && w[c * wcs] == acc_t(0)) continue;
      const acc_t xv = static_cast<acc_t>(x[c * xcs]);
      if (p.labels) {
        cnt.add_bin(cnt.bin_logit(c == label ? -xv : xv));
      } else {
        cnt.element(xv, t[c * tcs]);
      }
    }
  }
  cnt.finish();
}

// Entry point with the same signature in every capability namespace (16-bit
// logits staged through float32, as for the loss pass).
inline void ghmc_hist_dispatch(const FocalParams& p, int64_t begin, int64_t end, int64_t* counts) {
  auto staged = [&](const FocalParams& q, int64_t b, int64_t e) { ghmc_hist_range_t<float>(q, b, e, counts); };
  switch (p.input.kind) {
    case ScalarKind::Float16:
      return staged_blocks<c10::Half>(p, begin, end, false, staged);
    case ScalarKind::BFloat16:
      return staged_blocks<c10::BFloat16>(p, begin, end, false, staged);
    case ScalarKind::Float32:
      return ghmc_hist_range_t<float>(p, begin, end, counts);
    case ScalarKind::Float64:
      return ghmc_hist_range_t<double>(p, begin, end, counts);
    default:
      return;  // rejected by the op layer
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace focal
