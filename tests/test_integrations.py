"""Promise: inside detector heads focal_cuda gives the loss and gradients the framework's own code
gives -- torchvision's RetinaNet (patched head vs stock head), mmdet's FocalLoss semantics (written
from its documentation), and DDP with an all-reduced normaliser (equal to one process on the batch)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F

import focal_cuda
from helpers import assert_close64

torchvision = pytest.importorskip("torchvision")
from focal_cuda.integrations import mmdet as fc_mmdet  # noqa: E402
from focal_cuda.integrations import torchvision as fc_tv  # noqa: E402


# ----------------------------------------------------------------------------- torchvision RetinaNet

def _small_retinanet(num_classes=7):
    torch.manual_seed(0)
    return torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes, min_size=96, max_size=96
    )


def _synthetic_batch(num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 96, 96, generator=g) for _ in range(3)]
    targets = []
    for i, n in enumerate([3, 1, 0]):  # the last image has no boxes at all
        xy = torch.rand(n, 2, generator=g) * 60
        wh = torch.rand(n, 2, generator=g) * 30 + 6
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


def _cls_loss_and_grads(model, images, targets):
    model.zero_grad()
    losses = model(images, targets)
    losses["classification"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.head.classification_head.named_parameters()}
    return losses["classification"].detach(), grads


def test_patched_retinanet_matches_stock():
    C = 7
    model = _small_retinanet(C)
    model.train()
    images, targets = _synthetic_batch(C)
    stock_loss, stock_grads = _cls_loss_and_grads(model, images, targets)
    assert not fc_tv.is_patched(model)
    with fc_tv.patched_retinanet(model):
        assert fc_tv.is_patched(model)
        fused_loss, fused_grads = _cls_loss_and_grads(model, images, targets)
    assert not fc_tv.is_patched(model)
    again_loss, _ = _cls_loss_and_grads(model, images, targets)  # unpatched: stock again

    assert torch.isfinite(stock_loss) and stock_loss > 0
    assert_close64(fused_loss, stock_loss.double(), rtol=1e-5)
    assert_close64(again_loss, stock_loss.double(), rtol=1e-5)
    for name, g in stock_grads.items():
        assert_close64(fused_grads[name], g.double(), rtol=1e-4, atol=1e-5, msg=name)


def test_anchor_labels_mapping():
    targets = [{"labels": torch.tensor([4, 2])}, {"labels": torch.zeros(0, dtype=torch.int64)}]
    matched = [torch.tensor([1, -1, 0, -2, 1]), torch.tensor([-1, -2, -1])]
    labels = fc_tv.anchor_labels(targets, matched, num_classes=6)
    assert labels[0].tolist() == [2, 6, 4, -2, 2]
    assert labels[1].tolist() == [6, -2, 6]


def test_patched_retinanet_saves_loads_and_trains(device, tmp_path):
    """Whole-model checkpoints: a patched model saves with torch.save and pickle, loads back patched,
    and trains to the same loss as the model it was saved from."""
    import copy
    import pickle

    C = 7
    model = fc_tv.patch_retinanet(_small_retinanet(C)).to(device)
    model.train()
    images, targets = _synthetic_batch(C)
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    loss, _ = _cls_loss_and_grads(model, images, targets)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    clones = [torch.load(path, weights_only=False), pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]
    for clone in clones:
        assert fc_tv.is_patched(clone)
        assert clone.head.classification_head.compute_loss.head is clone.head.classification_head
        clone_loss, grads = _cls_loss_and_grads(clone, images, targets)
        assert_close64(clone_loss, loss.double(), rtol=1e-6)
        assert all(torch.isfinite(g).all() for g in grads.values())
        fc_tv.unpatch_retinanet(clone)  # and it unpatches to the stock head
        assert not fc_tv.is_patched(clone)
        stock_loss, _ = _cls_loss_and_grads(clone, images, targets)
        assert_close64(stock_loss, loss.double(), rtol=1e-5)


@pytest.mark.parametrize("bad", [7, 8, -1])
def test_patched_retinanet_rejects_a_bad_box_label(device, bad):
    """A box label outside 0..C-1 (label C, the common off-by-one, would read as background) raises
    an error naming the image, the box, its label and the range, where checking needs no host sync
    (CPU) or where validate=True; on a GPU without validate it makes the loss NaN instead."""
    C = 7
    model = fc_tv.patch_retinanet(_small_retinanet(C)).to(device)
    model.train()
    images, targets = _synthetic_batch(C)
    targets[0]["labels"][1] = bad
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    message = rf"targets\[0\]\['labels'\]\[1\] = {bad}: a box label must be a class index in 0..6 .*num_classes=7"
    if device == "cpu":
        with pytest.raises(ValueError, match=message):
            model(images, targets)
    else:
        losses = model(images, targets)
        assert torch.isnan(losses["classification"])
    fc_tv.patch_retinanet(model, validate=True)
    with pytest.raises(ValueError, match=message):
        model(images, targets)


def test_patched_retinanet_under_autocast_matches_stock():
    """Under autocast the stock head's loss is float32 (torchvision's sigmoid_focal_loss): so is the
    patched head's, and it is the float64 value of the stock formula on the same bfloat16 logits to
    float32 accuracy (a bfloat16 result would be ~1e-3 off; the stock head's own bfloat16 sigmoid
    and powers leave it about that far off too)."""
    C = 7
    model = _small_retinanet(C)
    model.train()
    images, targets = _synthetic_batch(C)
    head = model.head.classification_head
    seen = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock = model(images, targets)["classification"]
        with fc_tv.patched_retinanet(model):
            fused_compute_loss = head.compute_loss
            head.compute_loss = lambda *args: (seen.setdefault("args", args), fused_compute_loss(*args))[1]
            fused = model(images, targets)["classification"]
    assert stock.dtype == fused.dtype == torch.float32
    tgts, head_outputs, matched = seen["args"]
    assert head_outputs["cls_logits"].dtype == torch.bfloat16
    exact = type(head).compute_loss(head, tgts, {"cls_logits": head_outputs["cls_logits"].detach().double()}, matched)
    assert_close64(fused, exact, rtol=1e-5)
    assert_close64(stock, exact, rtol=3e-3)


def test_patch_rejects_other_models():
    with pytest.raises(TypeError, match="RetinaNet"):
        fc_tv.patch_retinanet(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- mmdet semantics

def mmdet_focal_loss_from_docs(pred, target, weight=None, avg_factor=None, reduction="mean", gamma=2.0, alpha=0.25,
                               loss_weight=1.0):
    """mmdet's sigmoid FocalLoss as its documentation describes it: one-hot of the labels with the
    background index C dropped, the focal formula per element, weight per anchor (broadcast over
    classes) or per element, then weight_reduce_loss: 'mean' with avg_factor = sum / (avg_factor + eps),
    'mean' = mean over elements, 'sum', 'none'; times loss_weight."""
    C = pred.shape[-1]
    onehot = F.one_hot(target, C + 1)[:, :C].to(pred.dtype)
    p = pred.sigmoid()
    pt = (1 - p) * onehot + p * (1 - onehot)
    focal_weight = (alpha * onehot + (1 - alpha) * (1 - onehot)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(pred, onehot, reduction="none") * focal_weight
    if weight is not None:
        loss = loss * (weight.view(-1, 1) if weight.dim() == 1 else weight)
    if reduction == "mean" and avg_factor is not None:
        loss = loss.sum() / (avg_factor + torch.finfo(torch.float32).eps)
    elif reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss * loss_weight


@pytest.mark.parametrize("reduction,avg", [("mean", True), ("mean", False), ("sum", False), ("none", False)])
@pytest.mark.parametrize("weight_kind", [None, "anchor", "element"])
def test_mmdet_semantics(device, reduction, avg, weight_kind):
    g = torch.Generator().manual_seed(3)
    N, C = 300, 80
    pred = (torch.randn(N, C, generator=g) * 2).double().to(device)
    target = torch.randint(0, C + 1, (N,), generator=g).to(device)  # C = background
    weight = {None: None, "anchor": torch.rand(N, generator=g), "element": torch.rand(N, C, generator=g)}[weight_kind]
    weight = None if weight is None else weight.double().to(device)
    avg_factor = ((target < C).sum().float() if avg else None)
    loss_fn = fc_mmdet.MMDetFocalLoss(gamma=2.0, alpha=0.25, reduction=reduction, loss_weight=1.5)
    x1 = pred.clone().requires_grad_()
    x2 = pred.clone().requires_grad_()
    ours = loss_fn(x1, target, weight=weight, avg_factor=avg_factor)
    ref = mmdet_focal_loss_from_docs(x2, target, weight, avg_factor, reduction, loss_weight=1.5)
    assert ours.shape == ref.shape
    assert_close64(ours, ref, rtol=1e-10, atol=1e-12)
    go = torch.rand_like(ref)
    ours.backward(go)
    ref.backward(go)
    assert_close64(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)


def test_mmdet_reduction_override_and_registry():
    loss_fn = fc_mmdet.MMDetFocalLoss(reduction="mean")
    pred = torch.randn(10, 4)
    target = torch.randint(0, 5, (10,))
    assert loss_fn(pred, target, reduction_override="none").shape == (10, 4)
    with pytest.raises(ValueError, match="use_sigmoid"):
        fc_mmdet.MMDetFocalLoss(use_sigmoid=False)
    assert fc_mmdet.register_with_mmdet() in (True, False)  # False without mmdet installed


# ----------------------------------------------------------------------------- DDP

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, feats, labels, state, out_path, recipe):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    head = torch.nn.Linear(feats.shape[-1], 12)
    head.load_state_dict(state)
    model = DDP(head)
    shard = slice(rank * feats.shape[0] // world, (rank + 1) * feats.shape[0] // world)
    f, lab = feats[shard], labels[shard]
    # as detectors do: the positive count all-reduced (a device tensor, no host sync), averaged over ranks
    num_pos = ((lab >= 0) & (lab < 12)).sum().float()
    dist.all_reduce(num_pos)
    if recipe == "documented":
        normalizer = num_pos.clamp_min(1.0) / world
    else:  # what the documentation once said: wrong when the batch has fewer positives than ranks
        normalizer = (num_pos / world).clamp_min(1.0)
    loss = focal_cuda.sigmoid_focal_loss(model(f), lab, reduction="sum", normalizer=normalizer)
    loss.backward()  # DDP averages the gradients over ranks
    if rank == 0:
        torch.save({"weight": head.weight.grad, "bias": head.bias.grad}, out_path)
    dist.destroy_process_group()


def _ddp_gradients(tmp_path, feats, labels, head, recipe):
    import torch.multiprocessing as mp

    state = {k: v.clone() for k, v in head.state_dict().items()}
    out = str(tmp_path / f"grads-{recipe}.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), feats, labels, state, out, recipe), nprocs=2, join=True)
    return torch.load(out)


@pytest.mark.parametrize("positives", ["many", "one"])
def test_ddp_gradients_equal_single_process(tmp_path, positives):
    """The README's recipe, num_pos.clamp_min(1) / world_size, gives one process's gradient on the
    whole batch; also with a single positive in the global batch (fewer than ranks), where the old
    (num_pos / world_size).clamp_min(1) gave half of it."""
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(64, 20, 16, generator=g)
    labels = torch.randint(-1, 13, (64, 20), generator=g)  # -1 ignored, 12 background
    if positives == "one":
        labels = torch.where(labels < 12, torch.full_like(labels, 12), labels)
        labels[40, 3] = 5  # on the second rank
    head = torch.nn.Linear(16, 12)
    ddp = _ddp_gradients(tmp_path, feats, labels, head, "documented")

    num_pos = ((labels >= 0) & (labels < 12)).sum().float().clamp_min(1.0)
    focal_cuda.sigmoid_focal_loss(head(feats), labels, reduction="sum", normalizer=num_pos).backward()
    assert_close64(ddp["weight"], head.weight.grad.double(), rtol=1e-5, atol=1e-7)
    assert_close64(ddp["bias"], head.bias.grad.double(), rtol=1e-5, atol=1e-7)
    if positives == "one":  # the old recipe is off by the number of ranks here
        old = _ddp_gradients(tmp_path, feats, labels, head, "old")
        assert_close64(old["bias"] * 2, head.bias.grad.double(), rtol=1e-5, atol=1e-7)
