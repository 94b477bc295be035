"""CUDA-only promises: the 16-byte vector path agrees with the scalar and strided paths for any C
and alignment; 64-bit indexing past 2^31 elements; CUDA graph capture and replay of a training
step; the current stream and the input's device are used; bad labels give NaN (never an
out-of-bounds access) and leave the context healthy; validate=True raises."""

from __future__ import annotations

import pytest
import torch

import focal_cuda
from helpers import assert_close64, fused_loss_and_grad, make_targets, reference_loss_and_grad

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values, stored one element past a 16-byte boundary."""
    flat = torch.cat([t.new_zeros(1), t.reshape(-1)])[1:]
    return flat.view(t.shape)


@pytest.mark.parametrize("C", [1, 3, 8, 80, 91, 264])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["binary", "labels", "labels32"])
def test_vector_scalar_strided_paths_agree(C, dtype, kind):
    g = torch.Generator().manual_seed(C)
    shape = (257, C)
    x = (torch.randn(shape, generator=g) * 3).to("cuda", dtype)
    t = make_targets(kind, shape, "cuda", g, dtype=dtype)
    variants = {
        "aligned": (x, t),
        "misaligned": (_misaligned(x), _misaligned(t) if t.dtype.is_floating_point else t),
        "strided": (x.t().contiguous().t(), t.t().contiguous().t() if t.dim() == 2 else t),
    }
    ref_loss, ref_grad = reference_loss_and_grad(x, t, reduction="sum")
    results = {}
    for name, (xv, tv) in variants.items():
        assert torch.equal(xv, x)
        results[name] = fused_loss_and_grad(xv, tv, reduction="sum")
        tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-5)
        assert_close64(results[name][0], ref_loss, rtol=tol, atol=tol, msg=name)
        assert_close64(results[name][1], ref_grad, rtol=tol, atol=tol, msg=name)
    for name in ("misaligned", "strided"):  # same per-element math: gradients agree to rounding
        assert_close64(results[name][1], results["aligned"][1].double(), rtol=1e-6, atol=1e-7)


def test_matches_cpu_kernel():
    g = torch.Generator().manual_seed(40)
    shape = (64, 91)
    x = torch.randn(shape, generator=g) * 3
    t = make_targets("labels", shape, "cpu", g)
    for reduction in ("none", "sum", "mean"):
        cl, cg = fused_loss_and_grad(x, t, reduction=reduction)
        gl, gg = fused_loss_and_grad(x.cuda(), t.cuda(), reduction=reduction)
        assert_close64(gl, cl.double())
        assert_close64(gg, cg.double())


def test_past_2_pow_31_elements():
    # bfloat16: float32's exponent range, so the normalised gradient (~1e-8 here) is representable
    # (float16 would flush it to zero, which is right for float16 but checks nothing)
    n_rows, C = 2**31 // 80 + 1000, 80  # just over 2^31 elements
    need = n_rows * C * 2 * 3  # bf16 logits + gradient + slack
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free on the GPU, has {free / 2**30:.1f}")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n_rows, C, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    labels = torch.randint(0, C + 1, (n_rows,), device="cuda", generator=g)
    loss = focal_cuda.sigmoid_focal_loss(x, labels, reduction="sum", normalizer=float(n_rows))
    loss.backward()
    # the rows beyond 2^31 elements are written, and right
    tail = slice(n_rows - 64, n_rows)
    _, ref_tail = reference_loss_and_grad(x[tail].detach(), labels[tail], reduction="sum", normalizer=float(n_rows))
    assert_close64(x.grad[tail], ref_tail, rtol=1e-2, atol=1e-2)
    # the sum covers every element: compare with a chunked float32 reference
    with torch.no_grad():
        total = sum(
            focal_cuda.reference.sigmoid_focal_loss(x[i : i + 2**20].float(), labels[i : i + 2**20], reduction="sum")
            .double()
            .item()
            for i in range(0, n_rows, 2**20)
        )
    assert loss.item() == pytest.approx(total / n_rows, rel=1e-2)


@pytest.mark.parametrize("kind", ["labels", "binary"])
def test_cuda_graph_capture_and_replay(kind):
    g = torch.Generator().manual_seed(41)
    C = 80
    head = torch.nn.Linear(32, C).cuda()
    feats = torch.randn(4, 500, 32, generator=g).cuda()
    targets = make_targets(kind, (4, 500, C), "cuda", g)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)

    def step():
        logits = head(feats)
        num_pos = (targets == 1).sum() if kind == "binary" else ((targets >= 0) & (targets < C)).sum()
        loss = focal_cuda.sigmoid_focal_loss(logits, targets, reduction="sum", normalizer=num_pos.clamp_min(1))
        loss.backward()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up outside the capture
            opt.zero_grad(set_to_none=False)
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_loss = step()
    for _ in range(3):
        feats.copy_(torch.randn(feats.shape, generator=g).cuda())
        graph.replay()
        replay_loss, replay_grad = static_loss.clone(), head.weight.grad.clone()
        head.weight.grad.zero_()
        head.bias.grad.zero_()
        eager_loss = step()
        assert_close64(replay_loss, eager_loss.double())
        assert_close64(replay_grad, head.weight.grad.double())
        head.weight.grad.zero_()
        head.bias.grad.zero_()


def test_runs_on_current_stream():
    g = torch.Generator().manual_seed(42)
    x = torch.randn(2000, 80, generator=g).cuda()
    t = make_targets("labels", (2000, 80), "cuda", g)
    expected = fused_loss_and_grad(x, t, reduction="sum")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(10_000_000)  # a long kernel ahead on this stream: work must queue behind it
        got = fused_loss_and_grad(x, t, reduction="sum")
    s.synchronize()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    g = torch.Generator().manual_seed(43)
    x = torch.randn(300, 91, generator=g)
    t = make_targets("labels", (300, 91), "cpu", g)
    with torch.cuda.device(0):
        loss1, grad1 = fused_loss_and_grad(x.to("cuda:1"), t.to("cuda:1"), reduction="sum")
    assert loss1.device == torch.device("cuda:1") and grad1.device == torch.device("cuda:1")
    loss0, grad0 = fused_loss_and_grad(x.cuda(), t.cuda(), reduction="sum")
    assert torch.equal(loss1.cpu(), loss0.cpu()) and torch.equal(grad1.cpu(), grad0.cpu())


def test_bad_labels_give_nan_and_context_survives():
    x = torch.randn(6, 5, device="cuda")
    labels = torch.tensor([0, 5, 7, -1, -4, 1000000], device="cuda")
    loss, grad = fused_loss_and_grad(x, labels)
    assert torch.isnan(loss[[2, 4, 5]]).all() and torch.isnan(grad[[2, 4, 5]]).all()
    assert torch.isfinite(loss[[0, 1, 3]]).all()
    total = focal_cuda.sigmoid_focal_loss(x, labels, reduction="sum")
    assert torch.isnan(total)
    torch.cuda.synchronize()  # no sticky error: the context still works
    ok = focal_cuda.sigmoid_focal_loss(x, labels.clamp(0, 5), reduction="sum")
    assert torch.isfinite(ok)
    with pytest.raises(ValueError, match="class index 7 at flat position 2"):
        focal_cuda.sigmoid_focal_loss(x, labels, validate=True)


def test_scale_grad_skips_when_one():
    grad = torch.randn(1000, device="cuda")
    before = grad.clone()
    focal_cuda.ops.scale_grad_op(grad, torch.tensor(1.0, device="cuda"))
    assert torch.equal(grad, before)
    focal_cuda.ops.scale_grad_op(grad, torch.tensor(-2.0, device="cuda"))
    assert torch.equal(grad, before * -2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C,rows", [(8, 150_001), (80, 20_011), (91, 16_001), (9, 133_337)])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (1.5, -1.0)])
def test_label_rows_kernel(dtype, C, rows, label_dtype, gamma, alpha):
    """The label-rows kernel (unweighted class labels, C at least the 16-byte pack, aligned; C = 91
    and 9 have packs that run into the next row, and a scalar tail): many grid-stride steps per
    thread with a ragged last one, the class in every column, ignored rows holding +-inf and NaN
    logits (exact zeros), bad labels (NaN rows). Checked against the float64 reference and against
    the general kernel (the same call with a weight of ones)."""
    g = torch.Generator().manual_seed(C + rows)
    x = torch.randn(rows, C, generator=g) * 4
    labels = torch.randint(0, C + 1, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < 0.1] = -1
    labels[:C] = torch.arange(C)  # the class in every column of a pack
    ignored = (labels == -1).nonzero().flatten()[:3]
    x[ignored[0]] = float("inf")
    x[ignored[1]] = float("-inf")
    x[ignored[2], ::2] = float("nan")
    bad = torch.tensor([rows // 2, rows - 1])
    labels[bad] = torch.tensor([C + 1, -7])
    x, labels = x.to("cuda", dtype), labels.to("cuda", label_dtype)
    kw = dict(gamma=gamma, alpha=alpha)

    loss, grad = fused_loss_and_grad(x, labels, reduction="none", **kw)
    assert torch.isnan(loss[bad]).all() and torch.isnan(grad[bad]).all()
    assert torch.all(loss[ignored] == 0) and torch.all(grad[ignored] == 0)
    good = (labels != -1) & (labels >= 0) & (labels <= C)
    ref_loss, ref_grad = reference_loss_and_grad(x[good], labels[good], reduction="none", **kw)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-5)
    assert_close64(loss[good], ref_loss, rtol=tol, atol=tol)
    assert_close64(grad[good], ref_grad, rtol=tol, atol=tol)

    # the general kernel (a weight sends the call there): the same values up to the rounding of
    # where alpha is applied (one float32 rounding, then the output dtype's)
    ones = torch.ones(C, device="cuda")
    w_loss, w_grad = fused_loss_and_grad(x, labels, reduction="none", weight=ones, **kw)
    # (below the dtype's smallest normal number, either may round to a different subnormal or 0)
    close = dict(rtol=4 * torch.finfo(dtype).eps, atol=torch.finfo(dtype).tiny)
    torch.testing.assert_close(loss[good].double(), w_loss[good].double(), **close)
    torch.testing.assert_close(grad[good].double(), w_grad[good].double(), **close)
    assert torch.all(w_loss[ignored] == 0) and torch.all(w_grad[ignored] == 0)
    assert torch.isnan(w_loss[bad]).all() and torch.isnan(w_grad[bad]).all()

    # sums: NaN with a bad label; without them, the reference's sum, bitwise the same run to run
    assert torch.isnan(focal_cuda.sigmoid_focal_loss(x, labels, reduction="sum", **kw))
    labels[bad] = C
    sums = [fused_loss_and_grad(x, labels, reduction="sum", normalizer=1000.0, **kw) for _ in range(3)]
    assert all(torch.equal(s[0], sums[0][0]) and torch.equal(s[1], sums[0][1]) for s in sums)
    keep = labels != -1
    x_clean = torch.where(keep[:, None], x, torch.zeros_like(x))  # ignored rows' logits do not matter
    ref_sum, ref_sgrad = reference_loss_and_grad(x_clean, labels, reduction="sum", normalizer=1000.0, **kw)
    assert_close64(sums[0][0], ref_sum, rtol=max(tol, 1e-6), atol=0)
    # (float16 gradients divided by a normaliser fall among its subnormals: absolute slack of its tiny)
    sub = torch.finfo(dtype).tiny if dtype == torch.float16 else 0.0
    slack = tol * ref_sgrad.abs().max().item() + sub
    torch.testing.assert_close(sums[0][1].double().cpu(), ref_sgrad.cpu(), rtol=tol, atol=slack)
    mean_loss, mean_grad = fused_loss_and_grad(x, labels, reduction="mean", **kw)
    ref_mean, ref_mgrad = reference_loss_and_grad(x_clean, labels, reduction="mean", **kw)
    assert_close64(mean_loss, ref_mean, rtol=max(tol, 1e-6), atol=0)
    slack = tol * ref_mgrad.abs().max().item() + sub
    torch.testing.assert_close(mean_grad.double().cpu(), ref_mgrad.cpu(), rtol=tol, atol=slack)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C,rows", [(80, 20_011), (91, 16_001)])
def test_label_rows_kernel_row_weights(dtype, C, rows):
    """Per-row weights (as the integrations pass them: per image, so equal over runs of rows, some
    zero, one zero row holding infinite logits) in the label-rows kernel, against the float64
    reference and against the general kernel fed the same weights per element."""
    g = torch.Generator().manual_seed(C)
    x = torch.randn(rows, C, generator=g) * 4
    labels = torch.randint(0, C + 1, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < 0.1] = -1
    w = (torch.rand(rows // 7 + 1, generator=g) + 0.5).repeat_interleave(7)[:rows]
    w[torch.rand(rows, generator=g) < 0.05] = 0.0
    zero = ((w == 0) & (labels >= 0)).nonzero().flatten()[0]
    x[zero] = float("inf")
    x, labels, w = x.to("cuda", dtype), labels.to("cuda"), w.to("cuda")[:, None].contiguous()
    loss, grad = fused_loss_and_grad(x, labels, reduction="none", weight=w)
    assert torch.all(loss[zero] == 0) and torch.all(grad[zero] == 0)
    x_ref = x.clone()
    x_ref[zero] = 0.0
    ref_loss, ref_grad = reference_loss_and_grad(x_ref, labels, reduction="none", weight=w)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-5)
    assert_close64(loss, ref_loss, rtol=tol, atol=tol)
    assert_close64(grad, ref_grad, rtol=tol, atol=tol)
    per_element = w.expand(rows, C).contiguous()  # the general kernel
    e_loss, e_grad = fused_loss_and_grad(x, labels, reduction="none", weight=per_element)
    close = dict(rtol=4 * torch.finfo(dtype).eps, atol=torch.finfo(dtype).tiny)
    torch.testing.assert_close(loss.double(), e_loss.double(), **close)
    torch.testing.assert_close(grad.double(), e_grad.double(), **close)
    total, _ = fused_loss_and_grad(x, labels, reduction="sum", weight=w, normalizer=100.0)
    ref_total, _ = reference_loss_and_grad(x_ref, labels, reduction="sum", weight=w, normalizer=100.0)
    assert_close64(total, ref_total, rtol=max(tol, 1e-6), atol=0)
