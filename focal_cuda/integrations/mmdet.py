"""mmdetection-style focal loss on top of focal_cuda (mmdet itself is not needed).

mmdet's ``FocalLoss(use_sigmoid=True, gamma, alpha, reduction, loss_weight)`` is called as
``loss(pred [N, C], target [N], weight=None, avg_factor=None, reduction_override=None)`` with class
indices whose background is ``C``, per-anchor (``[N]``) or per-element (``[N, C]``) weights, and
``avg_factor`` (usually the number of positive anchors, averaged across GPUs) as the divisor of
the summed loss. ``MMDetFocalLoss`` takes the same call and maps it onto one fused call:

  reduction 'mean' + avg_factor -> sum / (avg_factor + eps)       (mmdet adds float32 eps)
  reduction 'mean'              -> mean over all N * C elements
  reduction 'sum'               -> sum;  'none' -> elementwise [N, C]
  all multiplied by loss_weight; avg_factor may be a device tensor (no host synchronisation).

``register_with_mmdet()`` adds it to mmdet's MODELS registry as 'FocalCudaLoss' when mmdet is
installed, so configs can say ``loss_cls=dict(type='FocalCudaLoss', gamma=2.0, alpha=0.25, ...)``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..functional import sigmoid_focal_loss

EPS = torch.finfo(torch.float32).eps


class MMDetFocalLoss(nn.Module):
    def __init__(self, use_sigmoid: bool = True, gamma: float = 2.0, alpha: float = 0.25,
                 reduction: str = "mean", loss_weight: float = 1.0, ignore_index: int = -1):
        super().__init__()
        if not use_sigmoid:
            raise ValueError("use_sigmoid: focal_cuda implements the sigmoid focal loss only (use_sigmoid=True)")
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        self.reduction = reduction
        self.loss_weight = float(loss_weight)
        self.ignore_index = int(ignore_index)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                avg_factor: Optional[Union[float, torch.Tensor]] = None,
                reduction_override: Optional[str] = None) -> torch.Tensor:
        reduction = reduction_override or self.reduction
        if weight is not None and weight.dim() == pred.dim() - 1:
            weight = weight.unsqueeze(-1)  # per-anchor weights broadcast over the classes
        if reduction == "mean" and avg_factor is not None:
            loss = sigmoid_focal_loss(pred, target, self.alpha, self.gamma, "sum", weight=weight,
                                      normalizer=avg_factor + EPS, ignore_index=self.ignore_index)
        else:
            loss = sigmoid_focal_loss(pred, target, self.alpha, self.gamma, reduction, weight=weight,
                                      ignore_index=self.ignore_index)
        return loss * self.loss_weight if self.loss_weight != 1.0 else loss


def register_with_mmdet(name: str = "FocalCudaLoss") -> bool:
    """Register MMDetFocalLoss in mmdet's MODELS registry; False if mmdet is not installed."""
    try:
        from mmdet.registry import MODELS  # type: ignore
    except ImportError:
        return False
    MODELS.register_module(name=name, module=MMDetFocalLoss, force=True)
    return True
