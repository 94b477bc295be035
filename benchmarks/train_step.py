#!/usr/bin/env python3
"""A training step per framework, stock against patched: torchvision RetinaNet, HF transformers
RT-DETR and ultralytics YOLOv8n, small models built from their configs with random weights (no
downloads), on synthetic images and boxes.

    python benchmarks/train_step.py [--steps 6] [--frameworks retinanet,rtdetr,yolov8] [--out DIR]

For each framework and each mode (stock, then patched: the framework's own code with
``focal_cuda.integrations.<framework>.patch()``):

* the whole step (forward, loss, backward): median over interleaved steps;
* the classification loss alone, forward+backward, on the inputs it received in a step (captured
  from the framework's own call), median of repeated runs; summed over the calls of a step (RT-DETR
  computes it per decoder layer and denoising group);
* the ops the loss runs (torch.profiler: operator calls in one forward+backward of the loss);
* peak memory of a step (CPU: resident-set growth; GPU: max allocated);
* on a GPU, the host synchronisations of a step (torch.cuda.set_sync_debug_mode).

The patched and stock steps must give the same loss (checked, and reported).
Writes train_step.json and train_step.md into the run's results folder.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench_focal import peak_memory_mb  # noqa: E402
from focal_cuda._results import run_dir_name  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def capturing(owner, attr, calls):
    """Record the arguments of every call of owner.attr (a method or function), calling through."""
    original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    setattr(owner, attr, spy)
    try:
        yield
    finally:
        setattr(owner, attr, original)


# ----------------------------------------------------------------------------- the frameworks

class RetinaNet:
    name = "torchvision RetinaNet (resnet50-FPN, 5 classes, 256 px, batch 2)"

    def __init__(self, device):
        import torchvision

        from focal_cuda.integrations import torchvision as fc_tv

        torch.manual_seed(0)
        self.model = torchvision.models.detection.retinanet_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=5, min_size=256, max_size=256).to(device).train()
        g = torch.Generator().manual_seed(0)
        self.images = [torch.rand(3, 256, 256, generator=g).to(device) for _ in range(2)]
        self.targets = [{"boxes": torch.tensor([[20.0, 30, 120, 140], [150, 60, 230, 200]], device=device),
                         "labels": torch.tensor([1, 3], device=device)},
                        {"boxes": torch.tensor([[40.0, 40, 200, 220]], device=device),
                         "labels": torch.tensor([4], device=device)}]
        self.integration = fc_tv
        from torchvision.models.detection.retinanet import RetinaNetClassificationHead

        self.loss_owner, self.loss_attr = RetinaNetClassificationHead, "compute_loss"

    def step(self):
        losses = self.model(self.images, self.targets)
        total = sum(losses.values())
        total.backward()
        return losses["classification"].detach()

    def loss_call(self, args, kwargs):
        head, targets, head_outputs, matched = args
        logits = head_outputs["cls_logits"].detach().requires_grad_()
        loss = type(head).compute_loss(head, targets, {"cls_logits": logits}, matched)
        loss.backward()


class RTDetr:
    name = "HF transformers RT-DETR (ResNet, 2 decoder layers, 300 queries, 20 classes, 320 px, batch 2)"

    def __init__(self, device):
        import transformers

        from focal_cuda.integrations import transformers as fc_hf

        bb = transformers.RTDetrResNetConfig(depths=[1, 1, 1, 1], out_features=["stage2", "stage3", "stage4"])
        cfg = transformers.RTDetrConfig(backbone_config=bb, num_labels=20, decoder_layers=2, num_queries=300,
                                        num_denoising=50, encoder_ffn_dim=256, decoder_ffn_dim=256,
                                        use_pretrained_backbone=False)
        torch.manual_seed(0)
        self.model = transformers.RTDetrForObjectDetection(cfg).to(device).train()
        g = torch.Generator().manual_seed(0)
        self.pixels = torch.rand(2, 3, 320, 320, generator=g).to(device)
        self.labels = [{"class_labels": torch.tensor([1, 3, 7], device=device),
                        "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3], [0.5, 0.2, 0.2, 0.1]],
                                              device=device)},
                       {"class_labels": torch.tensor([0], device=device),
                        "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]], device=device)}]
        self.integration = fc_hf
        from transformers.loss.loss_rt_detr import RTDetrLoss

        self.loss_owner, self.loss_attr = RTDetrLoss, "loss_labels_vfl"

    def step(self):
        torch.manual_seed(1)  # the denoising queries are random
        out = self.model(pixel_values=self.pixels, labels=self.labels)
        out.loss.backward()
        return sum(v.detach() for k, v in out.loss_dict.items() if "vfl" in k)

    def loss_call(self, args, kwargs):
        crit, outputs, targets, indices, num_boxes = args
        outputs = {"logits": outputs["logits"].detach().requires_grad_(), "pred_boxes": outputs["pred_boxes"].detach()}
        type(crit).loss_labels_vfl(crit, outputs, targets, indices, num_boxes)["loss_vfl"].backward()


class YOLOv8:
    name = "ultralytics YOLOv8n (yolov8n.yaml, 80 classes, 320 px, batch 4)"

    def __init__(self, device):
        from ultralytics.cfg import get_cfg
        from ultralytics.nn.tasks import DetectionModel
        import ultralytics.utils.loss as yolo

        from focal_cuda.integrations import ultralytics as fc_ul

        torch.manual_seed(0)
        self.model = DetectionModel("yolov8n.yaml", nc=80, verbose=False).to(device)
        self.model.args = get_cfg()
        self.model.train()
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(4, 3, 320, 320, generator=g).to(device)
        n = 12
        self.batch = {"batch_idx": torch.arange(4, device=device).repeat_interleave(n // 4).float(),
                      "cls": torch.randint(0, 80, (n, 1), generator=g).float().to(device),
                      "bboxes": (torch.rand(n, 4, generator=g) * 0.4 + 0.3).to(device)}
        self.integration = fc_ul
        self.criterion = None
        self.yolo = yolo

    def begin(self):
        self.criterion = self.model.init_criterion()  # built now: patched or stock

    def step(self):
        loss, items = self.criterion(self.model(self.images), self.batch)
        loss.sum().backward()
        return items["cls_loss"].detach() if isinstance(items, dict) else loss.detach()[1]

    @property
    def loss_owner(self):
        return self.criterion

    loss_attr = "bce"

    def loss_call(self, args, kwargs):
        pred, target = args
        self.criterion.bce(pred.detach().requires_grad_(), target).sum().backward()


FRAMEWORKS = {"retinanet": RetinaNet, "rtdetr": RTDetr, "yolov8": YOLOv8}


# ----------------------------------------------------------------------------- measuring

def measure(fw, device, steps: int, log) -> dict:
    out = {}
    for mode in ("stock", "patched"):
        ctx = fw.integration.patched() if mode == "patched" else contextlib.nullcontext()
        with ctx:
            if hasattr(fw, "begin"):
                fw.begin()
            fw.model.zero_grad(set_to_none=True)
            calls = []
            with capturing(fw.loss_owner, fw.loss_attr, calls):
                cls_loss = fw.step()  # one step with the loss's inputs captured (and the warm-up)
            fw.model.zero_grad(set_to_none=True)
            out[mode] = {"cls_loss": float(cls_loss), "loss_calls_per_step": len(calls)}
            out[mode]["peak_mb"] = peak_memory_mb(fw.step, device)
            if device.type == "cuda":
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        fw.step()
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
                out[mode]["host_syncs_per_step"] = sum("synchroniz" in str(w.message) for w in caught)

            def loss_only():
                for args, kwargs in calls:
                    fw.loss_call(args, kwargs)

            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                loss_only()
            names = [e.name for e in prof.events()]
            out[mode]["loss_op_calls"] = sum(1 for n in names if n.startswith("aten::") or "::" in n)
            out[mode]["loss_ops_focal_cuda"] = sorted({n for n in names if n.startswith("focal_cuda::")})
            samples = []
            for _ in range(max(5, 3 * steps)):
                _sync(device)
                t0 = time.perf_counter()
                loss_only()
                _sync(device)
                samples.append((time.perf_counter() - t0) * 1e3)
            out[mode]["loss_ms"] = statistics.median(samples)
            fw.model.zero_grad(set_to_none=True)
        log(f"  {mode}: classification loss {out[mode]['loss_ms']:.2f} ms per step, "
            f"{out[mode]['loss_op_calls']} op calls")
    # whole steps, stock and patched interleaved
    times = {"stock": [], "patched": []}
    for i in range(steps):
        for mode in (("stock", "patched") if i % 2 == 0 else ("patched", "stock")):
            ctx = fw.integration.patched() if mode == "patched" else contextlib.nullcontext()
            with ctx:
                if hasattr(fw, "begin"):
                    fw.begin()
                _sync(device)
                t0 = time.perf_counter()
                fw.step()
                _sync(device)
                times[mode].append((time.perf_counter() - t0) * 1e3)
                fw.model.zero_grad(set_to_none=True)
    for mode in times:
        out[mode]["step_ms"] = statistics.median(times[mode])
    out["cls_loss_rel_diff"] = abs(out["patched"]["cls_loss"] - out["stock"]["cls_loss"]) / max(
        abs(out["stock"]["cls_loss"]), 1e-30)
    return out


def markdown(results: dict, info: dict) -> str:
    lines = [f"Device: {info['device']} | torch {info['torch']} | threads {info['threads']} | {info['date']}", "",
             "| framework | mode | step ms | classification loss ms (fwd+bwd, per step) | loss calls per step "
             "| op calls in the loss | peak MB | host syncs |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        for mode in ("stock", "patched"):
            m = r[mode]
            lines.append(f"| {name} | {mode} | {m['step_ms']:.0f} | {m['loss_ms']:.2f} | {m['loss_calls_per_step']} "
                         f"| {m['loss_op_calls']} | {m['peak_mb'] if m['peak_mb'] is None else round(m['peak_mb'])} "
                         f"| {m.get('host_syncs_per_step', '-')} |")
        lines.append(f"| {name} | loss, stock / patched | {r['stock']['step_ms'] / r['patched']['step_ms']:.2f}x "
                     f"| {r['stock']['loss_ms'] / r['patched']['loss_ms']:.1f}x | | | | |")
    lines.append("")
    lines += [f"- {name}: classification loss patched vs stock, relative difference {r['cls_loss_rel_diff']:.1e}"
              for name, r in results.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.time()

    def log(msg):
        print(f"[{time.time() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    results = {}
    for key in args.frameworks.split(","):
        fw = FRAMEWORKS[key](device)
        log(fw.name)
        results[fw.name] = measure(fw, device, args.steps, log)
        del fw
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    run_dir = os.path.join(args.out, args.name or run_dir_name(device))
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "train_step.json"), "w") as f:
        json.dump({"machine": info, "results": results}, f, indent=1)
    text = markdown(results, info)
    with open(os.path.join(run_dir, "train_step.md"), "w") as f:
        f.write(f"# Training steps, stock vs focal_cuda patched\n\n{text}")
    print(text)
    ok = all(r["cls_loss_rel_diff"] < 1e-3 for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
