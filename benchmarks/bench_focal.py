#!/usr/bin/env python
"""Benchmark focal_cuda against unfused PyTorch, torch.compile and torchvision, and the bandwidth floor.

Every case is one problem (batch x anchors x classes, dtype, reduction) solved by every variant:

  fused_labels    focal_cuda.sigmoid_focal_loss on int64 class labels (background = C)
  fused_dense     focal_cuda.sigmoid_focal_loss on dense one-hot targets
  eager_labels    focal_cuda.reference (plain PyTorch, same API) on the labels: one-hot built eagerly
  eager_dense     torchvision's formula in eager PyTorch on pre-built one-hot targets
  compile_dense   torch.compile of that formula on pre-built one-hot targets (what a torchvision user has)
  compile_labels  torch.compile of one-hot + formula from the labels (the strongest generic baseline)
  torchvision     torchvision.ops.sigmoid_focal_loss on the one-hot targets, when installed

The family sweep (a case with loss= one of FAMILY, on (labels, scores) targets, 10% positive
anchors) races each member the same way:

  fused_labels    the member's focal_cuda function on (labels, scores)
  fused_focal     focal_cuda.sigmoid_focal_loss on the same input (the member's cost relative to it)
  eager_labels    the member's plain-PyTorch twin (focal_cuda.reference) on (labels, scores)
  eager_dense     the member's formula as detection frameworks write it, on a pre-built dense
                  one-hot-times-score target
  compile_dense   torch.compile of that formula on the dense target
  compile_labels  torch.compile of the densification and the formula together

Each is timed forward-only (no_grad) and forward+backward (loss.backward(), gradient freed after),
reporting the median of repeated runs after warm-up (CUDA events on GPU, perf_counter on CPU, where
a measurement keeps sampling for at least 1 s so fast variants get dozens of samples), the
peak memory of one run, and the achieved bandwidth over the minimal bytes of the fused computation
(docs/design.md: read logits + labels, write the gradient) next to a device-to-device copy of the logits
measured in the same run. torch.compile times are warm; the compile itself is reported separately.

    python benchmarks/bench_focal.py --auto     # --full on a GPU, --quick on a CPU
    python benchmarks/bench_focal.py --quick    # CPU-sized: COCO RetinaNet, batch 1
    python benchmarks/bench_focal.py --full     # GPU sweep: batches 1-16, C = 80/91/264, dtypes

Writes a markdown table to stdout and <out>/<date>-<machine>/bench.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import focal_cuda  # noqa: E402
from focal_cuda._results import cpu_model, run_dir_name  # noqa: E402
from focal_cuda import reference as R  # noqa: E402
from focal_cuda.reference import focal_terms  # noqa: E402

try:
    import torchvision.ops as tv_ops  # noqa: E402
except Exception:  # torchvision is optional
    tv_ops = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALPHA, GAMMA = 0.25, 2.0

# The family's members as the sweep races them: the fused function, its options, the twin, and the
# elementwise formula on a dense target (y, the positive mask) as mmdet, ultralytics and HF write it.
FAMILY = {
    "focal": (focal_cuda.sigmoid_focal_loss, dict(alpha=ALPHA, gamma=GAMMA), R.sigmoid_focal_loss,
              lambda x, y, pos: focal_terms(x, y, ALPHA, GAMMA)),
    "focal_smoothing": (focal_cuda.sigmoid_focal_loss, dict(alpha=ALPHA, gamma=GAMMA, label_smoothing=0.1),
                        R.sigmoid_focal_loss, lambda x, y, pos: focal_terms(x, y, ALPHA, GAMMA, 0.1)),
    "quality_focal": (focal_cuda.quality_focal_loss, dict(beta=2.0), R.quality_focal_loss,
                      lambda x, y, pos: R.quality_focal_terms(x, y, 2.0)),
    "varifocal": (focal_cuda.varifocal_loss, dict(alpha=0.75, gamma=2.0), R.varifocal_loss,
                  lambda x, y, pos: R.varifocal_terms(x, y, pos, 0.75, 2.0, True, False)),
    "focal_star": (focal_cuda.sigmoid_focal_loss_star, dict(alpha=ALPHA, gamma=2.0, beta=1.0),
                   R.sigmoid_focal_loss_star, lambda x, y, pos: R.focal_star_terms(x, y, ALPHA, 2.0, 1.0)),
    "iou_aware_bce": (focal_cuda.iou_aware_bce_loss, dict(alpha=0.25, gamma=2.0), R.iou_aware_bce_loss,
                      lambda x, y, pos: R.iou_aware_bce_terms(x, y, pos, 0.25, 2.0)),
}
FAMILY_VARIANTS = ["fused_labels", "fused_focal", "eager_labels", "eager_dense", "compile_dense", "compile_labels"]

# The focal loss's alternatives (RetinaNet-like labels, 1% positives, 10% ignored), raced as:
#   fused_labels    focal_cuda.GHMCLoss (ghmc: the defaults, 10 bins, as mmdet's GHMC; ghmc30: mmdet's GHM
#                   RetinaNet config, 30 bins and momentum 0.75) / ohem_loss (3:1)
#   fused_focal     focal_cuda.sigmoid_focal_loss on the same labels
#   eager_labels    mmdet's algorithm in eager PyTorch (focal_cuda.reference.ghmc_loss: a mask, a sum
#                   and a host sync per bin) / OHEM in eager PyTorch (sort-based selection, BCE, mask)
#   compile_labels  torch.compile(fullgraph) of a sync-free PyTorch GHM-C (bin counts by scatter_add)
#                   / of the eager OHEM
GHMC_CONFIGS = {"ghmc": (10, 0.0), "ghmc30": (30, 0.75)}  # (bins, momentum)
ALTERNATIVES = tuple(GHMC_CONFIGS) + ("ohem",)
ALTERNATIVE_VARIANTS = ["fused_labels", "fused_focal", "eager_labels", "compile_labels"]
OHEM_RATIO = 3.0


@dataclass
class Case:
    name: str  # problem family: coco / torchvision91 / mlperf
    batch: int
    anchors: int
    classes: int
    dtype: str = "fp32"
    reduction: str = "sum"  # "sum" (with the positive-anchor normalizer) or "none"
    variants: Optional[List[str]] = None  # None: all
    loss: str = "focal"  # a member of FAMILY
    targets: str = "labels"  # "labels", or "scores": (labels, scores) with 10% positive anchors

    @property
    def family(self) -> bool:
        return self.loss != "focal" or self.targets != "labels"

    @property
    def label(self) -> str:
        text = f"{self.name} b{self.batch} {self.anchors}x{self.classes} {self.dtype} {self.reduction}"
        return text + (f" {self.loss} ({self.targets})" if self.family else "")

    @property
    def numel(self) -> int:
        return self.batch * self.anchors * self.classes


GPU_BATCH = 5  # calls per timed sample on a GPU (see Timer.time_ms)
COCO, TV91, MLPERF = (201600, 80), (201600, 91), (120087, 264)
ALL_VARIANTS = ["fused_labels", "fused_dense", "eager_labels", "eager_dense", "compile_dense", "compile_labels",
                "torchvision"]


def family_cases(batch: int) -> List[Case]:
    return [Case("coco", batch, *COCO, "fp32", "sum", None, loss, "scores") for loss in FAMILY]


def alternative_cases(batch: int) -> List[Case]:
    return [Case("coco", batch, *COCO, "fp32", "sum", None, loss, "labels") for loss in ALTERNATIVES]


def preset(name: str) -> List[Case]:
    if name == "quick":  # CPU: the COCO problem at batch 1, then the family sweep
        return [
            Case("coco", 1, *COCO, "fp32", "sum"),
            Case("coco", 1, *COCO, "bf16", "sum", ["fused_labels", "eager_dense", "compile_dense"]),
        ] + family_cases(1) + alternative_cases(1)
    # the goals' cases first (COCO b16 fp32 and bf16, then each family member on (labels, scores)),
    # so that a run stopped at a time limit (--time-limit) still has them
    cases = [Case("coco", 16, *COCO, dt, "sum") for dt in ("fp32", "bf16")]
    cases += family_cases(16)
    cases += [Case("coco", b, *COCO, "fp32", "sum") for b in (1, 2, 8)]
    cases += [Case("coco", 16, *COCO, "fp16", "sum")]
    cases += [Case("coco", 16, *COCO, "fp32", "none")]
    cases += [Case("torchvision91", 8, *TV91, "fp32", "sum")]
    cases += [Case("mlperf", b, *MLPERF, dt, "sum") for b in (8, 32) for dt in ("fp32", "bf16")]
    cases += alternative_cases(16)
    return cases


# ----------------------------------------------------------------------------- machine

def git_commit() -> str:
    if os.environ.get("FOCAL_CUDA_COMMIT"):  # a copied tree without (current) git metadata
        return os.environ["FOCAL_CUDA_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        pass
    return os.environ.get("FOCAL_CUDA_COMMIT", "unknown")  # a copy of the tree without .git (a lent GPU)


def machine_info(device: torch.device) -> dict:
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu_model()}",
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_grad_cache": bool(focal_cuda._C._cpu_grad_cache_info()["enabled"]),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(),
        "focal_cuda": focal_cuda.build_info(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(sm_count=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", driver_cuda=torch.version.cuda)
    return info


# ----------------------------------------------------------------------------- timing

CPU_MIN_SECONDS = 1.0  # per CPU measurement: keep sampling a fast variant for this long
CPU_MAX_REPS = 200


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[int], None], reps: int, warmup: int) -> List[float]:
        for i in range(warmup):
            fn(i)
        self.sync()
        out = []
        if self.device.type == "cuda":
            # each sample: GPU_BATCH calls back to back between two events, divided by GPU_BATCH, so the
            # host's launch overhead (Python, dispatch) overlaps device work, as in a training step where
            # the loss follows other GPU work; a lone call's host-side latency is not the kernel's time
            for i in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for j in range(GPU_BATCH):
                    fn(i * GPU_BATCH + j)
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end) / GPU_BATCH)
        else:
            # at least `reps` samples and at least CPU_MIN_SECONDS of them: a fast variant takes many more
            # samples, so its median does not hinge on a few (this shared VM's speed drifts by tens of %)
            t_start = time.perf_counter()
            i = 0
            while i < reps or (time.perf_counter() - t_start < CPU_MIN_SECONDS and i < CPU_MAX_REPS):
                t0 = time.perf_counter()
                fn(i)
                out.append((time.perf_counter() - t0) * 1e3)
                i += 1
        return out


def fixed_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """CPU: serve every allocation >= nbytes by its own mmap, returned to the OS when freed, so that
    the resident-set peak (VmHWM) measures a variant's real peak. glibc otherwise raises the threshold
    after the first large free and keeps later tensors in the heap, invisible to RSS."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False


def _rss_peak_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name):
                return int(line.split()[1])
    return 0


def peak_memory_mb(fn: Callable[[], None], device: torch.device) -> Optional[float]:
    """Extra memory one run needs beyond what is allocated before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    # a gradient buffer kept from the timed runs would hide this run's gradient from the peak
    focal_cuda.empty_cpu_grad_cache()
    if not _rss_peak_reset():
        return None
    base = _rss_kib("VmRSS")
    fn()
    return max(0, _rss_kib("VmHWM") - base) / 1024


# ----------------------------------------------------------------------------- problems

@dataclass
class Inputs:
    x: torch.Tensor  # logits, leaf, requires grad
    labels: torch.Tensor  # int64 [B, A]
    dense: torch.Tensor  # one-hot [B, A, C] (times the score, family cases) in the logits' dtype
    num_pos: torch.Tensor  # number of positive anchors, clamped >= 1 (device tensor)
    scores: Optional[torch.Tensor] = None  # family cases: float32 [B, A], the matched box's IoU
    positive: Optional[torch.Tensor] = None  # family cases: the one-hot mask [B, A, C]


def make_inputs(case: Case, device: torch.device, seed: int) -> Inputs:
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    B, A, C = case.batch, case.anchors, case.classes
    x = torch.randn(B, A, C, device=device, dtype=torch.float32, generator=g).mul_(2.0).sub_(4.0).to(dtype)
    # RetinaNet-like matching: ~1% positives (family cases: 10%), ~10% ignored (between thresholds),
    # the rest background
    pos_frac = 0.10 if case.targets == "scores" else 0.01
    u = torch.rand(B, A, device=device, generator=g)
    cls = torch.randint(0, C, (B, A), device=device, generator=g)
    labels = torch.where(u < pos_frac, cls, torch.full_like(cls, C))
    labels = torch.where((u >= pos_frac) & (u < pos_frac + 0.10), torch.full_like(cls, -1), labels)
    onehot = F.one_hot(labels.clamp_min(0), C + 1)[..., :C]
    # the dense formulas have no ignore: ignored anchors count as background in the dense forms
    num_pos = ((labels >= 0) & (labels < C)).sum().clamp_min(1)
    if not case.family:
        return Inputs(x.requires_grad_(), labels, onehot.to(dtype), num_pos)
    scores = torch.rand(B, A, device=device, generator=g).mul_(0.9).add_(0.1)  # IoU of the matched box
    dense = onehot.to(dtype) * scores.unsqueeze(-1).to(dtype)
    return Inputs(x.requires_grad_(), labels, dense, num_pos, scores, onehot.bool())


def variant_fns(case: Case, device: torch.device):
    """name -> fn(inputs, grad: bool) returning the loss; compiled ones are created fresh per case."""
    C = case.classes
    red = case.reduction

    def finish(loss_elementwise, n):
        return loss_elementwise.sum() / n if red == "sum" else loss_elementwise / n

    if case.loss in ALTERNATIVES:
        return alternative_fns(case)
    if case.family:
        return family_fns(case, finish)

    def fused_labels(inp: Inputs):
        return focal_cuda.sigmoid_focal_loss(inp.x, inp.labels, ALPHA, GAMMA, red, normalizer=inp.num_pos)

    def fused_dense(inp: Inputs):
        return focal_cuda.sigmoid_focal_loss(inp.x, inp.dense, ALPHA, GAMMA, red, normalizer=inp.num_pos)

    def eager_labels(inp: Inputs):
        return focal_cuda.reference.sigmoid_focal_loss(inp.x, inp.labels, ALPHA, GAMMA, red, normalizer=inp.num_pos,
                                                       validate=False)

    def tv_dense(x, dense, n):
        return finish(focal_terms(x, dense, ALPHA, GAMMA), n)

    def tv_labels(x, labels, n):
        dense = F.one_hot(labels.clamp_min(0), C + 1)[..., :C].to(x.dtype)
        return finish(focal_terms(x, dense, ALPHA, GAMMA), n)

    compiled_dense = torch.compile(tv_dense, fullgraph=True, dynamic=False)
    compiled_labels = torch.compile(tv_labels, fullgraph=True, dynamic=False)

    fns = {
        "fused_labels": fused_labels,
        "fused_dense": fused_dense,
        "eager_labels": eager_labels,
        "eager_dense": lambda inp: tv_dense(inp.x, inp.dense, inp.num_pos),
        "compile_dense": lambda inp: compiled_dense(inp.x, inp.dense, inp.num_pos),
        "compile_labels": lambda inp: compiled_labels(inp.x, inp.labels, inp.num_pos),
    }
    if tv_ops is not None:
        fns["torchvision"] = lambda inp: finish(tv_ops.sigmoid_focal_loss(inp.x, inp.dense, ALPHA, GAMMA, "none"),
                                                inp.num_pos)
    return fns


def family_fns(case: Case, finish):
    fused, options, twin, terms = FAMILY[case.loss]
    C, red = case.classes, case.reduction

    def densify(x, labels, scores):
        onehot = F.one_hot(labels.clamp_min(0), C + 1)[..., :C]
        return onehot.to(x.dtype) * scores.unsqueeze(-1).to(x.dtype), onehot.bool()

    def formula_dense(x, y, positive, n):
        return finish(terms(x, y, positive), n)

    def formula_labels(x, labels, scores, n):
        y, positive = densify(x, labels, scores)
        return finish(terms(x, y, positive), n)

    compiled_dense = torch.compile(formula_dense, fullgraph=True, dynamic=False)
    compiled_labels = torch.compile(formula_labels, fullgraph=True, dynamic=False)
    return {
        "fused_labels": lambda inp: fused(inp.x, (inp.labels, inp.scores), **options, reduction=red,
                                          normalizer=inp.num_pos),
        "fused_focal": lambda inp: focal_cuda.sigmoid_focal_loss(inp.x, (inp.labels, inp.scores), ALPHA, GAMMA, red,
                                                                 normalizer=inp.num_pos),
        "eager_labels": lambda inp: twin(inp.x, (inp.labels, inp.scores), **options, reduction=red,
                                         normalizer=inp.num_pos, validate=False),
        "eager_dense": lambda inp: formula_dense(inp.x, inp.dense, inp.positive, inp.num_pos),
        "compile_dense": lambda inp: compiled_dense(inp.x, inp.dense, inp.positive, inp.num_pos),
        "compile_labels": lambda inp: compiled_labels(inp.x, inp.labels, inp.scores, inp.num_pos),
    }


def ghmc_torch(x, labels, acc_sum, bins: int, momentum: float):
    """GHM-C in plain PyTorch without a host synchronisation (mmdet's semantics; bins by floor(g * bins)):
    per-bin counts by scatter_add, weights gathered back per element."""
    C = x.shape[-1]
    valid = (labels != -1).unsqueeze(-1).expand(x.shape)
    y = F.one_hot(labels.clamp_min(0), C + 1)[..., :C].to(x.dtype)
    g = (torch.sigmoid(x.detach()) - y).abs()
    b = (g * bins).floor().clamp(max=bins - 1).long()
    b = torch.where(valid, b, torch.full_like(b, bins))  # not valid: an extra bin
    counts = torch.zeros(bins + 1, dtype=torch.float32, device=x.device).scatter_add_(
        0, b.flatten(), torch.ones(b.numel(), dtype=torch.float32, device=x.device))[:bins]
    tot = valid.sum().clamp_min(1).float()
    nonempty = counts > 0
    n = nonempty.sum().clamp_min(1)
    acc = torch.where(nonempty, momentum * acc_sum + (1 - momentum) * counts, acc_sum) if momentum > 0 else counts
    if momentum > 0:
        acc_sum.copy_(acc)
    w_bin = torch.where(nonempty, tot / acc.clamp_min(1e-12), torch.zeros_like(acc)) / n
    w = torch.cat([w_bin, w_bin.new_zeros(1)])[b]
    return (F.binary_cross_entropy_with_logits(x, y, reduction="none") * w).sum() / tot


def ohem_torch(x, labels, ratio: float):
    """OHEM 3:1 in plain PyTorch: the same device-side selection as focal_cuda.ohem_loss, then the BCE
    over the whole tensor times the mask."""
    C = x.shape[-1]
    mask = focal_cuda.ohem.hard_negative_mask(x, labels, ratio)
    y = F.one_hot(labels.clamp_min(0), C + 1)[..., :C].to(x.dtype)
    return (F.binary_cross_entropy_with_logits(x, y, reduction="none") * mask.unsqueeze(-1)).sum()


def alternative_fns(case: Case):
    """The GHM-C or OHEM case's variants (see ALTERNATIVES). Each GHM-C variant keeps its own running
    counts, as a training run would."""
    if case.loss in GHMC_CONFIGS:
        bins, momentum = GHMC_CONFIGS[case.loss]
        module = focal_cuda.GHMCLoss(bins, momentum)
        acc_eager = torch.zeros(bins)
        acc_compile = torch.zeros(bins)
        compiled = torch.compile(ghmc_torch, fullgraph=True, dynamic=False)

        def fused(inp):
            module.to(inp.x.device)
            return module(inp.x, inp.labels)

        def eager(inp):
            return R.ghmc_loss(inp.x, inp.labels, None, bins, momentum, acc_eager.to(inp.x.device))

        def compiled_fn(inp):
            return compiled(inp.x, inp.labels, acc_compile.to(inp.x.device), bins, momentum)
    else:
        compiled = torch.compile(ohem_torch, fullgraph=True, dynamic=False)

        def fused(inp):
            return focal_cuda.ohem_loss(inp.x, inp.labels, OHEM_RATIO, "sum", inp.num_pos)

        def eager(inp):
            return ohem_torch(inp.x, inp.labels, OHEM_RATIO) / inp.num_pos

        def compiled_fn(inp):
            return compiled(inp.x, inp.labels, OHEM_RATIO) / inp.num_pos
    return {
        "fused_labels": fused,
        "fused_focal": lambda inp: focal_cuda.sigmoid_focal_loss(inp.x, inp.labels, ALPHA, GAMMA, "sum",
                                                                 normalizer=inp.num_pos),
        "eager_labels": eager,
        "compile_labels": compiled_fn,
    }


def min_bytes(case: Case, grad: bool, dense_targets: bool = False) -> int:
    """Fewest bytes the fused computation moves (docs/design.md, the byte floor), label targets unless told."""
    s = torch.finfo(DTYPES[case.dtype]).bits // 8
    n = case.numel
    total = n * s + case.batch * case.anchors * 8  # read logits and int64 labels
    if case.targets == "scores":
        total += case.batch * case.anchors * 4  # and float32 scores
    if dense_targets:
        total += n * s
    if grad:
        total += n * s  # write the gradient
    if case.reduction == "none":
        total += n * s  # write the elementwise loss
    return total


# ----------------------------------------------------------------------------- running

def run_case(case: Case, device: torch.device, reps: int, warmup: int, log) -> dict:
    timer = Timer(device)
    itemsize = torch.finfo(DTYPES[case.dtype]).bits // 8
    need = case.numel * itemsize
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
        sets = max(1, min(4, math.ceil(3 * l2 / need)))  # rotate inputs: a small case is not timed from L2
        if need * (3 * sets + 12) > free:  # inputs + one-hot + eager temporaries
            log(f"  skip {case.label}: needs ~{need * (3 * sets + 12) / 2**30:.1f} GiB, {free / 2**30:.1f} free")
            return {"case": case.__dict__, "skipped": "does not fit in GPU memory"}
    else:
        sets = 1
    try:
        inputs = [make_inputs(case, device, seed=i) for i in range(sets)]
    except torch.OutOfMemoryError:
        log(f"  skip {case.label}: out of memory building inputs")
        return {"case": case.__dict__, "skipped": "out of memory"}

    result = {"case": case.__dict__ | {"label": case.label}, "elements": case.numel, "input_sets": sets,
              "min_bytes": {"fwd": min_bytes(case, False), "fwdbwd": min_bytes(case, True)}, "variants": {}}

    # warm the process up first (CPU: the first runs pay for faulting fresh huge pages into the
    # process, ~2x slower for several runs; GPU: module load, allocator growth)
    fns = variant_fns(case, device)
    for i in range(8 if device.type == "cpu" else 3):
        loss = fns["fused_labels"](inputs[i % sets])
        (loss.sum() if loss.dim() else loss).backward()
        inputs[i % sets].x.grad = None
    timer.sync()

    # same-run bandwidth baseline: device-to-device copy of the logits (read + write = 2 x bytes)
    dst = torch.empty_like(inputs[0].x)
    copy_ms = statistics.median(timer.time_ms(lambda i: dst.copy_(inputs[i % sets].x.detach()), reps * 2, warmup))
    copy_gbps = 2 * need / copy_ms / 1e6
    result["copy"] = {"ms": copy_ms, "gbps": copy_gbps}
    del dst
    log(f"  copy: {copy_ms:.3f} ms, {copy_gbps:.1f} GB/s")

    default = ALTERNATIVE_VARIANTS if case.loss in ALTERNATIVES else FAMILY_VARIANTS if case.family else ALL_VARIANTS
    names = [v for v in (case.variants or default) if v in fns]
    for name in names:
        fn = fns[name]
        entry: Dict[str, object] = {}
        try:
            if name.startswith("compile"):  # first calls compile: report, then time warm
                t0 = time.perf_counter()
                with torch.no_grad():
                    fn(inputs[0])
                timer.sync()
                t1 = time.perf_counter()
                loss = fn(inputs[0])
                (loss.sum() if loss.dim() else loss).backward()
                inputs[0].x.grad = None
                timer.sync()
                entry["compile_s"] = {"fwd": t1 - t0, "fwdbwd": time.perf_counter() - t1}

            def fwd(i):
                with torch.no_grad():
                    fn(inputs[i % sets])

            def fwdbwd(i):
                inp = inputs[i % sets]
                loss = fn(inp)
                (loss.sum() if loss.dim() else loss).backward()
                inp.x.grad = None

            log(f"  {name}: forward ...")
            samples = timer.time_ms(fwd, reps, warmup)
            entry["fwd_ms"] = statistics.median(samples)
            entry["fwd_samples"] = len(samples)
            log(f"  {name}: forward+backward ...")
            samples = timer.time_ms(fwdbwd, reps, warmup)
            entry["fwdbwd_ms"] = statistics.median(samples)
            entry["fwdbwd_samples"] = len(samples)
            entry["peak_mb"] = peak_memory_mb(lambda: fwdbwd(0), device)
        except torch.OutOfMemoryError:
            entry = {"skipped": "out of memory"}
            log(f"  {name}: out of memory, skipped")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["variants"][name] = entry

    # correctness guard: the fused loss agrees with the eager reference on this very problem
    with torch.no_grad():
        a = fns["fused_labels"](inputs[0]).double()
        inp = inputs[0]
        if case.loss in GHMC_CONFIGS:  # the same running counts: a fresh buffer each, one call each
            bins, momentum = GHMC_CONFIGS[case.loss]
            a = focal_cuda.ghmc_loss(inp.x, inp.labels, None, bins, momentum,
                                     torch.zeros(bins, device=device)).double()
            b = R.ghmc_loss(inp.x.double(), inp.labels, None, bins, momentum, torch.zeros(bins, device=device))
        elif case.loss == "ohem":
            b = R.ohem_loss(inp.x.double(), inp.labels, OHEM_RATIO, "sum", inp.num_pos)
        elif case.family:
            _, options, twin, _ = FAMILY[case.loss]
            b = twin(inp.x.double(), (inp.labels, inp.scores), **options, reduction=case.reduction,
                     normalizer=inp.num_pos, validate=False)
        else:
            b = focal_cuda.reference.sigmoid_focal_loss(inp.x.double(), inp.labels, ALPHA, GAMMA, case.reduction,
                                                        normalizer=inp.num_pos, validate=False)
        rel = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    result["fused_vs_reference_max_rel_err"] = rel
    derive(result, case)
    return result


def derive(result: dict, case: Case) -> None:
    """Speedups, bandwidth over the minimal bytes and % of the same-run copy."""
    variants = result["variants"]
    ok = {k: v for k, v in variants.items() if "fwdbwd_ms" in v}
    compiles = [ok[k]["fwdbwd_ms"] for k in ("compile_dense", "compile_labels") if k in ok]
    best_compile = min(compiles) if compiles else None
    for name, v in ok.items():
        dense = name in ("fused_dense",)
        mb = min_bytes(case, grad=True, dense_targets=dense)
        v["fwdbwd_gbps"] = mb / v["fwdbwd_ms"] / 1e6
        v["pct_copy"] = 100 * v["fwdbwd_gbps"] / result["copy"]["gbps"]
        if "eager_labels" in ok:
            v["x_vs_eager_labels"] = ok["eager_labels"]["fwdbwd_ms"] / v["fwdbwd_ms"]
        if "eager_dense" in ok:
            v["x_vs_eager_dense"] = ok["eager_dense"]["fwdbwd_ms"] / v["fwdbwd_ms"]
        if best_compile:
            v["x_vs_best_compile"] = best_compile / v["fwdbwd_ms"]
        if "fused_focal" in ok:
            v["of_focal"] = v["fwdbwd_ms"] / ok["fused_focal"]["fwdbwd_ms"]


# ----------------------------------------------------------------------------- reporting

def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(results: List[dict], info: dict) -> str:
    cache = "" if info.get("cpu_grad_cache") is None or "CPU" not in info["device"] else (
        f" | CPU gradient cache {'on' if info['cpu_grad_cache'] else 'off'}")
    lines = [f"Device: {info['device']} | torch {info['torch']} (CUDA {info['cuda']}) | threads {info['threads']} "
             f"| commit {info['commit']}{cache}", ""]
    for r in results:
        c = r["case"]
        if "skipped" in r:
            lines += [f"### {c['name']} b{c['batch']} {c['dtype']} {c['reduction']}: skipped ({r['skipped']})", ""]
            continue
        lines += [
            f"### {c['label']} ({r['elements'] / 1e6:.1f}M logits; copy {r['copy']['gbps']:.0f} GB/s; "
            f"floor {r['min_bytes']['fwdbwd'] / r['elements']:.2f} B/logit fwd+bwd)",
            "",
            "| variant | fwd ms | fwd+bwd ms | x eager (labels) | x eager (dense) | x best compile | GB/s | % of copy "
            "| peak MB | compile s | time / focal's |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, v in r["variants"].items():
            if "skipped" in v:
                lines.append(f"| {name} | skipped: {v['skipped']} ||||||||||")
                continue
            comp = v.get("compile_s")
            lines.append(
                f"| {name} | {fmt(v.get('fwd_ms'), '.3f')} | {fmt(v.get('fwdbwd_ms'), '.3f')} "
                f"| {fmt(v.get('x_vs_eager_labels'), '.1f')} | {fmt(v.get('x_vs_eager_dense'), '.1f')} "
                f"| {fmt(v.get('x_vs_best_compile'), '.2f')} | {fmt(v.get('fwdbwd_gbps'), '.1f')} "
                f"| {fmt(v.get('pct_copy'), '.0f')} | {fmt(v.get('peak_mb'), '.0f')} "
                f"| {fmt(comp['fwdbwd'] + comp['fwd'] if comp else None, '.1f')} | {fmt(v.get('of_focal'), '.2f')} |"
            )
        lines += ["", f"fused vs float64 reference, max relative error of the loss: "
                      f"{r['fused_vs_reference_max_rel_err']:.1e}", ""]
    return "\n".join(lines)


def plot(results: List[dict], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    done = [r for r in results if "skipped" not in r]
    if not done:
        return None
    groups: Dict[str, List[dict]] = {}
    for r in done:
        c = r["case"]
        groups.setdefault(f"{c['name']} {c['dtype']} {c['reduction']}", []).append(r)
    sweep = max(groups.values(), key=len)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if len(sweep) > 1:  # speedup and bandwidth by batch size
        batches = [r["case"]["batch"] for r in sweep]
        for key, label in (("x_vs_eager_labels", "vs eager (labels)"), ("x_vs_eager_dense", "vs eager (dense)"),
                           ("x_vs_best_compile", "vs best torch.compile")):
            ys = [r["variants"].get("fused_labels", {}).get(key) for r in sweep]
            if any(y is not None for y in ys):
                axes[0].plot(batches, ys, marker="o", label=label)
        axes[0].set_xscale("log", base=2)
        axes[0].set_xlabel("batch size")
        axes[0].set_ylabel("fused fwd+bwd speedup (x)")
        axes[0].set_title(f"focal_cuda speedup, {sweep[0]['case']['name']} {sweep[0]['case']['dtype']}")
        for name in ("fused_labels", "fused_dense", "compile_labels", "compile_dense", "eager_dense"):
            ys = [r["variants"].get(name, {}).get("pct_copy") for r in sweep]
            if any(y is not None for y in ys):
                axes[1].plot(batches, ys, marker="o", label=name)
        axes[1].set_xscale("log", base=2)
        axes[1].set_xlabel("batch size")
        axes[1].set_ylabel("% of copy bandwidth (fwd+bwd, minimal bytes)")
        axes[1].axhline(100, color="gray", lw=0.8, ls="--")
    else:  # one problem: times and bandwidth per variant
        r = sweep[0]
        names = [n for n, v in r["variants"].items() if "fwdbwd_ms" in v]
        axes[0].barh(names, [r["variants"][n]["fwdbwd_ms"] for n in names], color="tab:blue")
        axes[0].set_xscale("log")
        axes[0].set_xlabel("forward+backward ms (median, log scale)")
        axes[0].set_title(r["case"]["label"])
        axes[1].barh(names, [r["variants"][n]["pct_copy"] for n in names], color="tab:green")
        axes[1].set_xlabel("% of same-run copy bandwidth over the minimal bytes")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CPU-sized sweep (default without a GPU)")
    mode.add_argument("--full", action="store_true", help="GPU sweep")
    mode.add_argument("--auto", action="store_true", help="--full on a GPU, else --quick")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--cases", default="",
                    help="only cases whose label contains this text (a comma list: any of them)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--name", default=None,
                    help="the run's folder under --out (default <date>-<machine>); it gets bench.json/.md/.png")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds: start no case that would end past this (estimated from the slowest case so "
                         "far); what ran is written, marked incomplete")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    full = args.full or ((args.auto or not args.quick) and device.type == "cuda")
    preset_name = "full" if full else "quick"
    wanted = [w for w in args.cases.split(",") if w] or [""]
    cases = [c for c in preset(preset_name) if any(w in c.label for w in wanted)]
    reps = args.reps or (10 if device.type == "cuda" else 7)
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 2)
    if device.type == "cpu":
        fixed_mmap_threshold()
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)

    info = machine_info(device)
    start = time.time()

    def log(msg):
        print(f"[{time.time() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    log(f"{preset_name} preset on {info['device']}: {len(cases)} cases, {reps} reps (median), {warmup} warm-up")
    run_dir = os.path.join(args.out, args.name or run_dir_name(device))
    os.makedirs(run_dir, exist_ok=True)

    def write(results, complete):
        # written after every case, so a run stopped part-way (a time limit) still leaves its results
        table = markdown(results, info)
        payload = {"preset": preset_name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "complete": complete, "cases_planned": len(cases), "reps": reps, "warmup": warmup,
                   "alpha": ALPHA, "gamma": GAMMA, "machine": info, "wall_s": time.time() - start,
                   "results": results}
        with open(os.path.join(run_dir, "bench.json"), "w") as f:
            json.dump(payload, f, indent=1)
        with open(os.path.join(run_dir, "bench.md"), "w") as f:
            note = "" if complete else f"(partial: {len(results)} of {len(cases)} cases)\n\n"
            f.write(f"# focal_cuda benchmark, {preset_name} preset, {payload['date']}\n\n{note}{table}\n")
        return table

    results = []
    slowest = 0.0
    for i, case in enumerate(cases):
        if args.time_limit is not None and time.time() - start + slowest > args.time_limit:
            log(f"time limit: {args.time_limit:.0f} s would be passed; {len(cases) - i} cases not run")
            break
        log(f"[{i + 1}/{len(cases)}] {case.label}")
        torch._dynamo.reset()
        t0 = time.time()
        results.append(run_case(case, device, reps, warmup, log))
        slowest = max(slowest, time.time() - t0)
        write(results, complete=False)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(write(results, complete=len(results) == len(cases)))
    png = None if args.no_plot else plot(results, os.path.join(run_dir, "bench.png"))
    log(f"wrote {os.path.join(run_dir, 'bench')}.json/.md" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
