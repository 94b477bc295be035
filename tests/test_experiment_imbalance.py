"""Promise: the class-imbalance experiment (python -m focal_cuda.experiments.imbalance) scores detections
by COCO-style AP correctly (hand-worked cases) and runs end to end, every loss, writing its table, JSON
and figures (a two-step smoke version of the committed run)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("matplotlib")
from focal_cuda.experiments import imbalance  # noqa: E402

GT = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([0])}


def dets(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


def ap(detections, gts, num_classes=1):
    return imbalance.average_precision(detections, gts, num_classes)


def test_ap_perfect_detection_is_one():
    r = ap([dets([[0, 0, 10, 10]], [0.9], [0])], [GT])
    assert r["AP"] == pytest.approx(1.0) and r["AP50"] == pytest.approx(1.0) and r["AP75"] == pytest.approx(1.0)


def test_ap_false_positive_ranked_first_halves_precision():
    """A higher-scored miss then the hit: precision 1/2 at every recall, so AP 0.5."""
    r = ap([dets([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])], [GT])
    assert r["AP"] == pytest.approx(0.5)


def test_ap_false_positive_ranked_last_costs_nothing():
    r = ap([dets([[50, 50, 60, 60], [0, 0, 10, 10]], [0.1, 0.8], [0, 0])], [GT])
    assert r["AP"] == pytest.approx(1.0)


def test_ap_counts_iou_thresholds():
    """IoU 0.62 (box 10 x 6.2 inside 10 x 10): a hit at 0.50, 0.55, 0.60 and a miss at the other seven."""
    r = ap([dets([[0, 0, 10, 6.2]], [0.9], [0])], [GT])
    assert r["AP50"] == pytest.approx(1.0) and r["AP75"] == pytest.approx(0.0)
    assert r["AP"] == pytest.approx(0.3)
    assert r["table"][2][0] == pytest.approx(1.0) and r["table"][3][0] == pytest.approx(0.0)


def test_ap_missed_box_caps_recall():
    """Two boxes, one found: precision 1 up to recall 0.5, none beyond: 51 of the 101 recall points."""
    gts = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [30, 30, 40, 40]]), "labels": torch.tensor([0, 0])}]
    r = ap([dets([[0, 0, 10, 10]], [0.9], [0])], gts)
    assert r["AP"] == pytest.approx(51 / 101)


def test_ap_duplicate_is_a_false_positive_and_classes_without_boxes_are_left_out():
    """The second detection of a matched box is a false positive (here after the hit: no cost); class 1
    has detections but no ground truth: left out of the mean, reported as None; a detection of the wrong
    class never matches."""
    d = dets([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8, 0.95], [0, 0, 1])
    r = ap([d], [GT], num_classes=2)
    assert r["per_class"][1] is None and r["AP"] == pytest.approx(1.0)
    d = dets([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.95], [1, 1])
    assert ap([d], [GT], num_classes=2)["AP"] == pytest.approx(0.0)


def test_ap_over_images_ranks_globally():
    """Image 0's miss outranks image 1's hit: precision 1/2 at recall 1/2 and 2/3 at recall 1 (made
    monotone: 2/3 everywhere, image 0's hit having the lowest score), so AP = 2/3."""
    gts = [GT, GT]
    d0 = dets([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.5], [0, 0])
    d1 = dets([[0, 0, 10, 10]], [0.7], [0])
    # ranks: 0.9 miss (P 0), 0.7 hit (P 1/2, R 1/2), 0.5 hit (P 2/3, R 1)
    assert ap([d0, d1], gts)["AP"] == pytest.approx(2 / 3)


def test_ap_rejects_mismatched_image_counts():
    with pytest.raises(ValueError, match="images"):
        ap([dets([[0, 0, 10, 10]], [0.9], [0])], [GT, GT])


def test_lr_schedule():
    steps, lr = 90, 1.0
    assert imbalance.lr_at(0, steps, lr, 10) == pytest.approx(0.1)
    assert imbalance.lr_at(10, steps, lr, 10) == pytest.approx(1.0)
    assert imbalance.lr_at(60, steps, lr, 10) == pytest.approx(0.1)
    assert imbalance.lr_at(80, steps, lr, 10) == pytest.approx(0.01)


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown loss 'bce'"):
        imbalance.ClassificationLoss("bce")


def test_smoke_every_loss(tmp_path):
    """Two steps of every loss on tiny images: finite losses, an AP in [0, 1], the four outputs."""
    rc = imbalance.main(["--steps", "2", "--batch", "2", "--size", "64", "--eval-images", "2", "--device", "cpu",
                         "--out", str(tmp_path)])
    assert rc == 0
    summary = json.loads((tmp_path / "imbalance.json").read_text())
    assert list(summary["results"]) == list(imbalance.LOSSES)
    for name, r in summary["results"].items():
        assert r["finite"], name
        assert len(r["curves"]["cls"]) == 2 and all(math.isfinite(v) and v > 0 for v in r["curves"]["cls"]), name
        assert 0.0 <= r["AP"] <= 1.0 or math.isnan(r["AP"]), name
    # the same initial weights and batches: the first step's box-regression loss agrees across losses
    first_box = [r["curves"]["box"][0] for r in summary["results"].values()]
    assert max(first_box) - min(first_box) <= 1e-5 * max(first_box)
    table = (tmp_path / "imbalance.md").read_text()
    for label, _ in imbalance.LOSSES.values():
        assert f"| {label} |" in table
    for png in ("imbalance_curves.png", "focal_loss_figure1.png"):
        with open(os.path.join(tmp_path, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
