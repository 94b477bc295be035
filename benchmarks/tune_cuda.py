#!/usr/bin/env python3
"""Kernel-level timing of the fused CUDA op against a same-run device-to-device copy.

A tuning aid beside bench_focal.py (which is the benchmark of record): it times only
focal_cuda's forward+backward (the backward is free when grad_output == 1, so this is the
fused kernel plus its tiny finalize) on the COCO batch-16 problem, rotating input sets so
nothing is timed out of L2, and prints GB/s over the minimal bytes and % of the copy.

    python3 benchmarks/tune_cuda.py [--dtypes fp32,bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import focal_cuda  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def time_ms(fn, sets, reps=50, warmup=10):
    for i in range(warmup):
        fn(i % sets)
    torch.cuda.synchronize()
    out = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i % sets)
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--anchors", type=int, default=201600)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument("--reduction", default="sum")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    n_rows, C = args.batch * args.anchors, args.classes
    for name in args.dtypes.split(","):
        dt = DTYPES[name]
        sets = 2
        g = torch.Generator(device="cuda").manual_seed(0)
        xs = [(torch.randn(n_rows, C, device="cuda", generator=g) * 3 - 4).to(dt).requires_grad_() for _ in range(sets)]
        u = torch.rand(n_rows, device="cuda", generator=g)
        cls = torch.randint(0, C, (n_rows,), device="cuda", generator=g)
        labels = torch.where(u < 0.01, cls, torch.full_like(cls, C))
        labels = torch.where((u >= 0.01) & (u < 0.11), torch.full_like(cls, -1), labels)
        num_pos = (labels >= 0).logical_and(labels < C).sum().clamp_min(1).to(torch.float32)
        dst = torch.empty_like(xs[0])

        def copy(i):
            dst.copy_(xs[i].detach())

        def fused(i):
            x = xs[i]
            loss = focal_cuda.sigmoid_focal_loss(x, labels, reduction=args.reduction, normalizer=num_pos)
            (loss.sum() if loss.dim() else loss).backward()
            x.grad = None

        def fwd(i):
            with torch.no_grad():
                focal_cuda.sigmoid_focal_loss(xs[i], labels, reduction=args.reduction, normalizer=num_pos)

        s = xs[0].element_size()
        n = n_rows * C
        copy_ms = time_ms(copy, sets)
        copy_gbps = 2 * n * s / copy_ms / 1e6
        fb_ms = time_ms(fused, sets)
        f_ms = time_ms(fwd, sets)
        min_bytes = n * s * (2 if args.reduction == "sum" else 3) + n_rows * 8
        gbps = min_bytes / fb_ms / 1e6
        row = {"dtype": name, "copy_ms": copy_ms,
               "copy_gbps": copy_gbps, "fwd_ms": f_ms, "fwdbwd_ms": fb_ms, "fwdbwd_gbps": gbps,
               "pct_copy": 100 * gbps / copy_gbps}
        rows.append(row)
        print(f"{name}: copy {copy_ms:.3f} ms ({copy_gbps:.0f} GB/s)  fwd {f_ms:.3f} ms  "
              f"fwd+bwd {fb_ms:.3f} ms = {gbps:.0f} GB/s over {min_bytes / n:.2f} B/logit = "
              f"{row['pct_copy']:.1f}% of copy", flush=True)
        del xs, dst
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
