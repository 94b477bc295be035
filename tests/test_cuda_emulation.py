"""The CUDA kernels' logic without a GPU: csrc/cuda/focal_cuda.cu (with kernels.cuh) compiled as
plain C++ (tests/cuda_emulation/emulate.cpp) and run thread by thread on the CPU, on small grids so that
every thread takes many grid-stride steps. Checked against the CPU op (an independent kernel) and
against what the kernels must choose: which kernel runs, which element gets which label, which
pack takes which path, that ignored rows give exact zeros and bad labels NaN. The emulation uses
focal_math.h's host math, so it proves indexing and control flow, not the device's arithmetic
(test_cuda.py does that on a GPU)."""

from __future__ import annotations

import pytest
import torch

import focal_cuda
from cuda_emulation.build import KNOB_BUILDS, build_emulation

# Where a GPU is present the kernels themselves run (test_cuda.py and every device-parametrised
# test); the emulation is for the machines without one (CI), and its JIT build would need the GPU
# machine's compiler workarounds (see setup.py's libstdc++ note).
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the real kernels are tested")


@pytest.fixture(scope="module")
def emu():
    return build_emulation()


@pytest.fixture(scope="module", params=list(KNOB_BUILDS))
def emu_knobs(request):
    return request.param, build_emulation(request.param)


def emu_forward(emu, x, t, w=None, alpha=0.25, gamma=2.0, ignore_index=-1, total=False, want_grad=True, scale=1.0,
                divisor=None, grid=1, acc_loss=False, **options):
    """The emulated op (planned as the real op plans it); options: loss_kind, beta, scores, ..."""
    return emu.forward(x, t, weight=w, divisor=divisor, scale=scale, reduction=int(total), ignore_index=ignore_index,
                       compute_grad=want_grad, acc_loss=acc_loss, alpha=alpha, gamma=gamma, grid=grid, **options)


PACK = {torch.float32: 4, torch.bfloat16: 8, torch.float16: 8}


def expected_kernel(dtype, C, labels, weighted, aligned=True, label_rows=True, focal=True):
    """The kernel a launch must choose. focal: the plain focal loss, whose label-rows kernels come with
    and without a row weight; the other members have only the ones that read a row weight (or 1)."""
    if not label_rows or not labels or weighted in ("class", "element") or not aligned or C < PACK[dtype]:
        return "general"
    name = "label_rows" if C % PACK[dtype] == 0 else "label_rows_cross"
    return name + "_w" if weighted == "row" or not focal else name


def make_weight(weighted, rows, C, g):
    """None; per class [C]; per row [rows, 1] constant over runs of 7 rows (as per-image weights
    are), some runs and single rows zero; or per element [rows, C]."""
    if weighted == "class":
        w = torch.rand(C, generator=g) + 0.5
        w[1 % C] = 0.0  # a zero weight gives exact zeros
        return w
    if weighted == "row":
        w = (torch.rand(rows // 7 + 1, generator=g) + 0.5).repeat_interleave(7)[:rows]
        w[torch.rand(rows, generator=g) < 0.05] = 0.0
        w[14:21] = 0.0
        return w[:, None].contiguous()
    if weighted == "element":
        w = torch.rand(rows, C, generator=g) + 0.5
        w[torch.rand(rows, C, generator=g) < 0.05] = 0.0
        return w
    return None


def inputs(rows, C, dtype, kind, g):
    x = (torch.randn(rows, C, generator=g) * 4).to(dtype)
    if kind == "dense":
        return x, (torch.rand(rows, C, generator=g) < 0.1).to(dtype)
    labels = torch.randint(0, C + 1, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < 0.1] = -1
    labels[: min(rows, C)] = torch.arange(min(rows, C))  # the class in every column
    return x, labels.to(torch.int32 if kind == "labels32" else torch.int64)


def cpu_op(x, t, weight=None, **kw):
    xr = x.clone().requires_grad_()
    loss = focal_cuda.sigmoid_focal_loss(xr, t, weight=weight, reduction="none", **kw)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), xr.grad


def close(dtype):
    # host math (IEEE reciprocal, log1pf) against the CPU kernel's vector math: a few float32 ulps,
    # then at most one rounding of the storage type apart (below its smallest normal number, a
    # different subnormal or 0)
    if dtype == torch.float32:
        return dict(rtol=4e-6, atol=1e-30)
    return dict(rtol=4 * torch.finfo(dtype).eps, atol=torch.finfo(dtype).tiny)


def sum_rtol(dtype):
    return max(1e-5, torch.finfo(dtype).eps)  # the sum comes back in the logits' dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [1, 3, 8, 9, 80, 91])
@pytest.mark.parametrize("kind", ["labels", "labels32", "dense"])
@pytest.mark.parametrize("weighted", ["none", "class", "row", "element"])
@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (1.5, -1.0)])
def test_emulated_kernels_match_cpu_op(emu, dtype, C, kind, weighted, gamma, alpha):
    g = torch.Generator().manual_seed(C * 7 + len(kind))
    rows = 20_000 // C + 3  # not a multiple of anything: ragged last steps, a scalar tail for odd C
    x, t = inputs(rows, C, dtype, kind, g)
    w = make_weight(weighted, rows, C, g)
    ref_loss, ref_grad = cpu_op(x, t, weight=w, gamma=gamma, alpha=alpha)
    for grid in (1, 3):
        loss, grad, chosen = emu_forward(emu, x, t, w, alpha, gamma, -1, False, True, 1.0, None, grid, False)
        assert chosen == expected_kernel(dtype, C, kind != "dense", weighted)
        torch.testing.assert_close(loss.double(), ref_loss.double(), **close(dtype))
        torch.testing.assert_close(grad.double(), ref_grad.double(), **close(dtype))
        total, _, _ = emu_forward(emu, x, t, w, alpha, gamma, -1, True, False, 1.0, None, grid, False)
        torch.testing.assert_close(total.double(), ref_loss.double().sum(), rtol=sum_rtol(dtype), atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [8, 80, 91, 9])
@pytest.mark.parametrize("weighted", ["none", "row"])
def test_emulated_ignored_rows_and_bad_labels(emu, dtype, C, weighted):
    """Ignored rows with +-inf and NaN logits give exact zeros; a bad label gives a NaN row and NaN
    sum, also where its weight is 0; the rows around them are untouched; the normaliser (a device
    tensor) divides both outputs."""
    g = torch.Generator().manual_seed(C)
    rows = 3001
    x, labels = inputs(rows, C, dtype, "labels", g)
    ignored = (labels == -1).nonzero().flatten()[:3]
    x[ignored[0]] = float("inf")
    x[ignored[1]] = float("-inf")
    x[ignored[2], ::2] = float("nan")
    bad = torch.tensor([rows // 2, rows // 2 + 1, rows - 1])
    labels[bad] = torch.tensor([C + 1, -7, 2**40])
    w = make_weight(weighted, rows, C, g)
    zero_w = torch.tensor([], dtype=torch.long)
    if w is not None:
        w[bad[0]] = 0.0
        zero_w = ((w[:, 0] == 0) & (labels >= 0)).nonzero().flatten()[:2]  # counted rows, weight 0
        x[zero_w[0]] = float("inf")  # a zero weight still gives exact zeros
        x[zero_w[1], 1::2] = float("nan")
    good = torch.ones(rows, dtype=torch.bool)
    good[bad] = False
    clean = labels.clone()
    clean[bad] = C
    x_clean = torch.where((labels == -1)[:, None], torch.zeros_like(x), x)
    x_clean[zero_w] = 0.0
    ref_loss, ref_grad = cpu_op(x_clean, clean, weight=w)
    divisor = torch.tensor(8.0)
    loss, grad, chosen = emu_forward(emu, x, labels, w, 0.25, 2.0, -1, False, True, 1.0, divisor, 2, False)
    assert chosen == expected_kernel(dtype, C, True, weighted)
    assert torch.isnan(loss[bad]).all() and torch.isnan(grad[bad]).all()
    assert torch.all(loss[ignored] == 0) and torch.all(grad[ignored] == 0)
    assert torch.all(loss[zero_w] == 0) and torch.all(grad[zero_w] == 0)
    torch.testing.assert_close(loss[good].double(), ref_loss[good].double() / 8, **close(dtype))
    torch.testing.assert_close(grad[good].double(), ref_grad[good].double() / 8, **close(dtype))
    total, _, _ = emu_forward(emu, x, labels, w, 0.25, 2.0, -1, True, False, 1.0, None, 2, False)
    assert torch.isnan(total)
    total, _, _ = emu_forward(emu, x, clean, w, 0.25, 2.0, -1, True, False, 1.0, None, 2, False)
    torch.testing.assert_close(total.double(), ref_loss.double().sum(), rtol=sum_rtol(dtype), atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_misaligned_and_ignore_index_a_class(emu, dtype):
    """Logits one element past a 16-byte boundary take the general kernel's scalar path; an
    ignore_index that is also a class id ignores those rows."""
    g = torch.Generator().manual_seed(5)
    rows, C = 2001, 80
    x, labels = inputs(rows, C, dtype, "labels", g)
    shifted = torch.cat([x.new_zeros(1), x.reshape(-1)])[1:].view(rows, C)
    assert shifted.data_ptr() % 16 != 0
    ref_loss, ref_grad = cpu_op(x, labels)
    loss, grad, chosen = emu_forward(emu, shifted, labels, None, 0.25, 2.0, -1, False, True, 1.0, None, 3, False)
    assert chosen == "general"
    torch.testing.assert_close(loss.double(), ref_loss.double(), **close(dtype))
    torch.testing.assert_close(grad.double(), ref_grad.double(), **close(dtype))
    labels = torch.where(labels == -1, C, labels)  # -1 is a bad label once ignore_index is 5
    ref_loss, ref_grad = cpu_op(x, labels, ignore_index=5)
    loss, grad, chosen = emu_forward(emu, x, labels, None, 0.25, 2.0, 5, False, True, 1.0, None, 3, False)
    assert chosen == "label_rows" and (labels == 5).any() and torch.all(loss[labels == 5] == 0)
    torch.testing.assert_close(loss.double(), ref_loss.double(), **close(dtype))
    torch.testing.assert_close(grad.double(), ref_grad.double(), **close(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [80, 3])
def test_emulated_reduced_loss_in_float32_under_autocast(emu, dtype, C):
    """acc_loss (what autocast asks for): the finalisation writes the scaled total in float32, not
    rounded to the logits' 16-bit type (whose rounding alone is ~100x this tolerance)."""
    g = torch.Generator().manual_seed(11)
    x, labels = inputs(4000 // C + 3, C, dtype, "labels", g)
    divisor = torch.tensor(3.0)
    expected = focal_cuda.reference.sigmoid_focal_loss(x.double(), labels, reduction="sum") / 3.0
    total, _, _ = emu_forward(emu, x, labels, None, 0.25, 2.0, -1, True, False, 1.0, divisor, 3, True)
    assert total.dtype == torch.float32 and total.dim() == 0
    torch.testing.assert_close(total.double(), expected, rtol=2e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [3, 8, 91])
@pytest.mark.parametrize("kind,weighted", [("labels", "none"), ("labels", "row"), ("dense", "none"),
                                           ("labels", "element")])
def test_emulated_knob_builds_match_cpu_op(emu_knobs, dtype, C, kind, weighted):
    """The kernels built with other tuning knobs give the same values, and LABEL_ROWS=0 sends every
    call to the general kernel."""
    knobs, emu = emu_knobs
    g = torch.Generator().manual_seed(C + 3)
    rows = 5000 // C + 3
    x, t = inputs(rows, C, dtype, kind, g)
    w = make_weight(weighted, rows, C, g)
    ref_loss, ref_grad = cpu_op(x, t, weight=w)
    for grid in (1, 3):
        loss, grad, chosen = emu_forward(emu, x, t, w, 0.25, 2.0, -1, False, True, 1.0, None, grid, False)
        assert chosen == expected_kernel(dtype, C, kind != "dense", weighted, label_rows=knobs != "label-rows-off")
        torch.testing.assert_close(loss.double(), ref_loss.double(), **close(dtype))
        torch.testing.assert_close(grad.double(), ref_grad.double(), **close(dtype))
        total, _, _ = emu_forward(emu, x, t, w, 0.25, 2.0, -1, True, False, 1.0, None, grid, False)
        torch.testing.assert_close(total.double(), ref_loss.double().sum(), rtol=sum_rtol(dtype), atol=0)


# ----------------------------------------------------------------------------- the family's members

from family import make_family_targets  # noqa: E402

# each member as the emulated op takes it (loss_kind: csrc/core/params.h's LossKind), and as the public
# function (the CPU op, an independent kernel) does
MEMBER_CALLS = {
    "focal_smoothing": (dict(loss_kind=0, alpha=0.25, gamma=2.0, label_smoothing=0.1),
                        lambda x, t, **kw: focal_cuda.sigmoid_focal_loss(x, t, 0.25, 2.0, label_smoothing=0.1, **kw)),
    "quality_focal": (dict(loss_kind=2, beta=2.0), lambda x, t, **kw: focal_cuda.quality_focal_loss(x, t, 2.0, **kw)),
    "quality_focal_beta1.5": (dict(loss_kind=2, beta=1.5),
                              lambda x, t, **kw: focal_cuda.quality_focal_loss(x, t, 1.5, **kw)),
    "varifocal": (dict(loss_kind=3, alpha=0.75, gamma=2.0),
                  lambda x, t, **kw: focal_cuda.varifocal_loss(x, t, 0.75, 2.0, **kw)),
    "varifocal_detached": (dict(loss_kind=3, alpha=0.75, gamma=1.5, iou_weighted=False, detach_weight=True),
                           lambda x, t, **kw: focal_cuda.varifocal_loss(x, t, 0.75, 1.5, iou_weighted=False,
                                                                        detach_weight=True, **kw)),
    "focal_star": (dict(loss_kind=4, alpha=0.25, gamma=2.0, beta=1.0),
                   lambda x, t, **kw: focal_cuda.sigmoid_focal_loss_star(x, t, 0.25, 2.0, 1.0, **kw)),
    "iou_aware_bce": (dict(loss_kind=5, alpha=0.25, gamma=2.0),
                      lambda x, t, **kw: focal_cuda.iou_aware_bce_loss(x, t, 0.25, 2.0, **kw)),
    "focal_with_scores": (dict(loss_kind=0, alpha=0.25, gamma=2.0),
                          lambda x, t, **kw: focal_cuda.sigmoid_focal_loss(x, t, 0.25, 2.0, **kw)),
}


def member_close(dtype, ref):
    """close(dtype), with an absolute floor relative to the largest value: members with |p - y|^beta or
    1 - t factors have tiny values whose last-ulp differences between the host math and the CPU kernel's
    vector math (approximate reciprocal) are large relative to them, never to the loss."""
    tol = close(dtype)
    return dict(rtol=tol["rtol"], atol=max(tol["atol"], 2 * tol["rtol"] * ref.abs().max().item()))


def member_cpu(call, x, t, w):
    xr = x.clone().requires_grad_()
    loss = call(xr, t, weight=w, reduction="none")
    loss.backward(torch.ones_like(loss))
    return loss.detach(), xr.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [3, 8, 91])
@pytest.mark.parametrize("weighted", ["none", "row", "element"])
@pytest.mark.parametrize("member,form", [(m, f) for m in MEMBER_CALLS for f in ("labels", "labels32", "scores", "dense")
                                         if m != "focal_with_scores" or f == "scores"])
def test_emulated_members_match_cpu_op(emu, dtype, C, form, weighted, member):
    """Each member through the emulated CUDA kernels (label-rows and general; plain labels, int32 labels
    converted, (labels, scores) with NaN scores on background and ignored rows, dense targets) against
    the CPU op."""
    options, call = MEMBER_CALLS[member]
    g = torch.Generator().manual_seed(C * 13 + len(form))
    rows = 6000 // C + 5
    x = (torch.randn(rows, C, generator=g) * 4).to(dtype)
    t = make_family_targets(form, (rows, C), "cpu", g, dtype=torch.float32)
    if isinstance(t, tuple):
        t[0][: min(rows, C)] = torch.arange(min(rows, C), dtype=t[0].dtype)  # the class in every column
        t[1][: min(rows, C)] = torch.rand(min(rows, C), generator=g)
    w = make_weight(weighted, rows, C, g)
    labels, scores = t if isinstance(t, tuple) else (t, None)
    ref_loss, ref_grad = member_cpu(call, x, t, w)
    for grid in (1, 3):
        loss, grad, chosen = emu_forward(emu, x, labels, w, grid=grid, scores=scores, **options)
        assert chosen == expected_kernel(dtype, C, form != "dense", weighted, focal=member == "focal_with_scores")
        torch.testing.assert_close(loss.double(), ref_loss.double(), **member_close(dtype, ref_loss))
        torch.testing.assert_close(grad.double(), ref_grad.double(), **member_close(dtype, ref_grad))
        total, _, _ = emu_forward(emu, x, labels, w, total=True, want_grad=False, grid=grid, scores=scores, **options)
        torch.testing.assert_close(total.double(), ref_loss.double().sum(), rtol=sum_rtol(dtype), atol=0)


# ----------------------------------------------------------------------------- GHM-C

def ghmc_case(form, rows, C, dtype, g, bins):
    """Logits on the bin thresholds (binary targets bin by exact comparisons there, so CPU and device
    must agree exactly) or, for soft targets, anywhere (their bins compare g = |p - y| with the edges:
    host and vector math may round p apart, so those logits keep a margin from the edges)."""
    ks = torch.arange(1, bins, dtype=torch.float64)
    thr = torch.log(ks / bins / (1 - ks / bins)).float()
    vals = torch.cat([thr, torch.nextafter(thr, thr + 1), torch.nextafter(thr, thr - 1), torch.randn(40, generator=g) * 3,
                      torch.tensor([0.0, 30.0, float("inf")])])
    vals = torch.cat([vals, -vals])
    x = vals[torch.randint(0, vals.numel(), (rows, C), generator=g)]
    if form in ("labels", "labels32"):
        t = torch.randint(-1, C + 1, (rows,), generator=g)
        t[: min(rows, C)] = torch.arange(min(rows, C))
        t = t.int() if form == "labels32" else t
    elif form == "binary":
        t = (torch.rand(rows, C, generator=g) < 0.3).float()
    else:
        t = torch.rand(rows, C, generator=g)
        t[:, 0] = 0.0
        t[:, 1] = 1.0
        p = torch.sigmoid(x.double())
        gn = (p - t.double()).abs() * bins
        near = ((gn - gn.round()).abs() < 1e-3) & (gn.round() > 0) & (gn.round() < bins)
        x = torch.where(near, x + 0.25 / bins, x)
    if dtype != torch.float32:
        x = x.to(dtype)
        if t.dtype.is_floating_point and dtype == torch.float64:
            t = t.double()
    return x, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("C", [3, 8, 91])
@pytest.mark.parametrize("form", ["labels", "labels32", "binary", "soft"])
@pytest.mark.parametrize("layout", ["contiguous", "weighted", "strided"])
def test_emulated_ghmc_histogram_matches_cpu_op(emu, dtype, C, form, layout):
    """GHM-C's histogram kernel (its three phases, every block's shared counts, run-length adds) against
    the CPU op: the same int64 counts, exactly, on grids of 1 and 3 blocks."""
    g = torch.Generator().manual_seed(C + len(form) * 5 + len(layout))
    rows = 3000 // C + 7
    bins = 10 if C != 8 else 30
    x, t = ghmc_case(form, rows, C, dtype, g, bins)
    w = None
    if layout == "weighted":
        w = (torch.rand(rows, 1, generator=g) < 0.8).to(torch.float64 if dtype == torch.float64 else torch.float32)
    if layout == "strided":
        x = x.t().contiguous().t()
    cpu = torch.ops.focal_cuda.ghmc_histogram(x, t, w, bins, -1)
    assert int(cpu[:bins].sum()) <= int(cpu[bins]) and int(cpu[bins]) > 0
    for grid in (1, 3):
        counts = emu.ghmc_histogram(x, t, w, bins=bins, ignore_index=-1, grid=grid)
        assert counts.tolist() == cpu.tolist(), grid


@pytest.mark.parametrize("momentum", [0.0, 0.75])
@pytest.mark.parametrize("norm", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("float64", [False, True])
def test_emulated_ghmc_weights_match_cpu_op(emu, momentum, norm, float64):
    g = torch.Generator().manual_seed(int(momentum * 4 + norm * 2 + float64))
    counts = torch.randint(0, 50, (31,), generator=g)
    counts[[3, 7, 8]] = 0  # empty bins
    counts[30] = int(counts[:30].sum()) + 5  # valid elements (5 NaN: in no bin)
    acc = torch.rand(30, generator=g) * 40 if momentum else None
    table, acc_out = torch.ops.focal_cuda.ghmc_weights(counts, acc, momentum, norm, float64)
    etable, eacc = emu.ghmc_weights(counts, acc, momentum=momentum, norm=norm, float64=float64)
    assert etable.dtype == table.dtype
    torch.testing.assert_close(etable, table, rtol=0, atol=0)
    torch.testing.assert_close(eacc, acc_out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [3, 8, 91])
@pytest.mark.parametrize("form", ["labels", "binary", "soft"])
@pytest.mark.parametrize("weighted", ["none", "row"])
@pytest.mark.parametrize("bins", [10, 30])
def test_emulated_ghmc_loss_pass_matches_cpu_op(emu, dtype, C, form, weighted, bins):
    """GHM-C's loss pass (the family kernels with the GHMC member reading the bin table) against the
    CPU op, elementwise and summed, through the label-rows and general kernels; the weight by threshold
    compares (10 bins) and from the grid (30)."""
    g = torch.Generator().manual_seed(C * 3 + len(form) + bins)
    rows = 3000 // C + 7
    x, t = ghmc_case(form, rows, C, dtype, g, bins)
    w = None
    if weighted == "row":
        w = (torch.rand(rows, 1, generator=g) < 0.8).float()
    counts = torch.ops.focal_cuda.ghmc_histogram(x, t, w, bins, -1)
    table, _ = torch.ops.focal_cuda.ghmc_weights(counts, None, 0.0, 1.0, False)
    ref_loss, ref_grad = torch.ops.focal_cuda.ghmc_loss_fwd(x, t, None, w, None, 1.0, 0, -1, True, 0.0, False, table)
    for grid in (1, 3):
        loss, grad, chosen = emu_forward(emu, x, t, w, grid=grid, loss_kind=6, table=table)
        assert chosen == expected_kernel(dtype, C, form == "labels", weighted, focal=False)
        torch.testing.assert_close(loss.double(), ref_loss.double(), **member_close(dtype, ref_loss[torch.isfinite(ref_loss)]),
                                   equal_nan=True)
        torch.testing.assert_close(grad.double(), ref_grad.double(), **member_close(dtype, ref_grad), equal_nan=True)
