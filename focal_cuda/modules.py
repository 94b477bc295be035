"""``SigmoidFocalLoss``: the functional API as an ``nn.Module``."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .functional import sigmoid_focal_loss


class SigmoidFocalLoss(nn.Module):
    """Fused sigmoid focal loss module.

    Args:
        alpha, gamma, reduction, ignore_index: as in ``focal_cuda.sigmoid_focal_loss``.
        class_weight: optional per-class weights ``[C]``, kept as a buffer (moves with ``.to()``).

    ``forward(inputs, targets, weight=None, normalizer=None)``; ``weight`` is per call and may not be
    combined with ``class_weight``.
    """

    def __init__(
        self,
        alpha: float = 0.25,
        gamma: float = 2.0,
        reduction: str = "none",
        ignore_index: int = -1,
        class_weight: Optional[torch.Tensor] = None,
    ) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.reduction = reduction
        self.ignore_index = int(ignore_index)
        self.register_buffer("class_weight", None if class_weight is None else torch.as_tensor(class_weight))

    def forward(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        normalizer: Optional[Union[float, torch.Tensor]] = None,
    ) -> torch.Tensor:
        if weight is not None and self.class_weight is not None:
            raise ValueError("weight: this module has a class_weight; pass one or the other, not both")
        return sigmoid_focal_loss(
            inputs,
            targets,
            self.alpha,
            self.gamma,
            self.reduction,
            weight=self.class_weight if weight is None else weight,
            normalizer=normalizer,
            ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"
