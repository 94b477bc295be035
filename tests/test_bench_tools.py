"""The GPU check's Nsight Compute parser, on a real report (an H100 run committed with the results)."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402

REPORT = os.path.join(ROOT, "benchmarks", "results", "h100-tuning", "2026-11-23-ncu-coco-b16.txt")


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


VARIANTS = sorted(
    os.path.join(ROOT, "benchmarks", "variants", f)
    for f in os.listdir(os.path.join(ROOT, "benchmarks", "variants"))
    if f.endswith(".patch")
)


@pytest.mark.parametrize("patch", VARIANTS, ids=os.path.basename)
def test_variant_patches_apply_to_this_tree(patch, tmp_path, monkeypatch):
    """Each kernel variant that race_cuda.py races must still apply here (regenerate or delete it
    when the kernel moves on), and must change what it says it changes."""
    import race_cuda

    monkeypatch.setattr(race_cuda, "WORK", str(tmp_path))
    dest = race_cuda.make_variant("v", patch)
    with open(patch) as f:
        text = f.read()
    changed = [line.split(" b/")[-1] for line in text.splitlines() if line.startswith("diff --git")]
    assert changed
    for rel in changed:
        with open(os.path.join(ROOT, rel)) as a, open(os.path.join(dest, rel)) as b:
            assert a.read() != b.read(), rel


def test_apply_patch_refuses_a_hunk_that_does_not_match(tmp_path):
    import race_cuda

    (tmp_path / "f.txt").write_text("one\ntwo\nthree\n")
    good = "--- a/f.txt\n+++ b/f.txt\n@@ -1,3 +1,3 @@\n one\n-two\n+2\n three\n"
    race_cuda.apply_patch(good, str(tmp_path))
    assert (tmp_path / "f.txt").read_text() == "one\n2\nthree\n"
    with pytest.raises(RuntimeError, match="found 0 times"):
        race_cuda.apply_patch(good, str(tmp_path))  # "two" is gone now


class _FakeProc:
    def __init__(self, rc, out):
        self.returncode = rc
        self._out = out

    def communicate(self):
        return self._out, None


def _fake_race(monkeypatch, tmp_path, failing_tests=(), tune_seconds=60.0):
    """race_cuda's orchestration on the CPU: builds, tests and tune_cuda replaced by fakes that
    advance a fake clock; tune_cuda 'measures' 1.0 ms + 0.1 ms per round (+1 ms for the patch)."""
    import torch

    import race_cuda

    clock = {"t": 1000.0, "tunes": {}}
    monkeypatch.setattr(race_cuda, "WORK", str(tmp_path / "race"))
    monkeypatch.setattr(race_cuda.time, "time", lambda: clock["t"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")

    def popen(cmd, cwd, **kw):
        name = os.path.basename(cwd)
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


PATCH = VARIANTS[0] if VARIANTS else None


@pytest.mark.skipif(PATCH is None, reason="no variant patch in benchmarks/variants")
def test_race_stops_rounds_at_the_budget_and_keeps_its_report(tmp_path, monkeypatch):
    race_cuda, clock = _fake_race(monkeypatch, tmp_path)
    out = tmp_path / "race.json"
    # two variants x 60 s a round: after round 2 the clock is at +240 s, and a third would end at 360 > 300
    rc = race_cuda.main(["--variants", PATCH, "--rounds", "5", "--budget-s", "300", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["rounds"] == 2 and report["complete"] is False
    assert clock["tunes"] == {"main": 2, os.path.splitext(os.path.basename(PATCH))[0]: 2}
    main = report["variants"]["main"]
    assert main["build"] == "ok" and main["tests"] == "4 passed"
    assert main["fp32"]["fwdbwd_ms"] == pytest.approx(1.05)  # median of 1.0 and 1.1
    assert len(main["bf16"]["rounds"]) == 2


@pytest.mark.skipif(PATCH is None, reason="no variant patch in benchmarks/variants")
def test_race_does_not_time_a_variant_whose_tests_fail(tmp_path, monkeypatch):
    name = os.path.splitext(os.path.basename(PATCH))[0]
    race_cuda, clock = _fake_race(monkeypatch, tmp_path, failing_tests=(name,))
    out = tmp_path / "race.json"
    rc = race_cuda.main(["--variants", PATCH, "--rounds", "2", "--json", str(out)])
    assert rc == 1
    report = json.loads(out.read_text())
    assert report["complete"] is True and report["rounds"] == 2
    assert report["variants"][name] == {"build": "ok", "tests": "1 failed"}
    assert clock["tunes"] == {"main": 2}
