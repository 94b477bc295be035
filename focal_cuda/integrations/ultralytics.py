"""ultralytics (8.4): YOLO's classification BCE, RT-DETR's varifocal and focal losses, fused.

    import focal_cuda.integrations.ultralytics as fc_ul
    fc_ul.patch()      # or: with fc_ul.patched(): ...;  fc_ul.unpatch()

What ``patch()`` replaces, in ultralytics' own classes and modules:

* ``v8DetectionLoss.__init__`` (and so its subclasses: segmentation, pose, OBB, E2E): the criterion's
  ``bce`` becomes a fused soft BCE of the assigner's target scores, summed (the only use the criteria
  make of it), so neither the elementwise loss nor its gradient's temporaries are materialised. A
  criterion with class weights keeps the stock BCE (it scales the elementwise loss in place). The
  dense ``(B, A, C)`` target scores stay: the assigner builds them and the box loss reads them too.
* ``DETRLoss._get_loss_class`` (RT-DETR): varifocal, focal or BCE straight from the matched labels
  and IoU scores per query, ``(labels, scores)``: no one-hot and no dense score tensor.
* ``VarifocalLoss`` and ``FocalLoss``, wherever an ultralytics module holds them: the drop-in
  classes below (same constructor and ``forward`` as ultralytics', fused).

The values and gradients equal the stock losses'. ultralytics computes its varifocal loss in
float32 with autocast off; so does the drop-in (the logits are cast to float32, as there).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as F_
from ._patching import Patches, modules_holding


def _alpha(alpha) -> float:
    """ultralytics weights by alpha only where alpha > 0."""
    a = float(alpha.max()) if isinstance(alpha, torch.Tensor) else float(alpha)
    return a if a > 0 else -1.0


class VarifocalLoss(nn.Module):
    """Drop-in for ``ultralytics.utils.loss.VarifocalLoss``: ``forward(pred_score, gt_score, label)``
    with dense ``(B, N, C)`` scores and one-hot labels, ``.mean(1).sum()`` of the elementwise loss."""

    def __init__(self, gamma: float = 2.0, alpha: float = 0.75):
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha

    def forward(self, pred_score: torch.Tensor, gt_score: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        # ultralytics' positives are the label's columns, also with a score of 0 (weight 0 there): as
        # (labels, scores) the fused loss reads them so, without a host synchronisation
        num_classes = pred_score.shape[-1]
        has_label = label.bool().any(-1)
        labels = torch.where(has_label, label.to(torch.float32).argmax(-1),
                             torch.full(has_label.shape, num_classes, dtype=torch.int64, device=label.device))
        scores = (gt_score * label).sum(-1).float()
        with torch.autocast(pred_score.device.type, enabled=False):
            return F_.varifocal_loss(pred_score.float(), (labels, scores), float(self.alpha), float(self.gamma), "sum",
                                     normalizer=pred_score.shape[1])


class FocalLoss(nn.Module):
    """Drop-in for ``ultralytics.utils.loss.FocalLoss``: ``forward(pred, label)``,
    ``.mean(1).sum()`` of the elementwise focal loss (alpha weighting only where alpha > 0)."""

    def __init__(self, gamma: float = 1.5, alpha: float = 0.25):
        super().__init__()
        self.gamma = gamma
        self.alpha = torch.tensor(alpha)

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return F_.sigmoid_focal_loss(pred, label.to(pred.dtype), _alpha(self.alpha), float(self.gamma), "sum",
                                     normalizer=pred.shape[1])


class SummedSoftBCE(nn.Module):
    """``BCEWithLogitsLoss(reduction="none")(pred, target).sum()``, fused, returned already summed (a
    0-d tensor, whose ``.sum()`` is itself): what the YOLO detection criteria do with their ``bce``."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F_.sigmoid_focal_loss(pred, target, -1.0, 0.0, "sum")


def _v8_init(original):
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if getattr(self, "class_weights", None) is None:
            self.bce = SummedSoftBCE()
    __init__._focal_cuda_original = original
    return __init__


def _detr_get_loss_class(self, pred_scores, targets, gt_scores, num_gts, postfix=""):
    """DETRLoss._get_loss_class from the labels and per-query scores, fused."""
    name = f"loss_class{postfix}"
    nq = pred_scores.shape[1]
    labels = targets.long()
    scores = gt_scores.view(labels.shape)
    if self.fl:
        if num_gts and self.vfl:
            with torch.autocast(pred_scores.device.type, enabled=False):
                loss = F_.varifocal_loss(pred_scores.float(), (labels, scores.float()), float(self.vfl.alpha),
                                         float(self.vfl.gamma), "sum", normalizer=max(num_gts, 1))
        else:
            loss = F_.sigmoid_focal_loss(pred_scores, labels, _alpha(self.fl.alpha), float(self.fl.gamma), "sum",
                                         normalizer=max(num_gts, 1))
    else:  # BCE on the soft target score * one_hot, .mean(1).sum()
        loss = F_.sigmoid_focal_loss(pred_scores, (labels, scores.to(pred_scores.dtype)), -1.0, 0.0, "sum",
                                     normalizer=nq)
    return {name: loss.squeeze() * self.loss_gain["class"]}


def _targets():
    import ultralytics.models.utils.loss as detr
    import ultralytics.utils.loss as yolo

    out = [
        (yolo.v8DetectionLoss, "__init__", _v8_init(yolo.v8DetectionLoss.__init__)),
        (detr.DETRLoss, "_get_loss_class", _detr_get_loss_class),
    ]
    for name, replacement in (("VarifocalLoss", VarifocalLoss), ("FocalLoss", FocalLoss)):
        for module in modules_holding("ultralytics", name, getattr(yolo, name)):
            out.append((module, name, replacement))
    return out


_patches = Patches("ultralytics", _targets)


def patch() -> None:
    """Install the fused losses in ultralytics (criteria built afterwards pick up the YOLO BCE;
    RT-DETR's classification term is patched in its class, for every criterion)."""
    _patches.patch()


def unpatch() -> None:
    _patches.unpatch()


def patched():
    return _patches.patched()
