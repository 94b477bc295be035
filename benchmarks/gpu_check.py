#!/usr/bin/env python3
"""One-command GPU check (``make gpu-check``) for a machine with a GPU and NO network.

Uses the machine's own python3 and what it already has (torch, pytest, numpy, ninja, pybind11;
pytest-xdist where installed): no virtual environment, no downloads. Everything a run writes goes to
its own folder, benchmarks/results/<date>-<gpu>/ (logs in its logs/). Steps:

  1. build the extension in place for this GPU's architecture only (CUDA build enforced; the
     CUDA translation units compile side by side on all cores);
  2. run the whole test suite (CPU and CUDA parametrisations) on pytest-xdist with a worker per core
     where it is installed, counting passed/failed/skipped, and logging the slowest tests;
  3. run compute-sanitizer (memcheck and racecheck) over a small CUDA test subset;
  4. run the benchmark's --full sweep, the goals' cases first (COCO b16 fp32 and bf16, then each family
     member), written after every case and stopped at the budget, then benchmarks/host_overhead.py
     (host time per call);
  (profile, only when named in --steps: Nsight Compute on the COCO batch-16 fp32 and bf16 kernels,
     key metrics into the report, the full text in logs/);
  5. write check.json (device, driver, torch, cuda, commit, tests, sanitizer, bench) and a short
     markdown summary, check.md, beside the benchmark's bench.json/.md.

Exit status 0 only if the build succeeded, no test failed and the sanitizer found nothing.

--budget (default 480 s) bounds the whole check: each step's time limit is what is left of it less
what the later steps need (NEED); the benchmark stops starting cases when its share is spent. Sized
from the 2026-11-23 H100 run (build 50 s; tests 136 s on 8 workers; sanitizer 57 s; benchmark
about 12 s a case; host overhead about 20 s) so that the check ends within 8 minutes.

``--steps build,test,sanitize,bench`` runs a subset (default: all); results of earlier calls on the
same day and GPU are kept and merged into the same report, so the check can be split across several
shorter calls. ``--bench-args`` passes options to the benchmark (e.g. ``"--cases coco --reps 10"``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SANITIZER_TESTS = [
    "tests/test_cuda.py::test_vector_scalar_strided_paths_agree",
    "tests/test_cuda.py::test_bad_labels_give_nan_and_context_survives",
    "tests/test_cuda.py::test_scale_grad_skips_when_one",
    "tests/test_values.py::test_loss_and_grad_match_reference_fp32",
    # the label-rows kernel over many grid-stride steps with a ragged last one (float32: two packs a step)
    "tests/test_cuda.py::test_label_rows_kernel[2.0-0.25-label_dtype0-8-150001-dtype0]",
    # packs that run into the next row, and the scalar tail (C = 91, bfloat16)
    "tests/test_cuda.py::test_label_rows_kernel[2.0-0.25-label_dtype0-91-16001-dtype1]",
    # every member's 16-bit kernels: label rows (labels, (labels, scores)) and the general vector path
    "tests/test_family.py::test_reduced_precision_logits",
    # GHM-C: the histogram kernel's shared-memory counts (racecheck), its bin weights and loss pass
    "tests/test_ghmc.py::test_dtypes",
    "tests/test_ghmc.py::test_matches_mmdet_algorithm[30-none-labels-cuda]",
    "tests/test_ghmc.py::test_matches_mmdet_algorithm[10-element-soft-cuda]",
]


def run(cmd, path, env=None, timeout=None):
    """Runs cmd in the tree, its output into the log file at path; returns (exit, seconds, path)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    t0 = time.time()
    print(f"$ {' '.join(cmd)}  (log: {os.path.relpath(path, ROOT)})", flush=True)
    with open(path, "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = 124
    dt = time.time() - t0
    with open(path) as f:
        tail = f.read()[-3000:]
    print(tail[-1500:], flush=True)
    print(f"-> exit {rc} in {dt:.0f} s", flush=True)
    return rc, dt, path


def junit_counts(path):
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root)
    tests = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return {"passed": tests - failed - skipped, "failed": failed, "skipped": skipped}


BUDGET_S = 480
# Seconds the later steps need at the least when the budget sets an earlier step's limit: the sanitizer
# (57 s on the H100 for its first 106 tests; now 171), the benchmark's first cases (COCO b16 fp32 and
# bf16: about 25 s), host overhead.
NEED = {"sanitize": 90, "bench": 45, "host": 30}
# seconds of a benchmark process before its first case (imports, CUDA start-up)
BENCH_START_S = 15


def xdist_workers() -> int:
    """Workers for pytest-xdist (one per core), or 0 where it is not installed."""
    try:
        import xdist  # noqa: F401
    except ImportError:
        return 0
    return os.cpu_count() or 1


def find_sanitizer():
    for cand in (shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer",
                 "/usr/local/cuda/compute-sanitizer/compute-sanitizer"):
        if cand and os.path.exists(cand):
            return cand
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="build,test,sanitize,bench")
    ap.add_argument("--bench-args", default="")
    ap.add_argument("--test-args", default="", help="extra pytest options, e.g. a test selection")
    ap.add_argument("--timeout", type=int, default=None,
                    help="seconds allowed to each of the test, sanitizer and benchmark steps (default: none)")
    ap.add_argument("--archive", default=None,
                    help="also write the results folder (report, benchmark, logs) into this .tar.gz")
    ap.add_argument("--budget", type=float, default=BUDGET_S,
                    help=f"seconds for the whole check (default {BUDGET_S}; 0: no bound)")
    args = ap.parse_args(argv)
    steps = set(args.steps.split(","))
    start = time.time()
    planned = [s for s in ("sanitize", "bench") if s in steps] + (["host"] if "bench" in steps else [])

    def limit(*later):
        """Seconds for a step: the budget left less what the later steps need (and --timeout)."""
        caps = [args.timeout] if args.timeout else []
        if args.budget > 0:
            caps.append(max(10.0, args.budget - (time.time() - start) - sum(NEED[s] for s in later if s in planned)))
        return int(min(caps)) if caps else None

    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible to torch; nothing to check", file=sys.stderr)
        return 2
    major, minor = torch.cuda.get_device_capability(0)
    gpu = torch.cuda.get_device_name(0)
    env = dict(os.environ)
    env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    env["FOCAL_CUDA_REQUIRE_CUDA"] = "1"
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    env["PYTHONUNBUFFERED"] = "1"
    report = {"device": gpu, "capability": f"{major}.{minor}", "torch": torch.__version__,
              "cuda": torch.version.cuda, "driver": driver_version(), "python": sys.version.split()[0],
              "date": datetime.date.today().isoformat()}
    out_dir = os.path.join(RESULTS, report_stem(report))
    logs = os.path.join(out_dir, "logs")
    previous = os.path.join(out_dir, "check.json")
    if os.path.exists(previous):  # merge with earlier partial runs
        with open(previous) as f:
            report = {**json.load(f), **report}
    # FOCAL_CUDA_COMMIT names the commit when the tree was copied without (current) git metadata
    report["commit"] = os.environ.get("FOCAL_CUDA_COMMIT") or ""
    if not report["commit"]:
        try:
            report["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                              text=True).stdout.strip() or "unknown"
        except OSError:
            report["commit"] = "unknown"

    rc, dt, _ = run([sys.executable, "setup.py", "build_ext", "--inplace"], os.path.join(logs, "build.log"), env)
    if "build" in steps or "build" not in report:
        report["build"] = {"ok": rc == 0, "seconds": round(dt), "arch": env["TORCH_CUDA_ARCH_LIST"]}
    if rc != 0:
        report["build"] = {"ok": False, "seconds": round(dt), "arch": env["TORCH_CUDA_ARCH_LIST"]}
        return finish(report, out_dir, ok=False, archive=args.archive)

    info = subprocess.run([sys.executable, "-m", "focal_cuda"], cwd=ROOT, capture_output=True, text=True, env=env)
    try:
        report["build_info"] = json.loads(info.stdout)
    except json.JSONDecodeError:
        report["build_info"] = info.stdout + info.stderr

    if "test" in steps:
        junit = os.path.join(logs, "tests.xml")
        if os.path.exists(junit):
            os.remove(junit)
        extra = shlex.split(args.test_args)
        test_env = env
        workers = xdist_workers() if not any(a == "-n" or a.startswith("-n") for a in extra) else 0
        if workers > 1:  # a worker per core: one thread each (torch's, inductor's compile pool)
            extra = ["-n", str(workers)] + extra
            test_env = dict(env, OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1")
        timeout = limit("sanitize", "bench", "host")
        rc, dt, _ = run([sys.executable, "-m", "pytest", "tests", "-q", "-rs", "--durations=25",
                         f"--junitxml={junit}", *extra], os.path.join(logs, "tests.log"), test_env, timeout=timeout)
        report["tests"] = junit_counts(junit) or {
            "passed": 0, "failed": 1, "skipped": 0,
            "note": f"timed out after {timeout} s" if rc == 124 else f"no junit report (pytest exit {rc})"}
        report["tests"]["seconds"] = round(dt)
        report["tests"]["args"] = " ".join(extra)

    sanitizer = find_sanitizer()
    report.setdefault("sanitizer", {})
    for tool in ("memcheck", "racecheck") if "sanitize" in steps else ():
        if not sanitizer:
            report["sanitizer"][tool] = "compute-sanitizer not found"
            continue
        cmd = [sanitizer, f"--tool={tool}", "--error-exitcode=99", "--target-processes=all",
               sys.executable, "-m", "pytest", "-q", "-x", "-k", "cuda", *SANITIZER_TESTS]
        rc, dt, path = run(cmd, os.path.join(logs, f"sanitizer-{tool}.log"), env, timeout=limit("bench", "host"))
        with open(path) as f:
            text = f.read()
        m = re.search(r"ERROR SUMMARY: (\d+) error", text)
        errors = int(m.group(1)) if m else None
        report["sanitizer"][tool] = {"exit": rc, "errors": errors, "seconds": round(dt)}

    if "profile" in steps:
        report["profile"] = profile(env, limit("bench", "host"), logs)

    if "bench" in steps:
        timeout = limit("host")
        bench_args = shlex.split(args.bench_args)
        if timeout is not None and "--time-limit" not in bench_args:  # stops between cases, before the kill
            bench_args += ["--time-limit", str(max(1, timeout - BENCH_START_S))]
        rc, dt, _ = run([sys.executable, "benchmarks/bench_focal.py", "--full", "--out", RESULTS, "--name",
                         report_stem(report), *bench_args], os.path.join(logs, "bench.log"), env,
                        timeout=None if timeout is None else timeout + 30)
        bench_json = os.path.join(out_dir, "bench.json")
        if os.path.exists(bench_json):  # written after every case: a stopped run keeps what it measured
            with open(bench_json) as f:
                bench = json.load(f)
            report["bench"] = {"file": os.path.relpath(bench_json, ROOT), "exit": rc, "seconds": round(dt),
                               "cases": f"{len(bench['results'])} of {bench.get('cases_planned', '?')}",
                               "complete": bool(bench.get("complete")) and rc == 0, "summary": summarize(bench)}
        else:
            report["bench"] = {"error": f"benchmark exited {rc} before its first case"}
        # host time per call on a tiny input (what bounds small batches), about 20 s
        host_json = os.path.join(out_dir, "host-overhead.json")
        rc, dt, _ = run([sys.executable, "benchmarks/host_overhead.py", "--device", "cuda", "--json", host_json],
                        os.path.join(logs, "host-overhead.log"), env, timeout=limit())
        if rc == 0 and os.path.exists(host_json):
            with open(host_json) as f:
                report["host_overhead_us"] = json.load(f)["us_per_call"]
        else:
            report["host_overhead_us"] = {"error": f"host_overhead.py exited {rc}"}

    report["seconds"] = round(time.time() - start)
    ok = ("tests" in report and report["tests"]["failed"] == 0 and all(
        isinstance(v, dict) and v.get("exit") == 0 and v.get("errors") in (0, None)
        for v in report["sanitizer"].values()))
    return finish(report, out_dir, ok, archive=args.archive)


NCU_METRICS = {  # Nsight Compute's metric name -> report key
    "Duration": "duration_us",
    "DRAM Throughput": "dram_pct",
    "Memory Throughput": "memory_throughput",
    "Issue Slots Busy": "issue_slots_busy_pct",
    "Executed Instructions": "warp_instructions",
    "Registers Per Thread": "registers",
    "Theoretical Occupancy": "theoretical_occupancy_pct",
    "Achieved Occupancy": "achieved_occupancy_pct",
    "Grid Size": "grid",
    "Warp Cycles Per Issued Instruction": "cycles_per_issue",
}


def parse_ncu(text: str) -> list:
    """One dict per profiled kernel from ncu's text report: its name and the NCU_METRICS it shows
    (the first value of each; 'Memory Throughput' appears as % and as bytes/s, the unit is kept)."""
    kernels = []
    for line in text.splitlines():
        if re.match(r"^\s{2}\S.*\(\d+, \d+, \d+\)x\(\d+, \d+, \d+\)", line):
            kernels.append({"kernel": line.strip().split("(FocalParams")[0].split("::")[-1]})
            continue
        m = re.match(r"^\s{4}(\S.*?)\s{2,}(\S+?)?\s+([\d,]+(?:\.\d+)?)\s*$", line)
        if not kernels or not m or m.group(1) not in NCU_METRICS:
            continue
        key, unit, value = NCU_METRICS[m.group(1)], m.group(2) or "", float(m.group(3).replace(",", ""))
        if key == "memory_throughput":
            key = "memory_throughput_pct" if unit == "%" else f"memory_throughput_{unit.replace('/', 'per')}"
        kernels[-1].setdefault(key, value)
    return kernels


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return out.splitlines()[0] if out else "unknown"


def find_ncu():
    for cand in (shutil.which("ncu"), "/usr/local/cuda/bin/ncu"):
        if cand and os.path.exists(cand):
            return cand
    return None


def profile(env, timeout, logs) -> dict:
    """Nsight Compute on the first fused launch (forward+backward) of COCO batch 16, per dtype."""
    ncu = find_ncu()
    if not ncu:
        return {"error": "ncu not found"}
    out = {}
    for dtype in ("fp32", "bf16"):
        cmd = [ncu, "--clock-control", "none", "-k", "regex:focal_(forward|label_rows)", "-c", "1",
               "--section", "SpeedOfLight",
               "--section", "ComputeWorkloadAnalysis", "--section", "MemoryWorkloadAnalysis", "--section",
               "Occupancy", "--section", "LaunchStats", "--section", "WarpStateStats", sys.executable,
               "benchmarks/tune_cuda.py", "--dtypes", dtype]
        rc, _, path = run(cmd, os.path.join(logs, f"ncu-{dtype}.log"), env, timeout=timeout)
        with open(path) as f:
            kernels = parse_ncu(f.read())
        out[dtype] = kernels[0] if rc == 0 and kernels else {"error": f"ncu exited {rc}"}
    return out


def report_stem(report: dict) -> str:
    return f"{report['date']}-{re.sub(r'[^A-Za-z0-9]+', '-', report['device']).strip('-').lower()}"


def summarize(bench: dict) -> list:
    rows = []
    for r in bench["results"]:
        if "skipped" in r:
            rows.append({"case": r["case"].get("label", str(r["case"])), "skipped": r["skipped"]})
            continue
        f = r["variants"].get("fused_labels", {})
        rows.append({"case": r["case"]["label"], "fused_fwdbwd_ms": f.get("fwdbwd_ms"),
                     "pct_copy": f.get("pct_copy"), "x_vs_best_compile": f.get("x_vs_best_compile"),
                     "x_vs_eager_dense": f.get("x_vs_eager_dense"), "copy_gbps": r["copy"]["gbps"]})
    return rows


def finish(report: dict, out_dir: str, ok: bool, archive: str | None = None) -> int:
    report["ok"] = bool(ok)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "check.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"# GPU check {report['date']}: {report['device']}", "",
             f"torch {report['torch']}, CUDA {report['cuda']}, driver {report.get('driver', 'unknown')}, "
             f"commit {report['commit']}, build {'ok' if report.get('build', {}).get('ok') else 'FAILED'}"
             f" ({report.get('build', {}).get('seconds', '?')} s), whole check {report.get('seconds', '?')} s", ""]
    if "tests" in report:
        t = report["tests"]
        lines.append(f"tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
                     f" ({t.get('seconds', '?')} s{', ' + t['note'] if 'note' in t else ''})")
    for tool, v in report.get("sanitizer", {}).items():
        lines.append(f"compute-sanitizer {tool}: {v}")
    for dtype, v in report.get("profile", {}).items():
        lines.append(f"ncu, COCO b16 {dtype} fused kernel: {v}")
    if "bench" in report:
        b = report["bench"]
        lines.append(f"benchmark: {b.get('cases', '?')} cases in {b.get('seconds', '?')} s"
                     f"{'' if b.get('complete') else ' (incomplete)'}{', ' + b['error'] if 'error' in b else ''}")
    for row in report.get("bench", {}).get("summary", []):
        lines.append(f"- {row}")
    if "host_overhead_us" in report:
        lines.append(f"host time per call, 4x5 input (us): {report['host_overhead_us']}")
    lines.append(f"\nresult: {'PASS' if ok else 'FAIL'}")
    with open(os.path.join(out_dir, "check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if archive:  # the results folder as one file (for a host whose tree is not brought back)
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(out_dir, arcname=os.path.join("benchmarks", "results", os.path.basename(out_dir)))
        print(f"archived {out_dir} into {archive}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
