"""Argument checks and the call plan shared by the fused function and the reference.

Everything a user can get wrong is checked here, once, with a message that names
the argument, what was expected and what was given. These checks only read
shapes, dtypes and devices, so they run the same in eager mode and while
torch.compile traces (no host synchronisation). The C++ op repeats the checks
that memory safety depends on, for direct ``torch.ops.focal_cuda`` callers.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LABEL_DTYPES = (torch.int32, torch.int64)
REDUCTIONS = ("none", "mean", "sum")

# Reduction codes understood by the op (mean becomes sum plus a divisor).
REDUCE_NONE = 0
REDUCE_SUM = 1


@dataclass
class Plan:
    """How to call the op for one validated set of arguments."""

    labels: bool  # targets are class indices
    targets: torch.Tensor  # dense targets, or the class indices
    scores: Optional[torch.Tensor]  # (labels, scores) targets: the score per row
    reduction: int  # REDUCE_NONE or REDUCE_SUM
    scale: float  # every loss / gradient value is multiplied by scale / divisor
    divisor: Optional[torch.Tensor]  # 0-d tensor of the compute dtype on inputs' device, or None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape(t) -> str:
    return str(tuple(t.shape))


# torch.compile with dynamic shapes passes floats as symbolic values: the checks below only compare
# them (math.isfinite cannot be traced), so they run the same in eager mode and while tracing.
_SYMBOLIC = (torch.SymFloat, torch.SymInt)
INF = math.inf


def _is_real(v) -> bool:
    """A real number that is not a bool (float and int first: an ABC check costs a few us a call)."""
    t = type(v)
    return t is float or t is int or (t is not bool and isinstance(v, (numbers.Real, *_SYMBOLIC)))


def _is_int(v) -> bool:
    t = type(v)
    return t is int or (t is not bool and isinstance(v, (numbers.Integral, torch.SymInt)))


def check_common(reduction, ignore_index) -> None:
    """The options every member has (what a module can check when it is built)."""
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of 'none', 'mean', 'sum', got {reduction!r}")
    if not _is_int(ignore_index):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")


# Each member's options (the modules check them when they are built, the functions on every call).

def check_alpha_or_off(alpha) -> None:
    """alpha of the focal loss and FL*: [0, 1], or -1 for no alpha weighting (torchvision's rule)."""
    if not _is_real(alpha) or not (alpha == -1 or 0 <= alpha <= 1):
        raise ValueError(
            f"alpha: expected a number in [0, 1], or -1 for no alpha weighting (as torchvision), got {alpha!r}"
        )


def check_nonnegative(name: str, value) -> None:
    if not _is_real(value) or not (0 <= value < INF):
        raise ValueError(f"{name}: expected a finite real number >= 0, got {value!r}")


def check_focal_options(alpha, gamma, label_smoothing=0.0) -> None:
    check_alpha_or_off(alpha)
    check_nonnegative("gamma", gamma)
    if not _is_real(label_smoothing) or not (0 <= label_smoothing <= 1):
        raise ValueError(f"label_smoothing: expected a number in [0, 1], got {label_smoothing!r}")


def check_quality_focal_options(beta) -> None:
    check_nonnegative("beta", beta)


def check_varifocal_options(alpha, gamma, iou_weighted, detach_weight) -> None:
    check_nonnegative("alpha", alpha)
    check_nonnegative("gamma", gamma)
    for name, flag in (("iou_weighted", iou_weighted), ("detach_weight", detach_weight)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")


def check_focal_star_options(alpha, gamma, beta) -> None:
    check_alpha_or_off(alpha)
    if not _is_real(gamma) or not (0 < gamma < INF):
        raise ValueError(f"gamma: expected a finite real number > 0 (FL* divides by it), got {gamma!r}")
    if not _is_real(beta) or not (-INF < beta < INF):
        raise ValueError(f"beta: expected a finite real number, got {beta!r}")


def check_iou_aware_bce_options(alpha, gamma) -> None:
    if not _is_real(alpha) or not (0 <= alpha <= 1):
        raise ValueError(f"alpha: expected a number in [0, 1] (the exponent of p in the IoU-aware target), got {alpha!r}")
    check_nonnegative("gamma", gamma)


def check(
    inputs,
    targets,
    reduction,
    weight,
    normalizer,
    ignore_index,
    weight_name: str = "weight",
) -> Plan:
    """The tensors and the options every member shares (each member checks its own options first)."""
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs: expected a torch.Tensor of logits, got {type(inputs).__name__}")
    if inputs.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"inputs: expected float16, bfloat16, float32 or float64 logits, got dtype {inputs.dtype}"
        )
    if inputs.dim() < 1:
        raise ValueError("inputs: expected shape [..., C] with at least one dimension, got a 0-d tensor")
    scores = None
    if isinstance(targets, tuple):
        targets, scores = _split_labels_and_scores(targets, inputs)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(
            f"targets: expected a torch.Tensor or a (labels, scores) tuple, got {type(targets).__name__}"
        )

    if targets.dtype in LABEL_DTYPES:
        labels = True
        if tuple(targets.shape) != tuple(inputs.shape[:-1]):
            raise ValueError(
                f"targets: class-index targets must have shape inputs.shape[:-1] = {tuple(inputs.shape[:-1])}, "
                f"got {_shape(targets)} (dense 0/1 or soft targets must be floating with shape {_shape(inputs)})"
            )
    elif targets.dtype.is_floating_point:
        labels = False
        if tuple(targets.shape) != tuple(inputs.shape):
            hint = ""
            if tuple(targets.shape) == tuple(inputs.shape[:-1]):
                hint = f" (class indices of shape {_shape(targets)} must be int32/int64: pass targets.long())"
            raise ValueError(
                f"targets: floating targets must have the shape of inputs {_shape(inputs)}, got {_shape(targets)}"
                + hint
            )
    else:
        raise TypeError(
            "targets: expected a floating tensor of 0/1 or soft targets (shape of inputs) or int32/int64 class "
            f"indices (shape inputs.shape[:-1]), got dtype {targets.dtype}"
        )
    if targets.device != inputs.device:
        raise ValueError(f"targets: expected a tensor on {inputs.device} (the device of inputs), got {targets.device}")
    if targets.requires_grad:
        raise ValueError(
            "targets: requires grad, but focal_cuda differentiates with respect to inputs only; "
            "pass targets.detach()"
        )

    if scores is not None and not labels:
        raise TypeError(f"targets: the labels of (labels, scores) must be int32/int64, got dtype {targets.dtype}")
    check_common(reduction, ignore_index)

    if weight is not None:
        _check_weight(weight, inputs, weight_name)

    acc = compute_dtype(inputs.dtype)
    scale = 1.0
    divisor = None
    if normalizer is not None:
        if reduction == "mean":
            raise ValueError(
                "normalizer: cannot be combined with reduction='mean'; use reduction='sum' with normalizer "
                "(sum / normalizer) or 'mean' alone"
            )
        divisor, scale = _normalizer(normalizer, inputs, acc)

    if reduction == "mean":
        numel = inputs.numel()
        if labels:
            # elements that are not ignored; at least 1, so an empty or all-ignored mean is 0
            count = (targets != ignore_index).sum() * inputs.shape[-1]
            divisor = count.clamp_min(1).to(acc)
        else:
            scale = 1.0 / max(numel, 1)
    return Plan(labels, targets, scores, REDUCE_NONE if reduction == "none" else REDUCE_SUM, scale, divisor)


def _split_labels_and_scores(targets: tuple, inputs: torch.Tensor):
    if len(targets) != 2:
        raise ValueError(f"targets: a tuple must be (labels, scores), got a tuple of {len(targets)}")
    labels, scores = targets
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"targets: scores of (labels, scores) must be a tensor, got {type(scores).__name__}")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"targets: scores of (labels, scores) must be floating, got dtype {scores.dtype}")
    lead = tuple(inputs.shape[:-1])
    if tuple(scores.shape) != lead:
        raise ValueError(
            f"targets: scores of (labels, scores) must have shape inputs.shape[:-1] = {lead} (one per anchor), "
            f"got {_shape(scores)}"
        )
    if scores.device != inputs.device:
        raise ValueError(f"targets: scores must be on {inputs.device} (the device of inputs), got {scores.device}")
    if scores.requires_grad:
        raise ValueError("targets: scores require grad, but focal_cuda differentiates with respect to inputs only; "
                         "pass scores.detach()")
    return labels, scores


def _check_weight(weight, inputs, name: str) -> None:
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        what = f"dtype {weight.dtype}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"{name}: expected a floating tensor, got {what}")
    try:
        shape = torch.broadcast_shapes(weight.shape, inputs.shape)
    except RuntimeError:
        shape = None
    if shape is None or tuple(shape) != tuple(inputs.shape):
        if name == "weight":
            expected = (f"per element {_shape(inputs)}, per anchor {tuple(inputs.shape[:-1]) + (1,)} or per class "
                        f"({inputs.shape[-1]},)")
        else:
            expected = f"one weight per class, ({inputs.shape[-1]},)"
        raise ValueError(
            f"{name}: shape {_shape(weight)} does not broadcast to inputs {_shape(inputs)}; expected {expected}"
        )
    if weight.device != inputs.device:
        raise ValueError(f"{name}: expected a tensor on {inputs.device} (the device of inputs), got {weight.device}")
    if weight.requires_grad:
        raise ValueError(f"{name}: requires grad, but focal_cuda does not differentiate with respect to it")


def _normalizer(normalizer: Union[float, torch.Tensor], inputs: torch.Tensor, acc: torch.dtype):
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(
                f"normalizer: expected a number or a 0-d / 1-element tensor, got a tensor of shape {_shape(normalizer)}"
            )
        if normalizer.device != inputs.device:
            raise ValueError(
                f"normalizer: expected a tensor on {inputs.device} (the device of inputs), got {normalizer.device}; "
                "pass a Python number or move it"
            )
        if normalizer.dtype == torch.bool or normalizer.is_complex():
            raise TypeError(f"normalizer: expected a real number tensor, got dtype {normalizer.dtype}")
        if normalizer.requires_grad:
            normalizer = normalizer.detach()
        if normalizer.dim() == 0 and normalizer.dtype == acc:  # (reshape and to() would return it as it is)
            return normalizer, 1.0
        return normalizer.reshape(()).to(acc), 1.0
    if not _is_real(normalizer):
        raise TypeError(f"normalizer: expected a number or a 1-element tensor, got {type(normalizer).__name__}")
    if not (-INF < normalizer < INF) or normalizer == 0:
        raise ValueError(f"normalizer: expected a finite non-zero number, got {normalizer!r}")
    return None, 1.0 / float(normalizer)


def validate_labels(targets: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Explicit label check (synchronises with the device): ValueError naming the first bad value."""
    bad = ((targets < 0) | (targets > num_classes)) & (targets != ignore_index)
    if bool(bad.any()):
        flat = bad.reshape(-1).nonzero()[0, 0]
        value = int(targets.reshape(-1)[flat])
        raise ValueError(
            f"targets: class index {value} at flat position {int(flat)} is outside 0..{num_classes - 1} (classes), "
            f"{num_classes} (background) and ignore_index={ignore_index}"
        )
