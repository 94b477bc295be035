"""Promise: backward is right however it is driven -- gradcheck in float64, grad_output == 1 or
not, reduction='none' with any grad_output, retain_graph and repeated backward, no gradient
wanted -- and a second derivative raises instead of being silently wrong."""

from __future__ import annotations

import pytest
import torch

import focal_cuda
from helpers import assert_close64, make_targets, reference_loss_and_grad, focal_op


@pytest.mark.parametrize("kind", ["binary", "soft", "labels"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.0])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_gradcheck_float64(device, kind, gamma, reduction):
    g = torch.Generator().manual_seed(17)
    shape = (3, 2, 5)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(device).requires_grad_()
    t = make_targets(kind, shape, device, g, dtype=torch.float64)
    w = torch.rand(shape[-1], generator=g, dtype=torch.float64).to(device)

    def fn(inp):
        return focal_cuda.sigmoid_focal_loss(inp, t, 0.25, gamma, reduction, weight=w, normalizer=1.7)

    fn_kw = {"normalizer": None} if reduction == "mean" else {}
    if fn_kw:
        def fn(inp):  # noqa: F811  (mean cannot take a normalizer)
            return focal_cuda.sigmoid_focal_loss(inp, t, 0.25, gamma, reduction, weight=w)

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


def _fresh(device, seed=0, shape=(6, 10)):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2).to(device)
    t = make_targets("labels", shape, device, g)
    return x, t


@pytest.mark.parametrize("scale", [1.0, 0.5, 65536.0, 0.0, -2.0])
def test_scaled_grad_output(device, scale):
    """grad_output != 1, as from a loss weight or AMP's GradScaler."""
    x, t = _fresh(device)
    xr = x.clone().requires_grad_()
    loss = focal_cuda.sigmoid_focal_loss(xr, t, reduction="sum", normalizer=3.0)
    (loss * scale).backward()
    _, ref = reference_loss_and_grad(x, t, reduction="sum", normalizer=3.0)
    assert_close64(xr.grad, ref * scale, atol=1e-6)


def test_none_with_arbitrary_grad_output(device):
    x, t = _fresh(device)
    go = torch.randn(x.shape, device=device)
    xr = x.clone().requires_grad_()
    focal_cuda.sigmoid_focal_loss(xr, t).backward(go)
    _, ref = reference_loss_and_grad(x, t, grad_output=go)
    assert_close64(xr.grad, ref)


def test_none_then_mean_and_sum(device):
    x, t = _fresh(device)
    for post in (torch.sum, torch.mean, lambda l: l[:, 3].sum() * 2):
        xr = x.clone().requires_grad_()
        post(focal_cuda.sigmoid_focal_loss(xr, t)).backward()
        xd = x.double().requires_grad_()
        post(focal_cuda.reference.sigmoid_focal_loss(xd, t)).backward()
        assert_close64(xr.grad, xd.grad)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_retain_graph_and_repeated_backward(device, reduction):
    x, t = _fresh(device)
    xr = x.clone().requires_grad_()
    loss = focal_cuda.sigmoid_focal_loss(xr, t, reduction=reduction)
    out = loss.sum() if reduction == "none" else loss
    _, ref = reference_loss_and_grad(x, t, reduction="sum")
    scales = [1.0, 3.0, 0.5, 1.0]
    for i, s in enumerate(scales):
        xr.grad = None
        (out * s).backward(retain_graph=i < len(scales) - 1)
        assert_close64(xr.grad, ref * s, msg=f"backward #{i} (scale {s})")


def test_grad_accumulates_across_calls(device):
    """Two losses on the same logits: autograd sums both gradients; neither call clobbers the other."""
    x, t = _fresh(device)
    xr = x.clone().requires_grad_()
    a = focal_cuda.sigmoid_focal_loss(xr, t, reduction="sum")
    b = focal_cuda.sigmoid_focal_loss(xr, t, gamma=0.0, reduction="sum")
    (a * 2 + b).backward()
    _, ra = reference_loss_and_grad(x, t, reduction="sum")
    _, rb = reference_loss_and_grad(x, t, gamma=0.0, reduction="sum")
    assert_close64(xr.grad, 2 * ra + rb)


def test_non_leaf_input(device):
    """Gradient flows through the op to parameters upstream (as in a detector head)."""
    x, t = _fresh(device)
    lin = torch.nn.Linear(10, 10, dtype=torch.float64).to(device)
    logits = lin(x.double()).float()
    focal_cuda.sigmoid_focal_loss(logits, t, reduction="sum").backward()
    lin_ref = torch.nn.Linear(10, 10, dtype=torch.float64).to(device)
    lin_ref.load_state_dict(lin.state_dict())
    focal_cuda.reference.sigmoid_focal_loss(lin_ref(x.double()), t, reduction="sum").backward()
    assert_close64(lin.weight.grad, lin_ref.weight.grad, rtol=1e-4)


def test_no_grad_forward_writes_no_gradient(device):
    x, t = _fresh(device)
    with torch.no_grad():
        loss = focal_cuda.sigmoid_focal_loss(x.clone().requires_grad_(), t, reduction="sum")
    assert not loss.requires_grad
    ref, _ = reference_loss_and_grad(x, t, reduction="sum")
    assert_close64(loss, ref)
    # the raw op reports an empty gradient when none is asked for
    _, grad = focal_op(x, t, None, None, 1.0, 0.25, 2.0, 1, -1, False)
    assert grad.numel() == 0


def test_double_backward_raises(device):
    x, t = _fresh(device)
    xr = x.clone().requires_grad_()
    loss = focal_cuda.sigmoid_focal_loss(xr, t, reduction="sum")
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(loss, xr, create_graph=True)
    # the graph is still usable for a first derivative afterwards
    loss.backward()
    _, ref = reference_loss_and_grad(x, t, reduction="sum")
    assert_close64(xr.grad, ref)


def test_op_level_autograd(device):
    """torch.ops.focal_cuda.sigmoid_focal_loss_fwd is differentiable by itself (registered autograd)."""
    x, t = _fresh(device)
    xr = x.clone().requires_grad_()
    loss, grad = focal_op(xr, t, None, None, 1.0, 0.25, 2.0, 1, -1, True)
    assert not grad.requires_grad
    loss.backward()
    _, ref = reference_loss_and_grad(x, t, reduction="sum")
    assert_close64(xr.grad, ref)


def test_raw_op_gradient_output_not_modified_by_backward(device):
    """The raw op hands its gradient buffer to the caller: its autograd must not scale it in place."""
    x, t = _fresh(device)
    xr = x.clone().requires_grad_()
    loss, grad = focal_op(xr, t, None, None, 1.0, 0.25, 2.0, 1, -1, True)
    before = grad.clone()
    (loss * 3.0).backward()
    assert torch.equal(grad, before)
    assert_close64(xr.grad, before.double() * 3.0)


# ----------------------------------------------------------------------------- torch.func

@pytest.mark.parametrize("kind", ["labels", "binary", "soft"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_torch_func_grad(device, kind, reduction):
    """torch.func.grad / grad_and_value / vjp give the float64 reference's gradient."""
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(5, 12, generator=g) * 2).to(device)
    t = make_targets(kind, (5, 12), device, g)

    def loss_fn(inp):
        return focal_cuda.sigmoid_focal_loss(inp, t, 0.25, 1.5, reduction)

    ref_loss, ref_grad = reference_loss_and_grad(x, t, gamma=1.5, reduction=reduction)
    assert_close64(torch.func.grad(loss_fn)(x), ref_grad)
    grad, value = torch.func.grad_and_value(loss_fn)(x)
    assert_close64(grad, ref_grad)
    assert_close64(value, ref_loss)
    value, vjp_fn = torch.func.vjp(loss_fn, x)
    (grad3,) = vjp_fn(torch.tensor(3.0, device=device))
    assert_close64(grad3, ref_grad * 3)


def test_torch_func_functional_call_and_vmap(device):
    """A module's parameter gradients through functional_call (how torch.func trains a model), and
    per-sample losses and gradients with vmap over the batch."""
    g = torch.Generator().manual_seed(9)
    head = torch.nn.Linear(6, 10).to(device)
    feats = torch.randn(4, 7, 6, generator=g).to(device)
    labels = torch.randint(-1, 11, (4, 7), generator=g).to(device)
    params = dict(head.named_parameters())

    def loss_fn(p, f, lab):
        return focal_cuda.sigmoid_focal_loss(torch.func.functional_call(head, p, (f,)), lab, reduction="sum")

    grads = torch.func.grad(loss_fn)(params, feats, labels)
    ref = focal_cuda.reference.sigmoid_focal_loss(head(feats).double(), labels, reduction="sum")
    ref.backward()
    assert_close64(grads["weight"], head.weight.grad.double(), rtol=1e-5)

    per_sample = torch.func.vmap(loss_fn, in_dims=(None, 0, 0))(params, feats, labels)
    loop = torch.stack([loss_fn(params, feats[i], labels[i]) for i in range(4)])
    assert_close64(per_sample, loop.double())
    per_sample_grads = torch.func.vmap(torch.func.grad(loss_fn), in_dims=(None, 0, 0))(params, feats, labels)
    for i in range(4):
        head.zero_grad()
        focal_cuda.reference.sigmoid_focal_loss(head(feats[i]).double(), labels[i], reduction="sum").backward()
        assert_close64(per_sample_grads["bias"][i], head.bias.grad.double(), rtol=1e-5)


def test_torch_func_second_derivative_raises(device):
    x, t = _fresh(device)

    def loss_fn(inp):
        return focal_cuda.sigmoid_focal_loss(inp, t, reduction="sum")

    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.func.grad(lambda inp: torch.func.grad(loss_fn)(inp).sum())(x)
    with pytest.raises(RuntimeError, match="forward-mode differentiation .* is not supported"):
        torch.func.hessian(loss_fn)(x)
    with pytest.raises(RuntimeError, match="forward-mode differentiation .* is not supported"):
        torch.func.jvp(loss_fn, (x,), (torch.ones_like(x),))
