"""fvcore / detectron2: drop-ins for ``fvcore.nn.sigmoid_focal_loss`` and ``sigmoid_focal_loss_star``
and their scripted ``_jit`` forms, fused.

    import focal_cuda.integrations.fvcore as fc_fv
    fc_fv.patch()       # fvcore.nn, fvcore.nn.focal_loss, and every imported detectron2 module that
                        # holds one of the four (detectron2's RetinaNet uses sigmoid_focal_loss_jit)
    fc_fv.unpatch()     # or: with fc_fv.patched(): ...

fvcore's semantics, kept: the loss is computed from float32 inputs and targets (``inputs.float()``,
``targets.float()``: integer 0/1 targets are accepted) and comes back in float32; any negative alpha
means no weighting; an unknown ``reduction`` means ``"none"``. FL* is focal_cuda's
``sigmoid_focal_loss_star`` with beta = 0. focal_cuda's kernels take alpha in [0, 1]: an alpha above
1 (which fvcore accepts, weighting negatives below zero) runs fvcore's formula unfused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import functional as _functional
from ._patching import Patches, modules_holding


def _reduction(reduction: str) -> str:
    return reduction if reduction == "mean" or reduction == "sum" else "none"


@torch.jit.unused
def _eager_focal(inputs: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float,
                 reduction: str) -> torch.Tensor:
    return _functional.sigmoid_focal_loss(inputs, targets, alpha if alpha >= 0 else -1.0, float(gamma), reduction)


@torch.jit.unused
def _eager_star(inputs: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float,
                reduction: str) -> torch.Tensor:
    return _functional.sigmoid_focal_loss_star(inputs, targets, alpha if alpha >= 0 else -1.0, float(gamma), 0.0,
                                               reduction)


def _unfused(inputs: torch.Tensor, targets: torch.Tensor, alpha: float, loss: torch.Tensor,
             reduction: str) -> torch.Tensor:
    """fvcore's tail for an alpha above 1 (outside the kernels' range)."""
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = -1, gamma: float = 2,
                       reduction: str = "none") -> torch.Tensor:
    """Drop-in for ``fvcore.nn.sigmoid_focal_loss`` (fvcore's semantics; float32 result), fused."""
    inputs = inputs.float()
    targets = targets.float()
    reduction = _reduction(reduction)
    if alpha > 1:
        p = torch.sigmoid(inputs)
        ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
        p_t = p * targets + (1 - p) * (1 - targets)
        return _unfused(inputs, targets, alpha, ce * ((1 - p_t) ** gamma), reduction)
    if not torch.jit.is_scripting():
        return _eager_focal(inputs, targets, alpha, gamma, reduction)
    scale = 1.0
    if reduction == "mean":
        scale = 1.0 / inputs.numel()
    compute_grad = inputs.requires_grad and torch.is_grad_enabled()
    loss, _ = torch.ops.focal_cuda.sigmoid_focal_loss_fwd(inputs, targets, None, None, None, scale,
                                                          0 if reduction == "none" else 1, -1, compute_grad, 0.0,
                                                          False, alpha if alpha >= 0 else -1.0, float(gamma), 0.0)
    return loss


def sigmoid_focal_loss_star(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = -1, gamma: float = 1,
                            reduction: str = "none") -> torch.Tensor:
    """Drop-in for ``fvcore.nn.sigmoid_focal_loss_star`` (FL*, beta = 0; float32 result), fused."""
    inputs = inputs.float()
    targets = targets.float()
    reduction = _reduction(reduction)
    if alpha > 1:
        loss = -F.logsigmoid(gamma * (inputs * (2 * targets - 1))) / gamma
        return _unfused(inputs, targets, alpha, loss, reduction)
    if not torch.jit.is_scripting():
        return _eager_star(inputs, targets, alpha, gamma, reduction)
    scale = 1.0
    if reduction == "mean":
        scale = 1.0 / inputs.numel()
    compute_grad = inputs.requires_grad and torch.is_grad_enabled()
    loss, _ = torch.ops.focal_cuda.sigmoid_focal_loss_star_fwd(inputs, targets, None, None, None, scale,
                                                               0 if reduction == "none" else 1, -1, compute_grad,
                                                               0.0, False, alpha if alpha >= 0 else -1.0,
                                                               float(gamma), 0.0)
    return loss


sigmoid_focal_loss_jit = torch.jit.script(sigmoid_focal_loss)
sigmoid_focal_loss_star_jit = torch.jit.script(sigmoid_focal_loss_star)

_NAMES = ("sigmoid_focal_loss", "sigmoid_focal_loss_jit", "sigmoid_focal_loss_star", "sigmoid_focal_loss_star_jit")


def _targets():
    import fvcore.nn.focal_loss as stock

    out = []
    for name in _NAMES:
        original = getattr(stock, name)
        for prefix in ("fvcore", "detectron2"):
            for module in modules_holding(prefix, name, original):
                out.append((module, name, globals()[name]))
    return out


_patches = Patches("fvcore", _targets)


def patch() -> None:
    """Install the drop-ins in fvcore.nn and every imported detectron2 module that uses them (import
    detectron2's modeling modules first for those)."""
    _patches.patch()


def unpatch() -> None:
    _patches.unpatch()


def patched():
    return _patches.patched()
