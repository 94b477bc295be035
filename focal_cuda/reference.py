"""The family's API in plain, unfused PyTorch: the twins of the fused functions.

They are the oracle the tests compare against (usually run in float64, differentiated by autograd)
and the eager baselines the benchmarks race. Each member's per-element formula is written out from
its paper, the way detection frameworks write it, on a dense target: labels become a one-hot
tensor, ``(labels, scores)`` a one-hot tensor times the score (scores of background and ignored
anchors are not used), ignored anchors and zero weights are masked to exact zeros, and the
reductions follow focal_cuda's documented semantics.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from . import _checks

Targets = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def focal_terms(inputs: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float,
                label_smoothing: float = 0.0) -> torch.Tensor:
    """Elementwise focal loss, torchvision's formula, on dense targets of the inputs' shape; with
    label smoothing s the cross-entropy takes y (1 - s) + s/2."""
    p = torch.sigmoid(inputs)
    smoothed = targets * (1 - label_smoothing) + label_smoothing / 2 if label_smoothing else targets
    ce = F.binary_cross_entropy_with_logits(inputs, smoothed, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss


def quality_focal_terms(inputs: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    p = torch.sigmoid(inputs)
    return F.binary_cross_entropy_with_logits(inputs, y, reduction="none") * (y - p).abs().pow(beta)


def varifocal_terms(inputs: torch.Tensor, y: torch.Tensor, positive: torch.Tensor, alpha: float, gamma: float,
                    iou_weighted: bool, detach_weight: bool) -> torch.Tensor:
    p = torch.sigmoid(inputs)
    w = torch.where(positive, y if iou_weighted else torch.ones_like(y), alpha * (p - y).abs().pow(gamma))
    if detach_weight:
        w = w.detach()
    return F.binary_cross_entropy_with_logits(inputs, y, reduction="none") * w


def focal_star_terms(inputs: torch.Tensor, y: torch.Tensor, alpha: float, gamma: float, beta: float) -> torch.Tensor:
    loss = -F.logsigmoid(gamma * (2 * y - 1) * inputs + beta) / gamma
    if alpha >= 0:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return loss


def iou_aware_bce_terms(inputs: torch.Tensor, y: torch.Tensor, positive: torch.Tensor, alpha: float,
                        gamma: float) -> torch.Tensor:
    p = torch.sigmoid(inputs)
    t = (p.detach() ** alpha * y ** (1 - alpha)).clamp(min=0.01)
    pos = F.binary_cross_entropy_with_logits(inputs, t, reduction="none")
    neg = p ** gamma * F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    return torch.where(positive, pos, neg)


def one_hot_labels(labels: torch.Tensor, num_classes: int, ignore_index: int, dtype: torch.dtype):
    """Dense 0/1 targets from class indices (C = background) and the mask of anchors that count."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.full_like(labels, num_classes)).long()
    dense = F.one_hot(safe, num_classes + 1)[..., :num_classes].to(dtype)
    return dense, valid


def dense_targets(inputs: torch.Tensor, plan: _checks.Plan, ignore_index: int):
    """(y, positive, valid): the dense target, the positive elements (the label's column for label
    targets; y > 0 for dense ones) and the anchors that count (None for dense targets)."""
    if not plan.labels:
        y = plan.targets.to(inputs.dtype)
        return y, y > 0, None
    onehot, valid = one_hot_labels(plan.targets, inputs.shape[-1], ignore_index, inputs.dtype)
    positive = onehot.bool()
    if plan.scores is None:
        return onehot, positive, valid
    y = torch.where(positive, plan.scores.to(inputs.dtype).unsqueeze(-1), torch.zeros_like(onehot))
    return y, positive, valid


def _reduce(loss: torch.Tensor, plan: _checks.Plan, weight, valid) -> torch.Tensor:
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


def _run(terms, inputs, targets, reduction, weight, normalizer, ignore_index, validate):
    plan = _checks.check(inputs, targets, reduction, weight, normalizer, ignore_index)
    if plan.labels and validate:
        _checks.validate_labels(plan.targets, inputs.shape[-1], int(ignore_index))
    y, positive, valid = dense_targets(inputs, plan, int(ignore_index))
    return _reduce(terms(y, positive), plan, weight, valid)


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: Targets,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    *,
    weight: Optional[torch.Tensor] = None,
    normalizer: Optional[Union[float, torch.Tensor]] = None,
    ignore_index: int = -1,
    validate: bool = True,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    _checks.check_focal_options(alpha, gamma, label_smoothing)
    return _run(lambda y, pos: focal_terms(inputs, y, alpha, gamma, label_smoothing), inputs, targets, reduction,
                weight, normalizer, ignore_index, validate)


def quality_focal_loss(inputs, targets, beta=2.0, reduction="none", *, weight=None, normalizer=None, ignore_index=-1,
                       validate=True) -> torch.Tensor:
    _checks.check_quality_focal_options(beta)
    return _run(lambda y, pos: quality_focal_terms(inputs, y, beta), inputs, targets, reduction, weight, normalizer,
                ignore_index, validate)


def varifocal_loss(inputs, targets, alpha=0.75, gamma=2.0, reduction="none", *, iou_weighted=True,
                   detach_weight=False, weight=None, normalizer=None, ignore_index=-1, validate=True) -> torch.Tensor:
    _checks.check_varifocal_options(alpha, gamma, iou_weighted, detach_weight)
    return _run(lambda y, pos: varifocal_terms(inputs, y, pos, alpha, gamma, iou_weighted, detach_weight), inputs,
                targets, reduction, weight, normalizer, ignore_index, validate)


def sigmoid_focal_loss_star(inputs, targets, alpha=-1.0, gamma=1.0, beta=0.0, reduction="none", *, weight=None,
                            normalizer=None, ignore_index=-1, validate=True) -> torch.Tensor:
    _checks.check_focal_star_options(alpha, gamma, beta)
    return _run(lambda y, pos: focal_star_terms(inputs, y, alpha, gamma, beta), inputs, targets, reduction, weight,
                normalizer, ignore_index, validate)


def iou_aware_bce_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none", *, weight=None, normalizer=None,
                       ignore_index=-1, validate=True) -> torch.Tensor:
    _checks.check_iou_aware_bce_options(alpha, gamma)
    return _run(lambda y, pos: iou_aware_bce_terms(inputs, y, pos, alpha, gamma), inputs, targets, reduction, weight,
                normalizer, ignore_index, validate)


def ghmc_loss(inputs, targets, label_weight=None, bins=10, momentum=0.0, acc_sum=None, ignore_index=-1, *,
              reduction="mean", loss_weight=1.0) -> torch.Tensor:
    """GHM-C as mmdet's ``GHMC.forward`` computes it, written from its documented semantics: one
    boolean mask and one host synchronisation per bin, the weights a constant for autograd. The
    eager baseline of the benchmarks and the tests' oracle (labels: C = background, ``ignore_index``
    not valid; label_weight: valid where > 0, per element or per anchor)."""
    C = inputs.shape[-1]
    if targets.dtype in _checks.LABEL_DTYPES:
        y, valid_rows = one_hot_labels(targets, C, ignore_index, torch.float32)
        valid = valid_rows.unsqueeze(-1).expand(inputs.shape)
    else:
        y = targets.to(torch.promote_types(inputs.dtype, torch.float32))  # mmdet: target.float()
        valid = torch.ones(inputs.shape, dtype=torch.bool, device=inputs.device)
    if label_weight is not None:
        lw = label_weight
        if tuple(lw.shape) == tuple(inputs.shape[:-1]) and tuple(lw.shape) != tuple(inputs.shape):
            lw = lw.unsqueeze(-1)
        valid = valid & (lw > 0)
    edges = torch.arange(bins + 1, device=inputs.device).float() / bins
    edges[-1] += 1e-6
    weights = torch.zeros_like(inputs)
    g = torch.abs(inputs.sigmoid().detach() - y)
    tot = max(valid.float().sum().item(), 1.0)
    n = 0
    for i in range(bins):
        inds = (g >= edges[i]) & (g < edges[i + 1]) & valid
        num_in_bin = inds.sum().item()
        if num_in_bin > 0:
            if momentum > 0:
                acc_sum[i] = momentum * acc_sum[i] + (1 - momentum) * num_in_bin
                weights[inds] = tot / acc_sum[i]
            else:
                weights[inds] = tot / num_in_bin
            n += 1
    if n > 0:
        weights = weights / n
    loss = F.binary_cross_entropy_with_logits(inputs, y.to(inputs.dtype), reduction="none") * weights
    if reduction == "mean":
        loss = loss.sum() / tot
    elif reduction == "sum":
        loss = loss.sum()
    return loss * loss_weight


def ohem_loss(inputs, labels, neg_pos_ratio=3.0, reduction="sum", normalizer=None, ignore_index=-1) -> torch.Tensor:
    """OHEM for one-stage detectors (SSD's hard negatives) in plain PyTorch, image by image: every
    positive anchor and the ``max(1, floor(neg_pos_ratio * positives))`` background anchors of highest
    summed BCE (ties: the lower index first); the loss is the BCE summed over the selected anchors'
    classes (``"mean"``: divided by their number of elements; ``normalizer``: divided by it)."""
    C = inputs.shape[-1]
    y, _ = one_hot_labels(labels, C, ignore_index, inputs.dtype)
    bce = F.binary_cross_entropy_with_logits(inputs, y, reduction="none")
    selected = torch.zeros(labels.shape, dtype=torch.bool, device=inputs.device)
    for b in range(labels.shape[0]):
        pos = (labels[b] >= 0) & (labels[b] < C)
        neg = labels[b] == C
        k = max(1, int(neg_pos_ratio * int(pos.sum())))
        neg_idx = neg.nonzero().flatten().tolist()
        scores = bce[b].detach().sum(-1).tolist()
        neg_idx.sort(key=lambda a: (-scores[a], a))
        chosen = pos.clone()
        chosen[neg_idx[:k]] = True
        selected[b] = chosen
    loss = bce * selected.unsqueeze(-1).to(bce.dtype)
    if reduction == "none":
        return loss
    loss = loss.sum()
    if reduction == "mean":
        return loss / max(int(selected.sum()) * C, 1)
    return loss / normalizer if normalizer is not None else loss
