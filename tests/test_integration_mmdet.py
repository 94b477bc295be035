"""Promise: the mmdet losses follow mmdet 3.x's documented semantics (mmdet needs a compiled mmcv,
so the references below are written from its documentation and source): FocalLoss (labels and
one-hot targets, weights, avg_factor, reduction_override), QualityFocalLoss and VarifocalLoss, and
their registration in (a stand-in for) mmdet's registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from focal_cuda.integrations import mmdet as fc_mmdet
from helpers import assert_close64


# ----------------------------------------------------------------------------- mmdet semantics

def mmdet_focal_loss_from_docs(pred, target, weight=None, avg_factor=None, reduction="mean", gamma=2.0, alpha=0.25,
                               loss_weight=1.0):
    """mmdet's sigmoid FocalLoss as its documentation describes it: one-hot of the labels with the
    background index C dropped, the focal formula per element, weight per anchor (broadcast over
    classes) or per element, then weight_reduce_loss: 'mean' with avg_factor = sum / (avg_factor + eps),
    'mean' = mean over elements, 'sum', 'none'; times loss_weight."""
    C = pred.shape[-1]
    onehot = F.one_hot(target, C + 1)[:, :C].to(pred.dtype)
    p = pred.sigmoid()
    pt = (1 - p) * onehot + p * (1 - onehot)
    focal_weight = (alpha * onehot + (1 - alpha) * (1 - onehot)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(pred, onehot, reduction="none") * focal_weight
    if weight is not None:
        loss = loss * (weight.view(-1, 1) if weight.dim() == 1 else weight)
    if reduction == "mean" and avg_factor is not None:
        loss = loss.sum() / (avg_factor + torch.finfo(torch.float32).eps)
    elif reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss * loss_weight


@pytest.mark.parametrize("reduction,avg", [("mean", True), ("mean", False), ("sum", False), ("none", False)])
@pytest.mark.parametrize("weight_kind", [None, "anchor", "element"])
def test_mmdet_semantics(device, reduction, avg, weight_kind):
    g = torch.Generator().manual_seed(3)
    N, C = 300, 80
    pred = (torch.randn(N, C, generator=g) * 2).double().to(device)
    target = torch.randint(0, C + 1, (N,), generator=g).to(device)  # C = background
    weight = {None: None, "anchor": torch.rand(N, generator=g), "element": torch.rand(N, C, generator=g)}[weight_kind]
    weight = None if weight is None else weight.double().to(device)
    avg_factor = ((target < C).sum().float() if avg else None)
    loss_fn = fc_mmdet.MMDetFocalLoss(gamma=2.0, alpha=0.25, reduction=reduction, loss_weight=1.5)
    x1 = pred.clone().requires_grad_()
    x2 = pred.clone().requires_grad_()
    ours = loss_fn(x1, target, weight=weight, avg_factor=avg_factor)
    ref = mmdet_focal_loss_from_docs(x2, target, weight, avg_factor, reduction, loss_weight=1.5)
    assert ours.shape == ref.shape
    assert_close64(ours, ref, rtol=1e-10, atol=1e-12)
    go = torch.rand_like(ref)
    ours.backward(go)
    ref.backward(go)
    assert_close64(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)


def test_mmdet_checks_as_mmdet_does():
    """mmdet asserts on the options and raises ValueError for avg_factor with 'sum' (its tests check both)."""
    pred = torch.randn(10, 5)
    target = torch.randint(0, 5, (10,))
    for cls in (fc_mmdet.FocalLoss, fc_mmdet.QualityFocalLoss, fc_mmdet.VarifocalLoss):
        with pytest.raises(AssertionError):
            cls(use_sigmoid=False)
        t = target if cls is fc_mmdet.FocalLoss else (
            (target, torch.rand(10)) if cls is fc_mmdet.QualityFocalLoss else torch.rand(10, 5))
        with pytest.raises(AssertionError):
            cls()(pred, t, reduction_override=True)
        with pytest.raises(ValueError, match='avg_factor can not be used with reduction="sum"'):
            cls()(pred, t, avg_factor=10, reduction_override="sum")
        for reduction_override in (None, "none", "mean"):
            cls()(pred, t, avg_factor=10, reduction_override=reduction_override)
    with pytest.raises(AssertionError):
        fc_mmdet.VarifocalLoss(alpha=-1.0)
    with pytest.raises(AssertionError, match="tuple of two elements"):
        fc_mmdet.QualityFocalLoss()(pred, (target,))
    assert fc_mmdet.FocalLoss()(pred, target, reduction_override="none").shape == (10, 5)


@pytest.mark.parametrize("shape", [(10, 5), (3, 5, 8, 8)])
def test_mmdet_focal_one_hot_targets(device, shape):
    """mmdet 3.x takes a target of the prediction's shape as one-hot (any dtype), also (B, C, H, W)."""
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    if len(shape) == 2:
        target = F.one_hot(torch.randint(0, 6, (shape[0],), generator=g), 6)[:, :5]
    else:
        B, C, H, W = shape
        target = F.one_hot(torch.randint(0, C, (B * H * W,), generator=g), C).reshape(B, H, W, C).permute(0, 3, 1, 2)
    target = target.to(device)
    got = fc_mmdet.FocalLoss(reduction="sum")(pred, target)
    t = target.to(pred.dtype)
    p = pred.sigmoid()
    pt = (1 - p) * t + p * (1 - t)
    expected = (F.binary_cross_entropy_with_logits(pred, t, reduction="none")
                * (0.25 * t + 0.75 * (1 - t)) * pt.pow(2)).sum()
    assert_close64(got, expected, rtol=1e-10)


def mmdet_qfl_from_docs(pred, label, score, beta=2.0):
    """mmdet's quality_focal_loss: BCE(pred, 0) * sigmoid^beta everywhere, the positives' entries
    (0 <= label < C) replaced by BCE(pred, score) * |score - sigmoid|^beta, summed over classes: (N,)."""
    C = pred.size(1)
    p = pred.sigmoid()
    loss = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none") * p.pow(beta)
    pos = ((label >= 0) & (label < C)).nonzero().squeeze(1)
    pl = label[pos].long()
    loss = loss.clone()
    loss[pos, pl] = (F.binary_cross_entropy_with_logits(pred[pos, pl], score[pos], reduction="none")
                     * (score[pos] - p[pos, pl]).abs().pow(beta))
    return loss.sum(dim=1)


@pytest.mark.parametrize("reduction,avg", [("mean", True), ("mean", False), ("sum", False), ("none", False)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("form", ["tuple", "tensor"])
def test_mmdet_quality_focal(device, reduction, avg, weighted, form):
    g = torch.Generator().manual_seed(5)
    N, C = 200, 9
    pred = (torch.randn(N, C, generator=g, dtype=torch.float64) * 2).to(device)
    label = torch.randint(-1, C + 1, (N,), generator=g).to(device)  # -1 and C: background for mmdet
    score = torch.rand(N, generator=g, dtype=torch.float64).to(device)
    weight = torch.rand(N, generator=g, dtype=torch.float64).to(device) if weighted else None
    avg_factor = torch.tensor(17.0, dtype=torch.float64, device=device) if avg else None
    if form == "tuple":
        target = (label, score)
    else:
        pos = (label >= 0) & (label < C)
        target = torch.zeros_like(pred)
        target[pos.nonzero().squeeze(1), label[pos]] = score[pos]
    x1, x2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    ours = fc_mmdet.QualityFocalLoss(reduction=reduction, loss_weight=2.0)(x1, target, weight, avg_factor)
    loss = mmdet_qfl_from_docs(x2, label, score)
    ref = 2.0 * fc_mmdet.weight_reduce_loss(loss, weight, reduction, avg_factor)
    assert ours.shape == ref.shape
    assert_close64(ours, ref, rtol=1e-10, atol=1e-12)
    go = torch.rand_like(ref)
    ours.backward(go)
    ref.backward(go)
    assert_close64(x1.grad, x2.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction,avg", [("mean", True), ("mean", False), ("sum", False), ("none", False)])
@pytest.mark.parametrize("iou_weighted", [True, False])
def test_mmdet_varifocal(device, reduction, avg, iou_weighted):
    """mmdet's varifocal_loss: BCE * (target where target > 0 (or 1), alpha |p - target|^gamma elsewhere)."""
    g = torch.Generator().manual_seed(6)
    N, C = 150, 7
    pred = (torch.randn(N, C, generator=g, dtype=torch.float64) * 2).to(device)
    target = torch.rand(N, C, generator=g, dtype=torch.float64)
    target = torch.where(torch.rand(N, C, generator=g) < 0.8, torch.zeros_like(target), target).to(device)
    avg_factor = 11.0 if avg else None
    x1, x2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    ours = fc_mmdet.VarifocalLoss(iou_weighted=iou_weighted, reduction=reduction, loss_weight=0.5)(
        x1, target, avg_factor=avg_factor)
    p = x2.sigmoid()
    pos = (target > 0).double()
    w = (target if iou_weighted else 1.0) * pos + 0.75 * (p - target).abs().pow(2.0) * (1 - pos)
    ref = 0.5 * fc_mmdet.weight_reduce_loss(F.binary_cross_entropy_with_logits(x2, target, reduction="none") * w,
                                            None, reduction, avg_factor)
    assert_close64(ours, ref, rtol=1e-10, atol=1e-12)
    go = torch.rand_like(ref)
    ours.backward(go)
    ref.backward(go)
    assert_close64(x1.grad, x2.grad, rtol=1e-9, atol=1e-12)


class _FakeRegistry:
    """The part of mmengine's Registry that registration and patching use."""

    def __init__(self):
        self.module_dict = {"FocalLoss": "stock FocalLoss", "QualityFocalLoss": "stock QFL",
                            "VarifocalLoss": "stock VFL", "GHMC": "stock GHMC"}

    def register_module(self, name, module, force=False):
        assert force or name not in self.module_dict
        self.module_dict[name] = module


def test_mmdet_registration_and_patch(monkeypatch):
    import sys
    import types

    registry = _FakeRegistry()
    mmdet = types.ModuleType("mmdet")
    mmdet_registry = types.ModuleType("mmdet.registry")
    mmdet_registry.MODELS = registry
    monkeypatch.setitem(sys.modules, "mmdet", mmdet)
    monkeypatch.setitem(sys.modules, "mmdet.registry", mmdet_registry)
    assert fc_mmdet.register_with_mmdet() is True
    assert registry.module_dict["FocalCudaLoss"] is fc_mmdet.FocalLoss
    assert registry.module_dict["QualityFocalCudaLoss"] is fc_mmdet.QualityFocalLoss
    with fc_mmdet.patched():  # unchanged configs (type='FocalLoss') build the fused losses
        assert registry.module_dict["FocalLoss"] is fc_mmdet.FocalLoss
        assert registry.module_dict["VarifocalLoss"] is fc_mmdet.VarifocalLoss
        assert registry.module_dict["GHMC"] is fc_mmdet.GHMC
    assert registry.module_dict["GHMCCudaLoss"] is fc_mmdet.GHMC
    assert registry.module_dict["GHMC"] == "stock GHMC"
    assert registry.module_dict["FocalLoss"] == "stock FocalLoss"
    assert registry.module_dict["QualityFocalLoss"] == "stock QFL"


def test_mmdet_absent():
    import importlib.util

    if importlib.util.find_spec("mmdet") is None:
        assert fc_mmdet.register_with_mmdet() is False
        with pytest.raises(ImportError, match="mmdet is not installed"):
            fc_mmdet.patch()


# ----------------------------------------------------------------------------- GHMC

def mmdet_ghmc_from_source(pred, target, label_weight, bins, momentum, acc_sum, reduction="mean", loss_weight=1.0):
    """mmdet 3.x's GHMC.forward, step by step as its source reads: labels expanded to one-hot (outside
    [0, C): all zero) with label_weight.view(-1, 1).expand(N, C); g = |sigmoid - target|; valid =
    label_weight > 0; tot = max(valid count, 1); per bin (edges k / bins, the last + 1e-6) tot / count or
    tot / acc_sum (momentum, non-empty bins only); / n; weight_reduce_loss(avg_factor=tot)."""
    C = pred.size(-1)
    if pred.dim() != target.dim():
        onehot = torch.zeros(pred.shape, dtype=torch.float32)
        inside = (target >= 0) & (target < C)
        onehot[inside.nonzero().flatten(), target[inside]] = 1
        target = onehot
        label_weight = label_weight.view(-1, 1).expand(pred.shape)
    target, label_weight = target.float(), label_weight.float()
    edges = torch.arange(bins + 1).float() / bins
    edges[-1] += 1e-6
    weights = torch.zeros_like(pred)
    g = torch.abs(pred.sigmoid().detach() - target)
    valid = label_weight > 0
    tot = max(valid.float().sum().item(), 1.0)
    n = 0
    for i in range(bins):
        inds = (g >= edges[i]) & (g < edges[i + 1]) & valid
        num = inds.sum().item()
        if num > 0:
            if momentum > 0:
                acc_sum[i] = momentum * acc_sum[i] + (1 - momentum) * num
                weights[inds] = tot / acc_sum[i]
            else:
                weights[inds] = tot / num
            n += 1
    if n > 0:
        weights = weights / n
    loss = F.binary_cross_entropy_with_logits(pred, target.to(pred.dtype), reduction="none") * weights
    if reduction == "mean":
        loss = loss.sum() / (tot + torch.finfo(torch.float32).eps)
    return loss * loss_weight


@pytest.mark.parametrize("form", ["labels", "dense"])
@pytest.mark.parametrize("momentum", [0.0, 0.75])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_mmdet_ghmc(device, form, momentum, reduction):
    g = torch.Generator().manual_seed(int(momentum * 4) + len(form) + len(reduction))
    N, C = 400, 20
    target = torch.randint(-1, C + 1, (N,), generator=g)  # -1 and C: background for mmdet
    label_weight = (torch.rand(N, generator=g) < 0.85).float()
    if form == "dense":
        inside = (target >= 0) & (target < C)
        dense = torch.zeros(N, C)
        dense[inside.nonzero().flatten(), target[inside]] = 1
        target, label_weight = dense, label_weight.view(-1, 1).expand(N, C).contiguous()
    # logits away from the bin edges (there mmdet's float32 sigmoid and the exact bins may disagree)
    pred = torch.randn(N, C, generator=g) * 2
    ref_target = target if form == "dense" else None
    crit = fc_mmdet.GHMC(bins=10, momentum=momentum, loss_weight=0.5, reduction=reduction).to(device)
    acc_ref = torch.zeros(10)
    for _ in range(2):
        y = ref_target if ref_target is not None else torch.nn.functional.one_hot(
            torch.where((target >= 0) & (target < C), target, torch.full_like(target, C)), C + 1)[:, :C].float()
        gn = (torch.sigmoid(pred.double()) - y.double()).abs() * 10
        pred = torch.where((gn - gn.round()).abs() < 2e-3, pred + 0.03, pred)
        xr = pred.clone().requires_grad_()
        expected = mmdet_ghmc_from_source(xr, target, label_weight, 10, momentum, acc_ref, reduction, 0.5)
        expected.backward(torch.ones_like(expected))
        x = pred.detach().clone().to(device).requires_grad_()
        loss = crit(x, target.to(device), label_weight.to(device))
        loss.backward(torch.ones_like(loss))
        assert_close64(loss.detach(), expected.detach().double(), rtol=2e-6, atol=1e-7)
        assert_close64(x.grad, xr.grad.double(), rtol=2e-5, atol=2e-6)
        if momentum:
            torch.testing.assert_close(crit.acc_sum.cpu(), acc_ref, rtol=1e-6, atol=0)
        pred = pred * 1.3
    assert set(crit.state_dict()) == ({"edges", "acc_sum"} if momentum else {"edges"})
    with pytest.raises(ValueError, match='avg_factor can not be used with reduction="sum"'):
        crit(pred.to(device), target.to(device), label_weight.to(device), reduction_override="sum")
    with pytest.raises(AssertionError):
        crit(pred.to(device), target.to(device), label_weight.to(device), reduction_override="avg")
