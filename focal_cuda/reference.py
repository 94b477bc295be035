"""The same API as ``focal_cuda.sigmoid_focal_loss`` in plain, unfused PyTorch.

This is the oracle the tests compare against (usually run in float64) and the
eager baseline the benchmarks race. The per-element formula is torchvision's
``sigmoid_focal_loss``, written out from the paper; labels become a one-hot
tensor, ignored anchors and zero weights are masked to exact zeros, and the
reductions follow focal_cuda's documented semantics.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from . import _checks


def focal_terms(inputs: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Elementwise focal loss, torchvision's formula, on dense targets of the inputs' shape."""
    p = torch.sigmoid(inputs)
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss


def one_hot_labels(labels: torch.Tensor, num_classes: int, ignore_index: int, dtype: torch.dtype):
    """Dense 0/1 targets from class indices (C = background) and the mask of anchors that count."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.full_like(labels, num_classes)).long()
    dense = F.one_hot(safe, num_classes + 1)[..., :num_classes].to(dtype)
    return dense, valid


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
    validate: bool = True,
) -> torch.Tensor:
    plan = _checks.check(inputs, targets, alpha, gamma, reduction, weight, normalizer, ignore_index)
    num_classes = inputs.shape[-1]
    valid = None
    if plan.labels:
        if validate:
            _checks.validate_labels(targets, num_classes, int(ignore_index))
        dense, valid = one_hot_labels(targets, num_classes, int(ignore_index), inputs.dtype)
    else:
        dense = targets.to(inputs.dtype)
    loss = focal_terms(inputs, dense, alpha, gamma)
    if weight is not None:
        w = weight.to(loss.dtype)
        loss = torch.where(w != 0, loss * w, torch.zeros_like(loss))
    if valid is not None:
        loss = torch.where(valid.unsqueeze(-1), loss, torch.zeros_like(loss))
    if plan.reduction == _checks.REDUCE_SUM:
        loss = loss.sum()
    if plan.divisor is not None:
        loss = loss / plan.divisor.to(loss.dtype)
    if plan.scale != 1.0:
        loss = loss * plan.scale
    return loss
