"""Promise: focal_cuda.ghmc_loss / GHMCLoss compute mmdet's GHMC (bins, tot, momentum on non-empty bins,
weights / n, sum / tot, weights constant for the gradient) on every target form, label weight and dtype,
against the plain-PyTorch twin of mmdet's algorithm (focal_cuda.reference.ghmc_loss) in float64; the
histogram counts exactly; the loss pass weights every element by the bin the histogram counted it in,
also for logits on the bin thresholds; bad arguments raise naming the argument."""

from __future__ import annotations

import math

import pytest
import torch

import focal_cuda
from focal_cuda import reference
from helpers import DEVICES, assert_close64


def dense_of(targets, C):
    if targets.dtype.is_floating_point:
        return targets.double()
    return reference.one_hot_labels(targets, C, -1, torch.float64)[0]


def away_from_edges(shape, y, bins, g, dtype=torch.float32, margin=2e-3):
    """Logits whose gradient norm |sigmoid(x) - y| is at least `margin` of a bin's width from every
    interior bin edge, after rounding to `dtype`: there the bin does not depend on how the sigmoid is
    rounded, so the fused op and mmdet's algorithm must agree exactly on the weights."""
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2.5
    for _ in range(200):
        xr = x.to(dtype).double()
        gn = (torch.sigmoid(xr) - y).abs() * bins
        frac = gn - gn.round()
        near = (frac.abs() < margin) & (gn.round() > 0) & (gn.round() < bins)
        if not bool(near.any()):
            return x.to(dtype)
        x = torch.where(near, x + 0.37 / bins, x)
    raise AssertionError("could not place the logits away from the edges")


def make_case(form, shape, g, bins, dtype=torch.float32):
    C = shape[-1]
    if form in ("labels", "labels32"):
        t = torch.randint(-1, C + 1, shape[:-1], generator=g)
        t[..., :3] = C  # some background
        if form == "labels32":
            t = t.int()
    elif form == "binary":
        t = (torch.rand(shape, generator=g) < 0.2).double()
    else:  # soft
        t = torch.rand(shape, generator=g, dtype=torch.float64)
        t[..., 0] = 0.0
        t[..., 1] = 1.0
    y = dense_of(t, C)
    x = away_from_edges(shape, y, bins, g, dtype)
    if t.dtype.is_floating_point:
        t = t.to(dtype if dtype == torch.float64 else torch.float32)
    return x, t


def label_weight_of(kind, x, g):
    lead = x.shape[:-1]
    if kind == "none":
        return None
    if kind == "anchor":  # mmdet's per-anchor weights, 0 for ignored anchors, any positive value otherwise
        w = torch.rand(lead, generator=g) + 0.5
        w[torch.rand(lead, generator=g) < 0.15] = 0.0
        return w
    if kind == "expanded":  # mmdet's view(-1, 1).expand(N, C)
        w = (torch.rand(lead, generator=g) < 0.8).float()
        return w.unsqueeze(-1).expand(x.shape)
    w = torch.rand(x.shape, generator=g)  # per element, some negative (not valid)
    w[torch.rand(x.shape, generator=g) < 0.2] = -1.0
    return w


def fused(x, t, lw=None, **kw):
    xr = x.clone().requires_grad_()
    loss = focal_cuda.ghmc_loss(xr, t, lw, **kw)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), xr.grad


def twin(x, t, lw=None, **kw):
    xr = x.detach().double().requires_grad_()
    tt = t.double() if t.dtype.is_floating_point else t
    loss = reference.ghmc_loss(xr, tt, lw, **kw)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), xr.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["labels", "labels32", "binary", "soft"])
@pytest.mark.parametrize("weighting", ["none", "anchor", "expanded", "element"])
@pytest.mark.parametrize("bins", [1, 10, 30])
def test_matches_mmdet_algorithm(device, form, weighting, bins):
    g = torch.Generator().manual_seed(bins * 7 + len(form) + len(weighting))
    x, t = make_case(form, (3, 157, 11), g, bins)
    lw = label_weight_of(weighting, x, g)
    ref_loss, ref_grad = twin(x, t, lw, bins=bins)
    loss, grad = fused(x.to(device), t.to(device), None if lw is None else lw.to(device), bins=bins)
    assert_close64(loss.cpu(), ref_loss, rtol=2e-6, atol=0)
    assert_close64(grad.cpu(), ref_grad, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(device, dtype):
    g = torch.Generator().manual_seed(3)
    x, t = make_case("labels", (2, 300, 9), g, 10, dtype=dtype)
    ref_loss, ref_grad = twin(x, t, bins=10)
    loss, grad = fused(x.to(device), t.to(device), bins=10)
    assert loss.dtype == dtype and grad.dtype == dtype
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=2 * torch.finfo(dtype).eps, atol=0)
    assert_close64(loss.cpu(), ref_loss, **tol)
    # 16-bit: the smallest gradients (easy negatives in a crowded bin) are a few float16 ulps
    gtol = dict(rtol=1e-10, atol=1e-18) if dtype == torch.float64 else dict(rtol=2 * torch.finfo(dtype).eps,
                                                                               atol=1e-3)
    assert_close64(grad.cpu(), ref_grad, **gtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_and_loss_weight(device, reduction):
    g = torch.Generator().manual_seed(11)
    x, t = make_case("labels", (2, 200, 6), g, 10)
    lw = label_weight_of("anchor", x, g)
    ref_loss, ref_grad = twin(x, t, lw, reduction=reduction, loss_weight=0.5)
    loss, grad = fused(x.to(device), t.to(device), lw.to(device), reduction=reduction, loss_weight=0.5)
    assert loss.shape == ref_loss.shape
    assert_close64(loss.cpu(), ref_loss, rtol=2e-6, atol=1e-12)
    assert_close64(grad.cpu(), ref_grad, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_ignore_index_and_empty(device):
    g = torch.Generator().manual_seed(5)
    x, t = make_case("labels", (2, 120, 5), g, 10)
    t[t == -1] = 5
    t[0, :50] = 7  # a chosen ignore_index
    ref_loss, ref_grad = twin(x, t, ignore_index=7)
    loss, grad = fused(x.to(device), t.to(device), ignore_index=7)
    assert_close64(loss.cpu(), ref_loss, rtol=2e-6, atol=0)
    assert_close64(grad.cpu(), ref_grad, rtol=2e-5, atol=2e-6)
    assert float(grad[0, :50].abs().sum()) == 0.0
    # nothing valid: loss 0 (mmdet: tot = max(0, 1)), gradient 0
    loss, grad = fused(x.to(device), t.to(device), torch.zeros(2, 120, device=device), ignore_index=7)
    assert float(loss) == 0.0 and float(grad.abs().sum()) == 0.0
    empty = torch.zeros(0, 5, device=device, requires_grad=True)
    out = focal_cuda.ghmc_loss(empty, torch.zeros(0, dtype=torch.long, device=device))
    out.backward()
    assert float(out.detach()) == 0.0 and empty.grad.shape == (0, 5)


@pytest.mark.parametrize("device", DEVICES)
def test_momentum_updates_acc_sum_like_mmdet(device):
    g = torch.Generator().manual_seed(9)
    acc_ref = torch.zeros(10, dtype=torch.float32)
    module = focal_cuda.GHMCLoss(bins=10, momentum=0.75).to(device)
    assert module.acc_sum.device.type == device and float(module.acc_sum.abs().sum()) == 0.0
    for step in range(4):
        x, t = make_case("labels", (2, 150, 7), g, 10)
        if step == 2:
            x = x * 0.05  # most elements in fewer bins: empty bins keep their running count
        ref_loss, ref_grad = twin(x, t, bins=10, momentum=0.75, acc_sum=acc_ref)
        xr = x.to(device).requires_grad_()
        loss = module(xr, t.to(device))
        loss.backward()
        assert_close64(loss.detach().cpu(), ref_loss, rtol=2e-6, atol=0)
        assert_close64(xr.grad.cpu(), ref_grad, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(module.acc_sum.cpu(), acc_ref, rtol=1e-6, atol=0)
    state = module.state_dict()
    assert set(state) == {"acc_sum"}
    fresh = focal_cuda.GHMCLoss(bins=10, momentum=0.75)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.acc_sum, acc_ref, rtol=1e-6, atol=0)
    assert not hasattr(focal_cuda.GHMCLoss(bins=10).state_dict(), "acc_sum")
    assert "acc_sum" not in focal_cuda.GHMCLoss(bins=10).state_dict()


@pytest.mark.parametrize("device", DEVICES)
def test_functional_momentum_needs_acc_sum(device):
    x = torch.randn(4, 3, device=device)
    t = torch.randint(0, 4, (4,), device=device)
    with pytest.raises(ValueError, match="acc_sum"):
        focal_cuda.ghmc_loss(x, t, momentum=0.5)
    with pytest.raises(ValueError, match=r"acc_sum: expected a float32 tensor of shape \(10,\)"):
        focal_cuda.ghmc_loss(x, t, momentum=0.5, acc_sum=torch.zeros(9, device=device))


def test_histogram_counts_exactly():
    """The histogram op against a float64 count of mmdet's bins (logits away from the edges), with the
    valid count last; per anchor weights, ignore_index and NaN logits (valid, in no bin) included."""
    g = torch.Generator().manual_seed(21)
    for form in ("labels", "binary", "soft"):
        x, t = make_case(form, (4, 257, 13), g, 30)
        x[0, 0, 0] = float("nan")
        lw = label_weight_of("anchor", x, g)
        mask = (lw > 0).unsqueeze(-1).expand(x.shape)
        y = dense_of(t, 13)
        if not t.dtype.is_floating_point:
            mask = mask & (t != -1).unsqueeze(-1)
        gn = (torch.sigmoid(x.double()) - y).abs()
        edges = torch.arange(31, dtype=torch.float64) / 30
        edges[-1] += 1e-6
        expected = [int(((gn >= edges[i]) & (gn < edges[i + 1]) & mask).sum()) for i in range(30)]
        expected.append(int(mask.sum()))
        weight01 = (lw > 0).float().unsqueeze(-1)
        counts = torch.ops.focal_cuda.ghmc_histogram(x, t, weight01, 30, -1)
        assert counts.dtype == torch.int64
        assert counts.tolist() == expected, form


def _on_thresholds(bins, rows, C, g):
    """Logits on and next to the float32 bin thresholds logit(k / bins), and their negatives."""
    ks = torch.arange(1, bins, dtype=torch.float64)
    t = torch.log(ks / bins / (1 - ks / bins)).float()
    vals = torch.cat([t, torch.nextafter(t, torch.full_like(t, math.inf)),
                      torch.nextafter(t, torch.full_like(t, -math.inf)), torch.zeros(1)])
    vals = torch.cat([vals, -vals])
    idx = torch.randint(0, vals.numel(), (rows, C), generator=g)
    return vals[idx]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["labels", "binary"])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "weighted"])
@pytest.mark.parametrize("bins", [10, 30, 100])
def test_loss_pass_uses_the_histograms_bins(device, form, layout, bins):
    """Logits exactly on the bin thresholds, where a different rounding of the sigmoid would move them:
    every element's weight (loss / BCE, from reduction='none') is the weight of the bin the histogram
    counted it in, so the number of elements carrying each weight equals that weight's bins' counts.
    Vector, padded and scalar paths alike (C = 13, strided logits, weights); the loss pass's threshold
    compares (10 bins) and grid (30, 100), the histogram's threshold counts (10, 30) and grid (100)."""
    g = torch.Generator().manual_seed(len(form) * 3 + len(layout) + bins)
    C = 13
    x = _on_thresholds(bins, 600, C, g)
    if form == "labels":
        t = torch.randint(0, C + 1, (600,), generator=g)
        y = reference.one_hot_labels(t, C, -1, torch.float64)[0]
    else:
        t = (torch.rand(600, C, generator=g) < 0.3).float()
        y = t.double()
    lw = None
    if layout == "strided":
        x = x.t().contiguous().t()
    if layout == "weighted":
        lw = (torch.rand(600, generator=g) < 0.7).float()
    x, t = x.to(device), t.to(device)
    mask = None if lw is None else (lw > 0).float().unsqueeze(-1).to(device)
    counts = torch.ops.focal_cuda.ghmc_histogram(x, t, mask, bins, -1).cpu()
    table, _ = torch.ops.focal_cuda.ghmc_weights(counts, None, 0.0, 0.0, False)
    loss = focal_cuda.ghmc_loss(x, t, None if lw is None else lw.to(device), bins, reduction="none").cpu().double()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x.cpu().double(), y, reduction="none")
    valid = torch.ones_like(bce, dtype=torch.bool) if lw is None else (lw > 0).unsqueeze(-1).expand(bce.shape)
    assert int(counts[bins]) == int(valid.sum())
    w_elem = loss[valid] / bce[valid]  # (every BCE here is at least softplus(-2.2) = 0.1)
    w_bins = table[:bins].double()
    seen = 0
    for b in range(bins):
        if counts[b] == 0:
            continue
        same = (w_bins - w_bins[b]).abs() <= 1e-6 * w_bins[b]
        expected = int(counts[:bins][same].sum())
        carried = int(((w_elem - w_bins[b]).abs() <= 1e-5 * w_bins[b]).sum())
        assert carried == expected, (b, expected, carried)
        seen += 1
    assert seen >= 5


def test_gradcheck_float64():
    """The analytic gradient w (p - y) / tot against finite differences (away from the bin edges, where
    the weights are locally constant, as mmdet treats them)."""
    g = torch.Generator().manual_seed(2)
    x, t = make_case("labels", (2, 9, 4), g, 10, dtype=torch.float64)
    lw = label_weight_of("anchor", x, g)
    xr = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: focal_cuda.ghmc_loss(v, t, lw, 10), (xr,), eps=1e-7, atol=1e-9)
    xd, td = make_case("soft", (3, 7), g, 5, dtype=torch.float64)
    xr = xd.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: focal_cuda.ghmc_loss(v, td, None, 5, reduction="none"), (xr,),
                                    eps=1e-7, atol=1e-9)


def test_compile_fullgraph():
    g = torch.Generator().manual_seed(4)
    x, t = make_case("labels", (2, 64, 5), g, 10)
    crit = focal_cuda.GHMCLoss(bins=10, momentum=0.5)
    ref = focal_cuda.GHMCLoss(bins=10, momentum=0.5)
    f = torch.compile(lambda a, b: crit(a, b), fullgraph=True)
    for _ in range(2):
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        la = f(xa, t)
        lb = ref(xb, t)
        la.backward()
        lb.backward()
        torch.testing.assert_close(la, lb)
        torch.testing.assert_close(xa.grad, xb.grad)
        torch.testing.assert_close(crit.acc_sum, ref.acc_sum)


def test_autocast_returns_float32():
    x = torch.randn(2, 50, 5, dtype=torch.bfloat16)
    t = torch.randint(0, 6, (2, 50))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = focal_cuda.ghmc_loss(x, t)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("call,match", [
    (lambda x, t: focal_cuda.ghmc_loss(x, t, bins=0), r"bins: expected an integer in \[1, 1024\], got 0"),
    (lambda x, t: focal_cuda.ghmc_loss(x, t, bins=2.5), "bins: expected an integer"),
    (lambda x, t: focal_cuda.ghmc_loss(x, t, momentum=1.0, acc_sum=torch.zeros(10)), r"momentum: expected a number in \[0, 1\)"),
    (lambda x, t: focal_cuda.ghmc_loss(x, t, reduction="avg"), "reduction: expected 'mean', 'sum' or 'none'"),
    (lambda x, t: focal_cuda.ghmc_loss(x, t, torch.ones(3)), r"label_weight: shape \(3,\) does not fit inputs"),
    (lambda x, t: focal_cuda.ghmc_loss(x, (t, torch.ones(4))), r"not \(labels, scores\)"),
    (lambda x, t: focal_cuda.ghmc_loss(x, t.float()), "targets: floating targets must have the shape"),
    (lambda x, t: focal_cuda.GHMCLoss(bins=-3), "bins: expected an integer"),
    (lambda x, t: focal_cuda.GHMCLoss(loss_weight=float("nan")), "loss_weight: expected a finite number"),
])
def test_bad_arguments(call, match):
    x = torch.randn(4, 5)
    t = torch.randint(0, 6, (4,))
    with pytest.raises((ValueError, TypeError), match=match):
        call(x, t)


def test_bad_label_raises_on_cpu():
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="class index 9"):
        focal_cuda.ghmc_loss(x, torch.tensor([0, 9, 1, 2]))


def test_repr():
    assert repr(focal_cuda.GHMCLoss(30, 0.75)) == (
        "GHMCLoss(bins=30, momentum=0.75, loss_weight=1.0, reduction='mean')")
