"""Promise: focal_cuda inside torchvision gives torchvision's own values and gradients: the drop-in
sigmoid_focal_loss (signature, errors, torch.jit.script), patch() of torchvision's modules and
classes (the fused op is what runs), and the patched RetinaNet head per model (checkpoints, bad box
labels, autocast)."""

from __future__ import annotations

import pytest
import torch

import focal_cuda
from helpers import assert_close64, focal_ops_called

torchvision = pytest.importorskip("torchvision")
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




# ----------------------------------------------------------------------------- the drop-in and patch()

@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("scripted", [False, True])
def test_dropin_equals_torchvision(device, reduction, scripted):
    tv_ops = torchvision.ops
    fn = torch.jit.script(fc_tv.sigmoid_focal_loss) if scripted else fc_tv.sigmoid_focal_loss
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(3, 40, 91, generator=g) * 2).to(device)
    t = (torch.rand(3, 40, 91, generator=g) < 0.1).float().to(device)
    for alpha, gamma in ((0.25, 2.0), (-1.0, 1.5)):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = fn(xa, t, alpha, gamma, reduction)
        theirs = tv_ops.sigmoid_focal_loss(xb, t, alpha, gamma, reduction)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        assert_close64(ours, theirs.double(), rtol=1e-5, atol=1e-6)
        go = torch.rand_like(ours)
        ours.backward(go)
        theirs.backward(go)
        assert_close64(xa.grad, xb.grad.double(), rtol=1e-5, atol=1e-6)
    empty = torch.zeros(0, 5, device=device)
    if reduction == "mean":  # torchvision's mean of nothing is NaN
        assert torch.isnan(fn(empty, empty, 0.25, 2.0, "mean"))


def test_dropin_errors_are_torchvision_s():
    x = torch.randn(2, 3)
    for fn in (fc_tv.sigmoid_focal_loss, torchvision.ops.sigmoid_focal_loss):
        with pytest.raises(ValueError, match=r"Invalid alpha value: 2.0. alpha must be in the range \[0,1\] or -1"):
            fn(x, torch.zeros(2, 3), alpha=2.0)
        with pytest.raises(ValueError, match=r"Invalid Value for arg 'reduction': 'avg"):
            fn(x, torch.zeros(2, 3), reduction="avg")


def test_patch_installs_the_dropins_everywhere_torchvision_uses_them():
    stock_fn = torchvision.ops.sigmoid_focal_loss
    head_cls = torchvision.models.detection.retinanet.RetinaNetClassificationHead
    stock_compute = head_cls.compute_loss
    with fc_tv.patched():
        assert torchvision.ops.sigmoid_focal_loss is fc_tv.sigmoid_focal_loss
        assert torchvision.models.detection.retinanet.sigmoid_focal_loss is fc_tv.sigmoid_focal_loss
        assert torchvision.models.detection.fcos.sigmoid_focal_loss is fc_tv.sigmoid_focal_loss
        assert head_cls.compute_loss is not stock_compute
    assert torchvision.ops.sigmoid_focal_loss is stock_fn
    assert torchvision.models.detection.fcos.sigmoid_focal_loss is stock_fn
    assert head_cls.compute_loss is stock_compute


def test_patch_trains_every_retinanet_as_stock_and_runs_the_fused_op():
    """patch() reaches models built before it, through torchvision's own class: same loss and
    gradients, and the profiler sees the fused op (and no torchvision formula)."""
    C = 7
    model = _small_retinanet(C)
    model.train()
    images, targets = _synthetic_batch(C)
    stock_loss, stock_grads = _cls_loss_and_grads(model, images, targets)
    with fc_tv.patched():
        fused_loss, fused_grads = _cls_loss_and_grads(model, images, targets)
        ops = focal_ops_called(lambda: model(images, targets)["classification"].backward())
    assert "focal_cuda::sigmoid_focal_loss_fwd" in ops
    assert_close64(fused_loss, stock_loss.double(), rtol=1e-5)
    for name, g in stock_grads.items():
        assert_close64(fused_grads[name], g.double(), rtol=1e-4, atol=1e-5, msg=name)


def test_patch_covers_fcos():
    """FCOS calls torchvision.ops.sigmoid_focal_loss on its dense targets: the patched function."""
    torch.manual_seed(0)
    model = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5,
                                                           min_size=96, max_size=96)
    model.train()
    images, targets = _synthetic_batch(5)
    stock = model(images, targets)["classification"]
    with fc_tv.patched():
        fused = model(images, targets)["classification"]
        ops = focal_ops_called(lambda: model(images, targets))
    assert "focal_cuda::sigmoid_focal_loss_fwd" in ops
    assert_close64(fused, stock.double(), rtol=1e-5)
