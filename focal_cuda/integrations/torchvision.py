"""torchvision: a drop-in ``sigmoid_focal_loss`` and the fused RetinaNet classification loss.

    import focal_cuda.integrations.torchvision as fc_tv
    fc_tv.patch()          # torchvision.ops.sigmoid_focal_loss (everywhere torchvision uses it, FCOS
                           # included) and RetinaNetClassificationHead.compute_loss, for every model
    fc_tv.unpatch()        # or: with fc_tv.patched(): ...
    fc_tv.patch_retinanet(model)   # one model only (its head instance)

``sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2, reduction="none")`` has torchvision's
signature, semantics and error messages, and ``torch.jit.script`` accepts it (scripted, it calls the
fused op directly).

The stock RetinaNet head loops over images, builds a dense one-hot target the size of the logits, copies the
non-ignored logits out with boolean indexing, and divides by ``max(1, num_foreground)`` -- a Python
``max`` over a tensor, which synchronises with the GPU once per image. The patched head computes the
same loss (value and gradients) in one fused call for the whole batch, straight from the matched
labels:

  * matched to a box          -> that box's class index
  * below the low IoU threshold -> background (C: all classes negative)
  * between the thresholds     -> ignored (ignore_index)
  * per-image normaliser 1 / (B * max(1, num_foreground_i)) as a per-image weight on the device.

Images with different anchor counts (not produced by torchvision's batching transform, but
possible with a custom one) fall back to one fused call per image.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List

import torch

from .. import functional as _functional
from ._patching import Patches, modules_holding


# torchvision.models.detection._utils.Matcher's codes for unmatched anchors
_BELOW_LOW_THRESHOLD = -1
_BETWEEN_THRESHOLDS = -2
_ORIGINAL = "_focal_cuda_original_compute_loss"


def anchor_labels(targets: List[Dict[str, torch.Tensor]], matched_idxs: List[torch.Tensor], num_classes: int,
                  ignore_index: int = _BETWEEN_THRESHOLDS) -> List[torch.Tensor]:
    """Class index per anchor from the matcher's output: class, C = background, ignore_index = ignored."""
    out = []
    for target, matched in zip(targets, matched_idxs):
        gt = target["labels"]
        if gt.numel() == 0:
            labels = torch.full_like(matched, num_classes)
        else:
            labels = gt.to(matched.dtype)[matched.clamp(min=0)]
            labels = torch.where(matched >= 0, labels, torch.full_like(labels, num_classes))
        out.append(torch.where(matched == _BETWEEN_THRESHOLDS, torch.full_like(labels, ignore_index), labels))
    return out


def check_box_labels(targets: List[Dict[str, torch.Tensor]], num_classes: int, validate: bool = False):
    """Box labels outside ``0..num_classes-1`` (label ``num_classes`` would otherwise read as
    background). On the CPU, or with ``validate=True`` (a host synchronisation on a GPU), raises a
    ValueError naming the image, the box and its label. Otherwise returns a per-image bool tensor on
    the device, True where an image holds a bad box: the caller turns that image's loss NaN."""
    flags = []
    for i, target in enumerate(targets):
        gt = target["labels"]
        bad = (gt < 0) | (gt >= num_classes)
        if validate or gt.device.type == "cpu":
            if bool(bad.any()):
                j = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"targets[{i}]['labels'][{j}] = {int(gt[j])}: a box label must be a class index in "
                    f"0..{num_classes - 1} (this RetinaNet has num_classes={num_classes})"
                )
        else:
            flags.append(bad.any())
    return torch.stack(flags) if flags else None


def classification_loss(head, targets, head_outputs, matched_idxs, validate: bool = False):
    """Drop-in for RetinaNetClassificationHead.compute_loss (same value and gradients).

    A box label outside ``0..C-1`` raises a ValueError on the CPU (and on a GPU with
    ``validate=True``); on a GPU it otherwise makes the loss NaN (no host synchronisation)."""
    cls_logits = head_outputs["cls_logits"]  # [B, A, C]
    num_images, _, num_classes = cls_logits.shape
    bad_images = check_box_labels(targets, num_classes, validate)
    labels = anchor_labels(targets, matched_idxs, num_classes)
    # per-image normaliser, kept on the device: 1 / (B * max(1, foreground count))
    num_fg = torch.stack([(m >= 0).sum() for m in matched_idxs]).clamp_min(1)
    per_image = 1.0 / (num_fg.to(torch.float32) * num_images)
    if bad_images is not None:
        per_image = torch.where(bad_images, torch.full_like(per_image, float("nan")), per_image)
    if all(lab.shape[0] == cls_logits.shape[1] for lab in labels):
        # per-anchor layout [B, A, 1] (B*A floats): its rows merge with the logits' into one row
        # index, which keeps the kernels on their contiguous (vectorised) path; a [B, 1, 1] view
        # would leave two unmergeable row dims and the strided path.
        weight = per_image.view(num_images, 1, 1).expand(num_images, cls_logits.shape[1], 1).contiguous()
        return _functional.sigmoid_focal_loss(cls_logits, torch.stack(labels), reduction="sum", weight=weight,
                                              ignore_index=_BETWEEN_THRESHOLDS)
    total = cls_logits.new_zeros(())
    for i, lab in enumerate(labels):
        total = total + _functional.sigmoid_focal_loss(cls_logits[i, : lab.shape[0]], lab, reduction="sum",
                                                       weight=per_image[i].view(1), ignore_index=_BETWEEN_THRESHOLDS)
    return total


class _FusedComputeLoss:
    """A patched head's ``compute_loss``: a callable bound to its head. Unlike a bound method of a
    module-level function (which pickles as ``getattr(head, its name)``, an attribute a loaded head
    does not have), it pickles and deep-copies with the model."""

    def __init__(self, head, validate: bool):
        self.head = head
        self.validate = validate

    def __call__(self, targets, head_outputs, matched_idxs):
        return classification_loss(self.head, targets, head_outputs, matched_idxs, validate=self.validate)


def patch_retinanet(model, validate: bool = False):
    """Make ``model`` (a torchvision RetinaNet) compute its classification loss with focal_cuda. Returns it.

    validate: on a GPU, check the box labels with a host synchronisation and raise on a bad one
    (without it, a bad label makes the loss NaN there; on the CPU it always raises)."""
    head = _classification_head(model)
    if not hasattr(head, _ORIGINAL):
        # the instance's own override if it had one, else None (the class's method applies)
        setattr(head, _ORIGINAL, head.__dict__.get("compute_loss"))
    head.compute_loss = _FusedComputeLoss(head, bool(validate))
    return model


def unpatch_retinanet(model):
    """Undo ``patch_retinanet``. Returns the model."""
    head = _classification_head(model)
    if hasattr(head, _ORIGINAL):
        original = getattr(head, _ORIGINAL)
        delattr(head, _ORIGINAL)
        if original is None:
            del head.compute_loss
        else:
            head.compute_loss = original
    return model


@contextlib.contextmanager
def patched_retinanet(model, validate: bool = False):
    """Context manager: ``with patched_retinanet(model): loss = model(images, targets)``."""
    patch_retinanet(model, validate)
    try:
        yield model
    finally:
        unpatch_retinanet(model)


def is_patched(model) -> bool:
    return hasattr(_classification_head(model), _ORIGINAL)


def _classification_head(model):
    head = getattr(getattr(model, "head", None), "classification_head", None)
    if head is None or not hasattr(head, "compute_loss"):
        raise TypeError(
            f"model: expected a torchvision RetinaNet (with .head.classification_head), got {type(model).__name__}"
        )
    return head


# ----------------------------------------------------------------------------- the drop-in function

@torch.jit.unused
def _eager(inputs: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float, reduction: str) -> torch.Tensor:
    return _functional.sigmoid_focal_loss(inputs, targets, float(alpha), float(gamma), reduction)


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2,
    reduction: str = "none",
) -> torch.Tensor:
    """Drop-in for ``torchvision.ops.sigmoid_focal_loss`` (same signature, values, gradients, dtype,
    errors; a mean over an empty input is NaN, as torchvision's), fused."""
    if not (0 <= alpha <= 1) and alpha != -1:
        raise ValueError(f"Invalid alpha value: {alpha}. alpha must be in the range [0,1] or -1 for ignore.")
    if reduction != "none" and reduction != "mean" and reduction != "sum":
        raise ValueError(
            f"Invalid Value for arg 'reduction': '{reduction} \n Supported reduction modes: 'none', 'mean', 'sum'"
        )
    if reduction == "mean" and inputs.numel() == 0:
        return inputs.sum() * float("nan")
    if not torch.jit.is_scripting():
        return _eager(inputs, targets, alpha, gamma, reduction)
    # scripted: the op itself (its registered autograd), no Python wrapper in between
    scale = 1.0
    if reduction == "mean":
        scale = 1.0 / inputs.numel()
    compute_grad = inputs.requires_grad and torch.is_grad_enabled()
    loss, _ = torch.ops.focal_cuda.sigmoid_focal_loss_fwd(inputs, targets, None, None, None, scale,
                                                          0 if reduction == "none" else 1, -1, compute_grad, 0.0,
                                                          False, float(alpha), float(gamma), 0.0)
    return loss


# ----------------------------------------------------------------------------- patch()

def _fused_head_compute_loss(self, targets, head_outputs, matched_idxs):
    return classification_loss(self, targets, head_outputs, matched_idxs, validate=_validate[0])


_validate = [False]


def _targets():
    import torchvision.ops
    import torchvision.ops.focal_loss
    import torchvision.models.detection  # noqa: F401  (RetinaNet and FCOS hold their own references)
    from torchvision.models.detection.retinanet import RetinaNetClassificationHead

    stock = torchvision.ops.focal_loss.sigmoid_focal_loss
    out = [(RetinaNetClassificationHead, "compute_loss", _fused_head_compute_loss)]
    for module in modules_holding("torchvision", "sigmoid_focal_loss", stock):
        out.append((module, "sigmoid_focal_loss", sigmoid_focal_loss))
    return out


_patches = Patches("torchvision", _targets)


def patch(validate: bool = False) -> None:
    """Install focal_cuda in torchvision: ``sigmoid_focal_loss`` in torchvision.ops and in every
    torchvision module that imported it (RetinaNet, FCOS), and RetinaNet's classification loss for
    every model (``validate``: check box labels with a host sync on a GPU, see ``patch_retinanet``)."""
    _validate[0] = bool(validate)
    _patches.patch()


def unpatch() -> None:
    """Restore torchvision's own functions."""
    _patches.unpatch()


def patched(validate: bool = False):
    """Context manager: ``with patched(): ...`` runs with torchvision patched."""
    _validate[0] = bool(validate)
    return _patches.patched()
