"""Promise: under DDP with the documented normaliser recipe (the positive count all-reduced as a
tensor, num_pos.clamp_min(1) / world_size) the gradients equal one process's on the whole batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch

import focal_cuda
from helpers import assert_close64


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


# ----------------------------------------------------------------------------- GHM-C's synced histogram

def _ghmc_worker(rank, world, port, feats, labels, state, out_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    head = torch.nn.Linear(feats.shape[-1], 12)
    head.load_state_dict(state)
    model = DDP(head)
    crit = focal_cuda.GHMCLoss(bins=10, momentum=0.75, sync_counts=True)
    shard = slice(rank * feats.shape[0] // world, (rank + 1) * feats.shape[0] // world)
    losses = []
    for _ in range(2):  # the running counts stay the same on every rank
        model.zero_grad()
        loss = crit(model(feats[shard]), labels[shard])
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total / world)
    if rank == 0:
        torch.save({"weight": head.weight.grad, "bias": head.bias.grad, "acc_sum": crit.acc_sum,
                    "losses": torch.stack(losses)}, out_path)
    dist.destroy_process_group()


def test_ghmc_sync_counts_equals_single_process(tmp_path):
    """GHMCLoss(sync_counts=True) on two ranks: the histogram summed over ranks, each rank's mean
    divided by tot / world_size, so DDP's averaged gradient, the ranks' mean loss and the running
    counts equal one process's on the whole batch."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(8)
    feats = torch.randn(16, 30, 16, generator=g)
    labels = torch.randint(-1, 13, (16, 30), generator=g)
    head = torch.nn.Linear(16, 12)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    out = str(tmp_path / "ghmc.pt")
    mp.spawn(_ghmc_worker, args=(2, _free_port(), feats, labels, state, out), nprocs=2, join=True)
    ddp = torch.load(out)

    crit = focal_cuda.GHMCLoss(bins=10, momentum=0.75)
    for step in range(2):
        head.zero_grad()
        loss = crit(head(feats), labels)
        loss.backward()
        assert_close64(ddp["losses"][step], loss.detach().double(), rtol=1e-5, atol=0)
    assert_close64(ddp["weight"], head.weight.grad.double(), rtol=1e-5, atol=1e-7)
    assert_close64(ddp["bias"], head.bias.grad.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ddp["acc_sum"], crit.acc_sum, rtol=1e-6, atol=0)
