# focal_cuda: every target sets itself up (virtual environment, dependencies, build) first.
#
#   make bench      benchmark (GPU if present, else a CPU-sized sweep)
#   make test       the whole test suite (CUDA tests run where a GPU is present; without one the
#                   CUDA emulation runs under AddressSanitizer)
#   make gpu-check  on a GPU host with torch/pytest/numpy/ninja/pybind11 preinstalled
#                   and no network: build in place, test, benchmark, sanitize, write results
#   make experiment the class-imbalance experiment (five losses on a small RetinaNet, about 15 min
#                   on a 2-core CPU; results into benchmarks/results/)
#   make build      (re)build the extension in place (incremental)
#   make test-emulation-asan  the CUDA kernels run on the CPU under AddressSanitizer
#   make check-old-torch  every source compiled as C++17 against torch 2.11's headers (the GPU
#                   hosts' torch; downloads its wheel once, about 530 MB)
#   make test-old-torch   the suite (CPU build, no emulation) under torch 2.11, torchvision 0.26 and
#                   transformers 5.17, in a venv of its own under build/ (about 6 minutes, 1.5 GB)
#
# Variables: PYTHON (interpreter that creates the venv), VENV, and the build switches
# FOCAL_CUDA_FORCE_CPU=1 / FOCAL_CUDA_REQUIRE_CUDA=1 / TORCH_CUDA_ARCH_LIST / CUDA_HOME.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export MAX_JOBS ?= 2

SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh)
STAMP := focal_cuda/.built

.PHONY: setup build test test-emulation-asan check-old-torch test-old-torch bench bench-full demo experiment gpu-check clean

$(VENV)/.deps: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

setup: $(VENV)/.deps

$(STAMP): $(VENV)/.deps $(SOURCES)
	$(PY) setup.py -q build_ext --inplace
	touch $@

build: $(STAMP)

# Everything but the CUDA emulation, then the emulation under AddressSanitizer (the same tests, with
# every out-of-bounds access fatal; plain where gcc has no libasan). Without a GPU only.
test: build
	$(PY) -m pytest tests -q --ignore=tests/test_cuda_emulation.py
	@if $(PY) -c "import sys, torch; sys.exit(torch.cuda.is_available())"; then \
		$(MAKE) --no-print-directory test-emulation-asan; \
	else echo "a GPU is present: the CUDA kernels themselves were tested, the emulation is not run"; fi

# The CUDA kernels emulated on the CPU under AddressSanitizer: any out-of-bounds access aborts.
ASAN_LIB := $(shell gcc -print-file-name=libasan.so 2>/dev/null)
ifneq ($(filter /%,$(ASAN_LIB)),)
ASAN_ENV := FOCAL_EMULATION_ASAN=1 LD_PRELOAD=$(ASAN_LIB) ASAN_OPTIONS=detect_leaks=0
endif
# Its three builds (default knobs, two other knob sets) compile side by side first, then the tests load them.
test-emulation-asan: build
	$(if $(ASAN_ENV),,@echo "test-emulation-asan: gcc has no libasan; the emulation runs without AddressSanitizer")
	$(ASAN_ENV) $(PY) tests/cuda_emulation/build.py
	$(ASAN_ENV) $(PY) -m pytest tests/test_cuda_emulation.py -q

# torch before 2.12 builds extensions as C++17: a C++20-only construct must fail here, not there.
check-old-torch: $(VENV)/.deps
	PY=$(PY) .ci/check-old-torch

# The suite under the GPU hosts' torch 2.11 (its own venv under build/, a CPU build of a copy of the tree).
test-old-torch:
	PYTHON=$(PYTHON) .ci/test-old-torch

bench: build
	$(PY) benchmarks/bench_focal.py --auto

bench-full: build
	$(PY) benchmarks/bench_focal.py --full

demo: build
	$(PY) -m focal_cuda.demo

experiment: build
	$(PY) -m focal_cuda.experiments.imbalance

# No venv, no downloads: the machine's own python3 with torch, pytest, numpy, ninja, pybind11.
gpu-check:
	python3 benchmarks/gpu_check.py

clean:
	rm -rf build $(STAMP) focal_cuda/*.so
