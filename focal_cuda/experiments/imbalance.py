"""Class imbalance on a small RetinaNet: five classification losses, same data, same start, same steps.

    python -m focal_cuda.experiments.imbalance            # all five losses, CPU defaults (see below)
    python -m focal_cuda.experiments.imbalance --losses focal,ghmc --steps 200 --out /tmp/imb

The model and data are the demo's (``focal_cuda.demo``): a torchvision RetinaNet with a resnet18-FPN
backbone trained from scratch (``weights=None``) on generated images of three shapes (filled box, disc,
cross) over noise, 1-3 shapes per image. Only the classification loss changes from run to run (the
box-regression loss stays torchvision's); each is computed by focal_cuda from the matcher's per-anchor
labels (class, background, or ignored between the IoU thresholds):

  balanced_ce  alpha-balanced sigmoid BCE, alpha 0.75 (the RetinaNet paper's best balanced CE, Table 1a)
  ohem         sigmoid BCE over positives plus the hardest negatives, 3 per positive (Table 1d's baseline)
  focal        focal loss, alpha 0.25, gamma 2
  fl_star      FL* (the paper's appendix), gamma 2, beta 1, alpha 0.25 (fvcore's RetinaNet-FL* choice)
  ghmc         GHM-C, 30 bins, momentum 0.75 (mmdet's GHM RetinaNet config)

The first four are divided by the number of foreground anchors in the batch (at least 1), as RetinaNet
normalises; GHM-C's mean normalises itself (sum over the valid elements' weighted BCE / their number).

Every run starts from the same weights (one model built, its state copied), sees the same batches in the
same order under the same torch seed, and takes the same number of SGD steps (momentum 0.9, weight decay
1e-4, a linear warm-up, then the learning rate divided by 10 at 2/3 and again at 8/9 of the steps, the
shape of Detectron's 1x schedule; gradient norm clipped at 10 for every run). Then each model is evaluated
on a held-out set drawn by the same generator at indices disjoint from training's, with torchvision's
post-processing (score threshold 0.01, at most 100 detections per image), by COCO-style AP computed
here: AP averaged over IoU 0.50:0.05:0.95 and over the classes, and AP50.

Writes, into benchmarks/results/<date>-<machine>/ (or --out DIR): imbalance.json (configuration,
environment, per-loss AP/AP50/final losses/times and every step's losses), imbalance.md (the table),
imbalance_curves.png (each loss's training curve) and focal_loss_figure1.png (the focal-loss paper's
Figure 1, computed with focal_cuda.sigmoid_focal_loss).

Time: the defaults (320 steps of batch 4 at 128 px per loss, 100 held-out images) take about 17 minutes
on a 2-core x86 CPU (about 0.6 s a step, 3.3 minutes per loss); a GPU takes far less. ``--steps 2 --batch 2 --size 64
--eval-images 4`` is a smoke test of a few seconds per loss.

The initial weights come from ``focal_cuda.demo.build_model`` (which seeds torch with 0 itself); --seed
selects the training batches (batch i of seed s is ``make_batch(100000 s + i)``) and seeds torch before
each run, so different seeds change the data order, not the initial weights.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

import focal_cuda
from focal_cuda._results import cpu_model, default_run_dir, machine_slug
from focal_cuda.demo import CLASSES, build_model, make_batch
from focal_cuda.integrations.torchvision import anchor_labels

IGNORED = -2  # anchor_labels' code for anchors between the matcher's IoU thresholds
EVAL_BASE = 10_000  # held-out image j is make_batch(EVAL_BASE + j, 1, ...)
SEED_STRIDE = 100_000  # training batch i of seed s is make_batch(SEED_STRIDE * s + i, ...)
IOU_THRESHOLDS = tuple(np.round(np.linspace(0.5, 0.95, 10), 2).tolist())
RECALL_POINTS = np.linspace(0.0, 1.0, 101)

LOSSES = {
    "balanced_ce": ("alpha-balanced BCE", "alpha 0.75, gamma 0"),
    "ohem": ("OHEM 3:1", "sigmoid BCE, positives + 3 hardest negatives per positive (per image)"),
    "focal": ("focal loss", "alpha 0.25, gamma 2"),
    "fl_star": ("FL*", "gamma 2, beta 1, alpha 0.25 (fvcore's RetinaNet-FL* alpha)"),
    "ghmc": ("GHM-C", "30 bins, momentum 0.75 (mmdet's GHM RetinaNet config)"),
}


class ClassificationLoss:
    """A RetinaNet classification head's ``compute_loss(targets, head_outputs, matched_idxs)`` computing
    one of LOSSES with focal_cuda. One instance per training run (GHM-C keeps running bin counts)."""

    def __init__(self, kind: str, device=None):
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; expected one of {', '.join(LOSSES)}")
        self.kind = kind
        self.ghmc = None
        if kind == "ghmc":
            self.ghmc = focal_cuda.GHMCLoss(bins=30, momentum=0.75, ignore_index=IGNORED).to(device or "cpu")

    def __call__(self, targets, head_outputs, matched_idxs):
        logits = head_outputs["cls_logits"]  # [B, A, C]
        labels = torch.stack(anchor_labels(targets, matched_idxs, logits.shape[-1]))  # [B, A]
        if self.kind == "ghmc":
            return self.ghmc(logits, labels)  # mean over the valid elements: normalises itself
        # RetinaNet's normaliser: foreground anchors in the batch, at least 1, kept on the device
        num_fg = torch.stack([(m >= 0).sum() for m in matched_idxs]).sum().clamp_min(1).to(logits.dtype)
        if self.kind == "balanced_ce":
            return focal_cuda.sigmoid_focal_loss(logits, labels, alpha=0.75, gamma=0.0, reduction="sum",
                                                 normalizer=num_fg, ignore_index=IGNORED)
        if self.kind == "ohem":
            return focal_cuda.ohem_loss(logits, labels, neg_pos_ratio=3.0, reduction="sum", normalizer=num_fg,
                                        ignore_index=IGNORED)
        if self.kind == "focal":
            return focal_cuda.sigmoid_focal_loss(logits, labels, alpha=0.25, gamma=2.0, reduction="sum",
                                                 normalizer=num_fg, ignore_index=IGNORED)
        return focal_cuda.sigmoid_focal_loss_star(logits, labels, alpha=0.25, gamma=2.0, beta=1.0, reduction="sum",
                                                  normalizer=num_fg, ignore_index=IGNORED)


# ----------------------------------------------------------------------------------------------------
# COCO-style average precision


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` [N, 4] with every box of ``b`` [M, 4] (x0, y0, x1, y1): [N, M]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clip(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def average_precision(detections: Sequence[Dict], ground_truths: Sequence[Dict], num_classes: int,
                      iou_thresholds: Sequence[float] = IOU_THRESHOLDS, max_dets: int = 100) -> Dict:
    """COCO-style AP (no crowd boxes, one area range).

    detections: per image ``{"boxes": [N, 4], "scores": [N], "labels": [N]}``; ground_truths: per image
    ``{"boxes": [M, 4], "labels": [M]}`` (tensors or arrays, boxes x0, y0, x1, y1). Per image the
    ``max_dets`` highest-scoring detections count. Per class and IoU threshold t, the class's detections
    over all images, by decreasing score (stable), each take the unmatched ground-truth box of the same
    image and class with the highest IoU, if that IoU is >= t (true positive; else false positive). The
    precision is made monotone (the maximum precision at any higher recall) and read at the 101 recall
    points 0, 0.01, ..., 1 (0 beyond the highest recall); AP is their mean. Classes without a
    ground-truth box are left out of the averages (COCO's -1).

    Returns ``{"AP": mean over thresholds and classes, "AP50", "AP75", "per_class": [AP per class or
    None], "table": [threshold][class] AP or None}``."""
    thr = [float(t) for t in iou_thresholds]
    table = np.full((len(thr), num_classes), np.nan)
    dets = []
    for d in detections:
        boxes, scores, labels = (_as_numpy(d[k]) for k in ("boxes", "scores", "labels"))
        keep = np.argsort(-scores, kind="mergesort")[:max_dets]
        dets.append((boxes.reshape(-1, 4)[keep], scores[keep], labels[keep]))
    gts = [(_as_numpy(g["boxes"]).reshape(-1, 4), _as_numpy(g["labels"])) for g in ground_truths]
    if len(dets) != len(gts):
        raise ValueError(f"{len(dets)} images of detections but {len(gts)} of ground truth")
    for c in range(num_classes):
        gt_c = [boxes[labels == c] for boxes, labels in gts]
        npos = sum(len(g) for g in gt_c)
        if npos == 0:
            continue
        img, score, ious = [], [], []
        for i, (boxes, scores, labels) in enumerate(dets):
            sel = labels == c
            iou = box_iou(boxes[sel], gt_c[i])
            for k in range(int(sel.sum())):
                img.append(i)
                score.append(scores[sel][k])
                ious.append(iou[k])
        order = np.argsort(-np.asarray(score, dtype=np.float64), kind="mergesort")
        for ti, t in enumerate(thr):
            matched = [np.zeros(len(g), dtype=bool) for g in gt_c]
            tp = np.zeros(len(order))
            for rank, d in enumerate(order):
                best, best_j = min(t, 1 - 1e-10), -1
                for j, v in enumerate(ious[d]):
                    if not matched[img[d]][j] and v >= best:
                        best, best_j = v, j
                if best_j >= 0:
                    matched[img[d]][best_j] = True
                    tp[rank] = 1.0
            tps = np.cumsum(tp)
            fps = np.cumsum(1.0 - tp)
            recall = tps / npos
            precision = tps / np.maximum(tps + fps, np.finfo(np.float64).eps)
            precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
            idx = np.searchsorted(recall, RECALL_POINTS, side="left")
            q = np.zeros(len(RECALL_POINTS))
            inside = idx < len(precision)
            q[inside] = precision[idx[inside]]
            table[ti, c] = q.mean()

    def mean(x):
        x = x[~np.isnan(x)]
        return float(x.mean()) if x.size else float("nan")

    def at(t):
        return mean(table[thr.index(t)]) if t in thr else float("nan")

    per_class = np.nanmean(table, axis=0) if (~np.isnan(table)).any() else table[0]
    return {
        "AP": mean(table),
        "AP50": at(0.5),
        "AP75": at(0.75),
        "per_class": [None if np.isnan(v) else float(v) for v in per_class],
        "table": [[None if np.isnan(v) else float(v) for v in row] for row in table],
    }


# ----------------------------------------------------------------------------------------------------
# training and evaluation


def lr_at(step: int, steps: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up from base_lr / 10 over ``warmup`` steps, then /10 at 2/3 and /100 at 8/9 of the steps."""
    if step < warmup:
        return base_lr * (0.1 + 0.9 * step / warmup)
    if step >= steps * 8 // 9:
        return base_lr * 0.01
    if step >= steps * 2 // 3:
        return base_lr * 0.1
    return base_lr


def train_index(seed: int, step: int) -> int:
    return SEED_STRIDE * seed + step


def train(model, loss_fn: ClassificationLoss, args, device, label: str) -> Dict[str, List[float]]:
    """Train ``model`` in place; returns each step's losses, learning rate and gradient norm."""
    head = model.head.classification_head
    head.compute_loss = loss_fn
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    rec = {"cls": [], "box": [], "total": [], "lr": [], "grad_norm": []}
    every = max(1, args.steps // 10)
    t0 = time.perf_counter()
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        images, targets = make_batch(train_index(args.seed, step), args.batch, args.size, device)
        losses = model(images, targets)
        total = losses["classification"] + losses["bbox_regression"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        rec["cls"].append(float(losses["classification"].detach()))
        rec["box"].append(float(losses["bbox_regression"].detach()))
        rec["total"].append(float(total.detach()))
        rec["lr"].append(lr)
        rec["grad_norm"].append(float(grad_norm))
        if (step + 1) % every == 0 or step + 1 == args.steps:
            print(f"  [{label}] step {step + 1}/{args.steps}  lr {lr:.4g}  cls {rec['cls'][-1]:.4f}  "
                  f"box {rec['box'][-1]:.4f}  grad norm {rec['grad_norm'][-1]:.2f}  "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return rec


def held_out_set(n: int, size: int, device):
    """The held-out images and targets: image j is make_batch(EVAL_BASE + j, 1, size)."""
    images, targets = [], []
    for j in range(n):
        im, tg = make_batch(EVAL_BASE + j, 1, size, device)
        images += im
        targets += tg
    return images, targets


@torch.no_grad()
def evaluate(model, images, targets, score_thresh: float, batch: int = 8) -> Dict:
    model.eval()
    model.score_thresh = score_thresh
    model.detections_per_img = 100
    dets = []
    for i in range(0, len(images), batch):
        dets += [{k: v.cpu() for k, v in d.items()} for d in model(images[i:i + batch])]
    result = average_precision(dets, [{k: v.cpu() for k, v in t.items()} for t in targets], len(CLASSES))
    result["detections_per_image"] = float(np.mean([len(d["scores"]) for d in dets])) if dets else 0.0
    return result


# ----------------------------------------------------------------------------------------------------
# reporting


def smooth(xs: Sequence[float], window: int) -> np.ndarray:
    """Exponential moving average with TensorBoard's start-up debiasing (time constant ``window``)."""
    beta = 1.0 - 1.0 / max(1, window)
    out, s = np.empty(len(xs)), 0.0
    for i, x in enumerate(xs):
        s = beta * s + (1 - beta) * x
        out[i] = s / (1 - beta ** (i + 1)) if beta > 0 else x
    return out


def plot_curves(results: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    axes = axes.ravel()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, name in enumerate(names):
        cls = np.asarray(results[name]["curves"]["cls"])
        steps = np.arange(1, len(cls) + 1)
        window = max(1, len(cls) // 30)
        ax = axes[k]
        ax.plot(steps, cls, color=colors[k], alpha=0.25, lw=0.8, label="per step")
        ax.plot(steps, smooth(cls, window), color=colors[k], lw=2, label=f"EMA ({window} steps)")
        if np.all(cls > 0) and np.all(np.isfinite(cls)):
            ax.set_yscale("log")
        r = results[name]
        ax.set_title(f"{LOSSES[name][0]}: AP {100 * r['AP']:.1f}, AP50 {100 * r['AP50']:.1f}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("classification loss")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        axes[-1].plot(steps, smooth(cls, window) / smooth(cls, window)[0], color=colors[k], lw=2,
                      label=LOSSES[name][0])
    for ax in axes[len(names):-1]:
        ax.axis("off")
    ax = axes[-1]
    ax.set_yscale("log")
    ax.set_title("all, smoothed, relative to the first step", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("loss / loss at step 1")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.suptitle("RetinaNet (resnet18-FPN, from scratch) on synthetic shapes: training classification loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_figure1(path: str) -> None:
    """The focal-loss paper's Figure 1: FL(p_t) against p_t for gamma in {0, 0.5, 1, 2, 5}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)[1:]  # (0, 1]; logit(1) = inf gives loss 0
    x = torch.logit(p).unsqueeze(-1)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for gamma in (0.0, 0.5, 1.0, 2.0, 5.0):
        loss = focal_cuda.sigmoid_focal_loss(x, torch.ones_like(x), alpha=-1, gamma=gamma, reduction="none")
        ax.plot(p.numpy(), loss.squeeze(-1).numpy(), lw=2, label=f"γ = {gamma:g}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 5)
    ax.set_xlabel("probability of ground truth class")
    ax.set_ylabel("loss")
    ax.axvspan(0.6, 1.0, color="0.9", zorder=0)
    ax.text(0.8, 3.0, "well-classified\nexamples", ha="center", fontsize=10)
    ax.set_title("FL(p_t) = -(1 - p_t)^γ log(p_t), from focal_cuda.sigmoid_focal_loss", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def git_state() -> Dict[str, Optional[object]]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=30)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _tail_mean(xs: Sequence[float], frac: float = 0.1) -> float:
    n = max(1, int(len(xs) * frac))
    return float(np.mean(xs[-n:])) if len(xs) else float("nan")


def write_markdown(summary: Dict, path: str) -> None:
    cfg, env = summary["config"], summary["environment"]
    commit = env["git_commit"] or "unknown"
    if env.get("git_dirty"):
        commit += " (with uncommitted changes)"
    lines = [
        "# Class imbalance: five classification losses on a small RetinaNet",
        "",
        f"{env['date']}, {env['machine']} ({env['cpu']}, {env['threads']} threads), device {cfg['device']}, "
        f"commit {commit}, torch {env['torch']}, focal_cuda {env['focal_cuda']}.",
        "",
        f"RetinaNet resnet18-FPN from scratch, {cfg['steps']} steps of batch {cfg['batch']} at {cfg['size']} px, "
        f"lr {cfg['lr']} (warm-up {cfg['warmup']} steps, /10 at 2/3 and 8/9), seed {cfg['seed']}; "
        f"AP on {cfg['eval_images']} held-out images (COCO-style, IoU .50:.95; AP50 at IoU .50).",
        "",
        f"| loss | settings | AP | AP50 | final cls loss (mean of last {cfg['tail_steps']} steps) | train time (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, r in summary["results"].items():
        lines.append(f"| {LOSSES[name][0]} | {LOSSES[name][1]} | {100 * r['AP']:.1f} | {100 * r['AP50']:.1f} | "
                     f"{r['final_cls_tail_mean']:.4f} | {r['train_s']:.0f} |")
    lines += ["", "AP and AP50 in percent. The classification losses have different scales: compare them "
              "within a row's curve, not across rows.", f"Whole experiment: {summary['wall_s']:.0f} s.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=320)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--eval-images", type=int, default=100)
    ap.add_argument("--losses", default=",".join(LOSSES), help=f"comma list of {', '.join(LOSSES)}")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default min(100, steps // 10))")
    ap.add_argument("--clip", type=float, default=10.0, help="gradient norm clip, every run alike")
    ap.add_argument("--score-thresh", type=float, default=0.01)
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<date>-<machine>)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    names = [n.strip() for n in args.losses.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOSSES]
    if unknown or not names:
        ap.error(f"--losses: unknown {', '.join(unknown) or '(none given)'}; expected a comma list of {', '.join(LOSSES)}")
    if args.steps < 1 or args.batch < 1 or args.eval_images < 1:
        ap.error("--steps, --batch and --eval-images must be >= 1")
    if args.seed < 0 or (args.seed == 0 and args.steps > EVAL_BASE) or args.steps > SEED_STRIDE:
        ap.error(f"--seed must be >= 0 and the training indices must not reach the held-out ones "
                 f"({EVAL_BASE}..): --steps <= {EVAL_BASE} with seed 0")
    if args.warmup is None:
        args.warmup = min(100, args.steps // 10)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = args.out or default_run_dir(device)
    os.makedirs(out, exist_ok=True)

    base = build_model(args.size)  # seeds torch with 0 itself: the one initial state of every run
    init_state = copy.deepcopy(base.state_dict())
    eval_images, eval_targets = held_out_set(args.eval_images, args.size, device)
    print(f"RetinaNet (resnet18-FPN, {len(CLASSES)} classes, {args.size} px, batch {args.batch}) on {device}: "
          f"{args.steps} steps per loss, losses {', '.join(names)}; AP on {args.eval_images} held-out images",
          file=sys.stderr, flush=True)

    results = {}
    for k, name in enumerate(names):
        print(f"[{k + 1}/{len(names)}] {LOSSES[name][0]} ({LOSSES[name][1]})", file=sys.stderr, flush=True)
        model = copy.deepcopy(base)
        model.load_state_dict(init_state)
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        rec = train(model, ClassificationLoss(name, device), args, device, name)
        t1 = time.perf_counter()
        ev = evaluate(model, eval_images, eval_targets, args.score_thresh)
        t2 = time.perf_counter()
        finite = all(math.isfinite(v) for v in rec["cls"] + rec["total"])
        results[name] = {
            "label": LOSSES[name][0], "settings": LOSSES[name][1],
            "AP": ev["AP"], "AP50": ev["AP50"], "AP75": ev["AP75"], "AP_per_class": ev["per_class"],
            "AP_table": ev["table"], "detections_per_image": ev["detections_per_image"],
            "final_cls": rec["cls"][-1], "final_total": rec["total"][-1],
            "final_cls_tail_mean": _tail_mean(rec["cls"]), "final_total_tail_mean": _tail_mean(rec["total"]),
            "finite": finite, "train_s": t1 - t0, "eval_s": t2 - t1, "curves": rec,
        }
        print(f"[{k + 1}/{len(names)}] {LOSSES[name][0]}: AP {100 * ev['AP']:.1f}  AP50 {100 * ev['AP50']:.1f}  "
              f"final cls loss {rec['cls'][-1]:.4f}  train {t1 - t0:.0f} s  eval {t2 - t1:.0f} s"
              + ("" if finite else "  (non-finite losses recorded)"), flush=True)
        del model

    plot_curves(results, os.path.join(out, "imbalance_curves.png"))
    plot_figure1(os.path.join(out, "focal_loss_figure1.png"))
    git = git_state()
    summary = {
        "config": {
            "steps": args.steps, "batch": args.batch, "size": args.size, "eval_images": args.eval_images,
            "losses": names, "lr": args.lr, "warmup": args.warmup, "lr_schedule": "linear warm-up from lr/10, "
            "then lr, lr/10 from 2/3 of the steps, lr/100 from 8/9", "optimizer": "SGD momentum 0.9, weight decay 1e-4",
            "clip_grad_norm": args.clip, "score_thresh": args.score_thresh, "detections_per_img": 100,
            "seed": args.seed, "device": str(device),
            "train_batches": f"make_batch({SEED_STRIDE * args.seed} + i, batch, size), i < steps",
            "held_out": f"make_batch({EVAL_BASE} + j, 1, size), j < eval_images",
            "iou_thresholds": list(IOU_THRESHOLDS), "tail_steps": max(1, int(args.steps * 0.1)),
            "classes": list(CLASSES),
        },
        "environment": {
            "date": datetime.date.today().isoformat(), "machine": machine_slug(device),
            "cpu": cpu_model(), "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": _torchvision_version(), "focal_cuda": focal_cuda.__version__,
            "git_commit": git["commit"], "git_dirty": git["dirty"],
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "results": results,
    }
    summary["wall_s"] = time.perf_counter() - t_start
    write_markdown(summary, os.path.join(out, "imbalance.md"))
    with open(os.path.join(out, "imbalance.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "imbalance.md")) as f:
        print("\n" + f.read())
    print(f"wrote {out}/imbalance.json, imbalance.md, imbalance_curves.png, focal_loss_figure1.png "
          f"({summary['wall_s']:.0f} s in all)")
    return 0 if all(r["finite"] for r in results.values()) else 1


def _torchvision_version() -> Optional[str]:
    try:
        import torchvision

        return torchvision.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
