"""HF transformers (5.x): the DETR family's classification losses, fused.

    import focal_cuda.integrations.transformers as fc_hf
    fc_hf.patch()      # or: with fc_hf.patched(): ...;  fc_hf.unpatch()

What ``patch()`` replaces, in the framework's own classes (so every model built on them picks it up):

* ``RTDetrLoss.loss_labels_vfl`` (RT-DETR; D-FINE and DEIMv2 inherit it): ``varifocal_loss`` with
  ``detach_weight=True`` on ``(labels, IoU of each matched pair)``;
* ``RTDetrLoss.loss_labels_focal`` and ``loss_labels_bce``: ``sigmoid_focal_loss`` on the labels (BCE is
  gamma 0 without alpha);
* ``DeformableDetrImageLoss.loss_labels`` (Deformable DETR and the models whose criterion it is):
  ``sigmoid_focal_loss`` on the labels;
* ``LwDetrImageLoss.loss_labels`` (LW-DETR; RF-DETR inherits it): ``iou_aware_bce_loss`` on
  ``(labels, IoU)``;
* ``sigmoid_focal_loss(inputs, targets, num_boxes, alpha, gamma)`` of
  ``transformers.loss.loss_for_object_detection``, wherever a transformers module holds it.

Each takes the labels straight from the matcher's indices (a ``[B, Q]`` tensor of class indices,
background = num_labels) and the IoU scores as one value per query: no one-hot, no dense score
tensor. The values and gradients equal the stock losses' (the IoU of a matched pair is computed
per pair instead of as the diagonal of an all-pairs matrix: the same numbers).

Left stock, deliberately: the criteria's ``forward`` (it turns ``num_boxes`` into a Python float with
``.item()``, and the Hungarian matcher runs on the host per decoder layer: both synchronise, which
fusing the classification term cannot remove; each layer's term is one fused call);
``loss_labels`` of RT-DETR (softmax cross-entropy, not in the family); DEIMv2's matching-aware loss
(``loss_labels_mal``, not in the family); Grounding DINO's token-level ``loss_labels``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import functional as F_
from ._patching import Patches, modules_holding


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, num_boxes, alpha: float = 0.25,
                       gamma: float = 2) -> torch.Tensor:
    """Drop-in for ``transformers.loss.loss_for_object_detection.sigmoid_focal_loss``:
    ``loss.mean(1).sum() / num_boxes`` of the elementwise focal loss (any negative alpha: no
    weighting), fused. ``num_boxes`` may be a number or a tensor (read on the device)."""
    if alpha > 1:  # outside the kernels' range: transformers' formula, unfused
        from ..reference import focal_terms

        return focal_terms(inputs, targets, float(alpha), float(gamma)).mean(1).sum() / num_boxes
    return F_.sigmoid_focal_loss(inputs, targets, alpha if alpha >= 0 else -1.0, float(gamma), "sum",
                                 normalizer=num_boxes * inputs.shape[1])


# ----------------------------------------------------------------------------- from the matcher

def _source_index(indices) -> Tuple[torch.Tensor, torch.Tensor]:
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch, torch.cat([src for (src, _) in indices])


def matched_labels(logits: torch.Tensor, targets, indices, num_classes: int):
    """The class index of every query ([B, Q], background = num_classes) from the matcher's indices,
    and the source index of the matched queries."""
    idx = _source_index(indices)
    classes = torch.cat([t["class_labels"][j] for t, (_, j) in zip(targets, indices)])
    labels = torch.full(logits.shape[:2], num_classes, dtype=torch.int64, device=logits.device)
    labels[idx] = classes.to(labels.device)
    return labels, idx


def pairwise_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of boxes1[i] with boxes2[i] (corner format), as transformers' box_iou computes each entry."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return inter / (area1 + area2 - inter)


def matched_scores(outputs, targets, indices, idx, shape, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The IoU of each matched query with its box ([B, Q], 0 elsewhere: never read there)."""
    from transformers.image_transforms import center_to_corners_format

    src_boxes = outputs["pred_boxes"][idx]
    target_boxes = torch.cat([t["boxes"][i] for t, (_, i) in zip(targets, indices)], dim=0)
    ious = pairwise_iou(center_to_corners_format(src_boxes.detach()), center_to_corners_format(target_boxes))
    scores = torch.zeros(shape, dtype=dtype or ious.dtype, device=src_boxes.device)
    scores[idx] = ious.to(scores.dtype)
    return scores


def _logits(outputs) -> torch.Tensor:
    if "logits" not in outputs:
        raise KeyError("No logits were found in the outputs")
    return outputs["logits"]


# ----------------------------------------------------------------------------- the criteria's methods

def _rt_detr_loss_labels_vfl(self, outputs, targets, indices, num_boxes, log=True):
    if "pred_boxes" not in outputs:
        raise KeyError("No predicted boxes found in outputs")
    logits = _logits(outputs)
    labels, idx = matched_labels(logits, targets, indices, self.num_classes)
    # the stock loss rounds the IoU to the logits' dtype
    scores = matched_scores(outputs, targets, indices, idx, logits.shape[:2], logits.dtype)
    loss = F_.varifocal_loss(logits, (labels, scores), float(self.alpha), float(self.gamma), "sum",
                             iou_weighted=True, detach_weight=True, normalizer=num_boxes)
    return {"loss_vfl": loss}


def _rt_detr_loss_labels_focal(self, outputs, targets, indices, num_boxes, log=True):
    logits = _logits(outputs)
    labels, _ = matched_labels(logits, targets, indices, self.num_classes)
    alpha = float(self.alpha)
    loss = F_.sigmoid_focal_loss(logits, labels, alpha if alpha >= 0 else -1.0, float(self.gamma), "sum",
                                 normalizer=num_boxes)
    return {"loss_focal": loss}


def _rt_detr_loss_labels_bce(self, outputs, targets, indices, num_boxes, log=True):
    logits = _logits(outputs)
    labels, _ = matched_labels(logits, targets, indices, self.num_classes)
    return {"loss_bce": F_.sigmoid_focal_loss(logits, labels, -1.0, 0.0, "sum", normalizer=num_boxes)}


def _deformable_detr_loss_labels(self, outputs, targets, indices, num_boxes):
    logits = _logits(outputs)
    labels, _ = matched_labels(logits, targets, indices, self.num_classes)
    alpha = float(self.focal_alpha)
    return {"loss_ce": F_.sigmoid_focal_loss(logits, labels, alpha if alpha >= 0 else -1.0, 2.0, "sum",
                                             normalizer=num_boxes)}


def _lw_detr_loss_labels(self, outputs, targets, indices, num_boxes):
    logits = _logits(outputs)
    labels, idx = matched_labels(logits, targets, indices, self.num_classes)
    scores = matched_scores(outputs, targets, indices, idx, logits.shape[:2], logits.dtype)
    loss = F_.iou_aware_bce_loss(logits, (labels, scores), float(self.focal_alpha), 2.0, "sum", normalizer=num_boxes)
    return {"loss_ce": loss}


def _targets():
    from transformers.loss import loss_for_object_detection as lod
    from transformers.loss.loss_deformable_detr import DeformableDetrImageLoss
    from transformers.loss.loss_lw_detr import LwDetrImageLoss
    from transformers.loss.loss_rt_detr import RTDetrLoss

    out = [
        (RTDetrLoss, "loss_labels_vfl", _rt_detr_loss_labels_vfl),
        (RTDetrLoss, "loss_labels_focal", _rt_detr_loss_labels_focal),
        (RTDetrLoss, "loss_labels_bce", _rt_detr_loss_labels_bce),
        (DeformableDetrImageLoss, "loss_labels", _deformable_detr_loss_labels),
        (LwDetrImageLoss, "loss_labels", _lw_detr_loss_labels),
    ]
    for module in modules_holding("transformers", "sigmoid_focal_loss", lod.sigmoid_focal_loss):
        out.append((module, "sigmoid_focal_loss", sigmoid_focal_loss))
    return out


_patches = Patches("transformers", _targets)


def patch() -> None:
    """Install the fused classification losses in transformers' DETR-family criteria."""
    _patches.patch()


def unpatch() -> None:
    _patches.unpatch()


def patched():
    return _patches.patched()
