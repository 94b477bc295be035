#!/usr/bin/env python3
"""Host time per call on a tiny input: what small batches pay besides the kernel.

On a GPU a small batch (COCO b1, b2) is bound by the host: argument checks, the autograd
function, op dispatch and the backward. This times those on an input so small that the kernel
costs nothing, next to the same-run floor of autograd itself (``x.sum().backward()``) and the
torchvision formula in eager PyTorch. On CUDA each figure is the wall time of many back-to-back
calls with one synchronisation at the end, so it is the host's rate (the tiny kernels keep up).

    python3 benchmarks/host_overhead.py [--device cpu|cuda] [--json out.json]

Figures are medians over repeats of the mean time per call, in microseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import focal_cuda  # noqa: E402
from focal_cuda import _checks  # noqa: E402
from focal_cuda.reference import focal_terms  # noqa: E402

from focal_cuda._results import cpu_model  # noqa: E402


def per_call_us(fn, device, number=300, repeats=7, warmup=300):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) / number * 1e6)
    return statistics.median(out)


def cases(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=g).to(device).requires_grad_()
    labels = torch.tensor([0, 5, 2, 5], device=device)
    dense = torch.nn.functional.one_hot(labels, 6)[:, :5].to(x.dtype)
    npos = torch.tensor(2.0, device=device)

    def fused_fwd_bwd():
        focal_cuda.sigmoid_focal_loss(x, labels, reduction="sum", normalizer=npos).backward()

    def fused_fwd():
        with torch.no_grad():
            focal_cuda.sigmoid_focal_loss(x, labels, reduction="sum", normalizer=npos)

    def checks():
        _checks.check_focal_options(0.25, 2.0)
        _checks.check(x, labels, "sum", None, npos, -1)

    def torchvision_fwd_bwd():  # the torchvision formula, dense targets
        (focal_terms(x, dense, 0.25, 2.0).sum() / npos).backward()

    def autograd_floor():
        x.sum().backward()

    return {
        "focal_cuda fwd+bwd": fused_fwd_bwd,
        "focal_cuda fwd (no grad)": fused_fwd,
        "argument checks": checks,
        "torchvision formula fwd+bwd (eager)": torchvision_fwd_bwd,
        "x.sum().backward() (autograd floor)": autograd_floor,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on the CPU (default 1)")
    ap.add_argument("--number", type=int, default=300, help="calls per repeat (7 repeats, after as many warm-up calls)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return measure(args, device)
    finally:
        torch.set_num_threads(threads)


def measure(args, device) -> int:
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(f"host time per call, 4x5 input, {device} ({machine}), torch {torch.__version__}")
    rows = {}
    for name, fn in cases(device).items():
        rows[name] = per_call_us(fn, device, number=args.number, warmup=args.number)
        print(f"  {name:>38}: {rows[name]:8.1f} us", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "machine": machine, "torch": torch.__version__,
                       "threads": args.threads, "us_per_call": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
