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
                            "VarifocalLoss": "stock VFL"}

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
    assert registry.module_dict["FocalLoss"] == "stock FocalLoss"
    assert registry.module_dict["QualityFocalLoss"] == "stock QFL"


def test_mmdet_absent():
    import importlib.util

    if importlib.util.find_spec("mmdet") is None:
        assert fc_mmdet.register_with_mmdet() is False
        with pytest.raises(ImportError, match="mmdet is not installed"):
            fc_mmdet.patch()
