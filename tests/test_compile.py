"""Promise: the ops pass torch.library.opcheck (schema, fake tensors, autograd registration, AOT
dispatch) with and without grad, and torch.compile(fullgraph=True) of a training step that calls
sigmoid_focal_loss has no graph break and gives the eager values and gradients."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import focal_cuda
from helpers import assert_close64, focal_op_args, make_targets

FWD = torch.ops.focal_cuda.sigmoid_focal_loss_fwd.default
SCALE = torch.ops.focal_cuda.scale_grad_.default


def _samples(device):
    g = torch.Generator().manual_seed(0)
    shape = (3, 4, 7)
    for dtype in (torch.float32, torch.float16, torch.float64):
        for kind in ("binary", "labels"):
            for reduction in (0, 1):
                for requires_grad in (False, True):
                    x = torch.randn(shape, generator=g).to(device, dtype).requires_grad_(requires_grad)
                    t = make_targets(kind, shape, device, g, dtype=dtype)
                    acc = torch.float64 if dtype == torch.float64 else torch.float32
                    w = torch.rand(7, generator=g).to(device) if kind == "labels" else None
                    div = torch.tensor(2.5, dtype=acc, device=device) if reduction == 1 else None
                    yield focal_op_args(x, t, w, div, 1.0, 0.25, 2.0, reduction, -1, requires_grad)
    # float16 with the gradient stored unnormalised and prescaled (what sigmoid_focal_loss does for fp16)
    x = torch.randn(5, 9, generator=g).to(device, torch.float16).requires_grad_()
    yield focal_op_args(x, torch.randint(0, 10, (5,), generator=g).to(device), None, torch.tensor(3.0, device=device),
                        0.5, 0.25, 2.0, 1, -1, True, 256.0)
    # general gamma, no alpha, non-contiguous input
    x = torch.randn(7, 3, generator=g).to(device).t().requires_grad_()
    yield focal_op_args(x, torch.rand(3, 7, generator=g).to(device), None, None, 0.5, -1.0, 1.5, 1, -1, True)


def test_opcheck_forward(device):
    for args in _samples(device):
        opcheck(FWD, args)


def test_opcheck_scale_grad(device):
    for dtype in (torch.float32, torch.float16, torch.float64):
        grad = torch.randn(5, 9, device=device, dtype=dtype)
        for value in (1.0, 3.0):
            opcheck(SCALE, (grad.clone(), torch.tensor(value, device=device, dtype=dtype)))


class _Head(torch.nn.Module):
    def __init__(self, C):
        super().__init__()
        self.cls = torch.nn.Linear(16, C)

    def forward(self, feats):
        return self.cls(feats)


def _train_step(head, feats, targets, reduction, normalizer):
    logits = head(feats)
    return focal_cuda.sigmoid_focal_loss(logits, targets, reduction=reduction, normalizer=normalizer)


@pytest.mark.parametrize(
    "kind,reduction,use_normalizer",
    [("labels", "sum", True), ("labels", "mean", False), ("binary", "none", False), ("soft", "sum", False)],
)
def test_compile_fullgraph_matches_eager(device, kind, reduction, use_normalizer):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    C = 9
    head = _Head(C).to(device)
    feats = torch.randn(2, 30, 16, generator=g).to(device)
    targets = make_targets(kind, (2, 30, C), device, g)
    normalizer = None
    if use_normalizer:  # RetinaNet: number of positive anchors, as a device tensor (no .item())
        normalizer = ((targets >= 0) & (targets < C)).sum().clamp_min(1)

    def run(step_fn):
        head.zero_grad()
        loss = step_fn(head, feats, targets, reduction, normalizer)
        (loss.sum() if reduction == "none" else loss).backward()
        return loss.detach(), head.cls.weight.grad.clone(), head.cls.bias.grad.clone()

    eager = run(_train_step)
    compiled = run(torch.compile(_train_step, fullgraph=True, backend="aot_eager"))
    for a, b in zip(compiled, eager):
        assert_close64(a, b.double())


def test_compile_inductor_training_step(device):
    """The default backend (inductor) end to end, with the loss scaled after the op (grad_output != 1)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    C = 12
    head = _Head(C).to(device)
    feats = torch.randn(3, 40, 16, generator=g).to(device)
    labels = make_targets("labels", (3, 40, C), device, g)

    def step(feats, labels):
        loss = focal_cuda.sigmoid_focal_loss(head(feats), labels, reduction="sum", normalizer=7.0)
        return 0.5 * loss

    def run(fn):
        head.zero_grad()
        loss = fn(feats, labels)
        loss.backward()
        return loss.detach(), head.cls.weight.grad.clone()

    eager = run(step)
    compiled = run(torch.compile(step, fullgraph=True))
    for a, b in zip(compiled, eager):
        assert_close64(a, b.double(), rtol=1e-5)


def test_compile_reports_no_graph_break(device):
    torch._dynamo.reset()
    x = torch.randn(4, 6, device=device, requires_grad=True)
    labels = torch.tensor([0, 6, -1, 2], device=device)

    def fn(x, labels):
        return focal_cuda.sigmoid_focal_loss(x, labels, reduction="mean")

    explanation = torch._dynamo.explain(fn)(x, labels)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


# ----------------------------------------------------------------------------- dynamic shapes

def _dynamic_case(device, n, g, dense):
    x = torch.randn(2, n, 5, generator=g).to(device)
    if dense:
        y = (torch.rand(2, n, 5, generator=g) < 0.2).float().to(device)
    else:
        y = torch.randint(-1, 6, (2, n), generator=g).to(device)  # -1 ignored, 5 background
    return x, y


@pytest.mark.parametrize("mode", ["dynamic=True", "mark_dynamic", "automatic"])
@pytest.mark.parametrize("options", ["module defaults", "module options", "passed per call"])
def test_compile_dynamic_shapes(device, mode, options):
    """Dynamic shapes make the sizes, and the float options passed in, symbolic: the argument checks
    must still trace (no graph break with fullgraph=True), and every size must give eager's values
    and gradients."""
    torch._dynamo.reset()
    if options == "module defaults":
        crit = focal_cuda.SigmoidFocalLoss(reduction="sum")
        fn = lambda x, y, a, gm: crit(x, y)  # noqa: E731
    elif options == "module options":
        crit = focal_cuda.SigmoidFocalLoss(alpha=0.5, gamma=1.5, reduction="mean")
        fn = lambda x, y, a, gm: crit(x, y)  # noqa: E731
    else:
        fn = lambda x, y, a, gm: focal_cuda.sigmoid_focal_loss(x, y, a, gm, "sum", normalizer=3.0)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, dynamic=True if mode == "dynamic=True" else None, backend="aot_eager")
    g = torch.Generator().manual_seed(3)
    for n, (a, gm) in zip((50, 61, 77), ((0.25, 2.0), (0.5, 1.5), (-1.0, 3.0))):
        for dense in (False, True):
            x, y = _dynamic_case(device, n, g, dense)
            xc = x.clone().requires_grad_()
            xe = x.clone().requires_grad_()
            if mode == "mark_dynamic":
                torch._dynamo.mark_dynamic(xc, 1)
                torch._dynamo.mark_dynamic(y, 1)
            got = compiled(xc, y, a, gm)
            want = fn(xe, y, a, gm)
            got.backward()
            want.backward()
            assert_close64(got, want.double(), rtol=1e-6)
            assert_close64(xc.grad, xe.grad.double(), rtol=1e-6)


def test_compile_dynamic_inductor(device):
    """The issue's case on the default backend: a module with default options, dynamic=True."""
    torch._dynamo.reset()
    crit = focal_cuda.SigmoidFocalLoss(reduction="sum")
    f = torch.compile(lambda x, y: crit(x, y), fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(4)
    for n in (50, 64):
        x, y = _dynamic_case(device, n, g, dense=False)
        assert_close64(f(x, y), crit(x, y).double(), rtol=1e-6)


# ----------------------------------------------------------------------------- torch.export

class _LossModule(torch.nn.Module):
    def __init__(self, C):
        super().__init__()
        self.cls = torch.nn.Linear(8, C)

    def forward(self, feats, labels):
        return focal_cuda.sigmoid_focal_loss(self.cls(feats), labels, reduction="sum", normalizer=4.0)


def _export_case(device):
    g = torch.Generator().manual_seed(6)
    torch.manual_seed(0)
    model = _LossModule(9).to(device)
    feats = torch.randn(3, 20, 8, generator=g).to(device)
    labels = torch.randint(-1, 10, (3, 20), generator=g).to(device)
    return model, feats, labels


def test_export_for_inference(device):
    """Exported under no_grad, the program computes the loss only, and its output does not require
    grad, also when run with grad enabled (it used to require grad and fail in backward)."""
    model, feats, labels = _export_case(device)
    with torch.no_grad():
        ep = torch.export.export(model, (feats, labels))
    out = ep.module()(feats, labels)
    assert not out.requires_grad
    assert_close64(out, model(feats, labels).double(), rtol=1e-6)


def test_export_for_training(device):
    """Exported with grad enabled, the program computes the gradient too: backward through it gives
    eager's parameter gradients."""
    model, feats, labels = _export_case(device)
    ep = torch.export.export(model, (feats, labels))
    exported = ep.module()
    out = exported(feats, labels)
    out.backward()
    model(feats, labels).backward()
    got = dict(exported.named_parameters())["cls.weight"].grad
    assert_close64(got, model.cls.weight.grad.double(), rtol=1e-6)
