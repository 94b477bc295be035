"""Fake (meta) implementations, autocast and autograd for the family's native ops.

Every member has one forward op (``torch.ops.focal_cuda.<member>_fwd``) that returns the loss and,
when asked, the gradient d loss / d inputs with weight and normalizer already applied; they share
their leading arguments (``COMMON_ARGS``), then take the member's options. Backward never reads the
logits again: it scales that saved gradient by grad_output.

How backward applies grad_output:
  * eager, plain tensors, graph not retained, gradient private to autograd
    (the public functions drop the op's gradient output): in place with the
    ``scale_grad_`` op, which reads grad_output on the device and skips the pass
    when it is exactly 1 (the usual case: loss.backward() or a sum of losses);
    the gradient tensor then belongs to the caller;
  * graph retained (``retain_graph=True``), torch.compile, wrapped tensors
    (opcheck, tensor subclasses, torch.func), or the raw op whose caller holds
    the gradient output: out of place, ``grad * grad_output``, so the saved
    gradient is never modified and a later backward still sees it;
  * float16 (``grad_prescale > 0``): the forward stored d loss / d inputs * weight
    * grad_prescale, without the normaliser; backward multiplies by
    grad_output * scale / divisor / grad_prescale computed in float32, in place or
    out of place by the rules above, so nothing underflows between a normaliser
    and a loss scale;
  * a second derivative (``create_graph=True``, nested ``torch.func.grad``) is
    not implemented: it raises a RuntimeError saying so, rather than return a
    gradient whose own derivative would silently be wrong.

Three autograd paths reach the same forward and backward:
  * ``_FusedFunction`` (what the public functions call): an ``autograd.Function``
    whose forward takes ``ctx``, the cheapest in host time;
  * ``_FunctorchFunction``: the same with a separate ``setup_context``, which
    torch.func transforms (``grad``, ``vjp``, ``vmap``) require; used only while
    one is active;
  * each op's own registration (``register_autograd``), for ``torch.ops`` callers.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers torch.ops.focal_cuda.*)

# The arguments every member's op takes first, in this order (then the member's options).
COMMON_ARGS = ("input", "targets", "scores", "weight", "divisor", "scale", "reduction", "ignore_index",
               "compute_grad", "grad_prescale", "acc_loss")
_REDUCTION = COMMON_ARGS.index("reduction")
_ACC_LOSS = COMMON_ARGS.index("acc_loss")

# The members' ops and their options, in schema order (csrc/ops/family_ops.cpp).
MEMBER_OPTIONS = {
    "sigmoid_focal_loss_fwd": ("alpha", "gamma", "label_smoothing"),
    "quality_focal_loss_fwd": ("beta",),
    "varifocal_loss_fwd": ("alpha", "gamma", "iou_weighted", "detach_weight"),
    "sigmoid_focal_loss_star_fwd": ("alpha", "gamma", "beta"),
    "iou_aware_bce_loss_fwd": ("alpha", "gamma"),
    "ghmc_loss_fwd": ("table",),  # GHM-C's loss pass; the table from ghmc_weights (focal_cuda/ghmc.py)
}
# The overloads themselves, for the calls made on every step: an OpOverloadPacket resolves the
# overload on each call (about 10 us of host time here, per call).
FWD = {name: getattr(torch.ops.focal_cuda, name).default for name in MEMBER_OPTIONS}
scale_grad_op = torch.ops.focal_cuda.scale_grad_
_scale_grad = scale_grad_op.default
# GHM-C's histogram and bin-weight ops (no gradient: counts and constants)
GHMC_HISTOGRAM = torch.ops.focal_cuda.ghmc_histogram.default
GHMC_WEIGHTS = torch.ops.focal_cuda.ghmc_weights.default
GHMC_GRID = 4096  # csrc/losses/ghmc.h, kGhmcGrid: the table is 3 bins + 4 + GHMC_GRID values


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_fake(input, targets, scores, weight, divisor, scale, reduction, ignore_index, compute_grad, grad_prescale,
              acc_loss, *options):
    if reduction == 0:
        loss = input.new_empty(input.shape)
    else:
        loss = input.new_empty((), dtype=_compute_dtype(input.dtype) if acc_loss else input.dtype)
    grad = input.new_empty(input.shape) if compute_grad else input.new_empty((0,))
    return loss, grad


@torch.library.register_fake("focal_cuda::scale_grad_")
def _scale_grad_fake(grad, grad_output):
    return None


@torch.library.register_fake("focal_cuda::ghmc_histogram")
def _ghmc_histogram_fake(input, targets, weight, bins, ignore_index):
    return input.new_empty((bins + 1,), dtype=torch.int64)


@torch.library.register_fake("focal_cuda::ghmc_weights")
def _ghmc_weights_fake(counts, acc_sum, momentum, norm, float64):
    bins = counts.shape[0] - 1
    table = counts.new_empty((3 * bins + 4 + GHMC_GRID,), dtype=torch.float64 if float64 else torch.float32)
    return table, counts.new_empty((bins if momentum > 0 else 0,), dtype=torch.float32)


# --------------------------------------------------------------------------------------- autocast
# Under torch.autocast a reduced loss comes back in float32, as torchvision's and PyTorch's own
# losses do: the op writes its (float32-accumulated) total in float32 instead of rounding it to the
# logits' bfloat16 or float16. The logits are not cast; an elementwise loss keeps their dtype.

def _register_autocast(name: str, device_type: str, lib: torch.library.Library) -> None:
    op = FWD[name]
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)
    keyset = torch._C.DispatchKeySet(key)

    def fwd_autocast(*args):
        args = list(args)
        args[_ACC_LOSS] = bool(args[_ACC_LOSS]) or args[_REDUCTION] != 0  # acc_loss for a reduced loss
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return op(*args)

    if op.has_kernel_for_dispatch_key(key):
        op.py_kernels.pop(key)
    op.py_impl(key)(fwd_autocast)  # what tracing (torch.compile, export) dispatches to
    lib.impl(name, lambda _keyset, *args: fwd_autocast(*args), key_name, with_keyset=True)


_lib = torch.library.Library("focal_cuda", "IMPL")
for _name in MEMBER_OPTIONS:
    torch.library.register_fake(f"focal_cuda::{_name}", _fwd_fake)
    for _device_type in ("cpu", "cuda"):
        _register_autocast(_name, _device_type, _lib)


# --------------------------------------------------------------------------------------- backward

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


def apply_grad_output(grad: torch.Tensor, grad_output: torch.Tensor, may_modify: bool = True) -> torch.Tensor:
    """d loss / d inputs = saved gradient * grad_output, without a pass when grad_output == 1.

    grad_output has grad's dtype, or float32 for a 16-bit gradient (scaled in float32: a float16
    gradient's rescaling, or the float32 loss of autocast).
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


def _save(ctx, output, private_grad, input, targets, scores, weight, divisor, scale, reduction, ignore_index,
          compute_grad, grad_prescale, acc_loss, *options):
    loss, grad = output
    ctx.num_args = len(COMMON_ARGS) + len(options)
    ctx.private_grad = private_grad
    ctx.has_grad = bool(compute_grad)
    if ctx.has_grad:
        ctx.mark_non_differentiable(grad)
    else:
        # no gradient was computed (an inference call, or a program exported under no_grad):
        # the loss does not require grad either, rather than fail in backward
        ctx.mark_non_differentiable(loss, grad)
    # The gradient output has no gradient of its own; without this, autograd
    # would allocate and zero a tensor of the logits' size for it on every backward.
    ctx.set_materialize_grads(False)
    ctx.prescale = float(grad_prescale)
    ctx.unnormalized = ctx.prescale > 0
    ctx.scale = float(scale)
    ctx.save_for_backward(grad if ctx.has_grad else None, divisor if ctx.unnormalized else None)


def setup_context(ctx, inputs, output, private_grad=False):
    """private_grad: the caller never sees the gradient output (sigmoid_focal_loss drops it), so
    backward may scale it in place; the raw op's caller holds it, so backward must not."""
    _save(ctx, output, private_grad, *inputs)


_DOUBLE_BACKWARD = (
    "focal_cuda: double backward is not supported: {how}, but the fused gradient is not "
    "differentiable again. Use the plain-PyTorch twin in focal_cuda.reference where one is needed"
)


def backward(ctx, grad_loss, _grad_of_grad):
    """The backward of each op's own autograd registration (one gradient per op argument)."""
    return (_backward_input(ctx, grad_loss, ctx.needs_input_grad[0]),) + (None,) * (ctx.num_args - 1)


def _backward_input(ctx, grad_loss, wanted: bool):
    """d loss / d input for the eager paths (create_graph raises), or None."""
    if grad_loss is None or not wanted:
        return None
    grad_mode = torch.is_grad_enabled()  # (off in a plain backward: then no no_grad block is needed)
    if grad_mode and not torch.compiler.is_compiling() and _is_plain(grad_loss):
        raise RuntimeError(_DOUBLE_BACKWARD.format(how="backward was called with create_graph=True"))
    if grad_mode:
        with torch.no_grad():
            return _input_grad(ctx, grad_loss)
    return _input_grad(ctx, grad_loss)


def _input_grad(ctx, grad_loss):
    if not ctx.has_grad:
        raise RuntimeError(
            "focal_cuda: backward called, but the forward ran with compute_grad=False; "
            "call it with inputs that require grad (under torch.enable_grad())"
        )
    grad, divisor = ctx.saved_tensors
    go = grad_loss
    if ctx.unnormalized:
        # float16: the normaliser was left out of the stored gradient; apply it here, together
        # with grad_output (e.g. a GradScaler's 65536), in float32 -- never below float16's range
        go = grad_loss.float() * (ctx.scale / ctx.prescale)
        if divisor is not None:
            go = go / divisor.float()
    return apply_grad_output(grad, go, may_modify=ctx.private_grad)


for _name in MEMBER_OPTIONS:
    torch.library.register_autograd(f"focal_cuda::{_name}", backward, setup_context=setup_context)


class _FusedFunction(torch.autograd.Function):
    """The autograd function behind the public functions: ``apply(op, *args)`` takes a member's op
    and its arguments and returns ``(loss, grad)``; the public functions drop ``grad``, which lets
    backward scale it in place (no allocation). Not public: its arguments are the op's."""

    # forward(ctx, ...) rather than a separate setup_context: with setup_context, Function.apply binds
    # the arguments through inspect.signature on every call (~100 us of host time per call).
    @staticmethod
    def forward(ctx, op, *args):
        if torch.compiler.is_compiling():
            output = op(*args)
        else:
            # straight to the kernel: the op's own (Python) autograd layer has nothing to do here
            with torch._C._AutoDispatchBelowAutograd():
                output = op(*args)
        _save(ctx, output, True, *args)
        return output

    @staticmethod
    def backward(ctx, grad_loss, _grad_of_grad):
        return (None, _backward_input(ctx, grad_loss, ctx.needs_input_grad[1])) + (None,) * (ctx.num_args - 1)


def _grad_levels() -> int:
    """How many torch.func differentiation transforms (grad, vjp, jacrev, jvp) are active."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    grad_like = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)
    return sum(1 for i in retrieve_all_functorch_interpreters() if i.key() in grad_like)


class _FunctorchFunction(torch.autograd.Function):
    """The same forward and backward in the form torch.func transforms accept (a separate
    setup_context; vmap runs the op once per batch entry). Used only while a transform is active."""

    @staticmethod
    def forward(op, *args):
        return op(*args)

    @staticmethod
    def vmap(info, in_dims, op, *args):
        # one op call per batch entry: each sample's loss is reduced and normalised exactly as an
        # unbatched call would (per-sample divisors included)
        outputs = []
        for b in range(info.batch_size):
            outputs.append(op(*(a if d is None else a.select(d, b) for a, d in zip(args, in_dims[1:]))))
        loss = torch.stack([o[0] for o in outputs])
        grad = torch.stack([o[1] for o in outputs])
        return (loss, grad), (0, 0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, output, False, *inputs[1:])

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(
            "focal_cuda: forward-mode differentiation (torch.func.jvp, jacfwd, hessian) is not supported; "
            "use reverse mode (torch.func.grad, vjp, jacrev), or focal_cuda.reference.sigmoid_focal_loss"
        )

    @staticmethod
    def backward(ctx, grad_loss, _grad_of_grad):
        nones = (None,) * (ctx.num_args - 1)
        if grad_loss is None or not ctx.needs_input_grad[1]:
            return (None, None) + nones
        if _grad_levels() > 1:
            raise RuntimeError(_DOUBLE_BACKWARD.format(how="torch.func transforms were nested to differentiate twice"))
        return (None, _input_grad(ctx, grad_loss)) + nones


def fused_forward(op, *args) -> torch.Tensor:
    """The loss of a member's op, through the autograd path that suits the caller."""
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        return _FunctorchFunction.apply(op, *args)[0]
    return _FusedFunction.apply(op, *args)[0]
