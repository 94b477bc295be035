"""Online hard example mining for one-stage detectors (SSD's 3:1 hard negatives; the RetinaNet paper's
Table 1 baseline), selected on the device.

Per image: every positive anchor, plus the background anchors of highest summed BCE, up to
``neg_pos_ratio`` times the image's positives (at least one). The ranking is a stable sort of the
detached logits' per-anchor BCE; the loss and its gradient over the selected anchors are one fused
pass (the focal-loss kernel with gamma = 0 and no alpha: the plain sigmoid BCE). Nothing is read back
to the host.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from . import _checks
from .ops import FWD, fused_forward


def hard_negative_mask(inputs: torch.Tensor, labels: torch.Tensor, neg_pos_ratio: float = 3.0) -> torch.Tensor:
    """The anchors OHEM keeps, ``[B, A]`` bool: positives (``0 <= label < C``) and, per image, the
    ``max(1, floor(neg_pos_ratio * positives))`` background anchors (``label == C``) whose summed BCE
    ``sum_c softplus(x_c)`` is highest (ties: the lower anchor index first)."""
    C = inputs.shape[-1]
    with torch.no_grad():
        pos = (labels >= 0) & (labels < C)
        neg = labels == C
        k = torch.floor(pos.sum(1).to(torch.float64) * float(neg_pos_ratio)).to(torch.int64).clamp_min(1)
        score = F.softplus(inputs.detach().float()).sum(-1)  # a background anchor's BCE
        score = score.masked_fill(~neg, -float("inf"))
        order = torch.sort(score, dim=1, descending=True, stable=True).indices
        ranks = torch.arange(labels.shape[1], device=labels.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, ranks)
        return pos | (neg & (rank < k.unsqueeze(1)))


def ohem_loss(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    neg_pos_ratio: float = 3.0,
    reduction: str = "sum",
    normalizer: Optional[Union[float, torch.Tensor]] = None,
    ignore_index: int = -1,
    *,
    validate: bool = False,
) -> torch.Tensor:
    """Sigmoid BCE over the anchors OHEM selects (``hard_negative_mask``), fused.

    Args:
        inputs: logits ``[B, A, C]`` (float16, bfloat16, float32, float64; CPU or CUDA).
        labels: int32/int64 ``[B, A]``: ``0..C-1`` a positive of that class, ``C`` background,
            ``ignore_index`` neither (never selected).
        neg_pos_ratio: background anchors kept per positive (> 0); at least one per image.
        reduction: ``"sum"``, ``"mean"`` (over the selected anchors' elements) or ``"none"``
            (``[B, A, C]``, zero where not selected).
        normalizer: ``"sum"`` only: divide by it (a number or a 1-element tensor on the device, e.g.
            the number of positives).
        validate: check every label (synchronises) and raise ValueError on one outside ``[0, C]``.

    Returns:
        The loss in the inputs' dtype (float32 under autocast for a reduced loss)."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 3:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"inputs: expected logits of shape [B, A, C], got {shape}")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in _checks.LABEL_DTYPES:
        what = f"dtype {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"labels: expected int32/int64 class indices of shape [B, A], got {what}")
    if not _checks._is_real(neg_pos_ratio) or not 0 < neg_pos_ratio < _checks.INF:
        raise ValueError(f"neg_pos_ratio: expected a finite number > 0, got {neg_pos_ratio!r}")
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction: expected 'sum', 'mean' or 'none', got {reduction!r}")
    if normalizer is not None and reduction != "sum":
        raise ValueError(f"normalizer: only with reduction='sum', got reduction={reduction!r}")
    plan = _checks.check(inputs, labels, "none" if reduction == "none" else "sum", None, normalizer, ignore_index)
    C = inputs.shape[-1]
    if validate:
        _checks.validate_labels(labels, C, int(ignore_index))
    selected = hard_negative_mask(inputs, labels, neg_pos_ratio)
    acc = _checks.compute_dtype(inputs.dtype)
    weight = selected.unsqueeze(-1).to(acc)
    divisor, scale = plan.divisor, plan.scale
    if reduction == "mean":
        divisor = (selected.sum() * C).clamp_min(1).to(acc)
    compute_grad = inputs.requires_grad and torch.is_grad_enabled()
    prescale = 1.0 if compute_grad and inputs.dtype == torch.float16 else 0.0
    acc_loss = reduction != "none" and torch.is_autocast_enabled(inputs.device.type)
    # the focal loss with gamma = 0 and alpha off is the sigmoid BCE
    return fused_forward(FWD["sigmoid_focal_loss_fwd"], inputs, plan.targets, None, weight, divisor, float(scale),
                         plan.reduction, int(ignore_index), compute_grad, prescale, acc_loss, -1.0, 0.0, 0.0)
