"""DistributedDataParallel: a TeS step on 2 gloo ranks gives the gradients of one process."""
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import tesloss

WORLD = 2
BATCH_PER_RANK, IN_FEATURES, WIDTH, NUM_CLASSES, TEXT_DIM = 4, 12, 24, 6, 8
TIMEOUT_S = 90

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def make_model():
    """The same weights in every process: a small backbone, then TeSHead."""
    generator = torch.Generator().manual_seed(0)
    text_head = F.normalize(torch.randn(NUM_CLASSES, TEXT_DIM, generator=generator), dim=1)
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(IN_FEATURES, WIDTH), nn.ReLU())
    return nn.Sequential(backbone, tesloss.TeSHead(WIDTH, text_head, proj_hidden=16))


def make_batch():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(WORLD * BATCH_PER_RANK, IN_FEATURES, generator=generator)
    target = torch.randint(0, NUM_CLASSES, (WORLD * BATCH_PER_RANK,), generator=generator)
    return inputs, target


def shard(tensor, rank):
    return tensor[rank * BATCH_PER_RANK:(rank + 1) * BATCH_PER_RANK]


def tes_loss_of(model, inputs, target):
    vis_logits, txt_logits = model(inputs)
    return tesloss.fused_tes_loss(vis_logits, txt_logits, target)


def step_on_rank(rank, out_dir):
    torch.set_num_threads(1)  # two ranks share a small machine
    # A file store, not a TCP one: with TCP, rank 0 hosts the store and can
    # exit while rank 1 is still tearing down, which aborts rank 1
    # ("terminate called without an active exception").
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}",
                            rank=rank, world_size=WORLD, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        inputs, target = make_batch()
        tes_loss_of(ddp, shard(inputs, rank), shard(target, rank)).backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears down while the other still works
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_single_process_gradients(tmp_path):
    context = mp.start_processes(step_on_rank, args=(str(tmp_path),), nprocs=WORLD,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + 2 * TIMEOUT_S
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} ranks did not finish in {2 * TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()

    # DDP normalizes each rank's half batch with that half's BatchNorm statistics (SyncBatchNorm
    # has no CPU kernel) and averages the ranks' gradients, so one process runs the same halves
    # in train mode and averages their losses.
    model = make_model()
    inputs, target = make_batch()
    losses = [tes_loss_of(model, shard(inputs, rank), shard(target, rank))
              for rank in range(WORLD)]
    (sum(losses) / WORLD).backward()
    expected = {name: p.grad for name, p in model.named_parameters()}
    assert all(grad.abs().sum() > 0 for grad in expected.values())

    for rank in range(WORLD):
        grads = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert grads.keys() == expected.keys()
        worst = max((grads[name] - expected[name]).abs().max().item() for name in expected)
        assert worst < 1e-5, f"rank {rank}: max gradient difference {worst:.3g}"
