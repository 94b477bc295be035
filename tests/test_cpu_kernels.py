"""Promise: every CPU kernel build this machine can run (portable, AVX2) gives the reference's
values and gradients, on the vector path (unit-stride runs) and the scalar path (strides, tails)."""

from __future__ import annotations

import pytest
import torch

import focal_cuda
from focal_cuda import _cpu_isa
from helpers import assert_close64, fused_loss_and_grad, make_targets, reference_loss_and_grad


def test_kernel_selection_reported(cpu_kernel):
    assert focal_cuda.build_info()["cpu_kernel"] == cpu_kernel
    assert _cpu_isa.current() == cpu_kernel


@pytest.mark.parametrize("kind", ["binary", "soft", "labels", "labels32"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(5, 80), (3, 7, 13), (50, 1), (33, 5), (6, 91)], ids=str)
def test_kernel_matches_reference(cpu_kernel, kind, gamma, dtype, shape):
    g = torch.Generator().manual_seed(31)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    t = make_targets(kind, shape, "cpu", g, dtype=dtype)
    w = torch.rand(shape[-1], generator=g)
    for reduction in ("none", "sum"):
        loss, grad = fused_loss_and_grad(x, t, gamma=gamma, weight=w, reduction=reduction)
        ref_loss, ref_grad = reference_loss_and_grad(x, t, gamma=gamma, weight=w, reduction=reduction)
        tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-5)
        assert_close64(loss, ref_loss, rtol=tol, atol=tol)
        assert_close64(grad, ref_grad, rtol=tol, atol=tol)


def test_kernel_strided_columns(cpu_kernel):
    g = torch.Generator().manual_seed(32)
    x = torch.randn(40, 30, generator=g).t()  # class stride 30: scalar path
    t = make_targets("labels", (30, 40), "cpu", g)
    loss, grad = fused_loss_and_grad(x, t, reduction="sum")
    ref_loss, ref_grad = reference_loss_and_grad(x, t, reduction="sum")
    assert_close64(loss, ref_loss)
    assert_close64(grad, ref_grad)


def test_unknown_kernel_name():
    with pytest.raises(ValueError, match="CPU kernel"):
        _cpu_isa.use("avx9000")


@pytest.mark.parametrize("C", [1, 3, 7, 8, 15])
@pytest.mark.parametrize("weight_form", [None, "anchor", "class", "element"])
def test_small_class_count_flat_path(cpu_kernel, C, weight_form):
    """Label targets with C < 16 run flat over the elements (vectors spanning several rows)."""
    g = torch.Generator().manual_seed(C)
    shape = (4, 37, C)
    x = torch.randn(shape, generator=g) * 3
    t = make_targets("labels", shape, "cpu", g)
    w = {None: None, "anchor": torch.rand(shape[:-1] + (1,), generator=g), "class": torch.rand(C, generator=g),
         "element": torch.rand(shape, generator=g)}[weight_form]
    for reduction in ("none", "sum", "mean"):
        loss, grad = fused_loss_and_grad(x, t, weight=w, reduction=reduction)
        ref_loss, ref_grad = reference_loss_and_grad(x, t, weight=w, reduction=reduction)
        assert_close64(loss, ref_loss)
        assert_close64(grad, ref_grad)


def _label_pattern(rows, C, g, ignore_index):
    """Labels that reach every branch of the unweighted flat path: long background runs, positives at
    the first and last class, neighbouring positive rows, single and consecutive ignored rows, ignored
    rows next to positives, at the start and end of the tensor."""
    u = torch.rand(rows, generator=g)
    lab = torch.full((rows,), C, dtype=torch.int64)
    pos = u < 0.12
    lab[pos] = torch.randint(0, C, (int(pos.sum()),), generator=g)
    lab[(u >= 0.12) & (u < 0.25)] = ignore_index
    lab[:3] = torch.tensor([0, C - 1, ignore_index])
    lab[-3:] = torch.tensor([ignore_index, C - 1, 0])
    lab[rows // 2:rows // 2 + 5] = ignore_index
    lab[rows // 3:rows // 3 + 4] = torch.tensor([C - 1, 0, C - 1, ignore_index])
    return lab


@pytest.mark.parametrize("C", [1, 2, 5, 15, 16, 17, 23, 24, 25, 48, 80, 91])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unweighted_labels_flat_path(cpu_kernel, C, dtype):
    """Contiguous labels without a weight run flat over the elements in groups of vectors: groups with
    no positive and no ignored element, groups inside an ignored row, and mixed groups built lane by
    lane. Sizes cross the 16384-element work chunks and leave a partial last group."""
    g = torch.Generator().manual_seed(100 + C)
    rows = 40000 // C + 7
    x = (torch.randn(rows, C, generator=g) * 4 - 2).to(dtype)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-5)
    for ignore_index in (-1, 255):
        lab = _label_pattern(rows, C, g, ignore_index)
        for labels in (lab, lab.to(torch.int32)):
            for reduction in ("none", "sum", "mean"):
                kw = dict(reduction=reduction, ignore_index=ignore_index)
                loss, grad = fused_loss_and_grad(x, labels, **kw)
                ref_loss, ref_grad = reference_loss_and_grad(x, labels, **kw)
                assert_close64(loss, ref_loss, rtol=tol, atol=tol)
                assert_close64(grad, ref_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("C", [3, 24, 91])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_unweighted_labels_flat_path_options(cpu_kernel, C, gamma, alpha):
    """The flat path's all-negative groups leave alpha to the caller: every gamma class, alpha on and off."""
    g = torch.Generator().manual_seed(7 * C)
    rows = 20000 // C + 5
    x = torch.randn(rows, C, generator=g) * 5
    lab = _label_pattern(rows, C, g, -1)
    for reduction in ("none", "sum"):
        kw = dict(reduction=reduction, gamma=gamma, alpha=alpha, normalizer=17.0 if reduction == "sum" else None)
        loss, grad = fused_loss_and_grad(x, lab, **kw)
        ref_loss, ref_grad = reference_loss_and_grad(x, lab, **kw)
        assert_close64(loss, ref_loss)
        assert_close64(grad, ref_grad)


@pytest.mark.parametrize("C", [1, 5, 24, 80, 91])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["one_hot", "soft", "one_hot_float32"])
def test_unweighted_dense_flat_path(cpu_kernel, C, dtype, form):
    """Contiguous dense targets without a weight run flat in groups of vectors; a group whose targets are
    all exactly 0 (also -0.0) takes the all-negative math, any other the soft-target math, and the last
    partial group of a 16384-element chunk the row-segment path."""
    g = torch.Generator().manual_seed(300 + C)
    rows = 40000 // C + 7
    x = (torch.randn(rows, C, generator=g) * 4 - 2).to(dtype)
    lab = _label_pattern(rows, C, g, -1).clamp_min(0)
    t = torch.nn.functional.one_hot(lab, C + 1)[:, :C].float()
    t[rows // 4:rows // 4 + 3] = -0.0  # negative zeros count as 0
    if form == "soft":
        t = t * torch.rand(rows, C, generator=g)  # zero where one-hot is zero, soft elsewhere
    t = t if form == "one_hot_float32" else t.to(dtype)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-5)
    for reduction in ("none", "sum", "mean"):
        loss, grad = fused_loss_and_grad(x, t, reduction=reduction)
        ref_loss, ref_grad = reference_loss_and_grad(x, t, reduction=reduction)
        assert_close64(loss, ref_loss, rtol=tol, atol=tol)
        assert_close64(grad, ref_grad, rtol=tol, atol=tol)
