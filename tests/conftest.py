"""Fixtures shared by the tests.

Every test that takes ``device`` runs on the CPU and, where a GPU is present,
on CUDA (skipped, not faked, without one). ``cpu_kernel`` additionally runs a
test with each CPU kernel build this machine can execute (portable and AVX2).
Shared helpers are in helpers.py.
"""

from __future__ import annotations

import pytest

from focal_cuda import _cpu_isa
from helpers import DEVICES


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=_cpu_isa.available())
def cpu_kernel(request):
    """Runs the test with one CPU kernel build active, then restores the default choice."""
    _cpu_isa.use(request.param)
    yield request.param
    _cpu_isa.select_default()
