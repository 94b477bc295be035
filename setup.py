"""Build focal_cuda's native parts.

Extensions:
  focal_cuda._C         ops (TORCH_LIBRARY), portable CPU kernel, and the CUDA
                        kernels whenever a CUDA toolkit and a CUDA build of torch
                        are present.
  focal_cuda._cpu_avx2  the CPU kernel built for AVX2 + FMA (x86-64 only);
                        picked at import time after a runtime CPU check.

Environment switches:
  FOCAL_CUDA_FORCE_CPU=1     never compile the CUDA sources.
  FOCAL_CUDA_REQUIRE_CUDA=1  fail the build if the CUDA sources cannot be compiled
                             (no toolkit found, or a CPU-only torch). CI sets it.
  TORCH_CUDA_ARCH_LIST       GPU architectures (default "8.0;9.0+PTX").
  CUDA_HOME                  CUDA toolkit root; found from nvcc when unset.
  MAX_JOBS                   parallel compile jobs (default 2).
  FOCAL_CUDA_TUNING          CUDA kernel knobs of csrc/cuda/tuning.h, e.g. "LABEL_ROWS=0 ROW_PACKS_F32=1"
                             (each becomes -DFOCAL_CUDA_<NAME>=<value>; unknown names are an error).
"""

import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(ROOT, "focal_cuda", "version.py")) as _f:
    VERSION = re.search(r'^__version__ = "([^"]+)"', _f.read(), re.M).group(1)


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) and (
        os.path.isfile(os.path.join(path, "bin", "nvcc"))
    )


def tuning_defines(text):
    """FOCAL_CUDA_TUNING ("NAME=value ...") as [("FOCAL_CUDA_NAME", "value")], checked against the
    knobs csrc/cuda/tuning.h declares: a misspelt knob fails the build instead of changing nothing."""
    with open(os.path.join(ROOT, "csrc", "cuda", "tuning.h")) as f:
        known = set(re.findall(r"^#ifndef FOCAL_CUDA_(\w+)$", f.read(), re.M))
    out = []
    for item in text.split():
        name, sep, value = item.partition("=")
        if not sep or name not in known or not re.fullmatch(r"-?\d+", value):
            sys.exit(f"setup.py: FOCAL_CUDA_TUNING: expected NAME=<integer> with NAME one of "
                     f"{', '.join(sorted(known))}; got {item!r}")
        out.append((f"FOCAL_CUDA_{name}", value))
    return out


def find_cuda_home():
    """The real CUDA toolkit directory (not the folder of an nvcc wrapper script)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        # nvcc reports its own install prefix; this sees through wrapper scripts.
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                capture_output=True, text=True, timeout=60,
            )
            m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
            if m and _is_toolkit(os.path.realpath(os.path.join(m.group(1).strip(), ".."))):
                return os.path.realpath(os.path.join(m.group(1).strip(), ".."))
        except (OSError, subprocess.SubprocessError):
            pass
        candidate = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(candidate):
            return candidate
    if _is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda"
    return None


force_cpu = _flag("FOCAL_CUDA_FORCE_CPU")
require_cuda = _flag("FOCAL_CUDA_REQUIRE_CUDA")
if force_cpu and require_cuda:
    sys.exit("setup.py: FOCAL_CUDA_FORCE_CPU and FOCAL_CUDA_REQUIRE_CUDA contradict each other")

cuda_home = None if force_cpu else find_cuda_home()
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
os.environ.setdefault("MAX_JOBS", "2")
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = bool(cuda_home) and torch.version.cuda is not None
if require_cuda and not with_cuda:
    why = "no CUDA toolkit found (set CUDA_HOME)" if not cuda_home else (
        f"torch {torch.__version__} is a CPU-only build")
    sys.exit(f"setup.py: FOCAL_CUDA_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: {why}")

archs = os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else ""
print(f"focal_cuda setup: torch {torch.__version__}, CUDA kernels: "
      f"{'yes, archs ' + archs + ', toolkit ' + cuda_home if with_cuda else 'no'}", flush=True)

# -g0: Python's own CFLAGS ask for debug info (-g), which took 30% of the CPU kernels' compile time and
# made their objects 13x larger; nothing here is debugged through it.
cxx_flags = ["-O3", "-g0", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unknown-pragmas", "-Wno-psabi",
             "-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]
link_flags = ["-fopenmp"]


def torch_libstdcxx():
    """[path of the libstdc++.so.6 this process (torch) runs with] when the C++ compiler has no shared
    libstdc++ of its own, else [].

    Some toolchains carry only libstdc++.a (seen on a GPU host's /opt/gcc). An extension linked
    with it holds a private copy of the C++ runtime, and the first exception it throws through torch's
    dispatcher (any TORCH_CHECK) kills the process with a segfault instead of raising. Linking the
    runtime that torch already uses keeps one C++ runtime in the process."""
    for cxx in (os.environ.get("CXX"), sysconfig.get_config_var("CXX"), "c++", "g++"):
        exe = shutil.which(cxx.split()[0]) if cxx else None
        if exe:
            break
    else:
        return []
    try:
        found = subprocess.run([exe, "-print-file-name=libstdc++.so"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return []
    if os.path.isabs(found) and os.path.exists(found):
        return []
    try:
        with open("/proc/self/maps") as f:
            loaded = sorted({line.split()[-1] for line in f if "/libstdc++.so" in line})
    except OSError:
        loaded = []
    if loaded:
        print(f"focal_cuda setup: {exe} has no shared libstdc++; linking torch's {loaded[0]}", flush=True)
    return loaded[:1]


stdcxx_flags = torch_libstdcxx()
link_flags += stdcxx_flags
sources = ["csrc/module.cpp", "csrc/ops/family_ops.cpp", "csrc/ops/ghmc_ops.cpp", "csrc/ops/plan.cpp", "csrc/cpu/grad_cache.cpp",
           "csrc/cpu/focal_cpu_default.cpp"]
tuning = " ".join(os.environ.get("FOCAL_CUDA_TUNING", "").split())
tuning_macros = tuning_defines(tuning)  # checked even where no CUDA is built
tuning = tuning if with_cuda else ""
define_macros = [("FOCAL_CUDA_ARCHS", f'"{archs}"'), ("FOCAL_CUDA_TUNING", f'"{tuning}"')]
if with_cuda:
    define_macros += tuning_macros
if tuning:
    print(f"focal_cuda setup: CUDA tuning knobs {tuning}", flush=True)

if with_cuda:
    # the CUDA kernels first (the longest compiles): one translation unit per 16/32-bit dtype's
    # forward kernels, compiled side by side, and focal_cuda.cu (entry points, float64, GHM-C)
    sources[:0] = ["csrc/cuda/forward_float.cu", "csrc/cuda/forward_bfloat16.cu", "csrc/cuda/forward_half.cu",
                   "csrc/cuda/focal_cuda.cu"]
    define_macros.append(("FOCAL_WITH_CUDA", None))
    # -ftz=true: float32 denormals flush to zero (exp(-|x|) below ~1e-38 is 0, as on the CPU path),
    # which drops the denormal fix-ups around the special-function unit from the hot loop
    # --threads 2: the architectures' device passes (cicc, ptxas: most of the build) side by side
    nvcc_flags = ["-O3", "-ftz=true", "--expt-relaxed-constexpr", "-lineinfo", "--threads", "2",
                  "-Xcompiler", "-Wall", "--Werror", "cross-execution-space-call"]
    core = CUDAExtension(
        "focal_cuda._C", sources, define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags,
    )
else:
    core = CppExtension(
        "focal_cuda._C", sources, define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
    )

ext_modules = [core]
if platform.machine().lower() in ("x86_64", "amd64"):
    ext_modules.append(CppExtension(
        "focal_cuda._cpu_avx2", ["csrc/cpu/focal_cpu_avx2.cpp"],
        extra_compile_args={"cxx": ["-O3", "-g0", "-mavx2", "-mfma", "-mf16c", "-Wall", "-Wextra",
                                    "-Wno-unused-parameter", "-Wno-unknown-pragmas", "-Wno-psabi", "-fvisibility=hidden",
                                    "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]},
        extra_link_args=stdcxx_flags,
    ))

setup(
    name="focal_cuda",
    version=VERSION,
    description="Fused sigmoid focal loss (forward + gradient in one pass) for PyTorch, CPU and CUDA",
    packages=["focal_cuda", "focal_cuda.integrations", "focal_cuda.experiments"],
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    zip_safe=False,
)
