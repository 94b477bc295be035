"""Promise: the fvcore drop-ins (and their scripted _jit forms) give fvcore's own values, gradients
and dtypes, and patch() installs them in fvcore.nn and in every detectron2 module that holds one,
where the fused op is what runs."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from helpers import assert_close64, focal_ops_called

fvcore_nn = pytest.importorskip("fvcore.nn")
from focal_cuda.integrations import fvcore as fc_fv  # noqa: E402

PAIRS = [("sigmoid_focal_loss", 2.0), ("sigmoid_focal_loss_jit", 2.0), ("sigmoid_focal_loss_star", 1.0),
         ("sigmoid_focal_loss_star_jit", 1.5)]


@pytest.mark.parametrize("name,gamma", PAIRS)
@pytest.mark.parametrize("alpha", [-1.0, 0.25, -0.5, 2.0])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "anything else"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropins_equal_fvcore(device, name, gamma, alpha, reduction, dtype):
    """Values, float32 results (fvcore computes from .float()), gradients; 0/1 integer targets;
    any negative alpha (no weighting) and an alpha above 1 (run unfused), an unknown reduction."""
    ours_fn, theirs_fn = getattr(fc_fv, name), getattr(fvcore_nn, name)
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(64, 11, generator=g) * 2).to(device, dtype)
    t = (torch.rand(64, 11, generator=g) < 0.2).long().to(device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = ours_fn(xa, t, alpha, gamma, reduction)
    theirs = theirs_fn(xb, t, alpha, gamma, reduction)
    assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape
    assert_close64(ours, theirs.double(), rtol=1e-5, atol=1e-6)
    go = torch.rand_like(ours)
    ours.backward(go)
    theirs.backward(go)
    assert xa.grad.dtype == dtype
    # float16: 1e-3 relative, and an absolute 1e-3 of the largest gradient, as a mean's small
    # gradients fall below float16's normal range (6.1e-5), where its spacing is 6e-8
    half = dtype == torch.float16
    assert_close64(xa.grad, xb.grad.double(), rtol=1e-3 if half else 1e-5, atol=1e-3 if half else 1e-6)


def test_patch_reaches_fvcore_and_detectron2_modules(monkeypatch):
    """patch() replaces the four names in fvcore.nn, fvcore.nn.focal_loss and every detectron2
    module that imported them (here a stand-in module, as detectron2's RetinaNet does)."""
    d2 = types.ModuleType("detectron2.modeling.meta_arch.retinanet")
    d2.sigmoid_focal_loss_jit = fvcore_nn.sigmoid_focal_loss_jit
    monkeypatch.setitem(sys.modules, "detectron2.modeling.meta_arch.retinanet", d2)
    stock = fvcore_nn.sigmoid_focal_loss_jit
    with fc_fv.patched():
        for name, _ in PAIRS:
            assert getattr(fvcore_nn, name) is getattr(fc_fv, name)
        assert d2.sigmoid_focal_loss_jit is fc_fv.sigmoid_focal_loss_jit
        x = torch.randn(20, 5, requires_grad=True)
        ops = focal_ops_called(lambda: d2.sigmoid_focal_loss_jit(x, torch.zeros(20, 5), 0.25, 2.0, "sum").backward())
        assert "focal_cuda::sigmoid_focal_loss_fwd" in ops
    assert fvcore_nn.sigmoid_focal_loss_jit is stock and d2.sigmoid_focal_loss_jit is stock
