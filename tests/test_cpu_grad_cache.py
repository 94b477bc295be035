"""Promise: the CPU gradient cache (focal_op.cpp, CpuGradCache) reuses a freed gradient buffer for the
next call of a similar size, never hands out a buffer that is still in use, and can be turned off."""

from __future__ import annotations

import pytest
import torch

import focal_cuda
from focal_cuda import _C
from helpers import assert_close64, reference_loss_and_grad

MIN_BYTES = _C._cpu_grad_cache_info()["min_bytes"]


@pytest.fixture(autouse=True)
def cache_on():
    focal_cuda.set_cpu_grad_cache(True)
    focal_cuda.empty_cpu_grad_cache()
    yield
    focal_cuda.set_cpu_grad_cache(True)
    focal_cuda.empty_cpu_grad_cache()


def _problem(rows, seed, C=80):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, C, generator=g) * 3 - 2).requires_grad_()
    lab = torch.randint(-1, C + 1, (rows,), generator=g)
    return x, lab


def _grad(x, lab):
    focal_cuda.sigmoid_focal_loss(x, lab, reduction="sum", normalizer=100.0).backward()
    g, x.grad = x.grad, None
    return g


ROWS = MIN_BYTES // (80 * 4) + 100  # just over the cache's minimum size


def test_freed_gradient_is_reused_and_correct():
    x, lab = _problem(ROWS, 1)
    g1 = _grad(x, lab)
    ptr = g1.data_ptr()
    del g1
    assert _C._cpu_grad_cache_info()["held_bytes"] >= ROWS * 80 * 4
    x2, lab2 = _problem(ROWS, 2)
    g2 = _grad(x2, lab2)
    assert g2.data_ptr() == ptr  # the kept buffer came back
    assert _C._cpu_grad_cache_info()["held_bytes"] == 0
    _, ref = reference_loss_and_grad(x2, lab2, reduction="sum", normalizer=100.0)
    assert_close64(g2, ref)


def test_live_gradient_is_never_handed_out():
    x, lab = _problem(ROWS, 3)
    g1 = _grad(x, lab)
    before = g1.clone()
    g2 = _grad(*_problem(ROWS, 4))
    g3 = _grad(*_problem(ROWS, 5))
    assert len({g1.data_ptr(), g2.data_ptr(), g3.data_ptr()}) == 3
    assert torch.equal(g1, before)  # untouched by the later calls


def test_kept_buffer_serves_only_similar_sizes():
    g_big = _grad(*_problem(3 * ROWS, 6))
    ptr = g_big.data_ptr()
    del g_big
    x, lab = _problem(ROWS, 7)  # a third of the kept size: not served from it, and freed first
    g = _grad(x, lab)
    assert _C._cpu_grad_cache_info()["held_bytes"] == 0
    _, ref = reference_loss_and_grad(x, lab, reduction="sum", normalizer=100.0)
    assert_close64(g, ref)


def test_small_gradients_bypass_the_cache():
    g = _grad(*_problem(100, 8))
    del g
    assert _C._cpu_grad_cache_info()["held_bytes"] == 0


def test_turned_off_holds_nothing():
    _grad(*_problem(ROWS, 9))  # the gradient is freed at once
    assert _C._cpu_grad_cache_info()["held_bytes"] > 0
    focal_cuda.set_cpu_grad_cache(False)
    assert _C._cpu_grad_cache_info() == {**_C._cpu_grad_cache_info(), "enabled": False, "held_bytes": 0}
    x, lab = _problem(ROWS, 10)
    g = _grad(x, lab)
    del g
    assert _C._cpu_grad_cache_info()["held_bytes"] == 0
    _, ref = reference_loss_and_grad(x, lab, reduction="sum", normalizer=100.0)
    assert_close64(_grad(x, lab), ref)


def test_gradient_outlives_everything_else():
    """The buffer's deleter may run late (here: after the cache is turned off and on again)."""
    g = _grad(*_problem(ROWS, 11))
    focal_cuda.set_cpu_grad_cache(False)
    focal_cuda.set_cpu_grad_cache(True)
    del g
    assert _C._cpu_grad_cache_info()["held_bytes"] > 0
