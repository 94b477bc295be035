"""Helpers the tests share: targets of each kind, the float64 reference's loss and gradient, the
closed-form gradient, and float64 comparisons. (Fixtures live in conftest.py.)"""

from __future__ import annotations

import math

import pytest
import torch

import focal_cuda

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def make_targets(kind: str, shape, device, generator=None, dtype=torch.float32):
    """Targets of a kind: 'binary' / 'soft' dense, 'labels' int64 / 'labels32' int32 class indices
    (C = background, -1 ignored)."""
    C = shape[-1]
    if kind == "binary":
        return (torch.rand(shape, generator=generator) < 0.2).to(dtype).to(device)
    if kind == "soft":
        return torch.rand(shape, generator=generator).to(dtype).to(device)
    if kind in ("labels", "labels32"):
        lab = torch.randint(-1, C + 1, shape[:-1], generator=generator)  # -1 ignored, C background
        return lab.to(torch.int32 if kind == "labels32" else torch.int64).to(device)
    raise ValueError(kind)


def reference_loss_and_grad(inputs, targets, grad_output=None, **kw):
    """Loss and d(loss * grad_output)/d inputs from the plain-PyTorch reference in float64."""
    x = inputs.detach().to(torch.float64).requires_grad_()
    t = targets.to(torch.float64) if targets.dtype.is_floating_point else targets
    kw = dict(kw)
    if isinstance(kw.get("weight"), torch.Tensor):
        kw["weight"] = kw["weight"].to(torch.float64)
    if isinstance(kw.get("normalizer"), torch.Tensor):
        kw["normalizer"] = kw["normalizer"].to(torch.float64)
    loss = focal_cuda.reference.sigmoid_focal_loss(x, t, **kw)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(torch.float64)
    (grad,) = torch.autograd.grad(loss, x, go)
    return loss.detach(), grad


def fused_loss_and_grad(inputs, targets, grad_output=None, **kw):
    x = inputs.detach().clone().requires_grad_()
    loss = focal_cuda.sigmoid_focal_loss(x, targets, **kw)
    go = torch.ones_like(loss) if grad_output is None else grad_output
    loss.backward(go)
    return loss.detach(), x.grad


def closed_form_grad(x: torch.Tensor, y: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """dFL/dx from docs/design.md's closed forms, in float64 (binary y: first form; soft y: second)."""
    x = x.double()
    y = y.double()
    p = torch.sigmoid(x)
    p_t = p * y + (1 - p) * (1 - y)
    a_t = (alpha * y + (1 - alpha) * (1 - y)) if alpha >= 0 else torch.ones_like(y)
    binary = (y == 0) | (y == 1)
    sign = torch.where(y == 1, 1.0, -1.0).double()
    g_binary = a_t * sign * (1 - p_t) ** gamma * (gamma * p_t * torch.log(p_t) + p_t - 1)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(x, y, reduction="none")
    g_soft = a_t * ((p - y) * (1 - p_t) ** gamma + ce * gamma * (1 - p_t) ** (gamma - 1) * (1 - 2 * y) * p * (1 - p))
    return torch.where(binary, g_binary, g_soft)


def assert_close64(actual, expected, rtol=1e-5, atol=1e-6, msg=""):
    """actual (any float dtype) against a float64 expectation; atol scaled by the expectation's magnitude."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    scale = expected.abs().max().item() if expected.numel() else 1.0
    scale = scale if math.isfinite(scale) and scale > 0 else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=msg or None)


def focal_op_args(x, t, weight=None, divisor=None, scale=1.0, alpha=0.25, gamma=2.0, reduction=1, ignore_index=-1,
                  compute_grad=False, grad_prescale=0.0, acc_loss=False, scores=None, label_smoothing=0.0):
    """The arguments of torch.ops.focal_cuda.sigmoid_focal_loss_fwd in its schema's order."""
    return (x, t, scores, weight, divisor, scale, reduction, ignore_index, compute_grad, grad_prescale, acc_loss,
            alpha, gamma, label_smoothing)


def focal_op(*args, **kwargs):
    """torch.ops.focal_cuda.sigmoid_focal_loss_fwd called with focal_op_args' named arguments."""
    return torch.ops.focal_cuda.sigmoid_focal_loss_fwd.default(*focal_op_args(*args, **kwargs))


def focal_ops_called(fn) -> set:
    """The focal_cuda ops a call runs (torch.profiler): proof that a patched framework uses them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("focal_cuda::")}
