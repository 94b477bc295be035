"""GHM-C, the gradient harmonizing mechanism's classification loss (Li, Liu and Wang, AAAI 2019), with
mmdet's ``GHMC`` semantics and no host synchronisation.

Three native ops, all on the logits' device (docs/design.md, "GHM-C"):

1. ``ghmc_histogram``: one pass over the logits counts the valid elements of each gradient-norm bin
   (int64 counts, the same whatever the thread order);
2. ``ghmc_weights``: the bins' weights from the counts (and the running counts with momentum), into a
   small table;
3. ``ghmc_loss_fwd``: one pass computes ``sum(w_bin BCE) / tot`` and its gradient ``w_bin (p - y) / tot``.

With ``sync_counts=True`` the counts are summed over the ranks of a ``torch.distributed`` group between
1 and 2, so every rank weights by the whole batch's histogram.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _checks
from .functional import FP16_GRAD_PRESCALE
from .ops import FWD, GHMC_HISTOGRAM, GHMC_WEIGHTS, fused_forward

MAX_BINS = 1024  # csrc/ops/ghmc_ops.h


def _check_options(bins, momentum, reduction, loss_weight) -> None:
    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= MAX_BINS:
        raise ValueError(f"bins: expected an integer in [1, {MAX_BINS}], got {bins!r}")
    if not _checks._is_real(momentum) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum: expected a number in [0, 1), got {momentum!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    if not _checks._is_real(loss_weight) or not (-_checks.INF < loss_weight < _checks.INF):
        raise ValueError(f"loss_weight: expected a finite number, got {loss_weight!r}")


def _check_acc_sum(acc_sum, bins: int, inputs: torch.Tensor) -> None:
    if not isinstance(acc_sum, torch.Tensor):
        raise ValueError(
            "acc_sum: momentum > 0 needs acc_sum, a float32 tensor of shape [bins] that carries the running "
            f"bin counts from call to call (GHMCLoss keeps one as a buffer); got {type(acc_sum).__name__}"
        )
    if acc_sum.dtype != torch.float32 or tuple(acc_sum.shape) != (bins,):
        raise ValueError(
            f"acc_sum: expected a float32 tensor of shape ({bins},), got dtype {acc_sum.dtype} and shape "
            f"{tuple(acc_sum.shape)}"
        )
    if acc_sum.device != inputs.device:
        raise ValueError(f"acc_sum: expected a tensor on {inputs.device} (the device of inputs), got {acc_sum.device}")


def _valid_mask(label_weight: Optional[torch.Tensor], inputs: torch.Tensor, labels: bool) -> Optional[torch.Tensor]:
    """``label_weight > 0`` as a 0/1 tensor of the compute dtype that broadcasts to ``inputs``.

    Accepted shapes: the inputs' ``[..., C]``, per anchor ``inputs.shape[:-1]`` (mmdet's and the labels'
    shape) or anything that broadcasts to the inputs (``[..., 1]``, ``[C]``). Only the distinct elements
    are compared: an expanded per-anchor weight (mmdet's ``view(-1, 1).expand(N, C)``) stays per anchor."""
    if label_weight is None:
        return None
    if not isinstance(label_weight, torch.Tensor):
        raise TypeError(f"label_weight: expected a tensor, got {type(label_weight).__name__}")
    if label_weight.device != inputs.device:
        raise ValueError(
            f"label_weight: expected a tensor on {inputs.device} (the device of inputs), got {label_weight.device}"
        )
    w = label_weight
    if tuple(w.shape) == tuple(inputs.shape[:-1]) and tuple(w.shape) != tuple(inputs.shape):
        w = w.unsqueeze(-1)
    try:
        shape = torch.broadcast_shapes(w.shape, inputs.shape)
    except RuntimeError:
        shape = None
    if shape is None or tuple(shape) != tuple(inputs.shape):
        raise ValueError(
            f"label_weight: shape {tuple(label_weight.shape)} does not fit inputs {tuple(inputs.shape)}; expected "
            f"per element {tuple(inputs.shape)}, per anchor {tuple(inputs.shape[:-1])} or a shape that broadcasts"
        )
    if w.dim() and any(st == 0 and sz > 1 for sz, st in zip(w.shape, w.stride())):
        distinct = w.as_strided([1 if st == 0 else sz for sz, st in zip(w.shape, w.stride())], w.stride())
        return distinct.detach().gt(0).to(_checks.compute_dtype(inputs.dtype)).expand(w.shape)
    return w.detach().gt(0).to(_checks.compute_dtype(inputs.dtype))


def ghmc_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    label_weight: Optional[torch.Tensor] = None,
    bins: int = 10,
    momentum: float = 0.0,
    acc_sum: Optional[torch.Tensor] = None,
    ignore_index: int = -1,
    *,
    reduction: str = "mean",
    loss_weight: float = 1.0,
    sync_counts: bool = False,
    process_group=None,
    validate: bool = False,
) -> torch.Tensor:
    """GHM-C loss (mmdet's ``GHMC``), fused, without a host synchronisation.

    Each valid element's gradient norm ``g = |sigmoid(x) - y|`` falls in one of ``bins`` equal bins of
    [0, 1]; a bin holding ``c`` of the ``tot`` valid elements weights them by ``tot / c``, divided by the
    number of non-empty bins. The loss is ``sum(w * BCE(x, y)) / tot``; the weights are constants for
    the gradient.

    Args:
        inputs: logits ``[..., C]``; float16, bfloat16, float32 or float64; CPU or CUDA.
        targets: dense 0/1 (or soft) targets of the inputs' shape, or int32/int64 class indices of shape
            ``inputs.shape[:-1]`` (``C`` = background, ``ignore_index`` = not valid).
        label_weight: valid where ``> 0`` (its magnitude is not used, as in mmdet); per element, per
            anchor (``inputs.shape[:-1]``) or broadcastable. None: every element is valid.
        bins: number of bins, 1..1024.
        momentum: in [0, 1). With ``momentum > 0`` a bin's count is the running ``acc = m acc + (1 - m) c``
            (updated for non-empty bins only), kept in ``acc_sum``.
        acc_sum: float32 tensor of shape ``[bins]`` on the inputs' device, updated in place; required
            when ``momentum > 0`` (``GHMCLoss`` keeps one as a buffer).
        ignore_index: class-index targets only.
        reduction: ``"mean"`` (mmdet's: ``sum / tot``), ``"sum"`` (``sum(w * BCE)``) or ``"none"``
            (``w * BCE`` per element; unvalid elements 0).
        loss_weight: multiplies the loss (mmdet's ``loss_weight``).
        sync_counts: sum the bin counts over the ranks of ``process_group`` (``torch.distributed``,
            on the device) before weighting, so every rank weights by the whole batch's histogram; with
            ``"mean"`` each rank's loss is then divided by ``tot / world_size`` (the global ``tot``), so that
            DDP's gradient average is the gradient of the global batch's loss. Default: per rank, as mmdet.
        validate: class-index targets only; check every label (synchronises) and raise ValueError on one
            outside ``[0, C]``. CPU labels are always checked.

    Returns:
        0-d loss (``"mean"``, ``"sum"``) or the per-element loss (``"none"``), in the inputs' dtype
        (float32 under autocast for a reduced loss).
    """
    _check_options(bins, momentum, reduction, loss_weight)
    if isinstance(targets, tuple):
        raise TypeError("targets: ghmc_loss takes dense targets or class indices, not (labels, scores)")
    plan = _checks.check(inputs, targets, "none" if reduction == "none" else "sum", None, None, ignore_index)
    if validate and plan.labels:
        _checks.validate_labels(plan.targets, inputs.shape[-1], int(ignore_index))
    if momentum > 0:
        _check_acc_sum(acc_sum, bins, inputs)
    mask = _valid_mask(label_weight, inputs, plan.labels)

    counts = GHMC_HISTOGRAM(inputs.detach(), plan.targets, mask, bins, int(ignore_index))
    norm = 1.0
    if sync_counts:
        import torch.distributed as dist

        dist.all_reduce(counts, group=process_group)
        norm = float(dist.get_world_size(process_group))
    table, new_acc = GHMC_WEIGHTS(counts, acc_sum if momentum > 0 else None, float(momentum),
                                  norm if reduction == "mean" else 0.0, inputs.dtype == torch.float64)
    if momentum > 0:
        with torch.no_grad():
            acc_sum.copy_(new_acc)

    compute_grad = inputs.requires_grad and torch.is_grad_enabled()
    prescale = 0.0
    if compute_grad and inputs.dtype == torch.float16:
        # float16: the gradient is stored without loss_weight, times a headroom factor, and scaled in
        # float32 in backward. The mean's weights are at most norm / ((1 - momentum) n): 2^8 of headroom
        # below that keeps gradients of ~1e-10 above float16's underflow. 'sum' / 'none' weights reach
        # tot / n: no headroom (docs/design.md: their float16 gradients can overflow)
        prescale = FP16_GRAD_PRESCALE * (1.0 - momentum) / norm if reduction == "mean" else 1.0
    acc_loss = reduction != "none" and torch.is_autocast_enabled(inputs.device.type)
    return fused_forward(FWD["ghmc_loss_fwd"], inputs, plan.targets, None, mask, None, float(loss_weight),
                         plan.reduction, int(ignore_index), compute_grad, prescale, acc_loss, table)


class GHMCLoss(nn.Module):
    """``ghmc_loss`` as a module: ``forward(inputs, targets, label_weight=None)``.

    With ``momentum > 0`` the running bin counts live in the ``acc_sum`` buffer (float32 ``[bins]``,
    zeros at first, as mmdet's), updated in place on the device by every forward, also in eval mode
    (as mmdet does); they move with ``.to()`` and are saved in the ``state_dict``."""

    def __init__(
        self,
        bins: int = 10,
        momentum: float = 0.0,
        loss_weight: float = 1.0,
        *,
        reduction: str = "mean",
        ignore_index: int = -1,
        sync_counts: bool = False,
        process_group=None,
    ) -> None:
        super().__init__()
        _check_options(bins, momentum, reduction, loss_weight)
        _checks.check_common(reduction, ignore_index)
        self.bins = int(bins)
        self.momentum = float(momentum)
        self.loss_weight = float(loss_weight)
        self.reduction = reduction
        self.ignore_index = int(ignore_index)
        self.sync_counts = bool(sync_counts)
        self.process_group = process_group
        if self.momentum > 0:
            self.register_buffer("acc_sum", torch.zeros(self.bins))
        else:
            self.acc_sum = None

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor,
                label_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ghmc_loss(inputs, targets, label_weight, self.bins, self.momentum, self.acc_sum, self.ignore_index,
                         reduction=self.reduction, loss_weight=self.loss_weight, sync_counts=self.sync_counts,
                         process_group=self.process_group)

    def extra_repr(self) -> str:
        text = f"bins={self.bins}, momentum={self.momentum}, loss_weight={self.loss_weight}, reduction={self.reduction!r}"
        if self.ignore_index != -1:
            text += f", ignore_index={self.ignore_index}"
        if self.sync_counts:
            text += ", sync_counts=True"
        return text
