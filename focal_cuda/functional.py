"""The public functional API: ``focal_cuda.sigmoid_focal_loss``."""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import _checks
from .ops import fused_forward

FP16_GRAD_PRESCALE = 256.0


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    *,
    weight: Optional[torch.Tensor] = None,
    normalizer: Optional[Union[float, torch.Tensor]] = None,
    ignore_index: int = -1,
    validate: bool = False,
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017), fused: one pass computes the loss and its gradient.

    Args:
        inputs: logits ``[..., C]``; float16, bfloat16, float32 or float64; any strides; CPU or CUDA.
        targets: either floating, same shape as ``inputs`` (0/1 or soft targets, torchvision's form),
            or int32/int64 class indices of shape ``inputs.shape[:-1]``: ``0..C-1`` marks that class
            positive, ``C`` is background (all C negative), ``ignore_index`` is ignored.
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

    Returns:
        The loss, in the dtype of ``inputs``: shape of ``inputs`` for ``"none"``, else 0-d. Under
        ``torch.autocast`` a reduced (0-d) loss is float32, as PyTorch's own losses are.
    """
    return _sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction, weight, normalizer, ignore_index, validate)


def _sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction, weight, normalizer, ignore_index, validate,
                        weight_name="weight"):
    plan = _checks.check(inputs, targets, alpha, gamma, reduction, weight, normalizer, ignore_index, weight_name)
    if validate and plan.labels:
        _checks.validate_labels(targets, inputs.shape[-1], int(ignore_index))
    compute_grad = inputs.requires_grad and torch.is_grad_enabled()
    # float16 cannot hold a gradient divided by a normaliser and later multiplied by a loss scale
    # (GradScaler): its gradient is stored unnormalised, times 2^8 to keep gradients down to ~2e-10
    # above float16's underflow (|dFL/dx| <= 1 + gamma/e stays far below its 65504), and backward
    # scales it once, in float32. With a weight (of unknown size) no headroom is taken.
    prescale = 0.0
    if compute_grad and inputs.dtype == torch.float16:
        prescale = 1.0 if weight is not None else FP16_GRAD_PRESCALE
    # under autocast a reduced loss comes back in float32 (the op's autocast rule does the same for
    # torch.ops callers; deciding it here keeps the eager fast path off the Python autocast kernel)
    acc_loss = plan.reduction != _checks.REDUCE_NONE and torch.is_autocast_enabled(inputs.device.type)
    return fused_forward(
        inputs,
        targets,
        weight,
        plan.divisor,
        float(plan.scale),
        float(alpha),
        float(gamma),
        plan.reduction,
        int(ignore_index),
        compute_grad,
        prescale,
        acc_loss,
    )
