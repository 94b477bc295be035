"""Promise: every member of the family keeps the focal loss's promises, with every target form
((labels, scores) included): the values and gradients of its plain-PyTorch twin (float64 autograd)
and of the contract's closed-form gradient (a 50-digit oracle), gradcheck, opcheck,
torch.compile(fullgraph=True), bitwise determinism, finite results wherever the true value is
finite, 16-bit logits with the math in float32, any strides, weights, normalisers, ignore_index,
scores never read where they do not count, and clear errors for bad options."""

from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

import focal_cuda
from family import FORMS, MEMBERS, exact, make_family_targets, to_device_dtype
from helpers import assert_close64

NAMES = list(MEMBERS)


def _twin_loss_and_grad(member, x, t, **kw):
    xr = x.detach().to(torch.float64).requires_grad_()
    loss = member.twin(xr, to_device_dtype(t, x.device, torch.float64), **member.options, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), xr.grad


def _fused_loss_and_grad(member, x, t, **kw):
    xr = x.detach().clone().requires_grad_()
    loss = member.fused(xr, t, **member.options, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), xr.grad


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_matches_twin_float64(device, name, form, reduction):
    member = MEMBERS[name]
    g = torch.Generator().manual_seed(hash((name, form)) % 1000)
    shape = (3, 41, 13)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(device)
    t = to_device_dtype(make_family_targets(form, shape, device, g), device, torch.float64)
    loss, grad = _fused_loss_and_grad(member, x, t, reduction=reduction)
    ref_loss, ref_grad = _twin_loss_and_grad(member, x, t, reduction=reduction)
    assert loss.shape == ref_loss.shape and loss.dtype == torch.float64
    assert_close64(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert_close64(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("C,rows,weighted", [(80, 150, None), (91, 77, None), (3, 400, None), (1, 300, None),
                                             (80, 60, "anchor"), (7, 200, "anchor"), (91, 40, "class"),
                                             (16, 50, "element")])
def test_cpu_kernels_float32(cpu_kernel, name, form, C, rows, weighted):
    """Every CPU path of each build (flat label and dense runs, steps across rows, row segments,
    small C, weights) against the float64 twin."""
    member = MEMBERS[name]
    g = torch.Generator().manual_seed(C * 31 + rows)
    x = torch.randn(rows, C, generator=g) * 4
    t = make_family_targets(form, (rows, C), "cpu", g)
    w = {None: None, "anchor": torch.rand(rows, 1, generator=g), "class": torch.rand(C, generator=g),
         "element": torch.rand(rows, C, generator=g)}[weighted]
    if w is not None:
        w[torch.rand(w.shape, generator=g) < 0.1] = 0.0
    for reduction in ("none", "sum"):
        loss, grad = _fused_loss_and_grad(member, x, t, reduction=reduction, weight=w)
        ref_loss, ref_grad = _twin_loss_and_grad(member, x, t, reduction=reduction,
                                                 weight=None if w is None else w.double())
        assert_close64(loss, ref_loss, rtol=2e-5, atol=1e-6)
        assert_close64(grad, ref_grad, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_closed_form_gradient_and_extreme_logits(device, name):
    """Loss and gradient against the 50-digit oracle (the loss's definition, the contract's closed-form
    gradient) at ordinary and extreme logits, for negatives, plain-label positives, positives with a
    score and dense soft targets: finite wherever the true value is finite, +inf where it is infinite."""
    member = MEMBERS[name]
    xs = [-math.inf, -1e4, -90.0, -30.0, -3.0, -0.5, 0.0, 0.7, 4.0, 30.0, 90.0, 1e4, math.inf]
    n = len(xs)
    for dtype in (torch.float32, torch.float64):
        for score in (None, 0.3, 0.0):  # plain labels; a score; a score of 0 (still a positive)
            x = torch.tensor(xs, dtype=dtype, device=device)[:, None].repeat(1, 2)  # column 0 positive
            labels = torch.zeros(n, dtype=torch.long, device=device)
            t = labels if score is None else (labels, torch.full((n,), score, dtype=dtype, device=device))
            loss, grad = _fused_loss_and_grad(member, x, t)
            y = 1.0 if score is None else score
            for i, xv in enumerate(xs):
                for col, (yv, pos) in enumerate(((y, True), (0.0, False))):
                    _check_exact(member, xv, yv, pos, loss[i, col].item(), grad[i, col].item(), dtype)
        for yv in (0.3, 1.0):  # dense soft targets
            x = torch.tensor(xs, dtype=dtype, device=device)[:, None]
            loss, grad = _fused_loss_and_grad(member, x, torch.full_like(x, yv))
            for i, xv in enumerate(xs):
                _check_exact(member, xv, yv, True, loss[i, 0].item(), grad[i, 0].item(), dtype)


def _check_exact(member, x, y, positive, got_loss, got_grad, dtype):
    # +-inf: the limit, read off the oracle far out (an infinite limit shows as a huge value)
    el, eg = exact(member, x if math.isfinite(x) else math.copysign(1e30, x), y, positive)
    el, eg = float(el), float(eg)
    what = f"{member.name} x={x} y={y} positive={positive} {dtype}"
    assert math.isfinite(got_grad), f"{what}: gradient {got_grad}, true {eg}"
    tol = dict(rel=2e-5 if dtype == torch.float32 else 1e-10, abs=1e-30)
    if not math.isfinite(x) and el > 1e20:
        assert got_loss == math.inf, f"{what}: loss {got_loss}, true inf"
    else:
        assert got_loss == pytest.approx(el, **tol), f"{what}: loss"
    if math.isfinite(x) or abs(eg) > 1e-20:
        assert got_grad == pytest.approx(eg, rel=tol["rel"], abs=1e-12 if dtype == torch.float32 else 1e-30), (
            f"{what}: gradient")


# ----------------------------------------------------------------------------- autograd, ops, compile


# (varifocal with detach_weight and IoU-aware BCE hold part of their loss constant for the gradient by
# definition, so a numerical derivative cannot check them: their gradients are checked against the
# twin's autograd, which detaches the same parts, in test_matches_twin_float64.)
DIFFERENTIABLE = [n for n in NAMES if n not in ("varifocal_detached", "iou_aware_bce")]


@pytest.mark.parametrize("name", DIFFERENTIABLE)
@pytest.mark.parametrize("form", FORMS)
def test_gradcheck(device, name, form):
    member = MEMBERS[name]
    g = torch.Generator().manual_seed(7)
    shape = (4, 2, 5)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(device).requires_grad_()
    t = to_device_dtype(make_family_targets(form, shape, device, g), device, torch.float64)
    w = torch.rand(5, generator=g, dtype=torch.float64).to(device)

    def fn(inp):
        return member.fused(inp, t, **member.options, reduction="sum", weight=w, normalizer=1.7)

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


OP_OPTIONS = {  # the op's option arguments for each member's sample (schema order)
    "sigmoid_focal_loss_fwd": (0.25, 2.0, 0.1),
    "quality_focal_loss_fwd": (2.0,),
    "varifocal_loss_fwd": (0.75, 2.0, True, False),
    "sigmoid_focal_loss_star_fwd": (0.25, 2.0, 1.0),
    "iou_aware_bce_loss_fwd": (0.25, 2.0),
}


@pytest.mark.parametrize("op_name", list(OP_OPTIONS))
def test_opcheck(device, op_name):
    op = getattr(torch.ops.focal_cuda, op_name).default
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for form in ("labels", "scores", "dense"):
            for reduction in (0, 1):
                for requires_grad in (False, True):
                    x = torch.randn(3, 4, 7, generator=g).to(device, dtype).requires_grad_(requires_grad)
                    t = make_family_targets(form, (3, 4, 7), device, g)
                    labels, scores = t if isinstance(t, tuple) else (t, None)
                    if scores is not None:
                        scores = torch.nan_to_num(scores, nan=0.5)
                    w = torch.rand(4, 1, generator=g).to(device) if form != "dense" else None
                    div = torch.tensor(2.5, dtype=acc, device=device) if reduction else None
                    opcheck(op, (x, labels, scores, w, div, 1.0, reduction, -1, requires_grad, 0.0, False,
                                 *OP_OPTIONS[op_name]))


@pytest.mark.parametrize("name", ["focal_smoothing", "quality_focal", "varifocal", "focal_star", "iou_aware_bce"])
def test_compile_fullgraph_no_graph_break(device, name):
    """A head and the member's loss on (labels, scores) compiled with fullgraph=True: one graph,
    eager's values and gradients."""
    member = MEMBERS[name]
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11).to(device)
    feats = torch.randn(2, 30, 8, generator=g).to(device)
    labels, scores = make_family_targets("scores", (2, 30, 11), device, g)
    num_pos = ((labels >= 0) & (labels < 11)).sum().clamp_min(1)

    def step(feats, labels, scores):
        return member.fused(head(feats), (labels, scores), **member.options, reduction="sum", normalizer=num_pos)

    def run(fn):
        head.zero_grad()
        loss = fn(feats, labels, scores)
        loss.backward()
        return loss.detach(), head.weight.grad.clone()

    eager = run(step)
    compiled = run(torch.compile(step, fullgraph=True, backend="aot_eager"))
    for a, b in zip(compiled, eager):
        assert_close64(a, b.double(), rtol=1e-6)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(feats, labels, scores)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("name", ["quality_focal", "varifocal"])
def test_torch_func_grad_and_double_backward(device, name):
    member = MEMBERS[name]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 9, generator=g, dtype=torch.float64).to(device)
    t = make_family_targets("scores", (6, 9), device, g)
    t = to_device_dtype(t, device, torch.float64)
    grad = torch.func.grad(lambda inp: member.fused(inp, t, **member.options, reduction="sum"))(x)
    _, ref = _twin_loss_and_grad(member, x, t, reduction="sum")
    assert_close64(grad, ref, rtol=1e-10)
    xr = x.clone().requires_grad_()
    loss = member.fused(xr, t, **member.options, reduction="sum")
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(loss, xr, create_graph=True)


# ----------------------------------------------------------------------------- numerics, layouts


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("form", ["labels", "scores", "dense"])
def test_sum_is_bitwise_reproducible(device, name, form):
    member = MEMBERS[name]
    g = torch.Generator().manual_seed(11)
    shape = (900, 91)
    x = torch.randn(shape, generator=g).to(device)
    t = make_family_targets(form, shape, device, g)
    runs = [_fused_loss_and_grad(member, x, t, reduction="sum") for _ in range(3)]
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])
    if device == "cpu":
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = member.fused(x, t, **member.options, reduction="sum")
        finally:
            torch.set_num_threads(before)
        assert torch.equal(one, runs[0][0])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", ["labels", "scores", "dense"])
def test_reduced_precision_logits(device, name, dtype, form):
    """16-bit logits, the math in float32: the loss and the gradient are the float64 values on the same
    16-bit inputs, rounded once to the logits' dtype."""
    member = MEMBERS[name]
    g = torch.Generator().manual_seed(12)
    shape = (60, 24)
    x = (torch.randn(shape, generator=g) * 3).to(device, dtype)
    t = to_device_dtype(make_family_targets(form, shape, device, g), device, dtype)
    loss, grad = _fused_loss_and_grad(member, x, t, reduction="none")
    assert loss.dtype == dtype and grad.dtype == dtype
    ref_loss, ref_grad = _twin_loss_and_grad(member, x, t, reduction="none")
    eps = torch.finfo(dtype).eps
    assert_close64(loss, ref_loss, rtol=2 * eps, atol=4 * eps)
    assert_close64(grad, ref_grad, rtol=2 * eps, atol=4 * eps)
    total = member.fused(x, t, **member.options, reduction="sum", normalizer=50.0)
    assert_close64(total, ref_loss.sum() / 50, rtol=2 * eps, atol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("form", ["labels", "scores", "dense"])
def test_strided_inputs_and_weights(device, name, form):
    """Non-contiguous logits, labels and scores; weights per element, anchor and class; a device
    normaliser; another ignore_index."""
    member = MEMBERS[name]
    g = torch.Generator().manual_seed(13)
    base = torch.randn(9, 40, 6, generator=g, dtype=torch.float64).to(device)
    x = base.transpose(0, 1)  # [40, 9, 6], strided
    t = make_family_targets(form, (9, 40, 6), device, g)
    if isinstance(t, tuple):
        t = (t[0].t(), t[1].t())
        t = (torch.where(t[0] == -1, torch.full_like(t[0], 255), t[0]), t[1])
    elif not t.dtype.is_floating_point:
        t = torch.where(t.t() == -1, torch.full_like(t.t(), 255), t.t())
    else:
        t = t.transpose(0, 1)
    t = to_device_dtype(t, device, torch.float64)
    normalizer = torch.tensor(7, device=device)  # an int64 count, read on the device
    for w in (torch.rand(40, 9, 6, generator=g, dtype=torch.float64), torch.rand(40, 9, 1, generator=g,
              dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64)):
        w = w.to(device)
        kw = dict(reduction="sum", weight=w, normalizer=normalizer, ignore_index=255)
        loss, grad = _fused_loss_and_grad(member, x, t, **kw)
        ref_loss, ref_grad = _twin_loss_and_grad(member, x, t, **kw)
        assert_close64(loss, ref_loss, rtol=1e-10)
        assert_close64(grad, ref_grad, rtol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_scores_of_background_and_ignored_rows_are_never_read(device, name):
    """NaN scores on background and ignored anchors (and inf logits on ignored anchors) change nothing:
    the results equal those with zeros there, and are finite."""
    member = MEMBERS[name]
    g = torch.Generator().manual_seed(14)
    x = torch.randn(500, 80, generator=g).to(device)
    labels, scores = make_family_targets("scores", (500, 80), device, g)
    x[labels == -1] = float("inf")
    clean = torch.where((labels >= 0) & (labels < 80), scores, torch.zeros_like(scores))
    a = _fused_loss_and_grad(member, x, (labels, scores), reduction="sum")
    b = _fused_loss_and_grad(member, x, (labels, clean), reduction="sum")
    assert torch.isfinite(a[0]) and torch.isfinite(a[1]).all()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("name", NAMES)
def test_labels_with_scores_of_one_equal_plain_labels_and_one_hot(device, name):
    """(labels, scores) with every score 1 is the plain-label loss, and both are the one-hot dense
    target's (for varifocal and IoU-aware BCE, y > 0 marks the positives of a dense target)."""
    member = MEMBERS[name]
    g = torch.Generator().manual_seed(15)
    C = 13
    x = (torch.randn(300, C, generator=g, dtype=torch.float64) * 3).to(device)
    labels = torch.randint(0, C + 1, (300,), generator=g).to(device)  # C = background
    onehot = torch.nn.functional.one_hot(labels, C + 1)[:, :C].double()
    plain = member.fused(x, labels, **member.options)
    ones = member.fused(x, (labels, torch.ones(300, dtype=torch.float64, device=device)), **member.options)
    dense = member.fused(x, onehot, **member.options)
    assert_close64(ones, plain, rtol=1e-12)
    assert_close64(dense, plain, rtol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_module_matches_function(device, name):
    member = MEMBERS[name]
    g = torch.Generator().manual_seed(16)
    x = torch.randn(20, 6, generator=g).to(device)
    t = make_family_targets("scores", (20, 6), device, g)
    cw = torch.rand(6, generator=g)
    module = member.module(**member.options, reduction="sum", class_weight=cw).to(device)
    assert_close64(module(x, t, normalizer=3.0),
                   member.fused(x, t, **member.options, reduction="sum", weight=cw.to(device), normalizer=3.0).double())
    assert "class_weight=<6 per-class weights" not in repr(module) and "class_weight=[" in repr(module)


# ----------------------------------------------------------------------------- bad input

BAD_OPTIONS = [
    (focal_cuda.sigmoid_focal_loss, dict(label_smoothing=1.5), ValueError, r"label_smoothing: .*\[0, 1\].*1.5"),
    (focal_cuda.sigmoid_focal_loss, dict(label_smoothing=-0.1), ValueError, r"label_smoothing"),
    (focal_cuda.quality_focal_loss, dict(beta=-1.0), ValueError, r"beta: .*>= 0.*-1.0"),
    (focal_cuda.quality_focal_loss, dict(beta=float("nan")), ValueError, r"beta"),
    (focal_cuda.varifocal_loss, dict(alpha=-0.5), ValueError, r"alpha: .*>= 0.*-0.5"),
    (focal_cuda.varifocal_loss, dict(gamma=-2.0), ValueError, r"gamma"),
    (focal_cuda.varifocal_loss, dict(iou_weighted=1), TypeError, r"iou_weighted: expected a bool"),
    (focal_cuda.varifocal_loss, dict(detach_weight="yes"), TypeError, r"detach_weight"),
    (focal_cuda.sigmoid_focal_loss_star, dict(gamma=0.0), ValueError, r"gamma: .*> 0.*0.0"),
    (focal_cuda.sigmoid_focal_loss_star, dict(gamma=-1.0), ValueError, r"gamma: .*> 0"),
    (focal_cuda.sigmoid_focal_loss_star, dict(alpha=2.0), ValueError, r"alpha: .*\[0, 1\], or -1"),
    (focal_cuda.sigmoid_focal_loss_star, dict(beta=float("inf")), ValueError, r"beta"),
    (focal_cuda.iou_aware_bce_loss, dict(alpha=-1.0), ValueError, r"alpha: .*\[0, 1\].*-1.0"),
    (focal_cuda.iou_aware_bce_loss, dict(alpha=1.5), ValueError, r"alpha"),
]


@pytest.mark.parametrize("case", range(len(BAD_OPTIONS)))
def test_bad_options_raise(case):
    fn, kw, exc, pattern = BAD_OPTIONS[case]
    x = torch.randn(4, 5)
    with pytest.raises(exc, match=pattern):
        fn(x, torch.zeros(4, dtype=torch.long), **kw)
    module = {m.fused: m.module for m in MEMBERS.values()}[fn]
    with pytest.raises(exc, match=pattern):  # a module fails where it is built
        module(**kw)


@pytest.mark.parametrize("name", ["focal", "varifocal", "iou_aware_bce"])
def test_bad_scores_raise(device, name):
    member = MEMBERS[name]
    x = torch.randn(4, 5, device=device)
    labels = torch.zeros(4, dtype=torch.long, device=device)
    cases = [
        ((labels, torch.rand(4, 5, device=device)), ValueError, r"targets: scores .* shape inputs.shape\[:-1\] = \(4,\)"),
        ((labels, torch.ones(4, dtype=torch.long, device=device)), TypeError, r"scores .* floating.*torch.int64"),
        ((labels, [0.5] * 4), TypeError, r"scores .* tensor, got list"),
        ((labels, torch.rand(4, device=device), torch.rand(4, device=device)), ValueError, r"\(labels, scores\).*3"),
        ((torch.rand(4, device=device), torch.rand(4, device=device)), ValueError, r"targets"),
        ((labels, torch.rand(4, device=device, requires_grad=True)), ValueError, r"scores require grad"),
    ]
    if device == "cpu":
        cases.append(((labels, torch.rand(4, device="meta")), ValueError, r"scores must be on cpu.*meta"))
    for t, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            member.fused(x, t, **member.options)
    # the raw op checks the scores too
    with pytest.raises(ValueError, match=r"scores must have the labels' shape"):
        torch.ops.focal_cuda.quality_focal_loss_fwd(x, labels, torch.rand(3, device=device), None, None, 1.0, 0, -1,
                                                    False, 0.0, False, 2.0)
    with pytest.raises(ValueError, match=r"gamma must be a finite number > 0"):
        torch.ops.focal_cuda.sigmoid_focal_loss_star_fwd(x, labels, None, None, None, 1.0, 0, -1, False, 0.0, False,
                                                         -1.0, 0.0, 0.0)
