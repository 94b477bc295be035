#!/usr/bin/env python3
"""Race focal_cuda's fused focal loss in two builds (two checkouts, each built in place) on the same
input, in alternating subprocesses: the before and after of a kernel change, measured in one run.

    python benchmarks/compare_builds.py --a /path/to/before --b . [--rounds 4] [--dtype bfloat16] [--json out.json]

Each round runs one subprocess per build (their order alternating), which builds the COCO batch-1
problem (201,600 anchors x 80 classes, float32 or --dtype, 1% positive and 10% ignored anchors, from a
fixed seed; dense targets in the logits' dtype), warms up, and times forward+backward and forward alone on label and on dense targets: each
figure the median of samples taken for at least one second. The report gives every round's figures
and, per build, the median over rounds and the ratio b / a.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, statistics, time
import torch
import torch.nn.functional as F
import focal_cuda

DTYPE = getattr(torch, __import__("os").environ["FOCAL_COMPARE_DTYPE"])
g = torch.Generator().manual_seed(0)
B, A, C = 1, 201600, 80
x = (torch.randn(B, A, C, generator=g) * 2 - 4).to(DTYPE).requires_grad_()
u = torch.rand(B, A, generator=g)
cls = torch.randint(0, C, (B, A), generator=g)
labels = torch.where(u < 0.01, cls, torch.full_like(cls, C))
labels = torch.where((u >= 0.01) & (u < 0.11), torch.full_like(cls, -1), labels)
dense = F.one_hot(labels.clamp_min(0), C + 1)[..., :C].to(DTYPE)
num_pos = ((labels >= 0) & (labels < C)).sum().clamp_min(1)


def median_ms(fn, min_seconds=1.0, min_reps=7):
    samples, start = [], time.perf_counter()
    while len(samples) < min_reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def fwdbwd(t):
    def run():
        focal_cuda.sigmoid_focal_loss(x, t, 0.25, 2.0, "sum", normalizer=num_pos).backward()
        x.grad = None
    return run


def fwd(t):
    def run():
        with torch.no_grad():
            focal_cuda.sigmoid_focal_loss(x, t, 0.25, 2.0, "sum", normalizer=num_pos)
    return run


for _ in range(8):  # warm-up: fault the gradient buffers in, settle the allocator
    fwdbwd(labels)()
out = {name: median_ms(fn) for name, fn in (("labels fwd+bwd", fwdbwd(labels)), ("labels fwd", fwd(labels)),
                                            ("dense fwd+bwd", fwdbwd(dense)), ("dense fwd", fwd(dense)))}
out["cpu_kernel"] = focal_cuda.build_info()["cpu_kernel"]
print(json.dumps(out))
"""


def run_build(tree: str, dtype: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, FOCAL_COMPARE_DTYPE=dtype)
    proc = subprocess.run([sys.executable, "-c", WORKER], cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: the timing run failed\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def git_commit(tree: str) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="the first tree (before), built in place")
    ap.add_argument("--b", required=True, help="the second tree (after), built in place")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the logits' (and dense targets') dtype")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    trees = {"a": os.path.abspath(args.a), "b": os.path.abspath(args.b)}
    rounds = {"a": [], "b": []}
    for r in range(args.rounds):
        for key in (("a", "b") if r % 2 == 0 else ("b", "a")):
            rounds[key].append(run_build(trees[key], args.dtype))
            print(f"round {r + 1} {key}: {rounds[key][-1]}", flush=True)
    names = [k for k in rounds["a"][0] if k != "cpu_kernel"]
    summary = {}
    for name in names:
        a = statistics.median(x[name] for x in rounds["a"])
        b = statistics.median(x[name] for x in rounds["b"])
        summary[name] = {"a_ms": a, "b_ms": b, "b_over_a": b / a}
        print(f"{name:>16}: a {a:8.2f} ms   b {b:8.2f} ms   b/a {b / a:.3f}")
    report = {"dtype": args.dtype, "trees": {k: {"path": v, "commit": git_commit(v)} for k, v in trees.items()},
              "rounds": rounds, "summary": summary}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
