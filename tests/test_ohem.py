"""Promise: focal_cuda.ohem_loss keeps, per image, every positive and the max(1, floor(ratio * positives))
background anchors of highest summed BCE (ties: lower index), never an ignored anchor, and returns the
sigmoid BCE over them and its gradient, against a per-image plain-PyTorch twin in float64."""

from __future__ import annotations

import pytest
import torch

import focal_cuda
from focal_cuda import reference
from focal_cuda.ohem import hard_negative_mask
from helpers import DEVICES, assert_close64


def case(B, A, C, g, positives=None):
    x = torch.randn(B, A, C, generator=g, dtype=torch.float64) * 2
    labels = torch.full((B, A), C, dtype=torch.int64)
    for b in range(B):
        n = int(torch.randint(0, 6, (1,), generator=g)) if positives is None else positives[b]
        idx = torch.randperm(A, generator=g)[:n]
        labels[b, idx] = torch.randint(0, C, (n,), generator=g)
        ign = torch.randperm(A, generator=g)[: A // 10]
        labels[b, ign] = torch.where(labels[b, ign] == C, torch.full_like(ign, -1), labels[b, ign])
    return x, labels


def run(fn, x, labels, **kw):
    xr = x.clone().requires_grad_()
    loss = fn(xr, labels, **kw)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), xr.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction,normalizer", [("sum", None), ("sum", 7.0), ("mean", None), ("none", None)])
@pytest.mark.parametrize("ratio", [3.0, 0.5, 1.7])
def test_matches_per_image_twin(device, reduction, normalizer, ratio):
    g = torch.Generator().manual_seed(int(ratio * 10) + len(reduction))
    x, labels = case(4, 200, 6, g, positives=[0, 3, 40, 1])
    ref_loss, ref_grad = run(reference.ohem_loss, x, labels, neg_pos_ratio=ratio, reduction=reduction,
                             normalizer=normalizer)
    loss, grad = run(focal_cuda.ohem_loss, x.to(device), labels.to(device), neg_pos_ratio=ratio,
                     reduction=reduction, normalizer=normalizer)
    assert_close64(loss.cpu(), ref_loss, rtol=1e-12, atol=1e-14)
    assert_close64(grad.cpu(), ref_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision(dtype):
    g = torch.Generator().manual_seed(1)
    x, labels = case(2, 300, 5, g, positives=[4, 9])
    x = x.to(dtype)
    ref_loss, ref_grad = run(reference.ohem_loss, x.double(), labels)
    loss, grad = run(focal_cuda.ohem_loss, x, labels)
    assert loss.dtype == dtype
    eps = torch.finfo(dtype).eps
    assert_close64(loss, ref_loss, rtol=4 * eps, atol=0)
    assert_close64(grad, ref_grad, rtol=4 * eps, atol=4 * eps)


def test_selection():
    g = torch.Generator().manual_seed(2)
    x, labels = case(3, 50, 4, g, positives=[0, 2, 20])
    mask = hard_negative_mask(x, labels, 3.0)
    score = torch.nn.functional.softplus(x).sum(-1)
    for b in range(3):
        pos = (labels[b] >= 0) & (labels[b] < 4)
        neg = labels[b] == 4
        k = max(1, 3 * int(pos.sum()))
        assert bool(mask[b][pos].all())
        assert not bool(mask[b][labels[b] == -1].any())  # ignored anchors are never kept
        chosen_neg = mask[b] & neg
        assert int(chosen_neg.sum()) == min(k, int(neg.sum()))
        if bool((neg & ~mask[b]).any()):  # every kept negative is at least as hard as every dropped one
            assert float(score[b][chosen_neg].min()) >= float(score[b][neg & ~mask[b]].max())
    # ties: the lower index first
    x = torch.zeros(1, 6, 3)
    labels = torch.tensor([[0, 3, 3, 3, 3, 3]])
    assert hard_negative_mask(x, labels, 2.0).tolist() == [[True, True, True, False, False, False]]


def test_no_host_sync_in_selection_under_compile():
    g = torch.Generator().manual_seed(3)
    x, labels = case(2, 64, 5, g)
    x = x.float()
    f = torch.compile(lambda a, b: focal_cuda.ohem_loss(a, b, 3.0), fullgraph=True)
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    la, lb = f(xa, labels), focal_cuda.ohem_loss(xb, labels, 3.0)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(xa.grad, xb.grad)


@pytest.mark.parametrize("call,match", [
    (lambda x, l: focal_cuda.ohem_loss(x[0], l[0]), r"inputs: expected logits of shape \[B, A, C\]"),
    (lambda x, l: focal_cuda.ohem_loss(x, l.float()), "labels: expected int32/int64"),
    (lambda x, l: focal_cuda.ohem_loss(x, l, neg_pos_ratio=0), "neg_pos_ratio: expected a finite number > 0"),
    (lambda x, l: focal_cuda.ohem_loss(x, l, reduction="avg"), "reduction: expected 'sum', 'mean' or 'none'"),
    (lambda x, l: focal_cuda.ohem_loss(x, l, reduction="mean", normalizer=2.0), "normalizer: only with"),
    (lambda x, l: focal_cuda.ohem_loss(x, l[:, :3]), "targets: class-index targets must have shape"),
    (lambda x, l: focal_cuda.ohem_loss(x, l + 9), "class index"),
])
def test_bad_arguments(call, match):
    x = torch.randn(2, 5, 3)
    labels = torch.randint(0, 4, (2, 5))
    with pytest.raises((ValueError, TypeError), match=match):
        call(x, labels)
