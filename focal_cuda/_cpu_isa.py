"""Choose the CPU kernel build at import time (runtime ISA check).

``_C`` carries a portable kernel. On x86-64 an AVX2 + FMA build ships as its own
module (``_cpu_avx2``); it is used when torch reports AVX2 or better for this CPU
(``torch.backends.cpu.get_cpu_capability()``, which honours ATEN_CPU_CAPABILITY).
``FOCAL_CUDA_CPU_KERNEL=default|avx2`` overrides the choice.
"""

from __future__ import annotations

import importlib
import os

import torch

from . import _C

_KERNELS = {"avx2": "focal_cuda._cpu_avx2"}
_SUPPORTS = {"avx2": ("AVX2", "AVX512")}


def cpu_supports(name: str) -> bool:
    if name == "default":
        return True
    cap = torch.backends.cpu.get_cpu_capability()
    return any(cap.startswith(c) for c in _SUPPORTS.get(name, ()))


def available() -> list:
    """CPU kernel builds that are compiled in and that this CPU can run."""
    names = ["default"]
    for name, module in _KERNELS.items():
        if cpu_supports(name):
            try:
                importlib.import_module(module)
            except ImportError:
                continue
            names.append(name)
    return names


def use(name: str) -> str:
    """Switch the CPU kernel ('default' or 'avx2'); returns the name in use."""
    if name == "default":
        _C._reset_cpu_kernel()
        return name
    if name not in _KERNELS:
        raise ValueError(f"CPU kernel: expected one of {['default'] + list(_KERNELS)}, got {name!r}")
    if not cpu_supports(name):
        raise RuntimeError(f"CPU kernel {name!r}: this CPU reports {torch.backends.cpu.get_cpu_capability()}")
    module = importlib.import_module(_KERNELS[name])
    _C._set_cpu_kernel(module.kernel_address(), module.hist_kernel_address(), name)
    return name


def current() -> str:
    return _C.build_info()["cpu_kernel"]


def select_default() -> str:
    wanted = os.environ.get("FOCAL_CUDA_CPU_KERNEL", "auto").strip().lower()
    if wanted not in ("", "auto"):
        return use(wanted)
    best = available()[-1]
    return use(best)
