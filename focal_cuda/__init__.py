"""focal_cuda: fused sigmoid focal loss for PyTorch (forward and gradient in one pass), CPU and CUDA."""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the native ops: torch.ops.focal_cuda.*)
from . import _cpu_isa
from . import ops  # noqa: F401  (fake implementations and autograd registration)
from . import reference  # noqa: F401
from .functional import sigmoid_focal_loss
from .modules import SigmoidFocalLoss
from .ops import SigmoidFocalLossFunction

__version__ = "0.1.0"

__all__ = [
    "sigmoid_focal_loss",
    "SigmoidFocalLoss",
    "SigmoidFocalLossFunction",
    "reference",
    "build_info",
    "__version__",
]

_cpu_isa.select_default()


def build_info() -> dict:
    """What this installation was built with and is using."""
    info = dict(_C.build_info())
    archs = info.pop("cuda_archs")
    return {
        "version": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels": info.pop("cuda"),
        "cuda_archs": [a for a in archs.split(";") if a] if archs else [],
        "cuda_available": torch.cuda.is_available(),
        "cpu_kernel": info.pop("cpu_kernel"),
        "cpu_kernels_available": _cpu_isa.available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "openmp": info.pop("openmp"),
        "cpu_threads": info.pop("cpu_threads"),
    }
