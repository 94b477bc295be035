#!/usr/bin/env python3
"""Race builds of the CUDA kernels with different tuning knobs on one GPU, in one call.

A variant is this tree built with a set of the knobs in csrc/cuda/tuning.h (FOCAL_CUDA_TUNING,
read by setup.py); ``main`` is the tree as it is. All variants are built at once (a GPU host has
many cores), then benchmarks/tune_cuda.py runs on each in turn, the variants interleaved round by
round so that drift of the GPU's clocks hits them all alike. Each variant first passes the CUDA
value tests of its kernels (part of test_cuda.py), or it is not timed. About 8 minutes on an
H100 for six builds and two dtypes, estimated; --budget-s stops the timing rounds early rather
than run past a 10-minute limit per command, and --json is rewritten after every phase, so a call
that is cut off still leaves what it measured.

    python3 benchmarks/race_cuda.py [--variant NAME=KNOB=V,KNOB=V ...] [--dtypes fp32,bf16]
                                    [--rounds 3] [--json out.json]

Without --variant it races DEFAULT_VARIANTS. Uses the machine's own python3 and what it has (torch,
pytest, ninja, pybind11): no downloads. Prints one line per variant and dtype: the median over
rounds of tune_cuda's forward+backward time and its percentage of the same round's copy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.environ.get("FOCAL_RACE_DIR", "/tmp/focal_race")
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "*.so", "results", "__pycache__", ".dev", ".whl")

# What the race settles by default: the label-rows kernel against the general kernel, its packs per
# step, its register cap (4 blocks an SM: more warps, but the loop spills), and the cheaper log1p
# reciprocal.
DEFAULT_VARIANTS = {
    "label-rows-off": "LABEL_ROWS=0",
    "row-packs-1": "ROW_PACKS_F32=1",
    "row-packs-2": "ROW_PACKS_F16=2",
    "row-min-blocks-4": "ROW_MIN_BLOCKS=4",
    "log1p-no-newton": "LOG1P_NEWTON=0",
}


def parse_variant(text: str) -> tuple[str, str]:
    """'name=KNOB=V,KNOB=V' -> ('name', 'KNOB=V KNOB=V') (FOCAL_CUDA_TUNING's form)."""
    name, sep, knobs = text.partition("=")
    if not sep or not name or not knobs or any("=" not in k for k in knobs.split(",")):
        raise argparse.ArgumentTypeError(f"--variant: expected NAME=KNOB=VALUE[,KNOB=VALUE...], got {text!r}")
    return name, " ".join(knobs.split(","))


def make_variant(name: str) -> str:
    """A copy of this tree to build one variant in (each build in place, side by side)."""
    dest = os.path.join(WORK, name)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(ROOT, dest, ignore=SKIP)
    return dest


TEST_SELECTION = "label_rows or vector_scalar or graph or bad_labels"


def write_report(report: dict, path: str | None) -> None:
    """The report so far (after the builds, the tests and every round): a call that runs out of
    time keeps what it measured."""
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


def summarize(report: dict, rows: dict) -> None:
    for name, by_dtype in rows.items():
        entry = report["variants"].setdefault(name, {})
        for dtype, rs in by_dtype.items():
            entry[dtype] = {"fwdbwd_ms": statistics.median(r["fwdbwd_ms"] for r in rs),
                            "fwd_ms": statistics.median(r["fwd_ms"] for r in rs),
                            "pct_copy": statistics.median(r["pct_copy"] for r in rs), "rounds": rs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", type=parse_variant, default=None,
                    help="NAME=KNOB=VALUE[,KNOB=VALUE...] (repeatable; default: DEFAULT_VARIANTS)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-test", action="store_true", help="time variants without their CUDA value tests")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="start no timing round that would end past this many seconds from the start "
                         "(judged by the rounds so far; a lent GPU allows 600 s per command)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("race_cuda: no CUDA device", file=sys.stderr)
        return 2
    t0 = time.time()
    knobs = {"main": ""}
    knobs.update(dict(args.variant) if args.variant else DEFAULT_VARIANTS)
    variants = {name: make_variant(name) for name in knobs}

    major, minor = torch.cuda.get_device_capability(0)
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=f"{major}.{minor}", FOCAL_CUDA_REQUIRE_CUDA="1",
               PYTHONUNBUFFERED="1")
    env["MAX_JOBS"] = str(max(1, (os.cpu_count() or 2) // len(variants)))
    env.pop("FOCAL_CUDA_TUNING", None)
    builds = {name: subprocess.Popen([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=d,
                                     env=dict(env, FOCAL_CUDA_TUNING=knobs[name]),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for name, d in variants.items()}
    ok = {}
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
              "commit": os.environ.get("FOCAL_CUDA_COMMIT", ""),
              "variants": {name: {"knobs": knobs[name]} for name in variants}, "complete": False}
    for name, proc in builds.items():
        out = proc.communicate()[0]
        ok[name] = proc.returncode == 0
        report["variants"][name]["build"] = "ok" if ok[name] else "failed"
        if not ok[name]:
            print(f"{name}: build failed\n{out[-3000:]}", flush=True)
    print(f"built {sum(ok.values())}/{len(ok)} variants in {time.time() - t0:.0f} s", flush=True)
    write_report(report, args.json)

    if not args.no_test:
        # all variants' tests at once (separate processes; the GPU has room for them)
        tests = {name: subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-x", "tests/test_cuda.py", "-k",
                                         TEST_SELECTION], cwd=d, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
                 for name, d in variants.items() if ok[name]}
        for name, proc in tests.items():
            out = proc.communicate()[0]
            ok[name] = proc.returncode == 0
            last = (out.strip().splitlines() or ["(no output)"])[-1]
            print(f"{name}: test_cuda.py {last}", flush=True)
            if not ok[name]:
                print(out[-3000:], flush=True)
            report["variants"][name]["tests"] = last
        print(f"tested in {time.time() - t0:.0f} s from the start", flush=True)
        write_report(report, args.json)

    rows = {name: {} for name in variants if ok[name]}
    rounds_done = 0
    rounds_start = time.time()
    for rnd in range(args.rounds):
        now = time.time()
        if rounds_done and now - t0 + (now - rounds_start) / rounds_done > args.budget_s:
            print(f"stopping after {rounds_done} round(s): another would end past --budget-s {args.budget_s:.0f}",
                  flush=True)
            break
        for name in rows:
            out = os.path.join(WORK, f"{name}-round{rnd}.json")
            proc = subprocess.run([sys.executable, "benchmarks/tune_cuda.py", "--dtypes", args.dtypes, "--json", out],
                                  cwd=variants[name], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name}: tune_cuda failed\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}", flush=True)
                continue
            with open(out) as f:
                for r in json.load(f):
                    rows[name].setdefault(r["dtype"], []).append(r)
        rounds_done += 1
        report["rounds"] = rounds_done
        summarize(report, rows)
        write_report(report, args.json)
    for name, by_dtype in rows.items():
        for dtype in by_dtype:
            e = report["variants"][name][dtype]
            print(f"{name:>24} {dtype}: fwd+bwd {e['fwdbwd_ms']:.3f} ms  fwd {e['fwd_ms']:.3f} ms  "
                  f"{e['pct_copy']:.1f}% of copy  (median of {len(e['rounds'])})", flush=True)
    report["complete"] = rounds_done == args.rounds
    report["seconds"] = round(time.time() - t0)
    write_report(report, args.json)
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
