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


# ---------------------------------------------------------------- exact mode == one process on the union

D, C, K = 16, 4, 3


def _centres():
    """Zero-mean unit prototypes: the head's LayerNorm over D keeps their direction."""
    g = torch.Generator().manual_seed(7)
    p = torch.randn(C, K, D, generator=g, dtype=torch.float64)
    return torch.nn.functional.normalize(p - p.mean(-1, keepdim=True), dim=-1).float()


def _clustered_data(rank):
    """(x (2, D, 6, 8), gt (2, 6, 8)) for `rank`: every pixel near one prototype of its class,
    every (class, prototype) present on every rank, per-rank counts that differ."""
    g = torch.Generator().manual_seed(300 + rank)
    n = 2 * 6 * 8
    slot = torch.cat([torch.arange(C * K), torch.randint(0, C * K if rank == 0 else K * 2, (n - C * K,), generator=g)])
    slot = slot[torch.randperm(n, generator=g)]
    x = _centres().view(C * K, D)[slot] + 0.05 * torch.randn(n, D, generator=g)
    gt = slot // K
    gt[torch.rand(n, generator=g) < 0.1] = -1
    return x.view(2, 6, 8, D).permute(0, 3, 1, 2).contiguous(), gt.view(2, 6, 8)


def _clustered_head(sync, backend):
    head = _head(sync, backend)
    head.gamma = 0.5
    with torch.no_grad():
        head.prototypes.copy_(_centres())
    return head


def _clustered_worker(rank, world, init_file, out_dir, sync, backend):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        head = _clustered_head(sync, backend)
        head(*_clustered_data(rank))
        torch.save(head.prototypes, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _union_run(backend):
    """One process, one step on the pixels of both ranks: (new prototypes, targets local vs union)."""
    head = _clustered_head("none", backend)
    (x0, g0), (x1, g1) = _clustered_data(0), _clustered_data(1)
    x, gt = torch.cat([x0, x1]), torch.cat([g0, g1])
    with torch.no_grad():  # the premise: Sinkhorn gives each pixel the same prototype locally and on the union
        def targets(xs, gs):
            f = head.embed(xs)
            seg = head.mask_norm(R.proto_seg_logits(f, head.prototypes))
            return R.prototype_learning(f, head.prototypes, gs.view(-1), seg, gamma=0.5, assign="argmax")[0]

        local = torch.cat([targets(x0, g0), targets(x1, g1)])
        union = targets(x, gt)
    head(x, gt)
    return head.prototypes, local, union


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_exact_sync_equals_one_process_on_the_union_of_pixels(tmp_path, backend):
    mp.start_processes(_clustered_worker, args=(2, str(tmp_path / "init"), str(tmp_path), "exact", backend), nprocs=2,
                       join=True, start_method="spawn")  # fmt: skip
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    expect, local, union = _union_run(backend)
    assert torch.equal(local, union)
    assert torch.equal(got[0], got[1])  # both ranks hold the same prototypes
    torch.testing.assert_close(got[0], expect, atol=1e-6, rtol=1e-6)
    assert (expect - _centres()).abs().max() > 1e-3  # the step did move the prototypes

    if backend != "cpu":
        return
    # the official average of per-rank updates is a different thing on the same data
    (tmp_path / "official").mkdir()
    mp.start_processes(_clustered_worker, args=(2, str(tmp_path / "init2"), str(tmp_path / "official"), "official",
                       backend), nprocs=2, join=True, start_method="spawn")  # fmt: skip
    official = torch.load(tmp_path / "official" / "rank0.pt")
    assert not torch.allclose(official, expect, atol=1e-4)


# ---------------------------------------------------------------- collectives and interpreter exit


def _kept_worker(rank, world, init_file, out_dir):
    import threading
    import time
    import weakref

    from protoseg_ext.head import _all_reduce

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        freed_on = []
        t = torch.full((64,), float(rank + 1))
        weakref.finalize(t, lambda: freed_on.append(threading.get_ident()))
        _all_reduce(t)
        reduced = t.clone()
        del t
        time.sleep(0.2)  # time enough for gloo's worker thread to drop its work
        alive_after_return = not freed_on
        _all_reduce(torch.zeros(1))  # the next collective releases the previous one's works
        torch.save({"sum": reduced, "alive": alive_after_return, "freed_on_main": freed_on == [threading.get_ident()]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_collective_tensors_are_freed_on_the_calling_thread(tmp_path):
    """A tensor made in Python and freed on gloo's worker thread takes the GIL there; during interpreter
    exit that aborts the process. _all_reduce keeps the works so that the caller's thread frees them."""
    mp.start_processes(_kept_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")  # fmt: skip
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert torch.equal(got["sum"], torch.full((64,), 3.0))
        assert got["alive"], "the work's tensor was freed before the next collective (by gloo's thread)"
        assert got["freed_on_main"], "the work's tensor was not freed on the thread that ran the collective"
