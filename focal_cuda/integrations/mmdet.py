"""mmdetection (3.x): ``FocalLoss``, ``QualityFocalLoss``, ``VarifocalLoss`` and ``GHMC`` with mmdet's
call signatures and semantics, fused (mmdet itself is not needed to use them).

    from focal_cuda.integrations import mmdet as fc_mm
    fc_mm.register_with_mmdet()   # FocalCudaLoss, QualityFocalCudaLoss, VarifocalCudaLoss, GHMCCudaLoss
                                  # in mmdet's MODELS
    fc_mm.patch()                 # or replace mmdet's own FocalLoss / QualityFocalLoss / VarifocalLoss /
                                  # GHMC registry entries, so unchanged configs build these (unpatch() restores)

mmdet's semantics, kept (its ``weight_reduce_loss``, its asserts):

* ``forward(pred, target, weight=None, avg_factor=None, reduction_override=None)``;
  ``reduction_override`` must be None, 'none', 'mean' or 'sum' (an AssertionError otherwise);
* ``avg_factor`` with 'mean' gives ``sum / (avg_factor + eps)`` (float32 eps); with 'none' it is
  unused; with 'sum' it raises ``ValueError('avg_factor can not be used with reduction="sum"')``;
  ``avg_factor`` may be a device tensor (no host synchronisation);
* everything times ``loss_weight``.

``FocalLoss``: class indices ``(N,)`` with background = C, or a target of the prediction's shape
(one-hot, any dtype: mmdet 3.x's "already in one-hot form", e.g. ``(B, C, H, W)``); a weight of
shape ``(N,)`` is per prediction, one of the loss's shape or size per element (mmdet's reshaping
and asserts). ``QualityFocalLoss``: ``(label, score)`` or a dense soft target; as mmdet, the loss is
summed over the classes of each prediction before the weight and the reduction (so 'none' is
``(N,)`` and 'mean' averages over predictions), and labels outside ``[0, C)`` are background.
``VarifocalLoss``: a dense target of the prediction's shape (positives: target > 0).
``activated=True`` (predictions already passed through a sigmoid) is mmdet's unfused formula.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as F_
from .. import ghmc as _ghmc
from ._patching import Patches

EPS = torch.finfo(torch.float32).eps
# mmdet has no ignored label: every label is a class or the background
_NEVER = -(2**62)

AvgFactor = Optional[Union[float, torch.Tensor]]


def _reduction(reduction_override, default):
    assert reduction_override in (None, "none", "mean", "sum")
    return reduction_override if reduction_override else default


def _check_avg_factor(reduction, avg_factor) -> None:
    if avg_factor is not None and reduction == "sum":
        raise ValueError('avg_factor can not be used with reduction="sum"')


def weight_reduce_loss(loss: torch.Tensor, weight=None, reduction="mean", avg_factor: AvgFactor = None):
    """mmdet's weight_reduce_loss (for the unfused paths)."""
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss
    if reduction == "mean":
        return loss.sum() / (avg_factor + EPS)
    if reduction != "none":
        raise ValueError('avg_factor can not be used with reduction="sum"')
    return loss


def _fused(fn, pred, target, weight, reduction, avg_factor, per: Optional[int] = None):
    """One fused call with mmdet's reductions. per: the 'mean' divisor when it is not the number of
    elements (QFL averages per-prediction sums)."""
    if avg_factor is not None and reduction == "mean":
        return fn(pred, target, "sum", weight, avg_factor + EPS)
    if reduction == "mean" and per is not None:
        return fn(pred, target, "sum", weight, float(per) if per > 0 else float("nan"))
    return fn(pred, target, reduction, weight, None)


class FocalLoss(nn.Module):
    """mmdet's ``FocalLoss`` (sigmoid), fused."""

    def __init__(self, use_sigmoid: bool = True, gamma: float = 2.0, alpha: float = 0.25, reduction: str = "mean",
                 loss_weight: float = 1.0, activated: bool = False):
        super().__init__()
        assert use_sigmoid is True, "Only sigmoid focal loss supported now."
        self.use_sigmoid = use_sigmoid
        self.gamma = gamma
        self.alpha = alpha
        self.reduction = reduction
        self.loss_weight = loss_weight
        self.activated = activated

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                avg_factor: AvgFactor = None, reduction_override: Optional[str] = None) -> torch.Tensor:
        reduction = _reduction(reduction_override, self.reduction)
        one_hot = pred.dim() == target.dim()
        if self.activated:
            return self.loss_weight * self._with_prob(pred, target, weight, reduction, avg_factor, one_hot)
        _check_avg_factor(reduction, avg_factor)
        dense = target.to(pred.dtype) if one_hot else target.long()
        weight = _mmdet_weight(weight, pred.shape)

        def call(x, t, red, w, normalizer):
            return F_.sigmoid_focal_loss(x, t, float(self.alpha), float(self.gamma), red, weight=w,
                                         normalizer=normalizer, ignore_index=_NEVER)

        return self.loss_weight * _fused(call, pred, dense, weight, reduction, avg_factor)

    def _with_prob(self, prob, target, weight, reduction, avg_factor, one_hot):
        if not one_hot:
            target = F.one_hot(target, num_classes=prob.size(1) + 1)[:, :-1]
        target = target.type_as(prob)
        pt = (1 - prob) * target + prob * (1 - target)
        focal_weight = (self.alpha * target + (1 - self.alpha) * (1 - target)) * pt.pow(self.gamma)
        loss = F.binary_cross_entropy(prob, target, reduction="none") * focal_weight
        return weight_reduce_loss(loss, _mmdet_weight(weight, loss.shape), reduction, avg_factor)


def _mmdet_weight(weight, shape):
    """mmdet's focal-loss weight handling: (N,) per prediction, else reshaped to the loss's rows."""
    if weight is None:
        return None
    if tuple(weight.shape) != tuple(shape):
        if weight.size(0) == shape[0]:
            weight = weight.view(-1, 1)
        else:
            assert weight.numel() == torch.Size(shape).numel()
            weight = weight.view(shape[0], -1)
    assert weight.ndim == len(shape)
    return weight


# mmdet's old name for the focal loss adapter
MMDetFocalLoss = FocalLoss


class QualityFocalLoss(nn.Module):
    """mmdet's ``QualityFocalLoss``, fused: ``target`` is ``(label, score)`` or a dense soft target."""

    def __init__(self, use_sigmoid: bool = True, beta: float = 2.0, reduction: str = "mean", loss_weight: float = 1.0,
                 activated: bool = False):
        super().__init__()
        assert use_sigmoid is True, "Only sigmoid in QFL supported now."
        self.use_sigmoid = use_sigmoid
        self.beta = beta
        self.reduction = reduction
        self.loss_weight = loss_weight
        self.activated = activated

    def forward(self, pred: torch.Tensor, target, weight: Optional[torch.Tensor] = None, avg_factor: AvgFactor = None,
                reduction_override: Optional[str] = None) -> torch.Tensor:
        reduction = _reduction(reduction_override, self.reduction)
        if isinstance(target, torch.Tensor):
            assert pred.size() == target.size()
            fused_target = target.to(pred.dtype)
        else:
            assert len(target) == 2, ("target for QFL must be a tuple of two elements, including category label and "
                                      "quality label, respectively")
            label, score = target
            num_classes = pred.size(1)
            label = label.long()
            label = torch.where((label >= 0) & (label < num_classes), label, torch.full_like(label, num_classes))
            fused_target = (label, score)
        if self.activated:
            return self.loss_weight * self._with_prob(pred, target, weight, reduction, avg_factor)
        _check_avg_factor(reduction, avg_factor)
        if weight is not None:
            weight = weight.reshape(-1, 1) if weight.dim() == 1 else weight  # per prediction

        def call(x, t, red, w, normalizer):
            loss = F_.quality_focal_loss(x, t, float(self.beta), red if red != "mean" else "sum", weight=w,
                                         normalizer=normalizer)
            return loss.sum(1) if red == "none" else loss

        return self.loss_weight * _fused(call, pred, fused_target, weight, reduction, avg_factor, per=pred.size(0))

    def _with_prob(self, prob, target, weight, reduction, avg_factor):
        if isinstance(target, torch.Tensor):
            y = target.type_as(prob)
        else:
            label, score = target
            C = prob.size(1)
            pos = (label >= 0) & (label < C)
            y = torch.zeros_like(prob)
            y[pos.nonzero().squeeze(1), label[pos].long()] = score[pos].type_as(prob)
        loss = (F.binary_cross_entropy(prob, y, reduction="none") * (y - prob).abs().pow(self.beta)).sum(1)
        return weight_reduce_loss(loss, weight, reduction, avg_factor)


class VarifocalLoss(nn.Module):
    """mmdet's ``VarifocalLoss``, fused: a dense target of the prediction's shape."""

    def __init__(self, use_sigmoid: bool = True, alpha: float = 0.75, gamma: float = 2.0, iou_weighted: bool = True,
                 reduction: str = "mean", loss_weight: float = 1.0):
        super().__init__()
        assert use_sigmoid is True, "Only sigmoid varifocal loss supported now."
        assert alpha >= 0.0
        self.use_sigmoid = use_sigmoid
        self.alpha = alpha
        self.gamma = gamma
        self.iou_weighted = iou_weighted
        self.reduction = reduction
        self.loss_weight = loss_weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                avg_factor: AvgFactor = None, reduction_override: Optional[str] = None) -> torch.Tensor:
        reduction = _reduction(reduction_override, self.reduction)
        assert pred.size() == target.size()
        _check_avg_factor(reduction, avg_factor)

        def call(x, t, red, w, normalizer):
            return F_.varifocal_loss(x, t, float(self.alpha), float(self.gamma), red, iou_weighted=self.iou_weighted,
                                     weight=w, normalizer=normalizer)

        return self.loss_weight * _fused(call, pred, target.to(pred.dtype), weight, reduction, avg_factor)


class GHMC(nn.Module):
    """mmdet's ``GHMC`` (GHM-C, ``use_sigmoid=True``), fused and without its host synchronisations.

    ``forward(pred, target, label_weight, reduction_override=None)``: ``target`` holds class indices
    ``(N,)`` (outside ``[0, C)``: background, as mmdet's one-hot expansion) with ``label_weight (N,)``,
    or a binary target of the prediction's shape with ``label_weight`` of that shape; valid where
    ``label_weight > 0``. 'mean' is ``sum / tot`` (mmdet: ``sum / (tot + eps)``, the same in float32),
    'none' the weighted elementwise loss; 'sum' raises as mmdet's ``weight_reduce_loss`` does with an
    ``avg_factor``. The ``edges`` (unused: the bins are found exactly from the logits) and, with momentum,
    ``acc_sum`` buffers have mmdet's names, so mmdet checkpoints load."""

    def __init__(self, bins: int = 10, momentum: float = 0.0, use_sigmoid: bool = True, loss_weight: float = 1.0,
                 reduction: str = "mean"):
        super().__init__()
        if not use_sigmoid:
            raise NotImplementedError
        _ghmc._check_options(bins, momentum, reduction, loss_weight)
        self.bins = bins
        self.momentum = momentum
        edges = torch.arange(bins + 1).float() / bins
        edges[-1] += 1e-6
        self.register_buffer("edges", edges)
        if momentum > 0:
            self.register_buffer("acc_sum", torch.zeros(bins))
        self.use_sigmoid = use_sigmoid
        self.loss_weight = loss_weight
        self.reduction = reduction

    def forward(self, pred: torch.Tensor, target: torch.Tensor, label_weight: torch.Tensor,
                reduction_override: Optional[str] = None, **kwargs) -> torch.Tensor:
        reduction = _reduction(reduction_override, self.reduction)
        _check_avg_factor(reduction, 1.0)  # mmdet passes avg_factor=tot: 'sum' raises
        if pred.dim() != target.dim():
            C = pred.size(-1)
            target = torch.where((target >= 0) & (target < C), target, torch.full_like(target, C)).long()
        else:
            target = target.to(pred.dtype)
        return _ghmc.ghmc_loss(pred, target, label_weight, self.bins, self.momentum,
                               self.acc_sum if self.momentum > 0 else None, _NEVER, reduction=reduction,
                               loss_weight=float(self.loss_weight))


REGISTERED = {"FocalCudaLoss": FocalLoss, "QualityFocalCudaLoss": QualityFocalLoss,
              "VarifocalCudaLoss": VarifocalLoss, "GHMCCudaLoss": GHMC}
REPLACES = {"FocalLoss": FocalLoss, "QualityFocalLoss": QualityFocalLoss, "VarifocalLoss": VarifocalLoss,
            "GHMC": GHMC}


def register_with_mmdet() -> bool:
    """Register the losses in mmdet's MODELS registry under REGISTERED's names; False if mmdet is not
    installed."""
    try:
        from mmdet.registry import MODELS  # type: ignore
    except ImportError:
        return False
    for name, cls in REGISTERED.items():
        MODELS.register_module(name=name, module=cls, force=True)
    return True


class _RegistryEntries:
    """mmdet's MODELS registry as a patch target: its entries by name, as attributes."""

    def __init__(self, registry):
        object.__setattr__(self, "registry", registry)

    def __getattr__(self, name):
        try:
            return self.registry.module_dict[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self.registry.register_module(name=name, module=value, force=True)

    def __delattr__(self, name):
        self.registry.module_dict.pop(name, None)


def _targets():
    try:
        from mmdet.registry import MODELS  # type: ignore
    except ImportError as e:
        raise ImportError("focal_cuda.integrations.mmdet.patch: mmdet is not installed") from e
    entries = _RegistryEntries(MODELS)
    return [(entries, name, cls) for name, cls in REPLACES.items()]


_patches = Patches("mmdet", _targets)


def patch() -> None:
    """Replace mmdet's FocalLoss, QualityFocalLoss, VarifocalLoss and GHMC registry entries (configs that
    name them build these); mmdet must be installed."""
    _patches.patch()


def unpatch() -> None:
    _patches.unpatch()


def patched():
    return _patches.patched()
