"""The family's members as the tests see them: the fused function, its plain-PyTorch twin, a module,
options to test with, and an independent 50-digit oracle of the loss and of the closed-form gradient
the contract gives for each member (docs/design.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict

import mpmath as mp
import torch

import focal_cuda
from focal_cuda import reference as R


@dataclass
class Member:
    name: str
    fused: Callable
    twin: Callable
    module: Callable
    options: Dict = field(default_factory=dict)


MEMBERS = {
    m.name: m
    for m in [
        Member("focal", focal_cuda.sigmoid_focal_loss, R.sigmoid_focal_loss, focal_cuda.SigmoidFocalLoss,
               dict(alpha=0.25, gamma=2.0)),
        Member("focal_gamma1.5", focal_cuda.sigmoid_focal_loss, R.sigmoid_focal_loss, focal_cuda.SigmoidFocalLoss,
               dict(alpha=-1.0, gamma=1.5)),
        Member("focal_smoothing", focal_cuda.sigmoid_focal_loss, R.sigmoid_focal_loss, focal_cuda.SigmoidFocalLoss,
               dict(alpha=0.25, gamma=2.0, label_smoothing=0.1)),
        Member("quality_focal", focal_cuda.quality_focal_loss, R.quality_focal_loss, focal_cuda.QualityFocalLoss,
               dict(beta=2.0)),
        Member("quality_focal_beta1.5", focal_cuda.quality_focal_loss, R.quality_focal_loss,
               focal_cuda.QualityFocalLoss, dict(beta=1.5)),
        Member("varifocal", focal_cuda.varifocal_loss, R.varifocal_loss, focal_cuda.VarifocalLoss,
               dict(alpha=0.75, gamma=2.0)),
        Member("varifocal_detached", focal_cuda.varifocal_loss, R.varifocal_loss, focal_cuda.VarifocalLoss,
               dict(alpha=0.75, gamma=1.5, detach_weight=True, iou_weighted=False)),
        Member("focal_star", focal_cuda.sigmoid_focal_loss_star, R.sigmoid_focal_loss_star,
               focal_cuda.SigmoidFocalLossStar, dict(alpha=0.25, gamma=2.0, beta=1.0)),
        Member("focal_star_default", focal_cuda.sigmoid_focal_loss_star, R.sigmoid_focal_loss_star,
               focal_cuda.SigmoidFocalLossStar, dict()),
        Member("iou_aware_bce", focal_cuda.iou_aware_bce_loss, R.iou_aware_bce_loss, focal_cuda.IoUAwareBCELoss,
               dict(alpha=0.25, gamma=2.0)),
    ]
}

# the target forms every member takes
FORMS = ["labels", "labels32", "scores", "dense"]


def make_family_targets(form: str, shape, device, g, dtype=torch.float32):
    """Targets of a form for logits of `shape`: class indices (-1 ignored, C background), a
    (labels, scores) tuple (scores in (0, 1], some exactly 0, NaN for background and ignored anchors:
    never read), or dense soft targets with many exact zeros and some ones."""
    C = shape[-1]
    lead = shape[:-1]
    if form == "dense":
        y = torch.rand(shape, generator=g)
        y = torch.where(torch.rand(shape, generator=g) < 0.7, torch.zeros_like(y), y)
        y = torch.where(torch.rand(shape, generator=g) < 0.05, torch.ones_like(y), y)
        return y.to(dtype).to(device)
    labels = torch.randint(-1, C + 1, lead, generator=g)
    if form == "labels32":
        labels = labels.to(torch.int32)
    if form != "scores":
        return labels.to(device)
    scores = torch.rand(lead, generator=g).to(dtype)
    scores = torch.where(torch.rand(lead, generator=g) < 0.1, torch.zeros_like(scores), scores)
    scores = torch.where((labels < 0) | (labels >= C), torch.full_like(scores, float("nan")), scores)
    return labels.to(device), scores.to(device)


def to_device_dtype(targets, device, dtype):
    """The same targets with floating parts in `dtype` (labels unchanged)."""
    if isinstance(targets, tuple):
        return targets[0].to(device), targets[1].to(device, dtype)
    return targets.to(device, dtype) if targets.dtype.is_floating_point else targets.to(device)


# ----------------------------------------------------------------------------- 50-digit oracle

mp.mp.dps = 50


def _sig(x):
    return 1 / (1 + mp.exp(-x))


def _softplus(x):
    return x + mp.log1p(mp.exp(-x)) if x > 0 else mp.log1p(mp.exp(x))


def _bce(x, y):
    return y * _softplus(-x) + (1 - y) * _softplus(x)


def exact(member: Member, x: float, y: float, positive: bool):
    """(loss, d loss/dx) at logit x and target y, in 50 digits: the loss from its definition, the
    gradient from the contract's closed form. positive: the label's column (varifocal, IoU-aware BCE)."""
    o = member.options
    x = mp.mpf(x)
    y = mp.mpf(y)
    p = _sig(x)
    pm = _sig(-x)  # 1 - p without cancellation (mpmath's exponent range is unbounded)
    if member.fused is focal_cuda.sigmoid_focal_loss:
        alpha, gamma, s = o.get("alpha", 0.25), o.get("gamma", 2.0), o.get("label_smoothing", 0.0)
        ys = y * (1 - s) + mp.mpf(s) / 2
        q = p * (1 - y) + pm * y  # 1 - p_t
        at = alpha * y + (1 - alpha) * (1 - y) if alpha >= 0 else mp.mpf(1)
        ce = _bce(x, ys)
        loss = at * q ** gamma * ce
        grad = at * q ** gamma * ((p - ys) + gamma * ce * (1 - 2 * y) * p * pm / q)
        return loss, grad
    if member.fused is focal_cuda.quality_focal_loss:
        beta = o.get("beta", 2.0)
        d = p - y if y != 1 else -pm
        ce = _bce(x, y)
        loss = abs(d) ** beta * ce
        grad = mp.sign(d) * abs(d) ** (beta - 1) * (d * d + beta * p * pm * ce) if d != 0 else mp.mpf(0)
        return loss, grad
    if member.fused is focal_cuda.varifocal_loss:
        alpha, gamma = o.get("alpha", 0.75), o.get("gamma", 2.0)
        if positive:
            w = y if o.get("iou_weighted", True) else mp.mpf(1)
            return w * _bce(x, y), w * (p - y)
        sp = _softplus(x)
        loss = alpha * p ** gamma * sp
        grad = alpha * p ** gamma * p if o.get("detach_weight") else alpha * p ** gamma * (gamma * pm * sp + p)
        return loss, grad
    if member.fused is focal_cuda.sigmoid_focal_loss_star:
        alpha, gamma, beta = o.get("alpha", -1.0), o.get("gamma", 1.0), o.get("beta", 0.0)
        yp = 2 * y - 1
        z = gamma * yp * x + beta
        at = alpha * y + (1 - alpha) * (1 - y) if alpha >= 0 else mp.mpf(1)
        return at * _softplus(-z) / gamma, -at * yp * _sig(-z)
    if member.fused is focal_cuda.iou_aware_bce_loss:
        alpha, gamma = o.get("alpha", 0.25), o.get("gamma", 2.0)
        if positive:
            t = max(p ** alpha * y ** (1 - alpha), mp.mpf("0.01"))
            return _bce(x, t), p - t
        sp = _softplus(x)
        return p ** gamma * sp, p ** gamma * (gamma * pm * sp + p)
    raise ValueError(member.name)
