"""What the CUDA build produced, read from the built extension without a GPU: the label-rows
kernels (the hot path of detectors) keep their loop in registers. Their register caps
(kRowMinBlocks in csrc/cuda/kernels.cuh) are set to each kernel's natural register count; a cap
below it makes ptxas spill inside the grid-stride loop (it did: 15-19 local loads and stores a step
in the COCO float32 and bfloat16 kernels), which shows as a stack frame in cuobjdump's resource
usage, as does a local array."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

import focal_cuda


def find_cuobjdump():
    cands = [shutil.which("cuobjdump"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                                                      "cuobjdump")]
    try:  # the triton wheel that comes with torch ships one
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def resource_usage():
    """[(arch, demangled kernel name, registers, stack bytes)] of the built extension."""
    if not focal_cuda.build_info()["cuda_kernels"]:
        pytest.skip("the extension was built without its CUDA kernels")
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton) on this machine")
    text = subprocess.run([tool, "-res-usage", focal_cuda._C.__file__], capture_output=True, text=True,
                          check=True).stdout
    rows, arch, names = [], None, []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            usage = re.search(r"REG:(\d+) STACK:(\d+)", lines[i + 1])
            names.append(m.group(1))
            rows.append((arch, int(usage.group(1)), int(usage.group(2))))
    demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    demangled = [d.replace("(anonymous namespace)::", "").replace("focal::", "") for d in demangled]
    return [(a, d[:d.find(">(") + 1] if ">(" in d else d, reg, stack) for (a, reg, stack), d in zip(rows, demangled)]


def test_label_rows_kernels_do_not_spill():
    """The focal loss's kernels: no stack at all. The other members' float32 kernels without row
    crossing need 86-88 registers uncapped, a few above the cap of 3 blocks: they may keep up to 3
    values (24 B) on the stack rather than lose a third of their warps. (With row crossing, a pack's
    two rows were once selected by address, which put both in local memory: 48 B of stack in every
    such kernel, whatever the cap.)"""
    rows = resource_usage()
    assert {a for a, *_ in rows} >= {f"sm_{a.split('+')[0].replace('.', '')}"
                                     for a in focal_cuda.build_info()["cuda_archs"]}
    # focal_label_rows_kernel<scalar, label, member, packs, kCross, kRowWeight>
    kernels = [(a, d, reg, stack) for a, d, reg, stack in rows if "focal_label_rows_kernel<" in d]
    for cross in ("false", "true"):  # every member, both 16/32-bit dtypes, with and without row crossing
        assert sum(bool(re.search(rf", \d+, {cross}, (true|false)>$", d)) for _, d, *_ in kernels) >= 10
    assert any("Focal<2, float>" in d for _, d, *_ in kernels)
    spilling = [f"{a} {d}: {reg} registers, {stack} B of stack" for a, d, reg, stack in kernels
                if stack > (0 if re.search(r", Focal<\d, float>,", d) else 24)]
    assert not spilling, "\n".join(spilling)
