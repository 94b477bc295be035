"""Promise: bad input gets a ValueError / TypeError that names the argument and says what was
expected and what was given; nothing crashes the process. The raw ops check too."""

from __future__ import annotations

import pytest
import torch

import focal_cuda
from helpers import focal_op

fl = focal_cuda.sigmoid_focal_loss


def _x(device, shape=(4, 5)):
    return torch.randn(shape, device=device)


CASES = {
    "targets shape": (lambda d: (_x(d), torch.zeros(4, 6, device=d)), {}, ValueError, r"targets.*shape.*\(4, 5\)"),
    "label shape": (lambda d: (_x(d), torch.zeros(4, 5, dtype=torch.long, device=d)), {}, ValueError,
                    r"targets.*class-index.*\(4,\)"),
    "int logits": (lambda d: (torch.zeros(4, 5, dtype=torch.long, device=d), torch.zeros(4, 5, device=d)), {},
                   TypeError, r"inputs.*float16.*torch.int64"),
    "bool logits": (lambda d: (torch.zeros(4, 5, dtype=torch.bool, device=d), torch.zeros(4, 5, device=d)), {},
                    TypeError, r"inputs.*torch.bool"),
    "0-d logits": (lambda d: (torch.tensor(1.0, device=d), torch.tensor(1.0, device=d)), {}, ValueError,
                   r"inputs.*at least one dimension"),
    "bool targets": (lambda d: (_x(d), torch.zeros(4, 5, dtype=torch.bool, device=d)), {}, TypeError,
                     r"targets.*torch.bool"),
    "uint8 targets": (lambda d: (_x(d), torch.zeros(4, dtype=torch.uint8, device=d)), {}, TypeError,
                      r"targets.*int32/int64.*torch.uint8"),
    "not a tensor": (lambda d: (_x(d), [0, 1, 2, 3]), {}, TypeError, r"targets.*torch.Tensor.*list"),
    "reduction": (lambda d: (_x(d), torch.zeros(4, 5, device=d)), {"reduction": "avg"}, ValueError,
                  r"reduction.*'none', 'mean', 'sum'.*'avg'"),
    "gamma < 0": (lambda d: (_x(d), torch.zeros(4, 5, device=d)), {"gamma": -1.0}, ValueError, r"gamma.*>= 0.*-1"),
    "gamma nan": (lambda d: (_x(d), torch.zeros(4, 5, device=d)), {"gamma": float("nan")}, ValueError, r"gamma"),
    "alpha inf": (lambda d: (_x(d), torch.zeros(4, 5, device=d)), {"alpha": float("inf")}, ValueError, r"alpha"),
    # torchvision's range: [0, 1], or -1 for no alpha weighting; anything else raises
    "alpha > 1": (lambda d: (_x(d), torch.zeros(4, 5, device=d)), {"alpha": 2.0}, ValueError,
                  r"alpha: expected a number in \[0, 1\], or -1 .*got 2.0"),
    "alpha < 0": (lambda d: (_x(d), torch.zeros(4, 5, device=d)), {"alpha": -0.5}, ValueError,
                  r"alpha: expected .*got -0.5"),
    "alpha nan": (lambda d: (_x(d), torch.zeros(4, 5, device=d)), {"alpha": float("nan")}, ValueError, r"alpha"),
    "float labels": (lambda d: (_x(d), torch.zeros(4, device=d)), {}, ValueError,
                     r"targets: floating targets .*got \(4,\).*class indices .*int32/int64: pass targets.long\(\)"),
    "weight shape": (lambda d: (_x(d), torch.zeros(4, 5, device=d)), {"weight": torch.ones(3)}, ValueError,
                     r"weight.*\(3,\).*does not broadcast.*\(4, 5\)"),
    "weight too big": (lambda d: (_x(d), torch.zeros(4, 5, device=d)), {"weight": torch.ones(2, 4, 5)}, ValueError,
                       r"weight"),
    "weight int": (lambda d: (_x(d), torch.zeros(4, 5, device=d)), {"weight": torch.ones(5, dtype=torch.long)},
                   TypeError, r"weight.*floating.*torch.int64"),
    "normalizer shape": (lambda d: (_x(d), torch.zeros(4, 5, device=d)),
                         {"reduction": "sum", "normalizer": torch.ones(2)}, ValueError, r"normalizer.*\(2,\)"),
    "normalizer zero": (lambda d: (_x(d), torch.zeros(4, 5, device=d)), {"reduction": "sum", "normalizer": 0},
                        ValueError, r"normalizer.*non-zero"),
    "normalizer str": (lambda d: (_x(d), torch.zeros(4, 5, device=d)), {"reduction": "sum", "normalizer": "4"},
                       TypeError, r"normalizer.*str"),
    "mean+normalizer": (lambda d: (_x(d), torch.zeros(4, 5, device=d)), {"reduction": "mean", "normalizer": 2.0},
                        ValueError, r"normalizer.*reduction='mean'"),
    "targets grad": (lambda d: (_x(d), torch.zeros(4, 5, device=d, requires_grad=True)), {}, ValueError,
                     r"targets.*requires grad.*detach"),
    "ignore_index float": (lambda d: (_x(d), torch.zeros(4, dtype=torch.long, device=d)), {"ignore_index": 1.5},
                           TypeError, r"ignore_index"),
    # bool is an int to Python, never a loss option here
    "gamma bool": (lambda d: (_x(d), torch.zeros(4, 5, device=d)), {"gamma": True}, ValueError, r"gamma.*True"),
    "alpha bool": (lambda d: (_x(d), torch.zeros(4, 5, device=d)), {"alpha": False}, ValueError, r"alpha.*False"),
    "gamma str": (lambda d: (_x(d), torch.zeros(4, 5, device=d)), {"gamma": "2"}, ValueError, r"gamma.*'2'"),
    "ignore_index bool": (lambda d: (_x(d), torch.zeros(4, dtype=torch.long, device=d)), {"ignore_index": True},
                          TypeError, r"ignore_index.*bool"),
    "normalizer bool": (lambda d: (_x(d), torch.zeros(4, 5, device=d)), {"reduction": "sum", "normalizer": True},
                        TypeError, r"normalizer.*bool"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_arguments_raise_clear_errors(device, case):
    make, kwargs, exc, pattern = CASES[case]
    inputs, targets = make(device)
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with pytest.raises(exc, match=pattern):
        fl(inputs, targets, **kwargs)
    with pytest.raises(exc, match=pattern):  # the reference checks the same way
        focal_cuda.reference.sigmoid_focal_loss(inputs, targets, **kwargs)


@pytest.mark.parametrize("bad", [-3, 6, 100])
def test_bad_labels_on_cpu_name_the_value(bad):
    x = torch.randn(4, 5)
    labels = torch.tensor([0, 5, bad, -1])
    with pytest.raises(ValueError, match=rf"class index {bad} at flat position 2"):
        fl(x, labels)
    with pytest.raises(ValueError, match=rf"{bad}"):
        fl(x, labels, validate=True)
    # the raw op checks too
    with pytest.raises(ValueError, match=rf"class index {bad}"):
        focal_op(x, labels, None, None, 1.0, 0.25, 2.0, 0, -1, False)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_bad_label_in_strided_labels_is_found_at_its_logical_position(dtype):
    x = torch.randn(3, 4, 5)
    base = torch.zeros(4, 3, dtype=dtype)
    base[2, 1] = 9  # labels = base.t(): row 1, column 2 -> flat position 1 * 4 + 2 = 6
    base[3, 2] = -1  # ignore_index: fine
    labels = base.t()
    assert not labels.is_contiguous()
    with pytest.raises(ValueError, match=r"class index 9 at flat position 6"):
        fl(x, labels)
    labels_ok = labels.clone()
    labels_ok[1, 2] = 5  # background
    fl(x, labels_ok)


def test_devices_that_differ():
    cpu = torch.randn(4, 5)
    meta_t = torch.zeros(4, 5, device="meta")
    with pytest.raises(ValueError, match=r"targets.*expected a tensor on cpu.*meta"):
        fl(cpu, meta_t)
    with pytest.raises(ValueError, match=r"weight.*cpu.*meta"):
        fl(cpu, torch.zeros(4, 5), weight=torch.ones(5, device="meta"))
    with pytest.raises(ValueError, match=r"normalizer.*cpu.*meta"):
        fl(cpu, torch.zeros(4, 5), reduction="sum", normalizer=torch.tensor(2.0, device="meta"))


def test_raw_op_checks():
    x = torch.randn(4, 5)
    op = focal_op
    with pytest.raises(ValueError, match="shape"):
        op(x, torch.zeros(3, 5), None, None, 1.0, 0.25, 2.0, 0, -1, False)
    with pytest.raises(ValueError, match="reduction"):
        op(x, torch.zeros(4, 5), None, None, 1.0, 0.25, 2.0, 2, -1, False)
    with pytest.raises(ValueError, match="gamma"):
        op(x, torch.zeros(4, 5), None, None, 1.0, 0.25, -1.0, 0, -1, False)
    with pytest.raises(TypeError, match="divisor must be Float"):
        op(x, torch.zeros(4, 5), None, torch.tensor(2.0, dtype=torch.float64), 1.0, 0.25, 2.0, 1, -1, False)
    with pytest.raises(ValueError, match="weight"):
        op(x, torch.zeros(4, 5), torch.ones(3), None, 1.0, 0.25, 2.0, 0, -1, False)
    with pytest.raises(TypeError, match="inputs must be"):
        op(x.long(), torch.zeros(4, 5), None, None, 1.0, 0.25, 2.0, 0, -1, False)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], or -1"):
        op(x, torch.zeros(4, 5), None, None, 1.0, 2.0, 2.0, 0, -1, False)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], or -1"):
        op(x, torch.zeros(4, 5), None, None, 1.0, -0.5, 2.0, 0, -1, False)
    with pytest.raises(ValueError, match="grad_output must have one element"):
        focal_cuda.ops.scale_grad_op(torch.ones(3), torch.ones(2))


def test_module_weight_conflict():
    m = focal_cuda.SigmoidFocalLoss(class_weight=torch.ones(5))
    with pytest.raises(ValueError, match="class_weight"):
        m(torch.randn(4, 5), torch.zeros(4, 5), weight=torch.ones(5))


@pytest.mark.parametrize("kwargs,exc,pattern", [
    ({"reduction": "avg"}, ValueError, r"reduction.*'avg'"),
    ({"gamma": -1}, ValueError, r"gamma.*-1"),
    ({"alpha": 2.0}, ValueError, r"alpha.*\[0, 1\].*2.0"),
    ({"ignore_index": 0.5}, TypeError, r"ignore_index"),
    ({"class_weight": torch.ones(2, 5)}, ValueError, r"class_weight: expected one weight per class.*\(2, 5\)"),
    ({"class_weight": torch.ones(5, dtype=torch.bool)}, TypeError, r"class_weight.*torch.bool"),
    ({"class_weight": "heavy"}, TypeError, r"class_weight.*str"),
])
def test_module_checks_options_when_built(kwargs, exc, pattern):
    """A module with a bad option fails where it is built, not at its first forward."""
    with pytest.raises(exc, match=pattern):
        focal_cuda.SigmoidFocalLoss(**kwargs)


def test_module_class_weight_errors_name_class_weight(device):
    m = focal_cuda.SigmoidFocalLoss(class_weight=torch.ones(5)).to(device)
    with pytest.raises(ValueError, match=r"class_weight: shape \(5,\) does not broadcast.*\(4, 7\).*per class, \(7,\)"):
        m(torch.randn(4, 7, device=device), torch.zeros(4, dtype=torch.long, device=device))
    # a per-call weight is still called weight
    with pytest.raises(ValueError, match=r"^weight: shape \(3,\)"):
        focal_cuda.SigmoidFocalLoss()(torch.randn(4, 7, device=device), torch.zeros(4, dtype=torch.long, device=device),
                                      weight=torch.ones(3, device=device))
    if device == "cpu":
        with pytest.raises(ValueError, match=r"class_weight: expected a tensor on cpu.*meta"):
            focal_cuda.SigmoidFocalLoss(class_weight=torch.ones(5, device="meta"))(
                torch.randn(4, 5), torch.zeros(4, dtype=torch.long))


def test_module_repr_shows_class_weight():
    assert "class_weight=[1, 2, 0.5]" in repr(focal_cuda.SigmoidFocalLoss(class_weight=[1.0, 2.0, 0.5]))
    assert "class_weight=<80 per-class weights" in repr(focal_cuda.SigmoidFocalLoss(class_weight=torch.ones(80)))
    assert "class_weight" not in repr(focal_cuda.SigmoidFocalLoss())


def test_numpy_and_fraction_options_are_accepted_like_floats():
    """Real and integral numbers of other types (numpy scalars, Fraction) are options like any float/int."""
    import fractions

    import numpy as np

    x = torch.randn(6, 5)
    labels = torch.tensor([0, 5, 2, 7, 4, 1])
    expected = fl(x, labels, alpha=0.25, gamma=2.0, reduction="sum", ignore_index=7, normalizer=3.0)
    got = fl(x, labels, alpha=np.float32(0.25), gamma=fractions.Fraction(2), reduction="sum",
             ignore_index=np.int64(7), normalizer=np.float64(3.0))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
