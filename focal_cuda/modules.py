"""``SigmoidFocalLoss``: the functional API as an ``nn.Module``."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from . import _checks
from .functional import _sigmoid_focal_loss


class SigmoidFocalLoss(nn.Module):
    """Fused sigmoid focal loss module.

    Args:
        alpha, gamma, reduction, ignore_index: as in ``focal_cuda.sigmoid_focal_loss``; checked here,
            when the module is built.
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
        _checks.check_options(alpha, gamma, reduction, ignore_index)
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.reduction = reduction
        self.ignore_index = int(ignore_index)
        self.register_buffer("class_weight", _class_weight(class_weight))

    def forward(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        normalizer: Optional[Union[float, torch.Tensor]] = None,
    ) -> torch.Tensor:
        if weight is not None and self.class_weight is not None:
            raise ValueError("weight: this module has a class_weight; pass one or the other, not both")
        class_weight = weight is None and self.class_weight is not None
        return _sigmoid_focal_loss(
            inputs,
            targets,
            self.alpha,
            self.gamma,
            self.reduction,
            self.class_weight if class_weight else weight,
            normalizer,
            self.ignore_index,
            False,
            "class_weight" if class_weight else "weight",
        )

    def extra_repr(self) -> str:
        text = f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"
        if self.class_weight is not None:
            text += f", class_weight={_describe(self.class_weight)}"
        return text


def _class_weight(class_weight) -> Optional[torch.Tensor]:
    if class_weight is None:
        return None
    try:
        w = torch.as_tensor(class_weight)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"class_weight: expected a 1-d floating tensor of per-class weights, got {type(class_weight).__name__}"
        ) from None
    if not w.dtype.is_floating_point:
        if w.dtype == torch.bool or w.is_complex():
            raise TypeError(f"class_weight: expected a 1-d floating tensor of per-class weights, got dtype {w.dtype}")
        w = w.to(torch.get_default_dtype())
    if w.dim() != 1:
        raise ValueError(f"class_weight: expected one weight per class, shape (C,), got shape {tuple(w.shape)}")
    return w


def _describe(w: torch.Tensor) -> str:
    if w.numel() <= 8:
        return "[" + ", ".join(f"{v:g}" for v in w.tolist()) + "]"
    return f"<{w.numel()} per-class weights, {w.dtype}, {w.device}>"
