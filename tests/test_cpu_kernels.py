"""Promise: every CPU kernel build this machine can run (portable, AVX2) gives the reference's
values and gradients, on the vector path (unit-stride runs) and the scalar path (strides, tails)."""

from __future__ import annotations

import pytest
import torch

import focal_cuda
from focal_cuda import _cpu_isa
from conftest import assert_close64, fused_loss_and_grad, make_targets, reference_loss_and_grad


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
