// The focal-loss family: every member is a functor, a template parameter of the
// CPU and CUDA kernels (which are written once, for any member). Adding a
// member = its header here, a LossKind (core/params.h), a line in with_loss
// below, its Python face and tests.
//
// A member L<S> (S: the compute type, float or double) provides:
//   static L make(const LossOptions&)     its options, converted on the host;
//   S neg_factor() const                  the constant factor of its y = 0 form;
//   negative(x, l, g)                     loss and d loss/dx for y = 0, without
//                                         neg_factor: the all-negative packs of a
//                                         label row (almost all of them) and the
//                                         all-zero steps of dense targets; the
//                                         kernels fold neg_factor into their
//                                         output factors;
//   binary(x, pos, l, g)                  labels without scores: y = 1 where pos;
//   labelled(x, pos, s, l, g)             (labels, scores): y = s where pos, the
//                                         label's column (a positive even when
//                                         s = 0), else 0;
//   dense(x, y, l, g)                     a floating target y;
// each templated on T (a scalar, or a CPU vector type, with MathOps<T>) and
// FOCAL_HD. For every member negative(x) * neg_factor equals labelled(x, false, .)
// and dense(x, 0) up to rounding, which the tests check.
#pragma once

#include <type_traits>

#include "../core/params.h"
#include "focal.h"
#include "focal_smooth.h"
#include "focal_star.h"
#include "ghmc.h"
#include "iou_aware_bce.h"
#include "quality_focal.h"
#include "varifocal.h"

namespace focal {

// The plain focal loss keeps its own instantiations for every target dtype (int32
// and int64 labels; 16-bit dense targets besides float32); the other members are
// built for int64 labels and dense targets in the compute type only (the op layer
// converts others: the labels and scores are 1/C of the logits), which keeps the
// build within its budget.
template <class L>
struct is_focal : std::false_type {};
template <int GK, class S>
struct is_focal<Focal<GK, S>> : std::true_type {};

// Calls f(member) with p's member, its options converted to S. gamma = 2 has its
// own focal instantiation, except in float64 (gradcheck's dtype: one general one).
template <class S, class F>
decltype(auto) with_loss(const FocalParams& p, F&& f) {
  const LossOptions& o = p.options;
  switch (p.loss_kind) {
    case LossKind::FocalSmooth:
      return f(FocalSmooth<S>::make(o));
    case LossKind::QualityFocal:
      return f(QualityFocal<S>::make(o));
    case LossKind::Varifocal:
      return f(Varifocal<S>::make(o));
    case LossKind::FocalStar:
      return f(FocalStar<S>::make(o));
    case LossKind::IoUAwareBCE:
      return f(IoUAwareBCE<S>::make(o));
    case LossKind::GHMC:
      return f(GHMC<S>::make(o));
    case LossKind::Focal:
    default:
      if constexpr (!std::is_same_v<S, double>) {
        if (small_integer(o.gamma) == 2) return f(Focal<kGammaTwo, S>::make(o));
      }
      return f(Focal<kGammaAny, S>::make(o));
  }
}

}  // namespace focal
