"""The CUDA emulation's builds (tests/test_cuda_emulation.py): emulate.cpp JIT-compiled with
torch.utils.cpp_extension, once with the default tuning knobs and once per other knob set.

Run as a script it compiles them all side by side, one process each, so that the tests then load
finished builds: `make test-emulation-asan` does that (three compiles on two cores take about as long
as the longest one and a half; built from inside the tests they ran one after another)."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Builds with tuning knobs (csrc/cuda/tuning.h) other than the defaults: other packs per step
# through both kernels, and the label-rows kernel switched off. They test the focal loss at gamma = 2
# (the knobs shape every member's kernels alike) and are built with that member only.
KNOB_BUILDS = {
    "packs": ("FOCAL_CUDA_PACKS_F32=1", "FOCAL_CUDA_PACKS_F16=2", "FOCAL_CUDA_ROW_PACKS_F32=3",
              "FOCAL_CUDA_ROW_PACKS_F16=2", "FOCAL_EMULATION_FOCAL_ONLY"),
    "label-rows-off": ("FOCAL_CUDA_LABEL_ROWS=0", "FOCAL_EMULATION_FOCAL_ONLY"),
}


def build_emulation(knobs: str | None = None):
    """The emulation module built with the default knobs, or with KNOB_BUILDS[knobs]."""
    from torch.utils import cpp_extension

    name = "focal_cuda_emulation" + ("_" + knobs.replace("-", "_") if knobs else "")
    defines = KNOB_BUILDS[knobs] if knobs else ()
    # FOCAL_EMULATION_ASAN=1 (`make test-emulation-asan`): built with AddressSanitizer, so that a
    # kernel's read or write outside the tensors aborts the run with a report
    asan = os.environ.get("FOCAL_EMULATION_ASAN") == "1"
    flags = ["-fsanitize=address", "-fno-omit-frame-pointer"] if asan else []
    name = name + ("_asan" if asan else "")
    build = os.path.join(ROOT, "build", name)
    os.makedirs(build, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[os.path.join(ROOT, "tests", "cuda_emulation", "emulate.cpp")],  # (it includes plan.cpp)
        extra_cflags=["-O1", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function", *flags,
                      *(f"-D{d}" for d in defines)],
        extra_ldflags=flags,
        build_directory=build,
        verbose=False,
    )


def _build(knobs):
    build_emulation(knobs)  # (the module itself stays in the worker)


def build_all() -> None:
    builds = [None, *KNOB_BUILDS]
    with ProcessPoolExecutor(max_workers=len(builds)) as pool:
        for done in [pool.submit(_build, k) for k in builds]:
            done.result()


if __name__ == "__main__":
    build_all()
