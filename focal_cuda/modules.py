"""The family's functions as ``nn.Module``s: options checked when the module is built, per-class
weights kept as a buffer (they move with ``.to()``)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from . import _checks
from .functional import _run
from .ops import FWD


class _FamilyLoss(nn.Module):
    """What every member's module shares. ``forward(inputs, targets, weight=None, normalizer=None)``;
    ``weight`` is per call and may not be combined with ``class_weight``."""

    _op_name = ""

    def __init__(self, reduction: str, ignore_index: int, class_weight: Optional[torch.Tensor]) -> None:
        super().__init__()
        _checks.check_common(reduction, ignore_index)
        self.reduction = reduction
        self.ignore_index = int(ignore_index)
        self.register_buffer("class_weight", _class_weight(class_weight))

    def _options(self) -> tuple:
        raise NotImplementedError

    def _grad_bound(self) -> float:
        return 1.0

    def forward(
        self,
        inputs: torch.Tensor,
        targets,
        weight: Optional[torch.Tensor] = None,
        normalizer: Optional[Union[float, torch.Tensor]] = None,
    ) -> torch.Tensor:
        if weight is not None and self.class_weight is not None:
            raise ValueError("weight: this module has a class_weight; pass one or the other, not both")
        class_weight = weight is None and self.class_weight is not None
        return _run(FWD[self._op_name], inputs, targets, self.reduction, self.class_weight if class_weight else weight,
                    normalizer, self.ignore_index, False, self._options(),
                    "class_weight" if class_weight else "weight", self._grad_bound())

    def _describe_options(self) -> str:
        raise NotImplementedError

    def extra_repr(self) -> str:
        text = f"{self._describe_options()}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"
        if self.class_weight is not None:
            text += f", class_weight={_describe(self.class_weight)}"
        return text


class SigmoidFocalLoss(_FamilyLoss):
    """``focal_cuda.sigmoid_focal_loss`` as a module (alpha, gamma, reduction, ignore_index,
    class_weight ``[C]``, label_smoothing)."""

    _op_name = "sigmoid_focal_loss_fwd"

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none", ignore_index: int = -1,
                 class_weight: Optional[torch.Tensor] = None, label_smoothing: float = 0.0) -> None:
        super().__init__(reduction, ignore_index, class_weight)
        _checks.check_focal_options(alpha, gamma, label_smoothing)
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)

    def _options(self) -> tuple:
        return (self.alpha, self.gamma, self.label_smoothing)

    def _describe_options(self) -> str:
        text = f"alpha={self.alpha}, gamma={self.gamma}"
        return text + (f", label_smoothing={self.label_smoothing}" if self.label_smoothing else "")


class QualityFocalLoss(_FamilyLoss):
    """``focal_cuda.quality_focal_loss`` as a module."""

    _op_name = "quality_focal_loss_fwd"

    def __init__(self, beta: float = 2.0, reduction: str = "none", ignore_index: int = -1,
                 class_weight: Optional[torch.Tensor] = None) -> None:
        super().__init__(reduction, ignore_index, class_weight)
        _checks.check_quality_focal_options(beta)
        self.beta = float(beta)

    def _options(self) -> tuple:
        return (self.beta,)

    def _describe_options(self) -> str:
        return f"beta={self.beta}"


class VarifocalLoss(_FamilyLoss):
    """``focal_cuda.varifocal_loss`` as a module."""

    _op_name = "varifocal_loss_fwd"

    def __init__(self, alpha: float = 0.75, gamma: float = 2.0, reduction: str = "none", ignore_index: int = -1,
                 class_weight: Optional[torch.Tensor] = None, iou_weighted: bool = True,
                 detach_weight: bool = False) -> None:
        super().__init__(reduction, ignore_index, class_weight)
        _checks.check_varifocal_options(alpha, gamma, iou_weighted, detach_weight)
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.iou_weighted = iou_weighted
        self.detach_weight = detach_weight

    def _options(self) -> tuple:
        return (self.alpha, self.gamma, self.iou_weighted, self.detach_weight)

    def _grad_bound(self) -> float:
        return self.alpha

    def _describe_options(self) -> str:
        return (f"alpha={self.alpha}, gamma={self.gamma}, iou_weighted={self.iou_weighted}, "
                f"detach_weight={self.detach_weight}")


class SigmoidFocalLossStar(_FamilyLoss):
    """``focal_cuda.sigmoid_focal_loss_star`` (FL*) as a module."""

    _op_name = "sigmoid_focal_loss_star_fwd"

    def __init__(self, alpha: float = -1.0, gamma: float = 1.0, beta: float = 0.0, reduction: str = "none",
                 ignore_index: int = -1, class_weight: Optional[torch.Tensor] = None) -> None:
        super().__init__(reduction, ignore_index, class_weight)
        _checks.check_focal_star_options(alpha, gamma, beta)
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.beta = float(beta)

    def _options(self) -> tuple:
        return (self.alpha, self.gamma, self.beta)

    def _describe_options(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, beta={self.beta}"


class IoUAwareBCELoss(_FamilyLoss):
    """``focal_cuda.iou_aware_bce_loss`` as a module."""

    _op_name = "iou_aware_bce_loss_fwd"

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none", ignore_index: int = -1,
                 class_weight: Optional[torch.Tensor] = None) -> None:
        super().__init__(reduction, ignore_index, class_weight)
        _checks.check_iou_aware_bce_options(alpha, gamma)
        self.alpha = float(alpha)
        self.gamma = float(gamma)

    def _options(self) -> tuple:
        return (self.alpha, self.gamma)

    def _describe_options(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}"


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
