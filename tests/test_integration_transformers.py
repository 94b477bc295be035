"""Promise: with focal_cuda patched into HF transformers, the DETR-family criteria (RT-DETR's
varifocal, focal and BCE terms, D-FINE's by inheritance, Deformable DETR's focal loss, LW-DETR's
and RF-DETR's IoU-aware BCE) give the stock values and gradients from the matcher's labels and IoU
scores, a whole model trains as stock with the fused op running, and the drop-in sigmoid_focal_loss
equals transformers' own."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close64, focal_ops_called

transformers = pytest.importorskip("transformers")
pytest.importorskip("scipy")  # the Hungarian matcher
from transformers.loss import loss_for_object_detection as lod  # noqa: E402
from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher, DeformableDetrImageLoss  # noqa: E402
from transformers.loss.loss_lw_detr import LwDetrHungarianMatcher, LwDetrImageLoss  # noqa: E402
from transformers.loss.loss_rt_detr import RTDetrLoss  # noqa: E402

from focal_cuda.integrations import transformers as fc_hf  # noqa: E402

B, Q, C = 2, 40, 7


def _outputs_and_targets(device, seed=1):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, Q, C, generator=g) * 2).to(device).requires_grad_()
    boxes = (torch.rand(B, Q, 4, generator=g) * 0.5 + 0.25).to(device).requires_grad_()
    targets = [{"class_labels": torch.randint(0, C, (n,), generator=g).to(device),
                "boxes": (torch.rand(n, 4, generator=g) * 0.4 + 0.3).to(device)} for n in (4, 0)]
    return logits, boxes, targets


def _criteria():
    rt = RTDetrLoss(transformers.RTDetrConfig(num_labels=C))
    rt_bce = RTDetrLoss(transformers.RTDetrConfig(num_labels=C))
    rt_bce.losses = ["bce", "boxes"]
    rt_bce.weight_dict["loss_bce"] = 1.0
    deformable = DeformableDetrImageLoss(DeformableDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2),
                                         num_classes=C, focal_alpha=0.25, losses=["labels", "boxes"])
    lw = LwDetrImageLoss(LwDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2), num_classes=C,
                         focal_alpha=0.25, losses=["labels", "boxes"], group_detr=1)
    return {"rt_detr_vfl": (rt, "loss_vfl"), "rt_detr_bce": (rt_bce, "loss_bce"),
            "deformable_detr": (deformable, "loss_ce"), "lw_detr": (lw, "loss_ce")}


@pytest.mark.parametrize("name", ["rt_detr_vfl", "rt_detr_bce", "deformable_detr", "lw_detr"])
def test_criteria_match_stock(device, name):
    crit, key = _criteria()[name]

    def run():
        logits, boxes, targets = _outputs_and_targets(device)
        loss = crit({"logits": logits, "pred_boxes": boxes}, targets)[key]
        loss.backward()
        return loss.detach(), logits.grad

    stock = run()
    with fc_hf.patched():
        fused = run()
        ops = focal_ops_called(run)
    assert ops & {"focal_cuda::varifocal_loss_fwd", "focal_cuda::sigmoid_focal_loss_fwd",
                  "focal_cuda::iou_aware_bce_loss_fwd"}
    assert_close64(fused[0], stock[0].double(), rtol=1e-5)
    assert_close64(fused[1], stock[1].double(), rtol=1e-4, atol=1e-7)


def test_rt_detr_focal_term_equals_transformers_formula(device):
    """RT-DETR's loss_labels_focal (stock, it fails: its one-hot target is integer) equals
    transformers' sigmoid_focal_loss on the float one-hot, times Q."""
    crit = RTDetrLoss(transformers.RTDetrConfig(num_labels=C))
    logits, boxes, targets = _outputs_and_targets(device)
    indices = crit.matcher({"logits": logits, "pred_boxes": boxes}, targets)
    with fc_hf.patched():
        got = crit.loss_labels_focal({"logits": logits}, targets, indices, 3.0)["loss_focal"]
    labels, _ = fc_hf.matched_labels(logits, targets, indices, C)
    onehot = torch.nn.functional.one_hot(labels, C + 1)[..., :C].float()
    expected = lod.sigmoid_focal_loss(logits, onehot, 3.0, crit.alpha, crit.gamma) * Q
    assert_close64(got, expected.double(), rtol=1e-5)


def test_inherited_criteria_use_the_patch():
    from transformers.loss.loss_d_fine import DFineLoss
    from transformers.loss.loss_rf_detr import RfDetrImageLoss

    with fc_hf.patched():
        assert DFineLoss.loss_labels_vfl is fc_hf._rt_detr_loss_labels_vfl
        assert RfDetrImageLoss.loss_labels is fc_hf._lw_detr_loss_labels
    assert RfDetrImageLoss.loss_labels is not fc_hf._lw_detr_loss_labels


@pytest.mark.parametrize("shape", [(2, 30, 5), (50, 6)])
@pytest.mark.parametrize("num_boxes", [3.0, "tensor"])
def test_sigmoid_focal_loss_dropin(device, shape, num_boxes):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g).to(device)
    t = (torch.rand(shape, generator=g) < 0.2).float().to(device)
    n = torch.tensor(3.0, device=device) if num_boxes == "tensor" else num_boxes
    for alpha in (0.25, -1.0):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = fc_hf.sigmoid_focal_loss(xa, t, n, alpha, 2)
        theirs = lod.sigmoid_focal_loss(xb, t, n, alpha, 2)
        ours.backward()
        theirs.backward()
        assert_close64(ours, theirs.double(), rtol=1e-5)
        assert_close64(xa.grad, xb.grad.double(), rtol=1e-5, atol=1e-7)


def tiny_rt_detr(num_labels=5):
    bb = transformers.RTDetrResNetConfig(depths=[1, 1, 1, 1], out_features=["stage2", "stage3", "stage4"])
    cfg = transformers.RTDetrConfig(backbone_config=bb, num_labels=num_labels, decoder_layers=2, num_queries=50,
                                    num_denoising=20, encoder_ffn_dim=256, decoder_ffn_dim=256,
                                    use_pretrained_backbone=False)
    torch.manual_seed(0)
    return transformers.RTDetrForObjectDetection(cfg)


def test_rt_detr_model_trains_as_stock(tmp_path):
    """A whole RT-DETR (all decoder layers, denoising groups): the same losses and classifier
    gradients patched as stock; the fused varifocal op runs; a model saved patched loads and runs."""
    model = tiny_rt_detr()
    model.train()
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 128, 128, generator=g)
    labels = [{"class_labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3]])},
              {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]

    def step():
        model.zero_grad()
        torch.manual_seed(1)  # the denoising queries are random
        out = model(pixel_values=pixels, labels=labels)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.model.decoder.class_embed.parameters()]
        return {k: v.item() for k, v in out.loss_dict.items() if "vfl" in k}, grads

    stock = step()
    with fc_hf.patched():
        fused = step()
        ops = focal_ops_called(step)
        torch.save(model, tmp_path / "m.pt")
    assert "focal_cuda::varifocal_loss_fwd" in ops
    assert stock[0].keys() == fused[0].keys() and len(stock[0]) >= 3
    for k in stock[0]:
        assert fused[0][k] == pytest.approx(stock[0][k], rel=1e-4), k
    assert len(stock[1]) == 4
    for a, b in zip(fused[1], stock[1]):
        assert_close64(a, b.double(), rtol=1e-3, atol=1e-6)
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with fc_hf.patched():
        assert torch.isfinite(loaded(pixel_values=pixels, labels=labels).loss)
