"""The benchmark tools on the CPU: the GPU check (its orchestration and budget with every GPU step
faked, its Nsight Compute parser on a real report committed with an H100 run, its sanitizer subset),
the knob race, the benchmark's time limit and case order, and the host-overhead script."""

import json
import os
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402

REPORT = os.path.join(ROOT, "benchmarks", "results", "2026-11-23-nvidia-h100-80gb-hbm3", "tuning",
                      "2026-11-23-ncu-coco-b16.txt")


def test_parse_ncu_reads_each_kernel_and_its_metrics():
    with open(REPORT) as f:
        kernels = gpu_check.parse_ncu(f.read())
    assert len(kernels) == 2  # the report holds two profiled launches
    k = kernels[0]
    assert k["kernel"] == "focal_forward_kernel<float, long, 2, 2>"
    # values as printed in the report's sections (read by eye from the file)
    assert k["duration_us"] == pytest.approx(793.89)
    assert k["dram_pct"] == pytest.approx(77.99)
    assert k["memory_throughput_Tbytepers"] == pytest.approx(2.61)
    assert k["warp_instructions"] == 574629922
    assert k["registers"] == 80
    assert k["theoretical_occupancy_pct"] == pytest.approx(37.5)
    assert k["achieved_occupancy_pct"] == pytest.approx(35.78)
    assert kernels[1]["duration_us"] == pytest.approx(792.90)


def test_parse_ncu_ignores_text_without_kernels():
    assert gpu_check.parse_ncu("==PROF== Disconnected\n    Duration   us   12.5\n") == []


def test_race_variant_arguments_become_tuning_knobs():
    import race_cuda

    assert race_cuda.parse_variant("rows=LABEL_ROWS=0,ROW_PACKS_F32=1") == ("rows", "LABEL_ROWS=0 ROW_PACKS_F32=1")
    for bad in ("rows", "rows=", "=LABEL_ROWS=0", "rows=LABEL_ROWS"):
        with pytest.raises(Exception, match="--variant"):
            race_cuda.parse_variant(bad)
    # every default variant names knobs that tuning.h declares (setup.py would refuse others)
    with open(os.path.join(ROOT, "csrc", "cuda", "tuning.h")) as f:
        header = f.read()
    for knobs in race_cuda.DEFAULT_VARIANTS.values():
        for item in knobs.split():
            assert f"#ifndef FOCAL_CUDA_{item.split('=')[0]}\n" in header, item


def test_setup_refuses_an_unknown_tuning_knob():
    """A misspelt knob must fail the build, not build the default kernel under a variant's name."""
    import subprocess

    env = dict(os.environ, FOCAL_CUDA_TUNING="LABEL_ROW=0")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "FOCAL_CUDA_TUNING" in proc.stderr and "LABEL_ROWS" in proc.stderr and "'LABEL_ROW=0'" in proc.stderr


class _FakeProc:
    def __init__(self, rc, out):
        self.returncode = rc
        self._out = out

    def communicate(self):
        return self._out, None


def _fake_race(monkeypatch, tmp_path, failing_tests=(), tune_seconds=60.0):
    """race_cuda's orchestration on the CPU: builds, tests and tune_cuda replaced by fakes that
    advance a fake clock; tune_cuda 'measures' 1.0 ms + 0.1 ms per round (+1 ms off main)."""
    import torch

    import race_cuda

    clock = {"t": 1000.0, "tunes": {}}
    monkeypatch.setattr(race_cuda, "WORK", str(tmp_path / "race"))
    monkeypatch.setattr(race_cuda.time, "time", lambda: clock["t"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")

    def popen(cmd, cwd, env=None, **kw):
        name = os.path.basename(cwd)
        if "setup.py" in cmd:
            clock.setdefault("built", {})[name] = env["FOCAL_CUDA_TUNING"]
        if "pytest" in cmd:
            failing = name in failing_tests
            return _FakeProc(1 if failing else 0, "F\n1 failed" if failing else "....\n4 passed")
        return _FakeProc(0, "built")

    def run(cmd, cwd, **kw):
        assert "benchmarks/tune_cuda.py" in cmd
        name = os.path.basename(cwd)
        k = clock["tunes"][name] = clock["tunes"].get(name, 0) + 1
        clock["t"] += tune_seconds
        ms = 1.0 + 0.1 * (k - 1) + (1.0 if name != "main" else 0.0)
        rows = [{"dtype": d, "fwdbwd_ms": ms, "fwd_ms": ms / 2, "pct_copy": 80.0 / ms} for d in ("fp32", "bf16")]
        with open(cmd[cmd.index("--json") + 1], "w") as f:
            json.dump(rows, f)
        return _FakeProc(0, "")

    monkeypatch.setattr(race_cuda.subprocess, "Popen", popen)
    monkeypatch.setattr(race_cuda.subprocess, "run", run)
    return race_cuda, clock


def test_race_stops_rounds_at_the_budget_and_keeps_its_report(tmp_path, monkeypatch):
    race_cuda, clock = _fake_race(monkeypatch, tmp_path)
    out = tmp_path / "race.json"
    # two variants x 60 s a round: after round 2 the clock is at +240 s, and a third would end at 360 > 300
    rc = race_cuda.main(["--variant", "rows-off=LABEL_ROWS=0", "--rounds", "5", "--budget-s", "300",
                         "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["rounds"] == 2 and report["complete"] is False
    assert clock["tunes"] == {"main": 2, "rows-off": 2}
    assert clock["built"] == {"main": "", "rows-off": "LABEL_ROWS=0"}  # each tree built with its knobs
    main = report["variants"]["main"]
    assert main["build"] == "ok" and main["tests"] == "4 passed" and main["knobs"] == ""
    assert main["fp32"]["fwdbwd_ms"] == pytest.approx(1.05)  # median of 1.0 and 1.1
    assert len(main["bf16"]["rounds"]) == 2
    assert report["variants"]["rows-off"]["fp32"]["fwdbwd_ms"] == pytest.approx(2.05)


def test_race_does_not_time_a_variant_whose_tests_fail(tmp_path, monkeypatch):
    race_cuda, clock = _fake_race(monkeypatch, tmp_path, failing_tests=("packs",))
    out = tmp_path / "race.json"
    rc = race_cuda.main(["--variant", "packs=ROW_PACKS_F32=1,ROW_PACKS_F16=2", "--rounds", "2", "--json", str(out)])
    assert rc == 1
    report = json.loads(out.read_text())
    assert report["complete"] is True and report["rounds"] == 2
    assert report["variants"]["packs"] == {"knobs": "ROW_PACKS_F32=1 ROW_PACKS_F16=2", "build": "ok",
                                           "tests": "1 failed"}
    assert clock["tunes"] == {"main": 2}


def test_race_defaults_to_its_default_variants(tmp_path, monkeypatch):
    race_cuda, clock = _fake_race(monkeypatch, tmp_path)
    assert race_cuda.main(["--rounds", "1", "--no-test"]) == 0
    assert clock["built"] == {"main": "", **race_cuda.DEFAULT_VARIANTS}


def test_gpu_check_orchestration_with_fake_steps(tmp_path, monkeypatch):
    """gpu_check.main on the CPU: every step it would run replaced by a fake that writes what the real
    one writes (junit XML, sanitizer summaries, the benchmark's and host_overhead's JSON); the report
    must count them, merge them, and pass or fail on them."""
    import torch

    results = tmp_path / "results"
    monkeypatch.setattr(gpu_check, "RESULTS", str(results))
    monkeypatch.setattr(gpu_check, "find_sanitizer", lambda: "/fake/compute-sanitizer")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU 80GB")
    monkeypatch.setenv("FOCAL_CUDA_COMMIT", "abc1234")
    ran = []
    racecheck_errors = {"n": 0}
    test_failures = {"n": 1}

    def fake_run(cmd, path, env=None, timeout=None):
        log_name = os.path.basename(path)
        ran.append(log_name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        text = ""
        if log_name == "tests.log":
            junit = next(a.split("=", 1)[1] for a in cmd if a.startswith("--junitxml="))
            with open(junit, "w") as f:
                f.write(f'<testsuites><testsuite tests="10" failures="{test_failures["n"]}" errors="0" '
                        'skipped="2"/></testsuites>')
        elif log_name.startswith("sanitizer-"):
            n = racecheck_errors["n"] if "racecheck" in log_name else 0
            text = f"========= ERROR SUMMARY: {n} errors\n"
        elif log_name == "bench.log":
            run_dir = os.path.join(cmd[cmd.index("--out") + 1], cmd[cmd.index("--name") + 1])
            case = {"case": {"label": "coco b16"}, "copy": {"gbps": 3000.0},
                    "variants": {"fused_labels": {"fwdbwd_ms": 0.8, "pct_copy": 85.0, "x_vs_best_compile": 2.1,
                                                  "x_vs_eager_dense": 35.0}}}
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "bench.json"), "w") as f:
                json.dump({"complete": True, "results": [case]}, f)
        elif log_name == "host-overhead.log":
            with open(cmd[cmd.index("--json") + 1], "w") as f:
                json.dump({"us_per_call": {"focal_cuda fwd+bwd": 120.0}}, f)
        with open(path, "w") as f:
            f.write(text)
        return 0, 1.0, path

    monkeypatch.setattr(gpu_check, "run", fake_run)
    assert gpu_check.main([]) == 1  # one test failed
    stem = gpu_check.report_stem({"date": __import__("datetime").date.today().isoformat(), "device": "Fake GPU 80GB"})
    report = json.loads((results / stem / "check.json").read_text())
    assert (results / stem / "logs" / "tests.log").exists() and (results / stem / "bench.json").exists()
    assert ran == ["build.log", "tests.log", "sanitizer-memcheck.log", "sanitizer-racecheck.log", "bench.log",
                   "host-overhead.log"]
    assert report["commit"] == "abc1234" and report["device"] == "Fake GPU 80GB"
    assert report["tests"]["passed"] == 7 and report["tests"]["failed"] == 1 and report["tests"]["skipped"] == 2
    assert report["sanitizer"]["memcheck"]["errors"] == 0
    assert report["bench"]["complete"] is True and report["bench"]["summary"][0]["pct_copy"] == 85.0
    assert report["host_overhead_us"] == {"focal_cuda fwd+bwd": 120.0}
    assert report["ok"] is False
    assert "result: FAIL" in (results / stem / "check.md").read_text()

    # later calls with some steps only: merged into the same report (and archived where asked)
    test_failures["n"] = 0
    archive = tmp_path / "check.tgz"
    assert gpu_check.main(["--steps", "build,test", "--archive", str(archive)]) == 0  # the sanitizer's results kept
    import tarfile

    with tarfile.open(archive) as tar:
        names = tar.getnames()
        packed = json.load(tar.extractfile(next(n for n in names if n.endswith("/check.json"))))
    assert all(n.startswith(f"benchmarks/results/{stem}") for n in names)
    assert any(n.endswith("/logs/tests.log") for n in names) and any(n.endswith("/bench.json") for n in names)
    assert packed["ok"] is True and packed["commit"] == "abc1234"
    report = json.loads((results / stem / "check.json").read_text())
    assert report["ok"] is True and report["tests"]["failed"] == 0
    assert report["bench"]["summary"][0]["case"] == "coco b16"  # kept from the first call
    racecheck_errors["n"] = 3
    assert gpu_check.main(["--steps", "sanitize"]) == 1  # racecheck errors fail the check
    report = json.loads((results / stem / "check.json").read_text())
    assert report["sanitizer"]["racecheck"]["errors"] == 3 and report["ok"] is False


def test_gpu_check_budget_sizes_each_step_and_runs_tests_on_a_worker_per_core(tmp_path, monkeypatch):
    """With --budget, each step's limit is what is left less what the later steps need; pytest runs
    on xdist with a worker per core, one thread each; the benchmark stops starting cases in time."""
    import torch

    monkeypatch.setattr(gpu_check, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(gpu_check, "find_sanitizer", lambda: "/fake/compute-sanitizer")
    monkeypatch.setattr(gpu_check, "xdist_workers", lambda: 16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU 141GB")
    clock = {"t": gpu_check.time.time()}  # (time.time itself: the report's date comes from it too)
    monkeypatch.setattr(gpu_check.time, "time", lambda: clock["t"])
    took = {"build.log": 60, "tests.log": 150, "sanitizer-memcheck.log": 20, "sanitizer-racecheck.log": 40,
            "bench.log": 150, "host-overhead.log": 20}
    calls = {}

    def fake_run(cmd, path, env=None, timeout=None):
        name = os.path.basename(path)
        calls[name] = {"cmd": cmd, "env": env, "timeout": timeout}
        clock["t"] += took[name]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("========= ERROR SUMMARY: 0 errors\n" if name.startswith("sanitizer") else "")
        return 0, took[name], path

    monkeypatch.setattr(gpu_check, "run", fake_run)
    monkeypatch.setenv("FOCAL_CUDA_COMMIT", "abc1234")
    # the build-info, git and nvidia-smi queries: not this test's subject (each a few seconds of start-up)
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout="{}", stderr="",
                                                                                      returncode=0))
    assert gpu_check.main(["--budget", "480"]) == 1  # no junit report: counted as a failure
    need = gpu_check.NEED
    tests = calls["tests.log"]
    assert tests["cmd"][tests["cmd"].index("-n") + 1] == "16"
    assert tests["env"]["OMP_NUM_THREADS"] == "1" and tests["env"]["TORCHINDUCTOR_COMPILE_THREADS"] == "1"
    assert tests["timeout"] == 480 - 60 - need["sanitize"] - need["bench"] - need["host"]
    assert calls["sanitizer-memcheck.log"]["timeout"] == 480 - 210 - need["bench"] - need["host"]
    assert calls["sanitizer-racecheck.log"]["timeout"] == 480 - 230 - need["bench"] - need["host"]
    bench = calls["bench.log"]
    left = 480 - 270 - need["host"]
    assert bench["cmd"][bench["cmd"].index("--time-limit") + 1] == str(left - gpu_check.BENCH_START_S)
    assert bench["timeout"] == left + 30
    assert calls["host-overhead.log"]["timeout"] == 480 - 420

    # spent: a step still gets 10 s; without a budget no limit; an explicit -n is kept as given
    calls.clear()
    clock["t"] += 1000
    took["build.log"] = 1000
    gpu_check.main(["--budget", "480", "--steps", "build,test"])
    assert calls["tests.log"]["timeout"] == 10
    calls.clear()
    gpu_check.main(["--budget", "0", "--steps", "build,test", "--test-args", "-n 4 -k cuda"])
    tests = calls["tests.log"]
    assert tests["timeout"] is None and tests["cmd"].count("-n") == 1 and "4" in tests["cmd"]


def test_bench_stops_starting_cases_at_its_time_limit(tmp_path, monkeypatch):
    """--time-limit: no case starts that would end past it (by the slowest so far); what ran is
    written, marked incomplete."""
    import bench_focal

    clock = {"t": 100.0, "ran": []}
    monkeypatch.setattr(bench_focal.time, "time", lambda: clock["t"])

    def fake_case(case, device, reps, warmup, log):
        clock["t"] += 40
        clock["ran"].append(case.label)
        return {"case": case.__dict__, "skipped": "fake"}

    monkeypatch.setattr(bench_focal, "run_case", fake_case)
    planned = bench_focal.preset("quick")
    assert len(planned) > 3
    # 0 + 0 <= 100: runs; 40 + 40 <= 100: runs; 80 + 40 > 100: stops
    assert bench_focal.main(["--quick", "--device", "cpu", "--time-limit", "100", "--out", str(tmp_path),
                             "--name", "run", "--no-plot"]) == 0
    assert clock["ran"] == [c.label for c in planned[:2]]
    report = json.loads((tmp_path / "run" / "bench.json").read_text())
    assert report["complete"] is False and len(report["results"]) == 2
    assert report["cases_planned"] == len(planned)


def test_full_sweep_runs_the_goals_cases_first():
    import bench_focal

    labels = [c.label for c in bench_focal.preset("full")]
    family = [c.label for c in bench_focal.family_cases(16)]
    assert labels[:2] == [c.label for c in (bench_focal.Case("coco", 16, *bench_focal.COCO, "fp32", "sum"),
                                            bench_focal.Case("coco", 16, *bench_focal.COCO, "bf16", "sum"))]
    assert labels[2:2 + len(family)] == family and len(family) == len(bench_focal.FAMILY)


def test_sanitizer_subset_names_tests_that_exist():
    """compute-sanitizer runs these node ids: each must still collect (a renamed test or parameter
    would make the sanitizer step test nothing)."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-k", "cuda",
                           *gpu_check.SANITIZER_TESTS], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    collected = [line.strip() for line in proc.stdout.splitlines() if "::" in line]
    for node in gpu_check.SANITIZER_TESTS:
        assert any(c == node or c.startswith(node + "[") for c in collected), node
    assert all("cuda" in c or c.startswith("tests/test_cuda.py") for c in collected)


def test_host_overhead_script_runs_and_reports_every_case(tmp_path):
    import host_overhead

    out = tmp_path / "host.json"
    assert host_overhead.main(["--device", "cpu", "--number", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["us_per_call"]
    assert set(rows) == {"focal_cuda fwd+bwd", "focal_cuda fwd (no grad)", "argument checks",
                         "torchvision formula fwd+bwd (eager)", "x.sum().backward() (autograd floor)"}
    assert all(v > 0 for v in rows.values())
