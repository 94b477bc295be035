"""Promise: float16 / bfloat16 / float32 / float64 logits give the input's dtype back, with errors
against a float64 reference no worse than plain PyTorch achieves in the same dtype; sums
accumulate in float32 at least; float32 targets with reduced-precision logits (AMP) work."""

from __future__ import annotations

import zlib

import pytest
import torch

import focal_cuda
from helpers import assert_close64, fused_loss_and_grad, make_targets, reference_loss_and_grad, focal_op

LOW = [torch.float16, torch.bfloat16]


def _max_err(a, b):
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def _plain_torch_in_dtype(x, t, dtype, **kw):
    """The reference formula run in `dtype` itself: the error plain PyTorch achieves."""
    xd = x.detach().to(dtype).requires_grad_()
    td = t.to(dtype) if t.dtype.is_floating_point else t
    loss = focal_cuda.reference.sigmoid_focal_loss(xd, td, **kw)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), xd.grad


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("kind", ["binary", "soft", "labels"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_reduced_precision_vs_float64(device, dtype, kind, reduction):
    g = torch.Generator().manual_seed(21)
    shape = (4, 33, 24)
    x = (torch.randn(shape, generator=g) * 3).to(device).to(dtype)  # values exactly representable in dtype
    t = make_targets(kind, shape, device, g, dtype=dtype)
    normalizer = 50.0 if reduction == "sum" else None
    loss, grad = fused_loss_and_grad(x, t, reduction=reduction, normalizer=normalizer)
    assert loss.dtype == dtype and grad.dtype == dtype
    ref_loss, ref_grad = reference_loss_and_grad(x, t, reduction=reduction, normalizer=normalizer)
    plain_loss, plain_grad = _plain_torch_in_dtype(x, t, dtype, reduction=reduction, normalizer=normalizer)
    ulp = torch.finfo(dtype).eps
    # no worse than plain PyTorch in the same dtype (plus one rounding of the stored result)
    assert _max_err(loss, ref_loss) <= 2 * _max_err(plain_loss, ref_loss) + ulp * ref_loss.abs().max().item()
    assert _max_err(grad, ref_grad) <= 2 * _max_err(plain_grad, ref_grad) + ulp * ref_grad.abs().max().item()
    # and close in absolute terms: results are rounded once from float32 math
    assert_close64(grad, ref_grad, rtol=2 * ulp, atol=2 * ulp)


@pytest.mark.parametrize("dtype", LOW)
def test_float32_targets_with_low_precision_logits(device, dtype):
    """AMP: logits in fp16/bf16 from autocast, one-hot / soft targets left in float32."""
    g = torch.Generator().manual_seed(2)
    shape = (8, 40)
    x = torch.randn(shape, generator=g).to(device).to(dtype)
    t = torch.rand(shape, generator=g).to(device)  # float32 soft targets
    loss, grad = fused_loss_and_grad(x, t, reduction="sum")
    assert loss.dtype == dtype
    ref_loss, ref_grad = reference_loss_and_grad(x, t, reduction="sum")
    assert_close64(loss, ref_loss, rtol=1e-2, atol=1e-3)
    assert_close64(grad, ref_grad, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mixed_target_dtype_converted(device, dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 9, generator=g).to(device).to(dtype)
    t = torch.rand(5, 9, generator=g).to(device).to(torch.float16)  # converted to the logits' dtype
    loss, grad = fused_loss_and_grad(x, t, reduction="sum")
    ref_loss, ref_grad = reference_loss_and_grad(x, t, reduction="sum")
    assert loss.dtype == dtype
    assert_close64(loss, ref_loss)
    assert_close64(grad, ref_grad)


def test_half_sum_accumulates_in_float32(device):
    """A half-precision sum of 300k terms is accurate to float32 accumulation, not float16's."""
    g = torch.Generator().manual_seed(8)
    shape = (3000, 100)
    x = torch.randn(shape, generator=g).to(device).half()
    t = make_targets("labels", shape, device, g)
    # normalised as detectors do (the raw sum, ~7.7e4, would exceed float16's range)
    loss = focal_cuda.sigmoid_focal_loss(x, t, reduction="sum", normalizer=1000.0)
    ref, _ = reference_loss_and_grad(x, t, reduction="sum", normalizer=1000.0)
    assert loss.dtype == torch.float16
    # only the final rounding to fp16 remains (relative 2^-11); a fp16 accumulator would be far off
    assert abs(loss.double().item() - ref.item()) <= 2 * 2**-11 * abs(ref.item())


def test_float32_sum_of_millions_is_accurate(device):
    g = torch.Generator().manual_seed(6)
    shape = (40000, 80)  # 3.2M terms
    x = torch.randn(shape, generator=g).to(device)
    t = make_targets("labels", shape, device, g)
    loss = focal_cuda.sigmoid_focal_loss(x, t, reduction="sum")
    with torch.no_grad():
        ref = focal_cuda.reference.sigmoid_focal_loss(x.double(), t, reduction="sum")
    assert abs(loss.double().item() - ref.item()) <= 1e-6 * abs(ref.item())


@pytest.mark.parametrize("reduction,normalizer", [("sum", 2000.0), ("sum", "tensor"), ("mean", None)])
@pytest.mark.parametrize("retain", [False, True])
def test_fp16_gradient_survives_normaliser_and_loss_scale(device, reduction, normalizer, retain):
    """AMP with float16: a normaliser shrinks the gradient, a GradScaler multiplies it back. Small
    gradients must not underflow in between (the float16 gradient is stored unnormalised and scaled
    once, in float32, in backward): the result matches float32 math rounded once to float16.
    (The loss itself is float16, so the scale must be representable there: 2^15, the value
    GradScaler settles at after its first back-off from 2^16.)"""
    g = torch.Generator().manual_seed(10)
    shape = (400, 80)
    x = (torch.randn(shape, generator=g) * 2 - 3).to(device).half()
    labels = make_targets("labels", shape, device, g)
    if normalizer == "tensor":
        normalizer = torch.tensor(1500, device=device)
    S = 32768.0
    xr = x.clone().requires_grad_()
    loss = focal_cuda.sigmoid_focal_loss(xr, labels, reduction=reduction, normalizer=normalizer)
    (loss * S).backward(retain_graph=retain)
    _, ref = reference_loss_and_grad(x, labels, reduction=reduction, normalizer=normalizer)
    expected = (ref * S).half().double()  # float32-or-better math, one rounding to float16
    got = xr.grad.double()
    assert torch.isfinite(got).all()
    small = (expected.abs() > 0) & (expected.abs() < 1e-2)  # the values an fp16 round trip would lose
    assert small.sum() > 100
    assert (got[small] != 0).all()
    # two roundings to float16 (the stored gradient, then the scaled one): within 2 ulp
    torch.testing.assert_close(got, expected, rtol=4 * 2**-11, atol=1e-7)


@pytest.mark.parametrize("C", [3, 80, 91])
def test_float32_sum_accurate_at_detector_initialisation(device, C):
    """RetinaNet's prior (logits near -4.6): millions of tiny, nearly equal terms. The sum stays within
    float32 rounding of the float64 one (per-lane float partials are flushed to float64 often)."""
    g = torch.Generator().manual_seed(C)
    shape = (8, 40000 // C * 10, C)
    x = (-4.6 + 0.1 * torch.randn(shape, generator=g)).to(device)
    labels = torch.where(torch.rand(shape[:-1], generator=g) < 0.01,
                         torch.randint(0, C, shape[:-1], generator=g), torch.full(shape[:-1], C)).to(device)
    for t in (labels, focal_cuda.reference.one_hot_labels(labels, C, -1, torch.float32)[0]):
        loss = focal_cuda.sigmoid_focal_loss(x, t, reduction="sum")
        with torch.no_grad():
            ref = focal_cuda.reference.sigmoid_focal_loss(x.double(), t.double() if t.is_floating_point() else t,
                                                          reduction="sum")
        assert abs(loss.double().item() - ref.item()) <= 1e-6 * abs(ref.item())


@pytest.mark.parametrize("dtype", LOW)
def test_backward_factor_not_rounded_to_16_bit(device, dtype):
    """Backward's factor (grad_output * scale / divisor / prescale, float32) multiplies a 16-bit gradient
    in float32: rounded to float16 first, 1.1223e-7 would be 1.19e-7 (6% off; seen with 'mean' over
    ~35k float16 elements)."""
    grad = torch.full((1000,), 216.75, dtype=dtype, device=device)
    torch.ops.focal_cuda.scale_grad_(grad, torch.tensor(1.1223e-7, device=device))
    expected = torch.full((1000,), 216.75 * 1.1223e-7, dtype=torch.float64)
    torch.testing.assert_close(grad.double().cpu(), expected, rtol=2**-8, atol=1e-7)


# ----------------------------------------------------------------------------- autocast (AMP)

def _amp_generator():
    return torch.Generator().manual_seed(31)


def _amp_step(device, amp_dtype, reduction, fn, compiled=False):
    """A linear head under autocast (its logits come out in amp_dtype), the loss, and backward."""
    g = _amp_generator()
    labels = torch.randint(-1, 81, (2, 300), generator=g)  # -1 ignored, 80 background
    head = torch.nn.Linear(16, 80)
    with torch.no_grad():
        head.weight.copy_(torch.randn(80, 16, generator=g) * 0.5)
        head.bias.copy_(torch.randn(80, generator=g) - 2.0)
    feats = torch.randn(2, 300, 16, generator=g)
    head, feats, labels = head.to(device), feats.to(device), labels.to(device)

    def step(feats, labels):
        logits = head(feats)
        return logits, fn(logits, labels, reduction=reduction)

    if compiled:
        torch._dynamo.reset()
        step = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch.autocast(device, dtype=amp_dtype):
        logits, loss = step(feats, labels)
    (loss if loss.dim() == 0 else loss.float().sum()).backward()
    return logits, loss, head.weight.grad


@pytest.mark.parametrize("amp_dtype", LOW)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("compiled", [False, True])
def test_autocast_reduced_loss_is_float32(device, amp_dtype, reduction, compiled):
    """Under autocast a reduced loss comes back in float32, as torchvision's sigmoid_focal_loss and
    PyTorch's own losses do, and as accurate as float32 accumulation of the 16-bit logits allows (a
    16-bit result would be ~1e-3 off); the logits are not upcast, so the gradient stays 16-bit."""
    logits, loss, _ = _amp_step(device, amp_dtype, reduction, focal_cuda.sigmoid_focal_loss, compiled)
    assert logits.dtype == amp_dtype
    assert loss.dtype == torch.float32
    labels = torch.randint(-1, 81, (2, 300), generator=_amp_generator()).to(device)
    normalizer = None if reduction == "sum" else (labels != -1).sum() * 80
    expected = focal_cuda.reference.sigmoid_focal_loss(logits.detach().double(), labels, reduction="sum")
    assert_close64(loss, expected / (1 if normalizer is None else normalizer), rtol=2e-5)
    # torchvision's own result under autocast: float32 too (its elementwise math partly in 16 bits)
    _, tv_loss, _ = _amp_step(device, amp_dtype, reduction, _torchvision_on_labels, compiled=False)
    assert tv_loss.dtype == torch.float32
    assert_close64(loss, tv_loss.double(), rtol=1e-3)


def _torchvision_on_labels(logits, labels, reduction):
    """torchvision's sigmoid_focal_loss on the one-hot of the labels, ignored anchors dropped."""
    tv_ops = pytest.importorskip("torchvision.ops")
    keep = labels != -1
    dense = torch.nn.functional.one_hot(labels[keep], 81)[:, :80].to(logits.dtype)
    loss = tv_ops.sigmoid_focal_loss(logits[keep], dense, reduction="sum")
    return loss if reduction == "sum" else loss / (keep.sum() * 80)


@pytest.mark.parametrize("amp_dtype", LOW)
def test_autocast_elementwise_loss_and_raw_op(device, amp_dtype):
    """reduction='none' keeps the logits' dtype under autocast (one float32 tensor of the logits'
    size would double what the loss writes); the raw op's own autocast rule returns a float32 sum."""
    x = torch.randn(6, 10, device=device).to(amp_dtype)
    labels = torch.randint(0, 11, (6,), device=device)
    op = focal_op
    with torch.autocast(device, dtype=amp_dtype):
        assert focal_cuda.sigmoid_focal_loss(x, labels).dtype == amp_dtype
        total, _ = op(x, labels, None, None, 1.0, 0.25, 2.0, 1, -1, False)
        elementwise, _ = op(x, labels, None, None, 1.0, 0.25, 2.0, 0, -1, False)
    assert total.dtype == torch.float32 and elementwise.dtype == amp_dtype
    expected = focal_cuda.reference.sigmoid_focal_loss(x.double(), labels, reduction="sum")
    assert_close64(total, expected, rtol=2e-5)
    # outside autocast: the logits' dtype, as torchvision returns it
    assert focal_cuda.sigmoid_focal_loss(x, labels, reduction="sum").dtype == amp_dtype


def test_float16_sum_overflows_outside_autocast(device):
    """Documented limit: without autocast a float16 sum comes back in float16, whose range ends at
    65504; the float32 accumulation is exact, the result is not representable. The gradient is fine."""
    x = torch.full((4000, 80), 3.0, device=device).half().requires_grad_()
    labels = torch.full((4000,), 80, device=device)  # all background: loss ~0.75 * 0.9^2 * 3.05 each
    loss = focal_cuda.sigmoid_focal_loss(x, labels, reduction="sum")
    assert loss.dtype == torch.float16 and torch.isinf(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    with torch.autocast(device, dtype=torch.float16):
        loss32 = focal_cuda.sigmoid_focal_loss(x, labels, reduction="sum")
    assert loss32.dtype == torch.float32 and torch.isfinite(loss32)


# ----------------------------------------------------------------------------- 16-bit staging
# On the CPU, float16 and bfloat16 logits run the float32 kernel on blocks staged through float32
# buffers (csrc/cpu/focal_cpu_kernel.h). The promise that makes that right: every value is the
# float32 math on the upcast logits, rounded once. So the raw op's elementwise loss and gradient for
# 16-bit logits must equal, bit for bit, the float32 op's on the same values rounded to the dtype,
# across block (3072 elements) and chunk (16384) boundaries, on every layout the kernel takes.

_STAGE_MEMBERS = {  # op, options in schema order
    "focal": ("sigmoid_focal_loss_fwd", (0.25, 2.0, 0.0)),
    "focal_gamma1.5_smoothing": ("sigmoid_focal_loss_fwd", (-1.0, 1.5, 0.1)),
    "quality_focal": ("quality_focal_loss_fwd", (2.0,)),
    "varifocal": ("varifocal_loss_fwd", (0.75, 2.0, True, False)),
    "focal_star": ("sigmoid_focal_loss_star_fwd", (0.25, 2.0, 1.0)),
    "iou_aware_bce": ("iou_aware_bce_loss_fwd", (0.25, 2.0)),
}


def _staging_case(form, layout, C, dtype, g):
    N, A = 2, 901  # 2 * 901 * C elements: many blocks and more than one chunk, rows crossing both
    base = torch.randn(A, N, 2 * C, generator=g) * 4
    base[0, 0, :4] = torch.tensor([1e4, -1e4, float("inf"), float("-inf")])
    x = base.to(dtype)
    x = x[..., ::2] if layout == "cols" else x[..., :C]  # strided columns, or strided rows
    x = x.transpose(0, 1) if layout in ("rows", "cols") else x.transpose(0, 1).contiguous()
    labels = torch.randint(-1, C + 1, (N, A), generator=g)
    scores = None
    if form == "dense":
        t = torch.where(torch.rand(N, A, C, generator=g) < 0.8, 0.0, torch.rand(N, A, C, generator=g))
        t16 = t.to(dtype)
        targets = t16 if layout == "contiguous" else t16.transpose(0, 1).contiguous().transpose(0, 1)
    else:
        targets = labels
        if form == "scores":
            scores = torch.rand(N, A, generator=g)
    weight = torch.rand(N, A, 1, generator=g).expand(N, A, C) if layout == "weighted" else None
    return x, targets, scores, weight


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("member", sorted(_STAGE_MEMBERS))
@pytest.mark.parametrize("form", ["labels", "scores", "dense"])
@pytest.mark.parametrize("layout", ["contiguous", "rows", "cols", "weighted"])
@pytest.mark.parametrize("C", [13, 91])
def test_cpu_16bit_is_float32_math_rounded_once(cpu_kernel, dtype, member, form, layout, C):
    g = torch.Generator().manual_seed(zlib.crc32(f"{member} {form} {layout} {C}".encode()))
    x, targets, scores, weight = _staging_case(form, layout, C, dtype, g)
    name, options = _STAGE_MEMBERS[member]
    op = focal_cuda.ops.FWD[name]

    def run(logits, tgt):
        # reduction none, a scale, the gradient: loss = l * scale, grad = dl/dx * weight * scale
        return op(logits, tgt, scores, weight, None, 0.75, 0, -1, True, 0.0, False, *options)

    loss16, grad16 = run(x, targets)
    t32 = targets.float() if targets.dtype.is_floating_point else targets
    loss32, grad32 = run(x.float(), t32)
    assert loss16.dtype == dtype and grad16.dtype == dtype
    exact = dict(rtol=0.0, atol=0.0, equal_nan=True)
    torch.testing.assert_close(loss16, loss32.to(dtype), **exact, msg="loss: not float32's rounded once")
    torch.testing.assert_close(grad16, grad32.to(dtype), **exact, msg="gradient: not float32's rounded once")
    # the reduced loss: float32 math, summed in float64 per block (block boundaries round differently)
    s16 = op(x, targets, scores, weight, None, 1.0, 1, -1, False, 0.0, True, *options)[0]
    s32 = op(x.float(), t32, scores, weight, None, 1.0, 1, -1, False, 0.0, True, *options)[0]
    torch.testing.assert_close(s16, s32, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("bins", [10, 100])
@pytest.mark.parametrize("layout", ["contiguous", "rows", "cols"])
def test_cpu_16bit_ghmc_histogram_is_float32s(cpu_kernel, dtype, bins, layout):
    g = torch.Generator().manual_seed(bins)
    x, labels, _, _ = _staging_case("labels", layout, 91, dtype, g)
    counts16 = torch.ops.focal_cuda.ghmc_histogram(x, labels, None, bins, -1)
    counts32 = torch.ops.focal_cuda.ghmc_histogram(x.float(), labels, None, bins, -1)
    assert counts16.sum() > 0
    assert torch.equal(counts16, counts32)
