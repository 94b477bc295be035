"""Fake (meta) implementations and autograd for the native ops.

Forward (``torch.ops.focal_cuda.sigmoid_focal_loss_fwd``) returns the loss and,
when asked, the gradient d loss / d inputs with alpha, weight and normalizer
already applied. Backward never reads the logits again: it scales that saved
gradient by grad_output.

How backward applies grad_output:
  * eager, plain tensors, graph not retained, gradient private to autograd
    (``sigmoid_focal_loss`` drops the op's gradient output): in place with the
    ``scale_grad_`` op, which reads grad_output on the device and skips the pass
    when it is exactly 1 (the usual case: loss.backward() or a sum of losses);
    the gradient tensor then belongs to the caller;
  * graph retained (``retain_graph=True``), torch.compile, wrapped tensors
    (opcheck, tensor subclasses), or the raw op whose caller holds the gradient
    output: out of place, ``grad * grad_output``, so the
    saved gradient is never modified and a later backward still sees it;
  * float16 (``grad_prescale > 0``): the forward stored d loss / d inputs * weight
    * grad_prescale, without the normaliser; backward multiplies by
    grad_output * scale / divisor / grad_prescale computed in float32, in place or
    out of place by the rules above, so nothing underflows between a normaliser
    and a loss scale;
  * ``create_graph=True``: the second derivative is not implemented; eager
    backward with create_graph raises a RuntimeError saying so, rather than
    return a gradient whose own derivative would silently be wrong.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers torch.ops.focal_cuda.*)

fwd_op = torch.ops.focal_cuda.sigmoid_focal_loss_fwd
scale_grad_op = torch.ops.focal_cuda.scale_grad_
# The overloads themselves, for the calls made on every step: an OpOverloadPacket resolves the
# overload on each call (about 10 us of host time here, per call).
_fwd = fwd_op.default
_scale_grad = scale_grad_op.default

# inputs, targets, weight, divisor, scale, alpha, gamma, reduction, ignore_index, compute_grad, grad_prescale
_NUM_FWD_ARGS = 11


@torch.library.register_fake("focal_cuda::sigmoid_focal_loss_fwd")
def _fwd_fake(inputs, targets, weight, divisor, scale, alpha, gamma, reduction, ignore_index, compute_grad,
              grad_prescale=0.0):
    loss = inputs.new_empty(inputs.shape if reduction == 0 else ())
    grad = inputs.new_empty(inputs.shape) if compute_grad else inputs.new_empty((0,))
    return loss, grad


@torch.library.register_fake("focal_cuda::scale_grad_")
def _scale_grad_fake(grad, grad_output):
    return None


_keep_graph_getter = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def _graph_is_kept() -> bool:
    if _keep_graph_getter is None:  # older torch: assume the graph may be reused
        return True
    try:
        return bool(_keep_graph_getter())
    except RuntimeError:  # not inside a backward pass (direct call)
        return True


def _is_plain(t: torch.Tensor) -> bool:
    return type(t) is torch.Tensor


def _times(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """grad * factor as a new tensor of grad's dtype, computed in factor's precision when higher."""
    if factor.dtype == grad.dtype:
        return grad * factor
    return (grad.to(factor.dtype) * factor).to(grad.dtype)


def apply_grad_output(grad: torch.Tensor, grad_output: torch.Tensor, reduction: int,
                      may_modify: bool = True) -> torch.Tensor:
    """d loss / d inputs = saved gradient * grad_output, without a pass when grad_output == 1.

    grad_output has grad's dtype, or float32 for a float16 gradient (scaled in float32).
    may_modify: the saved gradient is private to autograd (not handed to the caller as an output)."""
    if not may_modify or torch.compiler.is_compiling() or not (_is_plain(grad) and _is_plain(grad_output)):
        return _times(grad, grad_output)
    in_place = not _graph_is_kept()
    if grad_output.numel() != 1 and any(s != 0 for s in grad_output.stride()):
        # reduction='none' followed by something other than a plain sum/mean: elementwise
        return grad.mul_(grad_output) if in_place else _times(grad, grad_output)
    # one value (a 0-d grad_output, or an expanded scalar as from loss.sum().backward())
    go = grad_output if grad_output.dim() == 0 else grad_output.as_strided((), ())
    if not in_place:
        return _times(grad, go)
    _scale_grad(grad, go)
    return grad


def setup_context(ctx, inputs, output, private_grad=False):
    """private_grad: the caller never sees the gradient output (sigmoid_focal_loss drops it), so
    backward may scale it in place; the raw op's caller holds it, so backward must not."""
    ctx.private_grad = private_grad
    _, grad = output
    ctx.mark_non_differentiable(grad)
    # The gradient output has no gradient of its own; without this, autograd
    # would allocate and zero a tensor of the logits' size for it on every backward.
    ctx.set_materialize_grads(False)
    ctx.reduction = inputs[7]
    ctx.has_grad = bool(inputs[9])
    ctx.prescale = float(inputs[10]) if len(inputs) > 10 else 0.0
    ctx.unnormalized = ctx.prescale > 0
    ctx.scale = float(inputs[4])
    ctx.save_for_backward(grad if ctx.has_grad else None, inputs[3] if ctx.unnormalized else None)


def backward(ctx, grad_loss, _grad_of_grad):
    nones = (None,) * (_NUM_FWD_ARGS - 1)
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return (None,) + nones
    grad_mode = torch.is_grad_enabled()  # (off in a plain backward: then no no_grad block is needed)
    if grad_mode and not torch.compiler.is_compiling() and _is_plain(grad_loss):
        raise RuntimeError(
            "focal_cuda: double backward is not supported: backward was called with create_graph=True, "
            "but the fused gradient is not differentiable again. Use focal_cuda.reference.sigmoid_focal_loss "
            "where a second derivative is needed"
        )
    if not ctx.has_grad:
        raise RuntimeError(
            "focal_cuda: backward called, but the forward ran with compute_grad=False; "
            "call it with inputs that require grad (under torch.enable_grad())"
        )
    if grad_mode:
        with torch.no_grad():
            return (_input_grad(ctx, grad_loss),) + nones
    return (_input_grad(ctx, grad_loss),) + nones


def _input_grad(ctx, grad_loss):
    grad, divisor = ctx.saved_tensors
    go = grad_loss
    if ctx.unnormalized:
        # float16: the normaliser was left out of the stored gradient; apply it here, together
        # with grad_output (e.g. a GradScaler's 65536), in float32 -- never below float16's range
        go = grad_loss.float() * (ctx.scale / ctx.prescale)
        if divisor is not None:
            go = go / divisor.float()
    return apply_grad_output(grad, go, ctx.reduction, may_modify=ctx.private_grad)


torch.library.register_autograd("focal_cuda::sigmoid_focal_loss_fwd", backward, setup_context=setup_context)


class SigmoidFocalLossFunction(torch.autograd.Function):
    """The autograd function behind ``sigmoid_focal_loss``.

    ``apply(inputs, targets, weight, divisor, scale, alpha, gamma, reduction, ignore_index, compute_grad,
    grad_prescale=0.0)`` with the op's raw arguments (see ``focal_cuda.functional`` for how the
    public arguments map onto them) returns ``(loss, grad)``; ``grad`` is non-differentiable and empty
    unless ``compute_grad``. It is the buffer backward hands to autograd: ``sigmoid_focal_loss`` drops
    it, which lets backward scale it in place (no allocation); a caller of ``apply`` who keeps it must
    read it before calling backward. (The raw op's own autograd never modifies it.)
    """

    # forward(ctx, ...) rather than a separate setup_context: with setup_context, Function.apply binds
    # the arguments through inspect.signature on every call (~100 us of host time per call).
    @staticmethod
    def forward(ctx, inputs, targets, weight, divisor, scale, alpha, gamma, reduction, ignore_index, compute_grad,
                grad_prescale=0.0):
        args = (inputs, targets, weight, divisor, scale, alpha, gamma, reduction, ignore_index, compute_grad,
                grad_prescale)
        if torch.compiler.is_compiling():
            output = _fwd(*args)
        else:
            # straight to the kernel: the op's own (Python) autograd layer has nothing to do here
            with torch._C._AutoDispatchBelowAutograd():
                output = _fwd(*args)
        setup_context(ctx, args, output, private_grad=True)
        return output

    @staticmethod
    def backward(ctx, grad_loss, grad_of_grad):
        return backward(ctx, grad_loss, grad_of_grad)
