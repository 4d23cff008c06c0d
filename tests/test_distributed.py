"""Prototype synchronisation across two processes (gloo): official and exact modes."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from protoseg_ext import ProtoSegHead
from protoseg_ext import reference as R

HERE = os.path.dirname(os.path.abspath(__file__))


def _data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, 16, 5, 6, generator=g)
    gt = torch.randint(0, 4, (2, 5, 6), generator=g)
    gt[torch.rand(2, 5, 6, generator=g) < 0.1] = -1
    return x, gt


def _head(sync, backend):
    torch.manual_seed(0)
    return ProtoSegHead(16, 4, num_prototype=3, gamma=0.5, assign="argmax", sync=sync, backend=backend)


def _worker(rank, world, init_file, out_dir, sync, backend):
    sys.path.insert(0, HERE)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        head = _head(sync, backend)
        x, gt = _data(rank)
        head(x, gt)
        torch.save(head.prototypes, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(tmp_path, sync, backend):
    init_file = tmp_path / "init"
    mp.start_processes(_worker, args=(2, str(init_file), str(tmp_path), sync, backend), nprocs=2, join=True,
                       start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def _local(rank):
    """What rank `rank` computes alone: (embedded feats, protos, gt, seg logits)."""
    head = _head("none", "reference").eval()
    x, gt = _data(rank)
    with torch.no_grad():
        f = head.embed(x)
        protos = head.prototypes
        seg = head.mask_norm(R.proto_seg_logits(f, protos))
    return f, protos, gt.view(-1), seg


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_official_sync_averages_updated_prototypes(tmp_path, backend):
    got = _run(tmp_path, "official", backend)
    per_rank = []
    for r in range(2):
        f, p, gt, seg = _local(r)
        per_rank.append(R.prototype_learning(f, p, gt, seg, gamma=0.5, assign="argmax")[1])
    expect = (per_rank[0] + per_rank[1]) / 2
    assert torch.equal(got[0], got[1])
    torch.testing.assert_close(got[0], expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_exact_sync_applies_the_global_mean(tmp_path, backend):
    got = _run(tmp_path, "exact", backend)
    sums, counts = 0, 0
    for r in range(2):
        f, p, gt, seg = _local(r)
        _, _, s, c = R.prototype_learning(f, p, gt, seg, gamma=0.5, assign="argmax", return_sums=True)
        sums, counts = sums + s, counts + c
    expect = R.prototype_ema(p, sums, counts, 0.5)
    assert torch.equal(got[0], got[1])
    torch.testing.assert_close(got[0], expect, atol=1e-5, rtol=1e-5)
    # and it differs from the official average (the two modes are not the same thing)
    per_rank = [R.prototype_learning(*_local(r), gamma=0.5, assign="argmax")[1] for r in range(2)]
    assert not torch.allclose(got[0], (per_rank[0] + per_rank[1]) / 2, atol=1e-4)
