"""Promise: edge cases never produce a wrong number -- extreme and infinite logits give finite
results wherever the true value is finite (checked against a 50-digit mpmath oracle); ignored
anchors, zero weights and empty inputs never produce NaN; any strides and sizes give the same
answer as contiguous ones; sums are bitwise reproducible whatever the thread count."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

import focal_cuda
from helpers import assert_close64, fused_loss_and_grad, make_targets, reference_loss_and_grad

mpmath.mp.dps = 50


def exact_focal(x: float, y: float, alpha: float, gamma: float):
    """(loss, dloss/dx) to 50 digits; limits at +-inf taken by hand."""
    a_t = (alpha * y + (1 - alpha) * (1 - y)) if alpha >= 0 else 1.0
    if math.isinf(x):
        p = 1.0 if x > 0 else 0.0
        q = 1 - (p * y + (1 - p) * (1 - y))
        ce_zero = (x > 0 and y == 1) or (x < 0 and y == 0)
        loss = 0.0 if ce_zero else math.inf
        return loss, a_t * (p - y) * q**gamma  # the ce * p(1-p) term tends to 0
    x, y = mpmath.mpf(x), mpmath.mpf(y)
    p = 1 / (1 + mpmath.exp(-x))
    one_minus_p = 1 / (1 + mpmath.exp(x))  # not 1 - p: that rounds to 0 at 50 digits for x = 1e4
    ce = y * mpmath.log1p(mpmath.exp(-x)) + (1 - y) * mpmath.log1p(mpmath.exp(x))
    q = y * one_minus_p + (1 - y) * p  # 1 - p_t
    loss = a_t * q**gamma * ce
    dq = (1 - 2 * y) * p * one_minus_p
    dq_gamma = gamma * q ** (gamma - 1) * dq if gamma != 0 else 0
    grad = a_t * (((1 - y) * p - y * one_minus_p) * q**gamma + ce * dq_gamma)
    return float(loss), float(grad)


EXTREME = [-math.inf, -1e4, -200.0, -90.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 90.0, 200.0, 1e4, math.inf]


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.5, 2.0])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_binary_and_soft(device, gamma, alpha, dtype):
    ys = [0.0, 1.0, 0.3]
    xs = torch.tensor([[x for x in EXTREME] for _ in ys], dtype=dtype, device=device)
    ts = torch.tensor([[y] * len(EXTREME) for y in ys], dtype=dtype, device=device)
    loss, grad = fused_loss_and_grad(xs, ts, alpha=alpha, gamma=gamma)
    for i, y in enumerate(ys):
        for j, x in enumerate(EXTREME):
            el, eg = exact_focal(x, y, alpha, gamma)
            got_l, got_g = loss[i, j].item(), grad[i, j].item()
            assert math.isfinite(got_g), f"x={x} y={y}: gradient {got_g}, true {eg}"
            if math.isinf(el):
                assert got_l == math.inf, f"x={x} y={y}: loss {got_l}, true inf"
            else:
                assert math.isfinite(got_l)
                assert got_l == pytest.approx(el, rel=1e-5, abs=1e-30), f"loss x={x} y={y}"
            assert got_g == pytest.approx(eg, rel=1e-5, abs=1e-30), f"grad x={x} y={y}"


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_extreme_logits_labels(device, gamma):
    xs = torch.tensor(EXTREME, device=device).reshape(1, -1).repeat(2, 1)
    C = xs.shape[1]
    labels = torch.tensor([3, C], device=device)  # row 0: class 3 positive; row 1: background
    loss, grad = fused_loss_and_grad(xs, labels, gamma=gamma)
    for r in range(2):
        for c, x in enumerate(EXTREME):
            y = 1.0 if (r == 0 and c == 3) else 0.0
            el, eg = exact_focal(x, y, 0.25, gamma)
            assert math.isfinite(grad[r, c].item())
            assert grad[r, c].item() == pytest.approx(eg, rel=1e-5, abs=1e-30)
            if math.isfinite(el):
                assert loss[r, c].item() == pytest.approx(el, rel=1e-5, abs=1e-30)


def test_fp16_extremes(device):
    x = torch.tensor([[-60000.0, 60000.0, -65504.0, 65504.0]], device=device).half()
    for t in (torch.zeros_like(x), torch.ones_like(x)):
        loss, grad = fused_loss_and_grad(x, t)
        assert torch.isfinite(grad).all()
        for j in range(4):
            el, eg = exact_focal(float(x[0, j]), float(t[0, j]), 0.25, 2.0)
            assert grad[0, j].item() == pytest.approx(eg, rel=1e-3, abs=1e-7)
            if el < 65504:  # representable in fp16
                assert loss[0, j].item() == pytest.approx(el, rel=1e-3, abs=1e-7)
            else:
                assert loss[0, j].item() == math.inf  # the true loss overflows fp16, as in torch


def test_ignored_anchors_and_zero_weights_never_nan(device):
    x = torch.tensor([[math.nan, math.inf, -math.inf], [math.inf, -math.inf, 1.0]], device=device)
    labels = torch.tensor([-1, 0], device=device)
    w = torch.tensor([[1.0], [0.0]], device=device)  # anchor 0 ignored, anchor 1 weighted 0
    for reduction in ("none", "sum", "mean"):
        loss, grad = fused_loss_and_grad(x, labels, weight=w, reduction=reduction)
        assert torch.all(loss == 0), reduction
        assert torch.all(grad == 0), reduction
    dense = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], device=device)
    loss, grad = fused_loss_and_grad(x[1:], dense[1:], weight=torch.zeros(1, 3, device=device))
    assert torch.all(loss == 0) and torch.all(grad == 0)


def test_nan_logit_propagates(device):
    x = torch.tensor([[math.nan, 0.0]], device=device)
    loss, grad = fused_loss_and_grad(x, torch.tensor([1], device=device))
    assert math.isnan(loss[0, 0].item()) and math.isnan(grad[0, 0].item())
    assert math.isfinite(loss[0, 1].item())


@pytest.mark.parametrize("shape", [(0, 80), (2, 0, 5), (4, 0), (0,)], ids=str)
@pytest.mark.parametrize("kind", ["binary", "labels"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_input(device, shape, kind, reduction):
    x = torch.randn(shape, device=device)
    t = make_targets(kind, shape, device)
    loss, grad = fused_loss_and_grad(x, t, reduction=reduction)
    assert grad.shape == x.shape
    if reduction == "none":
        assert loss.shape == x.shape
    else:
        assert loss.shape == () and loss.item() == 0.0


def test_all_ignored_mean_is_zero(device):
    x = torch.randn(3, 5, device=device)
    labels = torch.full((3,), -1, device=device)
    loss, grad = fused_loss_and_grad(x, labels, reduction="mean")
    assert loss.item() == 0.0 and torch.all(grad == 0)


@pytest.mark.parametrize("C", [1, 3, 8, 80, 91, 264])
@pytest.mark.parametrize("kind", ["binary", "labels"])
def test_class_counts(device, C, kind):
    g = torch.Generator().manual_seed(C)
    shape = (37, C)
    x = (torch.randn(shape, generator=g) * 3).to(device)
    t = make_targets(kind, shape, device, g)
    loss, grad = fused_loss_and_grad(x, t, reduction="sum", normalizer=4.0)
    ref_loss, ref_grad = reference_loss_and_grad(x, t, reduction="sum", normalizer=4.0)
    assert_close64(loss, ref_loss)
    assert_close64(grad, ref_grad)


def _layouts(base: torch.Tensor):
    """Views of a [B, A, C] tensor with the same values as base.transpose(0, 1) etc."""
    B, A, C = base.shape
    return {
        "contiguous": base,
        "transposed_leading": base.transpose(0, 1),  # rows not mergeable
        "step_slice": base[:, ::2],
        "class_strided": base.permute(2, 0, 1).contiguous().permute(1, 2, 0),  # stride(-1) != 1
        "offset_by_one": torch.cat([base.new_zeros(1), base.reshape(-1)])[1:].view(B, A, C),
        "expanded_leading": base[:1].expand(3, A, C),
    }


@pytest.mark.parametrize("layout", list(_layouts(torch.zeros(2, 4, 3))))
@pytest.mark.parametrize("kind", ["binary", "labels"])
@pytest.mark.parametrize("weight_form", [None, "class", "anchor"])
def test_any_strides(device, layout, kind, weight_form):
    g = torch.Generator().manual_seed(12)
    base = (torch.randn(2, 14, 19, generator=g) * 2).to(device)
    x = _layouts(base)[layout]
    if kind == "binary":
        t = _layouts(make_targets("binary", base.shape, device, g))[layout]
    else:
        lab = make_targets("labels", base.shape, device, g)
        t = _layouts(lab.unsqueeze(-1))[layout][..., 0] if layout != "class_strided" else lab
        t = t if t.shape == x.shape[:-1] else lab
    w = None
    if weight_form == "class":
        w = torch.rand(19, generator=g).to(device)[::1]
    elif weight_form == "anchor":
        w = torch.rand(x.shape[:-1] + (1,), generator=g).to(device).transpose(0, 1).contiguous().transpose(0, 1)
    for reduction in ("none", "sum"):
        loss, grad = fused_loss_and_grad(x, t, weight=w, reduction=reduction)
        ref_loss, ref_grad = reference_loss_and_grad(x.contiguous(), t.contiguous(), weight=w, reduction=reduction)
        assert_close64(loss, ref_loss)
        assert_close64(grad, ref_grad)


def test_many_leading_dims(device):
    """More leading dims than the kernel's row indexer holds: falls back to a contiguous copy."""
    g = torch.Generator().manual_seed(13)
    base = torch.randn((2,) * 10 + (5,), generator=g).to(device)
    x = base.permute(*reversed(range(10)), 10)  # 10 unmergeable leading dims
    t = make_targets("labels", x.shape, device, g)
    loss, grad = fused_loss_and_grad(x, t)
    ref_loss, ref_grad = reference_loss_and_grad(x, t)
    assert_close64(loss, ref_loss)
    assert_close64(grad, ref_grad)


@pytest.mark.parametrize("kind", ["binary", "labels"])
def test_sum_is_bitwise_reproducible(device, kind):
    g = torch.Generator().manual_seed(14)
    shape = (2000, 91)
    x = torch.randn(shape, generator=g).to(device)
    t = make_targets(kind, shape, device, g)
    runs = [fused_loss_and_grad(x, t, reduction="sum") for _ in range(5)]
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0])
        assert torch.equal(grad, runs[0][1])


def test_cpu_sum_independent_of_thread_count():
    g = torch.Generator().manual_seed(15)
    shape = (3000, 80)
    x = torch.randn(shape, generator=g)
    t = make_targets("labels", shape, "cpu", g)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(focal_cuda.sigmoid_focal_loss(x, t, reduction="sum"))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(r, results[0]) for r in results)
