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
from conftest import assert_close64

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


def _ddp_worker(rank, world, port, feats, labels, state, out_path):
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
    normalizer = (num_pos / world).clamp_min(1.0)
    loss = focal_cuda.sigmoid_focal_loss(model(f), lab, reduction="sum", normalizer=normalizer)
    loss.backward()  # DDP averages the gradients over ranks
    if rank == 0:
        torch.save({"weight": head.weight.grad, "bias": head.bias.grad}, out_path)
    dist.destroy_process_group()


def test_ddp_gradients_equal_single_process(tmp_path):
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(5)
    feats = torch.randn(64, 20, 16, generator=g)
    labels = torch.randint(-1, 13, (64, 20), generator=g)  # -1 ignored, 12 background
    head = torch.nn.Linear(16, 12)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    out = str(tmp_path / "grads.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), feats, labels, state, out), nprocs=2, join=True)
    ddp = torch.load(out)

    num_pos = ((labels >= 0) & (labels < 12)).sum().float().clamp_min(1.0)
    focal_cuda.sigmoid_focal_loss(head(feats), labels, reduction="sum", normalizer=num_pos).backward()
    assert_close64(ddp["weight"], head.weight.grad.double(), rtol=1e-5, atol=1e-7)
    assert_close64(ddp["bias"], head.bias.grad.double(), rtol=1e-5, atol=1e-7)
