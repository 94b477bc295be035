"""Promise: the loss and its gradient equal the float64 plain-PyTorch reference (torchvision's
formula) and docs/design.md's closed-form gradient, for every target kind, gamma, alpha, reduction,
weight form and normalizer."""

from __future__ import annotations

import pytest
import torch

import focal_cuda
from helpers import (
    assert_close64,
    closed_form_grad,
    fused_loss_and_grad,
    make_targets,
    reference_loss_and_grad,
)

GAMMAS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
ALPHAS = [0.25, -1.0, 0.9]
TARGET_KINDS = ["binary", "soft", "labels", "labels32"]
SHAPES = [(3, 80), (2, 37, 13)]  # C = 80 (COCO), and C = 13 with a 3-D [B, A, C] input


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_loss_and_grad_match_reference_fp32(device, gamma, kind, shape):
    g = torch.Generator().manual_seed(hash((gamma, kind, shape)) % 2**31)
    x = (torch.randn(shape, generator=g) * 3).to(device)
    t = make_targets(kind, shape, device, g)
    loss, grad = fused_loss_and_grad(x, t, gamma=gamma)
    ref_loss, ref_grad = reference_loss_and_grad(x, t, gamma=gamma)
    assert loss.dtype == torch.float32 and loss.shape == x.shape
    assert_close64(loss, ref_loss)
    assert_close64(grad, ref_grad)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_alpha_and_reduction(device, alpha, reduction, kind):
    g = torch.Generator().manual_seed(7)
    shape = (5, 19)
    x = (torch.randn(shape, generator=g) * 2).to(device)
    t = make_targets(kind, shape, device, g)
    go = torch.rand((), generator=g).to(device) + 0.5 if reduction != "none" else None
    loss, grad = fused_loss_and_grad(x, t, go, alpha=alpha, reduction=reduction)
    ref_loss, ref_grad = reference_loss_and_grad(x, t, go, alpha=alpha, reduction=reduction)
    assert loss.shape == ref_loss.shape
    assert_close64(loss, ref_loss)
    assert_close64(grad, ref_grad)


def test_mean_divides_by_elements_not_ignored(device):
    x = torch.randn(4, 6, device=device)
    labels = torch.tensor([0, -1, 6, -1], device=device)  # two anchors ignored
    dense_loss = focal_cuda.sigmoid_focal_loss(x, labels)  # elementwise
    mean = focal_cuda.sigmoid_focal_loss(x, labels, reduction="mean")
    expected = dense_loss.double().sum() / (2 * 6)
    assert_close64(mean, expected)


@pytest.mark.parametrize("kind", ["binary", "soft", "labels"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.0])
def test_grad_matches_closed_form(device, kind, gamma):
    g = torch.Generator().manual_seed(11)
    shape = (6, 21)
    x = (torch.randn(shape, generator=g) * 4).to(device)
    t = make_targets(kind, shape, device, g)
    alpha = 0.25
    _, grad = fused_loss_and_grad(x, t, alpha=alpha, gamma=gamma)
    if t.dtype.is_floating_point:
        dense, valid = t, torch.ones(shape[:-1], dtype=torch.bool, device=device)
    else:
        dense, valid = focal_cuda.reference.one_hot_labels(t, shape[-1], -1, torch.float64)
    expected = closed_form_grad(x, dense, alpha, gamma) * valid.unsqueeze(-1)
    assert_close64(grad, expected)


WEIGHT_FORMS = {
    "element": lambda s, g: torch.rand(s, generator=g),
    "anchor": lambda s, g: torch.rand(s[:-1] + (1,), generator=g),
    "class": lambda s, g: torch.rand(s[-1:], generator=g),
    "scalar": lambda s, g: torch.rand((), generator=g),
}


@pytest.mark.parametrize("form", list(WEIGHT_FORMS))
@pytest.mark.parametrize("kind", ["binary", "labels"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_weight_forms(device, form, kind, reduction):
    g = torch.Generator().manual_seed(3)
    shape = (2, 9, 17)
    x = (torch.randn(shape, generator=g) * 2).to(device)
    t = make_targets(kind, shape, device, g)
    w = WEIGHT_FORMS[form](shape, g).to(device)
    w.view(-1)[0] = 0.0  # a zero weight gives an exact zero
    loss, grad = fused_loss_and_grad(x, t, weight=w, reduction=reduction)
    ref_loss, ref_grad = reference_loss_and_grad(x, t, weight=w, reduction=reduction)
    assert_close64(loss, ref_loss)
    assert_close64(grad, ref_grad)


@pytest.mark.parametrize("normalizer_kind", ["float", "int", "tensor0d", "tensor1", "int_tensor"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_normalizer(device, normalizer_kind, reduction):
    g = torch.Generator().manual_seed(5)
    shape = (7, 11)
    x = (torch.randn(shape, generator=g) * 2).to(device)
    t = make_targets("labels", shape, device, g)
    n = {
        "float": 3.5,
        "int": 4,
        "tensor0d": torch.tensor(3.5, device=device),
        "tensor1": torch.tensor([2.5], device=device),
        "int_tensor": torch.tensor(6, device=device),
    }[normalizer_kind]
    loss, grad = fused_loss_and_grad(x, t, normalizer=n, reduction=reduction)
    ref_loss, ref_grad = reference_loss_and_grad(x, t, normalizer=n, reduction=reduction)
    assert_close64(loss, ref_loss)
    assert_close64(grad, ref_grad)
    plain, _ = fused_loss_and_grad(x, t, reduction=reduction)
    value = float(n) if not isinstance(n, torch.Tensor) else n.item()
    assert_close64(loss, plain.double() / value)


def test_labels_equal_one_hot_dense(device):
    g = torch.Generator().manual_seed(9)
    shape = (4, 25, 10)
    x = (torch.randn(shape, generator=g) * 3).to(device)
    labels = torch.randint(0, 11, shape[:-1], generator=g).to(device)  # includes background = 10
    dense, _ = focal_cuda.reference.one_hot_labels(labels, 10, -1, torch.float32)
    for reduction in ("none", "sum", "mean"):
        a, ga = fused_loss_and_grad(x, labels, reduction=reduction)
        b, gb = fused_loss_and_grad(x, dense, reduction=reduction)
        assert_close64(a, b.double())
        assert_close64(ga, gb.double())


def test_ignore_index_other_values(device):
    x = torch.randn(5, 4, device=device)
    labels = torch.tensor([0, 255, 4, 255, 3], device=device)
    loss, grad = fused_loss_and_grad(x, labels, ignore_index=255)
    assert torch.all(loss[[1, 3]] == 0) and torch.all(grad[[1, 3]] == 0)
    ref_loss, ref_grad = reference_loss_and_grad(x, labels, ignore_index=255)
    assert_close64(loss, ref_loss)
    assert_close64(grad, ref_grad)


def test_module_matches_functional(device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, 6, generator=g).to(device)
    t = make_targets("labels", (3, 8, 6), device, g)
    cw = torch.rand(6, generator=g)
    m = focal_cuda.SigmoidFocalLoss(alpha=0.3, gamma=1.5, reduction="sum", class_weight=cw).to(device)
    assert m.class_weight.device.type == torch.device(device).type
    out = m(x, t, normalizer=2.0)
    expected = focal_cuda.sigmoid_focal_loss(x, t, 0.3, 1.5, "sum", weight=cw.to(device), normalizer=2.0)
    assert torch.equal(out, expected)
    assert "gamma=1.5" in repr(m)
