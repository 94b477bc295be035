"""Train a small RetinaNet on generated shapes, stock head vs focal_cuda-patched head.

    python -m focal_cuda.demo                 # CPU here: ~30 steps each, a few minutes
    python -m focal_cuda.demo --steps 60 --device cuda

Both models start from the same weights, see the same batches in the same order and take their
steps in turns (so machine noise hits both alike); the only difference is how the classification
loss is computed (torchvision's per-image loop over a dense
one-hot target vs one fused focal_cuda call on the matched labels). Prints per-step progress, then
the loss agreement, the time per step and per classification-loss call, and the peak memory per
step of each; writes a PNG of the two loss curves (no downloads: the data is drawn on the fly).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch

from ._results import default_run_dir
from .integrations.torchvision import patch_retinanet

CLASSES = ("box", "disc", "cross")


def make_batch(step: int, batch: int, size: int, device):
    """Images with 1-3 shapes each (filled box, disc, cross) over noise, with their boxes and labels."""
    g = torch.Generator().manual_seed(1000 + step)
    images, targets = [], []
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    for _ in range(batch):
        img = torch.rand(3, size, size, generator=g) * 0.3
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            cls = int(torch.randint(0, len(CLASSES), (1,), generator=g))
            w, h = (torch.rand(2, generator=g) * size * 0.3 + size * 0.12).tolist()
            x0 = float(torch.rand(1, generator=g)) * (size - w)
            y0 = float(torch.rand(1, generator=g)) * (size - h)
            cx, cy = x0 + w / 2, y0 + h / 2
            if cls == 0:
                mask = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
            elif cls == 1:
                mask = ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 <= 1
            else:
                inside = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
                mask = inside & (((xx - cx).abs() < w / 6) | ((yy - cy).abs() < h / 6))
            color = torch.rand(3, 1, 1, generator=g) * 0.6 + 0.4
            img = torch.where(mask, color.expand_as(img), img)
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(cls)
        images.append(img.to(device))
        targets.append({"boxes": torch.tensor(boxes, device=device), "labels": torch.tensor(labels, device=device)})
    return images, targets


def build_model(size: int):
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return RetinaNet(backbone, num_classes=len(CLASSES), min_size=size, max_size=size)


class _Peak:
    """Peak memory of a step: CUDA allocator peak, or resident-set peak on CPU (Linux)."""

    def __init__(self, device):
        self.device = device
        if device.type == "cpu":
            try:  # serve large allocations by mmap so RSS follows them (see benchmarks/bench_focal.py)
                import ctypes

                ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
            except (OSError, AttributeError):
                pass

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._status("VmRSS")
        except OSError:
            self.base = None

    def stop(self):
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        if self.base is None:
            return float("nan")
        return (self._status("VmHWM") - self.base) / 1024

    @staticmethod
    def _status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
        return 0


class _Run:
    """One model's training state and records; its classification loss call is timed."""

    def __init__(self, model, device, label, lr):
        self.model, self.device, self.label = model.to(device).train(), device, label
        self.head = model.head.classification_head
        self.compute_loss = self.head.compute_loss  # stock, or the focal_cuda patch
        self.head.compute_loss = self._timed_compute_loss
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
        self.peak = _Peak(device)
        self.rec = {"cls": [], "total": [], "step_ms": [], "peak_mb": [], "cls_loss_ms": []}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed_compute_loss(self, *args, **kwargs):
        self._sync()
        t0 = time.perf_counter()
        out = self.compute_loss(*args, **kwargs)
        self._sync()
        self.rec["cls_loss_ms"].append((time.perf_counter() - t0) * 1e3)
        return out

    def step(self, images, targets):
        self.peak.start()
        t0 = time.perf_counter()
        losses = self.model(images, targets)
        total = losses["classification"] + losses["bbox_regression"]
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
        self.opt.step()
        self._sync()
        self.rec["step_ms"].append((time.perf_counter() - t0) * 1e3)
        self.rec["peak_mb"].append(self.peak.stop())
        self.rec["cls"].append(float(losses["classification"].detach()))
        self.rec["total"].append(float(total.detach()))

    def close(self):
        self.head.compute_loss = self.compute_loss  # drop the timing wrapper, keep the stock or patched method


def train_both(stock, fused, steps, batch, size, device, lr):
    """Both models step in turns on the same batch, so machine noise hits them alike."""
    runs = [_Run(stock, device, "stock", lr), _Run(fused, device, "focal_cuda", lr)]
    for step in range(steps):
        images, targets = make_batch(step, batch, size, device)
        for run in runs:
            run.step(images, targets)
        a, b = runs[0].rec, runs[1].rec
        done = int(30 * (step + 1) / steps)
        print(f"\r[{'#' * done}{'.' * (30 - done)}] step {step + 1}/{steps}  cls loss stock {a['cls'][-1]:.4f} "
              f"focal_cuda {b['cls'][-1]:.4f}  step ms {a['step_ms'][-1]:.0f} / {b['step_ms'][-1]:.0f}",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    for run in runs:
        run.close()
    return runs[0].rec, runs[1].rec


def _median_tail(xs, skip=2):
    tail = sorted(xs[skip:] if len(xs) > skip else xs)
    return tail[len(tail) // 2] if tail else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None,
                    help="path stem of the .json/.png (default benchmarks/results/<date>-<machine>/demo_retinanet)")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.out is None:
        args.out = os.path.join(default_run_dir(device), "demo_retinanet")

    base = build_model(args.size)
    stock = copy.deepcopy(base)
    fused = patch_retinanet(copy.deepcopy(base))
    print(f"RetinaNet (resnet18-FPN, {len(CLASSES)} classes, {args.size}px, batch {args.batch}) on {device}, "
          f"{args.steps} steps each", file=sys.stderr)
    a, b = train_both(stock, fused, args.steps, args.batch, args.size, device, args.lr)

    diff = max(abs(x - y) for x, y in zip(a["cls"], b["cls"]))
    rel0 = abs(a["cls"][0] - b["cls"][0]) / abs(a["cls"][0])
    summary = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__, "steps": args.steps, "batch": args.batch, "size": args.size,
        "first_step_cls_rel_diff": rel0, "max_cls_abs_diff": diff,
        "final_cls": {"stock": a["cls"][-1], "focal_cuda": b["cls"][-1]},
        "median_step_ms": {"stock": _median_tail(a["step_ms"]), "focal_cuda": _median_tail(b["step_ms"])},
        "median_cls_loss_ms": {"stock": _median_tail(a["cls_loss_ms"]), "focal_cuda": _median_tail(b["cls_loss_ms"])},
        "median_peak_mb": {"stock": _median_tail(a["peak_mb"]), "focal_cuda": _median_tail(b["peak_mb"])},
    }
    print("\n| | stock torchvision | focal_cuda |\n|---|---:|---:|")
    print(f"| median step (ms) | {summary['median_step_ms']['stock']:.0f} | {summary['median_step_ms']['focal_cuda']:.0f} |")
    print(f"| median classification-loss call (ms) | {summary['median_cls_loss_ms']['stock']:.2f} "
          f"| {summary['median_cls_loss_ms']['focal_cuda']:.2f} |")
    print(f"| median peak memory per step (MB) | {summary['median_peak_mb']['stock']:.0f} "
          f"| {summary['median_peak_mb']['focal_cuda']:.0f} |")
    print(f"| final classification loss | {a['cls'][-1]:.4f} | {b['cls'][-1]:.4f} |")
    print(f"\nloss curves: first-step relative difference {rel0:.1e}, largest difference over "
          f"{args.steps} steps {diff:.1e} (float rounding compounding through training)")

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"summary": summary, "stock": a, "focal_cuda": b}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        steps = range(1, args.steps + 1)
        axes[0].plot(steps, a["cls"], label="stock torchvision", lw=2.5, alpha=0.6)
        axes[0].plot(steps, b["cls"], label="focal_cuda (patched)", lw=1.2, ls="--")
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("classification (focal) loss")
        axes[0].set_title(f"RetinaNet on shapes, {summary['device']}")
        axes[0].legend()
        axes[1].plot(steps, a["cls_loss_ms"], label="stock", lw=2)
        axes[1].plot(steps, b["cls_loss_ms"], label="focal_cuda", lw=2)
        axes[1].set_yscale("log")
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("classification-loss call (ms, log)")
        axes[1].legend()
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.out + ".png", dpi=110)
        print(f"wrote {args.out}.png and {args.out}.json")
    except ImportError:
        print(f"wrote {args.out}.json (matplotlib not installed: no plot)")
    ok = math.isfinite(diff) and rel0 < 1e-4
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
