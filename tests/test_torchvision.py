"""Promise: with default arguments and floating targets, focal_cuda is a drop-in for
torchvision.ops.sigmoid_focal_loss: same values, gradients, dtype and shape."""

from __future__ import annotations

import pytest
import torch

import focal_cuda
from helpers import assert_close64, make_targets

tv_ops = pytest.importorskip("torchvision.ops")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("kind", ["binary", "soft"])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0), (0.25, 1.5)])
def test_equals_torchvision(device, reduction, kind, alpha, gamma):
    g = torch.Generator().manual_seed(0)
    shape = (3, 50, 91)  # torchvision's COCO detectors use C = 91
    x = (torch.randn(shape, generator=g) * 2).to(device)
    t = make_targets(kind, shape, device, g)
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ours = focal_cuda.sigmoid_focal_loss(xa, t, alpha, gamma, reduction)
    theirs = tv_ops.sigmoid_focal_loss(xb, t, alpha, gamma, reduction)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert_close64(ours, theirs.double(), rtol=1e-5, atol=1e-6)
    go = torch.rand_like(ours)
    ours.backward(go)
    theirs.backward(go)
    assert_close64(xa.grad, xb.grad.double(), rtol=1e-5, atol=1e-6)


def test_equals_torchvision_fp16(device):
    if device == "cpu":
        x = torch.randn(4, 33)
    else:
        x = torch.randn(4, 33, device=device)
    x = x.half()
    t = (torch.rand(4, 33) < 0.3).half().to(device)
    ours = focal_cuda.sigmoid_focal_loss(x, t, reduction="sum")
    theirs = tv_ops.sigmoid_focal_loss(x.float(), t.float(), reduction="sum")
    assert ours.dtype == torch.float16
    assert abs(ours.item() - theirs.item()) <= 2e-3 * abs(theirs.item())
