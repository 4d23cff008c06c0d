"""The errors of bad input and the process-level corner cases (threads, environment).

The legal corner cases of docs/design.md, "Numerics and edge cases" (absent, single-pixel and mispredicted classes, all
pixels ignored, empty batch, non-finite rows, labels out of range) run on every backend in the op x
backend table, protoseg_ext/testing/test_backends.py."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import protoseg_ext
import protoseg_ext.functional as PF
from protoseg_ext.testing import make_problem

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda f, p, gt, seg: PF.proto_seg_logits(f[0], p), "feats must be a \\(N, D\\)"),
        (lambda f, p, gt, seg: PF.proto_seg_logits(f, p[0]), "protos must be a \\(C, K, D\\)"),
        (lambda f, p, gt, seg: PF.proto_seg_logits(f, p[..., :3]), "D = feats.shape\\[1\\]"),
        (lambda f, p, gt, seg: PF.proto_seg_logits(f.long(), p), "feats must be float"),
        (lambda f, p, gt, seg: PF.prototype_learning(f, p, gt[:5], seg), "gt must be a"),
        (lambda f, p, gt, seg: PF.prototype_learning(f, p, gt.float(), seg), "gt must be an integer"),
        (lambda f, p, gt, seg: PF.prototype_learning(f, p, gt, seg[:, :2]), "seg must be"),
        (lambda f, p, gt, seg: PF.prototype_learning(f, p, gt, seg, assign="soft"), "assign"),
        (lambda f, p, gt, seg: PF.prototype_learning(f, p, gt, seg, gamma=1.5), "gamma"),
        (lambda f, p, gt, seg: PF.prototype_learning(f, p, gt, seg, sinkhorn_iters=0), "sinkhorn_iters"),
        (lambda f, p, gt, seg: PF.prototype_learning(f, p, gt, seg, sinkhorn_eps=0.0), "sinkhorn_eps"),
        (lambda f, p, gt, seg: PF.prototype_learning(f, p, gt, seg, gumbel_noise=torch.zeros(3, 3)), "gumbel_noise"),
        (lambda f, p, gt, seg: PF.prototype_learning(f, p, gt, seg, ignore_index=4), "ignore_index 4"),
        (lambda f, p, gt, seg: PF.proto_losses(f, p, gt.long(), temperature=0), "temperature"),
        (lambda f, p, gt, seg: PF.proto_seg_logits(f, p, backend="gpu"), "backend must be one of"),
    ],
)
def test_bad_arguments_name_the_argument(call, match):
    f, p, gt, seg = make_problem(N=20, C=3, K=2)
    with pytest.raises(ValueError, match=match):
        call(f, p, gt, seg)


def test_device_mismatch_is_a_value_error():
    f, p, gt, seg = make_problem(N=20, C=3, K=2)
    with pytest.raises(ValueError, match="protos is on meta"):
        PF.proto_seg_logits(f, p.to("meta"))


def test_explicit_backend_that_cannot_run_says_why():
    f, p, _, _ = make_problem(N=20, C=3, K=2)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu: .*"):
        PF.proto_seg_logits(f, p, backend="cuda")


def test_env_var_overrides_auto(monkeypatch):
    from protoseg_ext import backends

    monkeypatch.setenv("PROTOSEG_BACKEND", "reference")
    assert backends.resolve("auto", "cpu").name == "reference"
    assert backends.resolve("cpu", "cpu").name == "cpu"  # an explicit choice wins
    monkeypatch.setenv("PROTOSEG_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        backends.resolve("auto", "cpu")
    monkeypatch.delenv("PROTOSEG_BACKEND")
    assert backends.resolve("auto", "cpu").name == "cpu"


_THREADS_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(int(sys.argv[1]))
    sys.path.insert(0, sys.argv[2])
    from protoseg_ext.testing import make_problem
    import protoseg_ext.functional as PF
    f, p, gt, seg = make_problem(N=20000, D=64, C=19, K=10, skew=True)
    torch.manual_seed(0)
    t, new = PF.prototype_learning(f, p, gt, seg, gamma=0.9, backend="cpu")
    a = f.clone().requires_grad_()
    ppc, ppd = PF.proto_losses(a, p, t, backend="cpu")
    (ppc + ppd).backward()
    seg2 = PF.proto_seg_logits(f, p, backend="cpu")
    # the head's embedding on an NCHW map: several tiles per image, LayerNorm weight and bias gradients
    from protoseg_ext import backends
    be = backends.get_backend("cpu")
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 48, 40, 60, generator=g) + 0.3).requires_grad_()
    w, b = (torch.randn(48, generator=g).requires_grad_() for _ in range(2))
    q = torch.nn.functional.normalize(torch.randn(19, 10, 48, generator=g), dim=-1)
    lab = torch.randint(-1, 19, (4800,), generator=g)
    outs = {}
    for cache in (0, 1 << 30):
        o = be.embed_similarity(x, (w, b, 1e-5), q, lab, seg=True, lse=True, own=True, cache_bytes=cache)
        gx, gw, gb = torch.autograd.grad(o.seg.sum() + o.lse.sum() + o.own.sum(), (x, w, b))
        outs.update({f"emb{cache}": o.lse, f"gx{cache}": gx, f"gw{cache}": gw, f"gb{cache}": gb})
    sums, counts = be.embed_prototype_sums(x.detach(), (w, b, 1e-5), torch.randint(-1, 190, (4800,), generator=g), 190)
    torch.save({"t": t, "new": new, "ppc": ppc.detach(), "grad": a.grad, "seg": seg2, "sums": sums, **outs},
               sys.argv[3])
    """
)


def test_same_bits_with_one_and_two_threads(tmp_path):
    """The kernels' reductions run in a fixed order whatever the thread count, so one and two threads
    give the same bits. The GEMMs inside them are MKL's, called one per tile from each thread: on an
    Intel CPU with AVX-512, MKL's AVX-512 sgemm rounds some entries of a tile (its last, partial row
    block) differently when the process has one thread or two (seen on a Xeon: 1 ulp in seg and own, 1
    ulp in the row log-sum-exp of one pixel in 4,800), so the comparison pins MKL's code path with its
    conditional numerical reproducibility switch (MKL_CBWR=COMPATIBLE; ignored where torch has no MKL)."""
    here = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "run.py"
    script.write_text(_THREADS_SCRIPT)
    outs = []
    for n in (1, 2):
        out = tmp_path / f"out{n}.pt"
        env = dict(os.environ, OMP_NUM_THREADS=str(n), MKL_CBWR="COMPATIBLE")
        subprocess.run([sys.executable, str(script), str(n), here, str(out)], check=True, env=env)
        outs.append(torch.load(out))
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), k


@pytest.mark.parametrize("layer_norm", [True, False])
def test_embed_prototype_sums_pixel_whose_float_squares_overflow(layer_norm):
    """The CPU kernel sums a finite pixel whose float32 sum of squares overflows (entries ~1e20)
    in float64 instead of dropping it; reference: the embedding computed in float64."""
    if "cpu" not in protoseg_ext.available_backends():
        pytest.skip("the C++ extension is not built")
    from protoseg_ext import backends
    from protoseg_ext import reference as R

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 40, 30, generator=g, dtype=torch.float64)
    x[0, :, 5, 7] *= 1e20
    ln = (torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64))
    slot = torch.randint(-1, 6, (1200,), generator=g)
    slot[5 * 30 + 7] = 2
    rows = x.permute(0, 2, 3, 1).reshape(-1, 16)
    if layer_norm:
        rows = torch.nn.functional.layer_norm(rows, (16,), ln[0], ln[1], 1e-5)
    rs, rc = R.prototype_sums(torch.nn.functional.normalize(rows, dim=-1), slot, 6)
    feat_norm = (ln[0].float(), ln[1].float(), 1e-5) if layer_norm else None
    sums, counts = backends.get_backend("cpu").embed_prototype_sums(x.float(), feat_norm, slot, 6)
    torch.testing.assert_close(sums.double(), rs, atol=1e-4, rtol=1e-5)
    assert torch.equal(counts.double(), rc)
