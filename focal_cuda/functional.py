"""The public functions of the focal-loss family, one fused op call each.

Every member takes the same target forms and the same shared options:

* ``targets``: floating, the shape of ``inputs`` (y per element, soft values allowed); int32/int64
  class indices of shape ``inputs.shape[:-1]`` (``0..C-1`` that class, ``C`` background,
  ``ignore_index`` ignored); or a tuple ``(labels, scores)``: y is the anchor's score in its label's
  column, 0 elsewhere (the score of a background or ignored anchor is never read);
* ``reduction``: ``"none"`` | ``"mean"`` (over the elements not ignored) | ``"sum"``;
* ``weight`` per element, anchor ``[..., 1]`` or class ``[C]``; ``normalizer`` (a number or a
  1-element tensor, read on the device: ``sum / normalizer``); ``ignore_index``; ``validate``.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import _checks
from .ops import FWD, fused_forward

Targets = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]
Normalizer = Optional[Union[float, torch.Tensor]]

# float16 cannot hold a gradient divided by a normaliser and later multiplied by a loss scale
# (GradScaler): its gradient is stored unnormalised, times 2^8 to keep gradients down to ~2e-10
# above float16's underflow (every member's |d loss/dx| is at most a few units, times its largest
# option scale, far below float16's 65504), and backward scales it once, in float32. With a weight
# (of unknown size) no headroom is taken.
FP16_GRAD_PRESCALE = 256.0


def _run(op, inputs, targets, reduction, weight, normalizer, ignore_index, validate, options,
         weight_name="weight", grad_bound=1.0) -> torch.Tensor:
    plan = _checks.check(inputs, targets, reduction, weight, normalizer, ignore_index, weight_name)
    if validate and plan.labels:
        _checks.validate_labels(plan.targets, inputs.shape[-1], int(ignore_index))
    compute_grad = inputs.requires_grad and torch.is_grad_enabled()
    prescale = 0.0
    if compute_grad and inputs.dtype == torch.float16:
        prescale = 1.0 if weight is not None else FP16_GRAD_PRESCALE / (grad_bound if grad_bound > 1 else 1.0)
    # under autocast a reduced loss comes back in float32 (the op's autocast rule does the same for
    # torch.ops callers; deciding it here keeps the eager fast path off the Python autocast kernel)
    acc_loss = plan.reduction != _checks.REDUCE_NONE and torch.is_autocast_enabled(inputs.device.type)
    return fused_forward(op, inputs, plan.targets, plan.scores, weight, plan.divisor, float(plan.scale),
                         plan.reduction, int(ignore_index), compute_grad, prescale, acc_loss, *options)


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: Targets,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    *,
    weight: Optional[torch.Tensor] = None,
    normalizer: Normalizer = None,
    ignore_index: int = -1,
    validate: bool = False,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017), fused: one pass computes the loss and its gradient.

    ``FL = alpha_t (1 - p_t)^gamma BCE(x, y)``, p = sigmoid(x), p_t = p y + (1-p)(1-y),
    alpha_t = alpha y + (1-alpha)(1-y). With ``label_smoothing`` s the cross-entropy takes the
    smoothed target y (1 - s) + s/2 (EfficientDet); alpha_t and p_t keep the unsmoothed y.

    Args:
        inputs: logits ``[..., C]``; float16, bfloat16, float32 or float64; any strides; CPU or CUDA.
        targets: dense (torchvision's form), class indices, or ``(labels, scores)`` (module docstring).
        alpha: weight of positives in ``[0, 1]``; negatives get ``1 - alpha``; ``-1`` disables it
            (as in torchvision, any other value raises ValueError).
        gamma: focusing parameter, any real ``>= 0``.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``. ``"mean"`` divides by the number of elements
            that are not ignored (at least 1).
        weight: optional tensor broadcastable to ``inputs``: per element ``[..., C]``, per anchor
            ``[..., 1]`` or per class ``[C]``. A zero weight gives an exact zero loss and gradient.
        normalizer: optional number or 0-d/1-element tensor on the inputs' device; the result (and the
            gradient) is divided by it, without a host synchronisation. Not with ``"mean"``.
        ignore_index: label targets only; those anchors give zero loss and zero gradient.
        validate: label targets only; check every label explicitly (synchronises with the device) and
            raise ValueError on one outside ``[0, C]``. On CPU labels are always checked; on CUDA a bad
            label otherwise turns the loss NaN.
        label_smoothing: in ``[0, 1]``.

    Returns:
        The loss, in the dtype of ``inputs``: shape of ``inputs`` for ``"none"``, else 0-d. Under
        ``torch.autocast`` a reduced (0-d) loss is float32, as PyTorch's own losses are.
    """
    _checks.check_focal_options(alpha, gamma, label_smoothing)
    return _run(FWD["sigmoid_focal_loss_fwd"], inputs, targets, reduction, weight, normalizer, ignore_index,
                validate, (float(alpha), float(gamma), float(label_smoothing)))


def quality_focal_loss(
    inputs: torch.Tensor,
    targets: Targets,
    beta: float = 2.0,
    reduction: str = "none",
    *,
    weight: Optional[torch.Tensor] = None,
    normalizer: Normalizer = None,
    ignore_index: int = -1,
    validate: bool = False,
) -> torch.Tensor:
    """Quality focal loss (GFL; mmdet's QualityFocalLoss): ``|y - p|^beta BCE(x, y)``, one formula for
    every element; ``(labels, scores)`` targets give y = the IoU score in the label's column. beta >= 0.
    Other arguments as in ``sigmoid_focal_loss``."""
    _checks.check_quality_focal_options(beta)
    return _run(FWD["quality_focal_loss_fwd"], inputs, targets, reduction, weight, normalizer, ignore_index,
                validate, (float(beta),))


def varifocal_loss(
    inputs: torch.Tensor,
    targets: Targets,
    alpha: float = 0.75,
    gamma: float = 2.0,
    reduction: str = "none",
    *,
    iou_weighted: bool = True,
    detach_weight: bool = False,
    weight: Optional[torch.Tensor] = None,
    normalizer: Normalizer = None,
    ignore_index: int = -1,
    validate: bool = False,
) -> torch.Tensor:
    """Varifocal loss (VarifocalNet; RT-DETR; ultralytics): ``w BCE(x, y)`` with ``w = y`` for a
    positive (``1`` if not ``iou_weighted``) and ``alpha |p - y|^gamma`` otherwise.

    A positive is the label's column for label targets (also with a score of 0: weight 0, as
    RT-DETR does), ``y > 0`` for dense targets (as mmdet). ``detach_weight=True``: the gradient
    treats w as a constant (RT-DETR, HF transformers); False: the full derivative (VarifocalNet,
    mmdet, ultralytics). alpha >= 0 scales the negatives. Other arguments as in ``sigmoid_focal_loss``."""
    _checks.check_varifocal_options(alpha, gamma, iou_weighted, detach_weight)
    return _run(FWD["varifocal_loss_fwd"], inputs, targets, reduction, weight, normalizer, ignore_index, validate,
                (float(alpha), float(gamma), iou_weighted, detach_weight), grad_bound=alpha)


def sigmoid_focal_loss_star(
    inputs: torch.Tensor,
    targets: Targets,
    alpha: float = -1.0,
    gamma: float = 1.0,
    beta: float = 0.0,
    reduction: str = "none",
    *,
    weight: Optional[torch.Tensor] = None,
    normalizer: Normalizer = None,
    ignore_index: int = -1,
    validate: bool = False,
) -> torch.Tensor:
    """FL* (the RetinaNet paper's appendix; fvcore's ``sigmoid_focal_loss_star``):
    ``alpha_t (-log sigmoid(gamma y' x + beta)) / gamma``, ``y' = 2y - 1``. gamma > 0; alpha in
    ``[0, 1]`` or -1 (none). Other arguments as in ``sigmoid_focal_loss``."""
    _checks.check_focal_star_options(alpha, gamma, beta)
    return _run(FWD["sigmoid_focal_loss_star_fwd"], inputs, targets, reduction, weight, normalizer, ignore_index,
                validate, (float(alpha), float(gamma), float(beta)))


def iou_aware_bce_loss(
    inputs: torch.Tensor,
    targets: Targets,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    *,
    weight: Optional[torch.Tensor] = None,
    normalizer: Normalizer = None,
    ignore_index: int = -1,
    validate: bool = False,
) -> torch.Tensor:
    """IoU-aware BCE (LW-DETR, RF-DETR): a positive gets ``BCE(x, t)`` with
    ``t = max(p^alpha y^(1-alpha), 0.01)`` taken as a constant; the others ``p^gamma softplus(x)``
    (full derivative). A positive is the label's column (also with a score of 0), or ``y > 0`` for
    dense targets. alpha in ``[0, 1]``. Other arguments as in ``sigmoid_focal_loss``."""
    _checks.check_iou_aware_bce_options(alpha, gamma)
    return _run(FWD["iou_aware_bce_loss_fwd"], inputs, targets, reduction, weight, normalizer, ignore_index,
                validate, (float(alpha), float(gamma)))
