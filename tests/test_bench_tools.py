"""The GPU check's Nsight Compute parser, on a real report (an H100 run committed with the results)."""

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
