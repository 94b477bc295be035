"""Promise: with focal_cuda patched into ultralytics, YOLOv8's classification BCE, RT-DETR's
varifocal, focal and BCE terms and the VarifocalLoss / FocalLoss classes give the stock values and
gradients, with the fused op running; a criterion with class weights keeps the stock BCE."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close64, focal_ops_called

pytest.importorskip("ultralytics")
import ultralytics.utils.loss as yolo_loss  # noqa: E402
from ultralytics.models.utils.loss import DETRLoss  # noqa: E402

from focal_cuda.integrations import ultralytics as fc_ul  # noqa: E402


def test_loss_classes_equal_stock(device):
    g = torch.Generator().manual_seed(0)
    B, N, C = 2, 40, 6
    pred = torch.randn(B, N, C, generator=g).to(device)
    lab = torch.randint(0, C + 1, (B, N), generator=g)
    onehot = torch.nn.functional.one_hot(lab, C + 1)[..., :C].to(device)
    score = torch.rand(B, N, generator=g)
    score[0, :5] = 0.0  # positives with a score of 0: weight 0, as ultralytics has it
    gt = score.to(device)[..., None] * onehot
    for stock, ours, args in ((yolo_loss.VarifocalLoss(), fc_ul.VarifocalLoss(), (gt, onehot)),
                              (yolo_loss.FocalLoss(), fc_ul.FocalLoss(), (onehot.float(),)),
                              (yolo_loss.FocalLoss(alpha=0.0), fc_ul.FocalLoss(alpha=0.0), (onehot.float(),))):
        a, b = pred.clone().requires_grad_(), pred.clone().requires_grad_()
        la, lb = stock(a, *args), ours(b, *args)
        la.backward()
        lb.backward()
        assert_close64(lb, la.double(), rtol=1e-5)
        assert_close64(b.grad, a.grad.double(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("use_fl,use_vfl", [(True, True), (True, False), (False, False)])
def test_rt_detr_class_term_matches_stock(device, use_fl, use_vfl):
    g = torch.Generator().manual_seed(0)
    L, B, Q, C = 3, 2, 30, 6
    scores = torch.randn(L, B, Q, C, generator=g).to(device)
    bboxes = (torch.rand(L, B, Q, 4, generator=g) * 0.5 + 0.25).to(device)
    batch = {"cls": torch.tensor([1, 4, 0, 2, 5], device=device),
             "bboxes": (torch.rand(5, 4, generator=g) * 0.4 + 0.3).to(device), "gt_groups": [3, 2]}

    def run():
        s, b = scores.clone().requires_grad_(), bboxes.clone().requires_grad_()
        out = DETRLoss(nc=C, use_fl=use_fl, use_vfl=use_vfl)(b, s, batch)
        sum(v for k, v in out.items() if "class" in k).backward()
        return {k: v.item() for k, v in out.items() if "class" in k}, s.grad

    stock = run()
    with fc_ul.patched():
        fused = run()
        ops = focal_ops_called(run)
    assert ops & {"focal_cuda::varifocal_loss_fwd", "focal_cuda::sigmoid_focal_loss_fwd"}
    for k in stock[0]:
        assert fused[0][k] == pytest.approx(stock[0][k], rel=1e-5), k
    assert_close64(fused[1], stock[1].double(), rtol=1e-4, atol=1e-8)


def tiny_yolo(nc=5):
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=nc, verbose=False)
    model.args = get_cfg()
    return model


def _yolo_batch(device="cpu"):
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 160, 160, generator=g).to(device), {
        "batch_idx": torch.tensor([0.0, 0.0, 1.0], device=device), "cls": torch.tensor([[1.0], [3.0], [0.0]], device=device),
        "bboxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]], device=device)}


def test_yolov8_detection_loss_matches_stock(tmp_path):
    model = tiny_yolo()
    model.train()
    images, batch = _yolo_batch()

    def step():
        model.zero_grad()
        loss, items = model.init_criterion()(model(images), batch)
        loss.sum().backward()
        return torch.stack([v.detach() for v in items.values()]), model.model[-1].cv3[0][2].weight.grad.clone()

    stock = step()
    with fc_ul.patched():
        assert isinstance(model.init_criterion().bce, fc_ul.SummedSoftBCE)
        fused = step()
        ops = focal_ops_called(step)
        torch.save(model, tmp_path / "yolo.pt")
    assert "focal_cuda::sigmoid_focal_loss_fwd" in ops
    assert_close64(fused[0], stock[0].double(), rtol=1e-5)
    assert_close64(fused[1], stock[1].double(), rtol=1e-4, atol=1e-7)
    assert isinstance(model.init_criterion().bce, torch.nn.BCEWithLogitsLoss)  # unpatched
    loaded = torch.load(tmp_path / "yolo.pt", weights_only=False)
    with fc_ul.patched():
        loss, _ = loaded.init_criterion()(loaded(images), batch)
    assert torch.isfinite(loss).all()


def test_class_weights_keep_the_stock_bce():
    model = tiny_yolo()
    model.class_weights = torch.ones(5)
    with fc_ul.patched():
        assert isinstance(model.init_criterion().bce, torch.nn.BCEWithLogitsLoss)
