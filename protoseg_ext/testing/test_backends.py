"""The op x backend table: every op of the backend contract, on every backend present, against
:mod:`protoseg_ext.reference` on values and gradients, edge cases included.

Parametrised by the ``device_backend`` fixture: ``cpu``, ``reference`` and (under
TRITON_INTERPRET=1) ``triton`` on CPU tensors; ``cuda`` and ``triton`` on a GPU.
Collected by ``tests/test_backends.py`` and run on GPUs by ``python -m protoseg_ext.selftest``.
"""

import pytest
import torch
import torch.nn.functional as F

import protoseg_ext.functional as PF
from protoseg_ext import ProtoSegHead, backends
from protoseg_ext import reference as R
from protoseg_ext.reference_backend import embed_stats
from protoseg_ext.testing import (  # noqa: F401
    as_layout, assert_close_rel, device_backend, embed_reference, loss_scores, make_problem, official_head_step)

# the interpreter and the CPU kernels agree with float32 eager to rounding; a
# GPU's tensor-core GEMMs (tf32x3 in Triton) a little less
_TOL = {"cpu": dict(atol=1e-5, rtol=1e-5), "cuda": dict(atol=2e-5, rtol=1e-4)}
HALF_TOL = dict(atol=2e-2, rtol=2e-2)
F64_TOL = dict(atol=1e-10, rtol=1e-9)
# the interpreter evaluates masked-out lanes too (e.g. inf - inf of a NaN row): numpy warns, harmlessly
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


class Case:
    """One (device, backend) cell of the table: its problem factory, backend object and tolerance."""

    def __init__(self, cell):
        self.device, self.backend = cell
        self.be = backends.get_backend(self.backend)
        self.tol = _TOL[torch.device(self.device).type]

    def problem(self, **kw):
        return make_problem(device=self.device, **kw)


@pytest.fixture
def case(device_backend):  # noqa: F811 - the fixture of protoseg_ext.testing
    return Case(device_backend)


# ---------------------------------------------------------------- similarity: seg logits


@pytest.mark.parametrize("shape", [(300, 16, 5, 4), (1, 8, 1, 1), (257, 33, 7, 10), (64, 720, 3, 2), (40, 300, 3, 2)])
def test_seg_logits_values_and_grad(case, shape):
    N, D, C, K = shape
    f, p, _, _ = case.problem(N=N, D=D, C=C, K=K)
    a, b = f.clone().requires_grad_(), f.clone().requires_grad_()
    sa = PF.proto_seg_logits(a, p, backend=case.backend)
    sb = R.proto_seg_logits(b, p)
    torch.testing.assert_close(sa, sb, **case.tol)
    w = torch.randn_like(sb)  # non-uniform upstream gradient
    (sa * w).sum().backward()
    (sb * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, **case.tol)


def test_seg_logits_gradcheck(case):
    f, p, _, _ = case.problem(N=12, D=5, C=3, K=3, dtype=torch.float64)
    f.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: PF.proto_seg_logits(x, p, backend=case.backend), (f,))


# ---------------------------------------------------------------- similarity: every output


def test_similarity_op_outputs(case):
    f, p, gt, _ = case.problem(N=200, C=5, K=4)
    seg, argk, lse, own = case.be.similarity(f, p, gt, temperature=0.5, seg=True, lse=True, own=True)
    S = R.similarity(f, p)  # (N, C*K)
    masks = S.view(-1, 5, 4)
    torch.testing.assert_close(seg, masks.amax(2), **case.tol)
    assert torch.equal(argk.long(), masks.argmax(2))
    torch.testing.assert_close(lse, torch.logsumexp(S / 0.5, 1), **case.tol)
    ref_own = masks[torch.arange(200), gt.clamp(min=0)] * (gt >= 0)[:, None]
    torch.testing.assert_close(own, ref_own, **case.tol)
    assert seg.dtype == f.dtype and lse.dtype == torch.float32 and own.dtype == torch.float32


def test_similarity_outputs_not_asked_for_are_empty(case):
    f, p, gt, _ = case.problem(N=30, C=3, K=2)
    out = case.be.similarity(f, p, seg=True)
    assert out.seg.shape == (30, 3) and out.lse.numel() == 0 and out.own.numel() == 0
    out = case.be.similarity(f, p, gt, seg=False, own=True)
    assert out.seg.numel() == 0 and out.argk.numel() == 0 and out.own.shape == (30, 2)


def test_similarity_op_gradcheck_all_outputs(case):
    """The raw op: seg, lse and own outputs at once, with the labels path."""
    f, p, gt, _ = case.problem(N=12, D=5, C=3, K=2, dtype=torch.float64)
    f.requires_grad_()

    def fn(x):
        out = case.be.similarity(x, p, gt, temperature=0.7, seg=True, lse=True, own=True)
        return out.seg, out.lse, out.own

    assert torch.autograd.gradcheck(fn, (f,))


@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_every_gradient_of_the_fused_outputs(case, temperature):
    """Each output's gradient alone and all together, against autograd through the full S."""
    N, D, C, K = 70, 40, 9, 3
    f, p, gt, _ = case.problem(N=N, D=D, C=C, K=K)
    x = f.clone().requires_grad_()
    out = case.be.similarity(x, p, gt, temperature=temperature, seg=True, lse=True, own=True)
    y = f.clone().requires_grad_()
    S = R.similarity(y, p)
    masks = S.view(N, C, K)
    ref = (masks.amax(2), torch.logsumexp(S / temperature, 1),
           masks[torch.arange(N), gt.clamp(min=0)] * (gt >= 0)[:, None])
    g = torch.Generator().manual_seed(2)
    w = [torch.randn(r.shape, generator=g).to(f.device) for r in ref]
    for pick in ([0], [1], [2], [0, 1, 2]):
        ga = torch.autograd.grad(sum((out[(0, 2, 3)[i]] * w[i]).sum() for i in pick), x, retain_graph=True)[0]
        gb = torch.autograd.grad(sum((ref[i] * w[i]).sum() for i in pick), y, retain_graph=True)[0]
        torch.testing.assert_close(ga, gb, **case.tol)


@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_similarity_lse_and_softmax_cache_for_any_row_scale(case, scale, temperature):
    """Rows of S well inside float range and rows up to |S / tau| = 200: the row log-sum-exp, and the
    same gradient whether the backward keeps softmax(S) (where a backend caches) or recomputes it."""
    f, p, gt, _ = case.problem(N=300, C=5, K=4)
    f = f * scale
    f[7] *= 3  # one row far out
    S = R.similarity(f, p) / temperature
    lse = case.be.similarity(f, p, gt, temperature=temperature, lse=True).lse
    torch.testing.assert_close(lse, torch.logsumexp(S, 1), atol=1e-5, rtol=1e-5)
    g = torch.randn(300, device=f.device)
    ref = torch.autograd.grad((torch.logsumexp(R.similarity(f.requires_grad_(), p) / temperature, 1) * g).sum(), f)[0]
    for cache in (0, 1 << 20):
        x = f.detach().clone().requires_grad_()
        (case.be.similarity(x, p, gt, temperature=temperature, lse=True, cache_bytes=cache).lse * g).sum().backward()
        torch.testing.assert_close(x.grad, ref, atol=1e-4, rtol=1e-4)


def test_similarity_normalize_flag_matches_normalize_then_similarity(case):
    """normalize=True (the head's path) == F.normalize first, values and gradients; prototype_sums too."""
    f, p, gt, _ = case.problem(N=300, D=16, C=5, K=4)
    g = torch.Generator().manual_seed(0)  # fixed draws: an unseeded one gave a near tie in the max over K now and then
    x = f * torch.rand(f.shape[0], 1, generator=g).to(f.device) * 3  # raw rows of any length
    x[3] = 0  # a zero row: F.normalize leaves it zero
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    kw = dict(temperature=0.5, seg=True, lse=True, own=True, cache_bytes=1 << 20)
    oa = case.be.similarity(a, p, gt, normalize=True, **kw)
    ob = case.be.similarity(F.normalize(b, dim=-1), p, gt, normalize=False, **kw)
    for u, v in zip(oa, ob):
        torch.testing.assert_close(u, v, **case.tol)
    w = [torch.randn(o.shape, generator=g).to(o) for o in (oa.seg, oa.lse, oa.own)]
    ga = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip((oa.seg, oa.lse, oa.own), w)), a)[0]
    gb = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip((ob.seg, ob.lse, ob.own), w)), b)[0]
    torch.testing.assert_close(ga, gb, **case.tol)
    slot = torch.randint(-1, 20, (300,), generator=g).to(f.device)
    sa, ca = case.be.prototype_sums(x, slot, 20, True)
    sb, cb = case.be.prototype_sums(F.normalize(x, dim=-1), slot, 20, False)
    torch.testing.assert_close(sa, sb, **case.tol)
    assert torch.equal(ca, cb)


@pytest.mark.parametrize("cache", [0, 1 << 20])
def test_similarity_normalize_gradcheck(case, cache):
    f, p, gt, _ = case.problem(N=10, D=5, C=3, K=2, dtype=torch.float64)
    x = (f * 2.5).requires_grad_()

    def fn(x):
        out = case.be.similarity(x, p, gt, temperature=0.7, seg=True, lse=True, own=True, cache_bytes=cache,
                                 normalize=True)
        return out.seg, out.lse, out.own

    assert torch.autograd.gradcheck(fn, (x,))


# ---------------------------------------------------------------- the head's embedding fused into the similarity


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("cache", [0, 1 << 20])
def test_embed_similarity_values_and_every_gradient(case, layout, layer_norm, cache):
    """feats as the backbone gives them (NCHW, channels-last, or (N, D) rows) and the official
    LayerNorm, against LayerNorm + F.normalize + the reference similarity: values, and gradients
    to the features and to the LayerNorm's weight and bias."""
    B, D, H, W, C, K = 2, 37, 5, 7, 4, 3  # tiles end inside images; D not a multiple of the vector width
    g = torch.Generator().manual_seed(11)
    x0 = (torch.randn(B, D, H, W, generator=g) * 2 + 0.5).to(case.device)
    w0, b0 = torch.randn(D, generator=g).to(case.device), torch.randn(D, generator=g).to(case.device)
    p = F.normalize(torch.randn(C, K, D, generator=g), dim=-1).to(case.device)
    gt = torch.randint(-1, C, (B * H * W,), generator=g).to(case.device)
    leaves = [t.clone().requires_grad_() for t in (x0, w0, b0)]
    xa, wa, ba = leaves
    xin = as_layout(xa, layout)
    kept = xin.detach().clone()
    ln_a = (wa, ba, 1e-5) if layer_norm else None
    out = case.be.embed_similarity(xin, ln_a, p, gt, temperature=0.7, seg=True, lse=True, own=True, cache_bytes=cache)
    xb, wb, bb = [t.clone().requires_grad_() for t in (x0, w0, b0)]
    ref = R.similarity_outputs(embed_reference(xb, (wb, bb, 1e-5) if layer_norm else None), p, gt, -1, 0.7, True,
                               True, True)
    for u, v in zip(out, ref):
        torch.testing.assert_close(u, v, **case.tol)
    assert torch.equal(xin.detach(), kept)  # the input is never written
    wts = [torch.randn(r.shape, generator=g).to(case.device) for r in (ref[0], ref[2], ref[3])]
    la = sum((o * w).sum() for o, w in zip((out.seg, out.lse, out.own), wts))
    lb = sum((o * w).sum() for o, w in zip((ref[0], ref[2], ref[3]), wts))
    n = 3 if layer_norm else 1
    for u, v in zip(torch.autograd.grad(la, leaves[:n]), torch.autograd.grad(lb, [xb, wb, bb][:n])):
        torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("cache", [0, 1 << 30])
def test_embed_similarity_tiles_and_offsets(case, layer_norm, cache, monkeypatch):
    """Images of several tiles (the last one partial), one image's pixels far from zero mean
    (|mean| / std = 30: the CPU backend's LayerNorm folded into the GEMM would lose digits, so
    those tiles take its row path), against LayerNorm + F.normalize + the reference. The
    composed default runs in chunks of 700 pixels here (14 image rows; the last one partial)."""
    if case.backend == "reference":  # the composed embedding: several chunks
        monkeypatch.setattr(case.be, "embed_chunk", 700)
    B, D, H, W, C, K = 2, 24, 30, 50, 3, 4  # 1,500 pixels per image
    g = torch.Generator().manual_seed(14)
    x0 = torch.randn(B, D, H, W, generator=g, dtype=torch.float64) * 2
    x0[1] += 60
    x0 = x0.to(case.device, torch.float32)
    w0, b0 = torch.randn(D, generator=g).to(case.device), torch.randn(D, generator=g).to(case.device)
    p = F.normalize(torch.randn(C, K, D, generator=g), dim=-1).to(case.device)
    gt = torch.randint(-1, C, (B * H * W,), generator=g).to(case.device)
    xa, wa, ba = [t.clone().requires_grad_() for t in (x0, w0, b0)]
    xb, wb, bb = [t.double().requires_grad_() for t in (x0, w0, b0)]
    out = case.be.embed_similarity(xa, (wa, ba, 1e-5) if layer_norm else None, p, gt, seg=True, lse=True, own=True,
                                   cache_bytes=cache)
    ref = R.similarity_outputs(embed_reference(xb, (wb, bb, 1e-5) if layer_norm else None), p.double(), gt, -1, 1.0,
                               True, True, True)
    for u, v in zip((out.seg, out.lse, out.own), (ref[0], ref[2], ref[3])):
        torch.testing.assert_close(u.double(), v, atol=1e-5, rtol=1e-5)
    wts = [torch.randn(r.shape, generator=g, dtype=torch.float64).to(case.device) for r in (ref[0], ref[2], ref[3])]
    la = sum((o.double() * w).sum() for o, w in zip((out.seg, out.lse, out.own), wts))
    lb = sum((o * w).sum() for o, w in zip((ref[0], ref[2], ref[3]), wts))
    n = 3 if layer_norm else 1
    for u, v in zip(torch.autograd.grad(la, [xa, wa, ba][:n]), torch.autograd.grad(lb, [xb, wb, bb][:n])):
        torch.testing.assert_close(u.double(), v, atol=1e-4, rtol=1e-4)


def test_embed_similarity_gradcheck(case):
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(2, 6, 2, 3, generator=g, dtype=torch.float64) + 0.3).to(case.device).requires_grad_()
    w = torch.randn(6, generator=g, dtype=torch.float64).to(case.device).requires_grad_()
    b = torch.randn(6, generator=g, dtype=torch.float64).to(case.device).requires_grad_()
    p = F.normalize(torch.randn(3, 2, 6, generator=g, dtype=torch.float64), dim=-1).to(case.device)
    gt = torch.randint(-1, 3, (12,), generator=g).to(case.device)

    def fn(x, w, b):
        out = case.be.embed_similarity(x, (w, b, 1e-5), p, gt, temperature=0.7, seg=True, lse=True, own=True)
        return out.seg, out.lse, out.own

    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("HW", [(6, 5), (40, 60)])  # one tile per image; several (the CPU backend's 1,024 pixels)
def test_embed_prototype_sums(case, layout, layer_norm, HW, monkeypatch):
    g = torch.Generator().manual_seed(13)
    H, W = HW
    x = torch.randn(2, 20, H, W, generator=g, dtype=torch.float64)
    x[1, :, 2, 3] = float("nan")  # a non-finite pixel never reaches the sums
    x[1, :, 2, 4] = float("inf")
    x[0, :, 3, 2] += 500  # far from zero mean
    ln = (torch.randn(20, generator=g, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64),
          1e-5) if layer_norm else None
    slot = torch.randint(-1, 12, (2 * H * W,), generator=g).to(case.device)
    slot[2 * W + 3] = slot[H * W + 2 * W + 3] = slot[H * W + 2 * W + 4] = 5
    xf = x.float().to(case.device)
    lnf = tuple(t.float().to(case.device) for t in ln[:2]) + (1e-5,) if layer_norm else None
    xin = as_layout(xf, layout)
    if case.backend == "reference":  # the composed embedding: several chunks
        monkeypatch.setattr(case.be, "embed_chunk", 500)
    sums, counts = case.be.embed_prototype_sums(xin, lnf, slot, 12)
    rs, rc = R.prototype_sums(embed_reference(x, ln).to(case.device), slot, 12)  # the embedding in float64
    torch.testing.assert_close(sums.double(), rs, atol=1e-4, rtol=1e-5)
    assert torch.equal(counts.double(), rc)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
@pytest.mark.parametrize("layer_norm", [True, False])
def test_embed_stats_and_their_reuse(case, layout, layer_norm):
    """embed_similarity's per-pixel statistics against the reference's (NaN columns for a NaN and
    an inf pixel; a pixel far from zero mean; several CPU tiles), and the prototype sums and the
    backward given them: the same as without them, and as the reference."""
    g = torch.Generator().manual_seed(15)
    B, D, H, W, C, K = 2, 20, 30, 40, 3, 4  # 1,200 pixels per image
    x = torch.randn(B, D, H, W, generator=g, dtype=torch.float64) * 2 + 0.3
    x[1, :, 2, 3] = float("nan")
    x[1, 5, 2, 4] = float("inf")
    x[0, :, 3, 2] += 500
    ln = (torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64),
          1e-5) if layer_norm else None
    lnf = tuple(t.float().to(case.device) for t in ln[:2]) + (1e-5,) if layer_norm else None
    xin = as_layout(x.float().to(case.device), layout)
    p = F.normalize(torch.randn(C, K, D, generator=g), dim=-1).to(case.device)
    gt = torch.randint(-1, C, (B * H * W,), generator=g).to(case.device)
    out = case.be.embed_similarity(xin, lnf, p, gt, seg=False, lse=True, own=True)
    ref = embed_stats(x, ln)  # in float64
    # the compiled backends keep more rows, for their own backward (csrc/cpu/similarity_cpu.h, kStatsRows;
    # csrc/cuda/embed_cuda.cu, kStatRows; kernels/embed.py, STATS_ROWS)
    rows = {"cpu": 6, "cuda": 5, "triton": 5}.get(case.backend, 3)
    assert out.stats.shape == (rows, B * H * W) and out.stats.dtype == torch.float32
    bad = torch.isnan(ref[0])
    assert bad.sum() == 2 and torch.equal(torch.isnan(out.stats[:3]).cpu(), bad.expand(3, -1))
    torch.testing.assert_close(out.stats[:3].cpu().double(), ref, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert case.be.embed_similarity(xin, lnf, p, seg=False).stats.numel() == 0  # nothing computed

    slot = torch.randint(-1, C * K, (B * H * W,), generator=g).to(case.device)
    slot[bad.to(case.device)] = 5
    sums, counts = case.be.embed_prototype_sums(xin, lnf, slot, C * K, out.stats)
    rs, rc = R.prototype_sums(embed_reference(x, ln).to(case.device), slot, C * K)
    torch.testing.assert_close(sums.double(), rs, atol=1e-4, rtol=1e-5)
    assert torch.equal(counts.double(), rc)
    s0, c0 = case.be.embed_prototype_sums(xin, lnf, slot, C * K)
    torch.testing.assert_close(sums, s0, atol=1e-5, rtol=1e-5)
    assert torch.equal(counts, c0)
    with pytest.raises(ValueError, match="stats"):
        case.be.embed_prototype_sums(xin, lnf, slot, C * K, out.stats[:, 1:])
    with pytest.raises(ValueError, match="stats"):
        case.be.embed_prototype_sums(xin, lnf, slot, C * K, out.stats.double())
    if case.backend == "reference":  # its backward is autograd's
        return
    w, b = lnf[:2] if layer_norm else (None, None)
    ops = case.be._ops
    for cache in (0, 1 << 30):  # S recomputed, or the softmax kept
        _, argk, lse, _, probs, stats = ops.embed_similarity(xin, w, b, 1e-5, p, gt, -1, 0.7, True, True, True, cache)
        grads = (torch.randn(B * H * W, C, generator=g).to(case.device), torch.randn(B * H * W, generator=g).to(
            case.device), torch.randn(B * H * W, K, generator=g).to(case.device))
        args = (*grads, xin, w, b, 1e-5, p, gt, argk, lse, -1, 0.7, probs)
        for u, v in zip(ops.embed_similarity_backward(*args, stats), ops.embed_similarity_backward(*args)):
            torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-4, equal_nan=True)


# ---------------------------------------------------------------- Sinkhorn


def _own(f, p, gt):
    own = R.similarity(f.double(), p.double()).view(f.shape[0], p.shape[0], p.shape[1])
    return (own[torch.arange(f.shape[0]), gt.clamp(min=0)] * (gt >= 0)[:, None]).float()


@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("iters,eps", [(3, 0.05), (1, 0.05), (5, 0.1)])
def test_sinkhorn_matches_official_loop(case, skew, iters, eps):
    f, p, gt, _ = case.problem(N=400, C=6, K=5, skew=skew)
    own = _own(f, p, gt)
    Q = case.be.sinkhorn(own, gt, p.shape[0], -1, iters, eps)
    torch.testing.assert_close(Q, R.sinkhorn(own, gt, p.shape[0], -1, iters, eps), atol=1e-5, rtol=1e-4)
    valid = gt >= 0
    torch.testing.assert_close(Q[valid].sum(1), torch.ones(int(valid.sum()), device=Q.device), atol=1e-5, rtol=0)
    assert (Q[~valid] == 0).all()


def test_sinkhorn_float64_and_nonfinite_rows(case):
    f, p, gt, _ = case.problem(N=120, D=8, C=3, K=4, dtype=torch.float64)
    own = _own(f, p, gt).double()
    own[5] = float("nan")
    own[9, 2] = float("inf")
    Q = case.be.sinkhorn(own, gt, 3, -1, 3, 0.05)
    assert Q.dtype == torch.float64
    assert torch.isfinite(Q).all() and (Q[5] == 0).all() and (Q[9] == 0).all()
    torch.testing.assert_close(Q, R.sinkhorn(own, gt, 3, -1, 3, 0.05), **F64_TOL)


# ---------------------------------------------------------------- prototype sums and EMA


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("N", [250, 20000])  # 20,000 rows: the CPU kernel merges partials of several row blocks
def test_prototype_sums(case, deterministic, N):
    D, S = 20, 12
    g = torch.Generator().manual_seed(3)
    f = torch.randn(N, D, generator=g).to(case.device)
    slot = torch.randint(-1, S, (N,), generator=g).to(case.device)
    f[7] = float("nan")  # a non-finite row never reaches the sums
    f[11, 3] = float("-inf")
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(deterministic)
        sums, counts = case.be.prototype_sums(f, slot, S)
        again = case.be.prototype_sums(f, slot, S)
    finally:
        torch.use_deterministic_algorithms(prev)
    rs, rc = R.prototype_sums(f.double(), slot, S)
    assert sums.dtype == torch.float32 and counts.dtype == torch.float32
    torch.testing.assert_close(sums.double(), rs, atol=1e-4, rtol=1e-5)
    assert torch.equal(counts.double(), rc) and torch.isfinite(sums).all()
    if deterministic:
        assert torch.equal(sums, again[0])  # bitwise, run to run


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_prototype_ema(case, dtype):
    C, K, D = 4, 3, 20
    g = torch.Generator().manual_seed(5)
    protos = F.normalize(torch.randn(C, K, D, generator=g), dim=-1).to(dtype).to(case.device)
    sums = torch.randn(C * K, D, generator=g).to(case.device)
    counts = torch.randint(0, 3, (C * K,), generator=g).float().to(case.device)  # some prototypes get no pixel
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = case.be.prototype_ema(protos, sums.to(acc), counts.to(acc), 0.9)
    ref = R.prototype_ema(protos, sums.view(C, K, D), counts.view(C, K), 0.9)
    assert out.dtype == dtype and out.shape == (C, K, D)
    torch.testing.assert_close(out, ref, **(case.tol if dtype != torch.bfloat16 else HALF_TOL))


# ---------------------------------------------------------------- prototype learning (composed)


def _learn(case, f, p, gt, seg, **kw):
    return PF.prototype_learning(f, p, gt, seg, backend=case.backend, **kw), R.prototype_learning(f, p, gt, seg, **kw)


@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("gamma", [0.999, 0.5, 0.0])
@pytest.mark.parametrize("ignore_index", [-1, 255])
def test_prototype_learning_argmax_exact(case, skew, gamma, ignore_index):
    f, p, gt, seg = case.problem(N=500, C=6, K=5, skew=skew, ignore_index=ignore_index)
    (t, new), (tr, newr) = _learn(case, f, p, gt, seg, gamma=gamma, assign="argmax", ignore_index=ignore_index)
    assert torch.equal(t, tr)
    torch.testing.assert_close(new, newr, **case.tol)
    torch.testing.assert_close(new.norm(dim=-1), torch.ones(new.shape[:2], device=new.device), **case.tol)


def test_prototype_learning_gumbel_with_noise(case):
    f, p, gt, seg = case.problem(N=500, C=6, K=5)
    noise = R.sample_gumbel((f.shape[0], p.shape[1]), generator=torch.Generator().manual_seed(3)).to(f.device)
    (t, new), (tr, newr) = _learn(case, f, p, gt, seg, gamma=0.5, gumbel_noise=noise)
    assert torch.equal(t, tr)
    torch.testing.assert_close(new, newr, **case.tol)
    # the official quirk: the EMA assignment differs from the target for many pixels
    _, new_argmax = PF.prototype_learning(f, p, gt, seg, gamma=0.5, assign="argmax", backend=case.backend)
    assert not torch.allclose(new, new_argmax)


def test_prototype_learning_gumbel_seeded_same_as_reference(case):
    f, p, gt, seg = case.problem(N=300, C=4, K=3)
    torch.manual_seed(7)
    t, new = PF.prototype_learning(f, p, gt, seg, gamma=0.5, backend=case.backend)
    torch.manual_seed(7)
    tr, newr = R.prototype_learning(f, p, gt, seg, gamma=0.5)
    assert torch.equal(t, tr)
    torch.testing.assert_close(new, newr, **case.tol)


@pytest.mark.parametrize("ignore_index", [-1, 255])
def test_prototype_learning_sample_with_noise(case, ignore_index):
    """assign="sample": the same noise gives the reference's slots, so every backend draws the same prototypes."""
    f, p, gt, seg = case.problem(N=500, C=6, K=5, ignore_index=ignore_index)
    noise = R.sample_gumbel((f.shape[0], p.shape[1]), generator=torch.Generator().manual_seed(4)).to(f.device)
    kw = dict(gamma=0.5, assign="sample", gumbel_noise=noise, ignore_index=ignore_index)
    (t, new), (tr, newr) = _learn(case, f, p, gt, seg, **kw)
    assert torch.equal(t, tr)
    torch.testing.assert_close(new, newr, **case.tol)
    own = case.be.similarity(f, p, gt, ignore_index=ignore_index, seg=False, own=True).own
    _, slot = PF.assign_slots(case.be, own, gt, seg.argmax(dim=1), 6, mode="sample", gumbel_noise=noise,
                              ignore_index=ignore_index, sinkhorn_iters=3, sinkhorn_eps=0.05)
    _, _, sums_r, counts_r = R.prototype_learning(f, p, gt, seg, return_sums=True, **kw)
    counts = torch.bincount(slot[slot >= 0], minlength=30).to(counts_r.dtype)
    assert torch.equal(counts.view_as(counts_r), counts_r)  # the very same slots, pixel counts per prototype
    # a different draw than the official one and than argmax under the same noise
    _, new_g = PF.prototype_learning(f, p, gt, seg, gamma=0.5, gumbel_noise=noise, ignore_index=ignore_index,
                                     backend=case.backend)
    _, new_a = PF.prototype_learning(f, p, gt, seg, gamma=0.5, assign="argmax", ignore_index=ignore_index,
                                     backend=case.backend)
    assert not torch.allclose(new, new_g) and not torch.allclose(new, new_a)


def test_prototype_learning_sample_seeded_same_as_reference(case):
    f, p, gt, seg = case.problem(N=300, C=4, K=3)
    torch.manual_seed(7)
    t, new = PF.prototype_learning(f, p, gt, seg, gamma=0.5, assign="sample", backend=case.backend)
    torch.manual_seed(7)
    tr, newr = R.prototype_learning(f, p, gt, seg, gamma=0.5, assign="sample")
    assert torch.equal(t, tr)
    torch.testing.assert_close(new, newr, **case.tol)


def test_assign_sample_draws_the_plan(case):
    """Slot frequencies of assign="sample" against the Sinkhorn plan Q on a fixed problem.

    T copies of 60 pixels (Sinkhorn is invariant to repeating a class's rows, so
    each copy has the same plan row): the count of slot k for pixel n is
    Binomial(T, Q[n, k]); every count must lie within 5 binomial standard
    errors (+1 for the rounding of tiny Q) of T * Q[n, k]. The official draw
    ``argmax(Q + g)`` fails this (it is close to uniform), as the last check shows.
    """
    T, n, C, K = 2000, 60, 3, 4
    f, p, gt, seg = case.problem(N=n, D=8, C=C, K=K, seed=11)
    gt = gt.clamp(min=0)
    own1 = case.be.similarity(f, p, gt, seg=False, own=True).own
    own = own1.repeat(T, 1)  # row n of copy t at t * n + n
    gts = gt.repeat(T)
    pred = gts  # every pixel correct: every pixel draws a slot
    Q = case.be.sinkhorn(own1, gt, C, -1, 3, 0.5).double()  # eps 0.5: a plan far from one-hot
    Qr = R.sinkhorn(own1.double(), gt, C, -1, 3, 0.5)
    torch.testing.assert_close(Q, Qr, atol=1e-5, rtol=1e-4)
    noise = R.sample_gumbel((n * T, K), generator=torch.Generator().manual_seed(5)).to(f.device)
    freq = {}
    for mode in ("sample", "gumbel"):
        _, slot = PF.assign_slots(case.be, own, gts, pred, C, mode=mode, gumbel_noise=noise, ignore_index=-1,
                                  sinkhorn_iters=3, sinkhorn_eps=0.5)
        k = (slot - gts * K).view(T, n)
        assert ((k >= 0) & (k < K)).all()
        freq[mode] = F.one_hot(k, K).sum(0).double().cpu()  # (n, K)
    Q = Q.cpu()
    assert (Q.max(1).values - Q.min(1).values).max() > 0.3  # rows far from uniform, or the check says nothing
    se = (T * Q * (1 - Q)).sqrt()
    dev = (freq["sample"] - T * Q).abs()
    assert (dev <= 5 * se + 1).all(), f"max deviation {(dev / (se + 1e-9)).max():.1f} standard errors"
    assert ((freq["gumbel"] - T * Q).abs() > 5 * se + 1).any()


def test_assign_sample_never_draws_a_zero_of_the_plan():
    """log 0 = -inf: an entry with Q = 0 is never drawn, whatever the noise, while its row has a positive entry."""
    Q = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.0, 0.0, 1.0], [0.2, 0.3, 0.5]])
    g = torch.tensor([[50.0, -5.0, 50.0], [-3.0, 80.0, -3.0], [1e30, 1e30, -1e30], [0.0, 0.0, 0.0]])
    assert PF.draw_slots(Q, g, "sample").tolist() == [1, 0, 2, 2]
    assert PF.draw_slots(Q, g, "gumbel").tolist() == [0, 1, 0, 2]  # the official draw takes the zeros
    big = R.sample_gumbel((4000, 3), generator=torch.Generator().manual_seed(0)) * 20
    k = PF.draw_slots(Q[:3].repeat(4000 // 3 + 1, 1)[:4000], big, "sample")
    rows = torch.arange(4000) % 3
    assert (Q[:3][rows, k] > 0).all()
    with pytest.raises(ValueError, match="mode"):
        PF.draw_slots(Q, g, "argmax")


def test_prototype_learning_no_update_and_input_untouched(case):
    f, p, gt, seg = case.problem()
    p0 = p.clone()
    t, new = PF.prototype_learning(f, p, gt, seg, update=False, assign="argmax", backend=case.backend)
    tr, _ = R.prototype_learning(f, p, gt, seg, update=False, assign="argmax")
    assert torch.equal(p, p0)
    assert torch.equal(t, tr)
    torch.testing.assert_close(new, F.normalize(p, dim=-1), **case.tol)


@pytest.mark.parametrize("N", [400, 20000])
def test_prototype_learning_update_sums(case, N):
    """The per-prototype sums/counts of the composed step, checked directly against the reference."""
    f, p, gt, seg = case.problem(N=N, C=5, K=4)
    own = case.be.similarity(f, p, gt, seg=False, own=True).own
    t, slot = PF.assign_slots(case.be, own, gt, seg.argmax(dim=1), 5, mode="argmax", ignore_index=-1,
                              sinkhorn_iters=3, sinkhorn_eps=0.05)
    sums, counts = case.be.prototype_sums(f, slot, 5 * 4)
    tr, _, sums_r, counts_r = R.prototype_learning(f, p, gt, seg, assign="argmax", return_sums=True)
    assert torch.equal(t, tr)
    torch.testing.assert_close(sums.view_as(sums_r), sums_r, **case.tol)
    torch.testing.assert_close(counts.view_as(counts_r), counts_r, atol=0, rtol=0)
    assert counts.sum() > 0


# ---------------------------------------------------------------- losses


@pytest.mark.parametrize("temperature", [1.0, 0.1])
@pytest.mark.parametrize("ignore_index", [-1, 255])
def test_losses_values_and_grad(case, temperature, ignore_index):
    f, p, gt, seg = case.problem(N=400, C=5, K=4, ignore_index=ignore_index)
    t, _ = R.prototype_learning(f, p, gt, seg, assign="argmax", ignore_index=ignore_index)
    a, b = f.clone().requires_grad_(), f.clone().requires_grad_()
    la = PF.proto_losses(a, p, t, ignore_index=ignore_index, temperature=temperature, backend=case.backend)
    lb = R.proto_losses(b, p, t, ignore_index=ignore_index, temperature=temperature)
    torch.testing.assert_close(la[0], lb[0], **case.tol)
    torch.testing.assert_close(la[1], lb[1], **case.tol)
    for wa, wb in [(1.0, 0.0), (0.0, 1.0), (0.7, 3.0)]:  # each loss's gradient alone and mixed
        ga = torch.autograd.grad(wa * la[0] + wb * la[1], a, retain_graph=True)[0]
        gb = torch.autograd.grad(wa * lb[0] + wb * lb[1], b, retain_graph=True)[0]
        torch.testing.assert_close(ga, gb, **case.tol)


def test_losses_float64_tight(case):
    f, p, gt, _ = case.problem(N=50, D=12, C=4, K=3, dtype=torch.float64)
    target = torch.where(gt >= 0, gt * 3 + 1, gt)
    a, b = f.clone().requires_grad_(), f.clone().requires_grad_()
    la = PF.proto_losses(a, p, target, temperature=0.5, backend=case.backend)
    lb = R.proto_losses(b, p, target, temperature=0.5)
    torch.testing.assert_close(torch.stack(la), torch.stack(lb), **F64_TOL)
    (la[0] + 0.3 * la[1]).backward()
    (lb[0] + 0.3 * lb[1]).backward()
    torch.testing.assert_close(a.grad, b.grad, **F64_TOL)


def test_losses_gradcheck(case):
    f, p, gt, seg = case.problem(N=12, D=6, C=3, K=2, dtype=torch.float64)
    t, _ = R.prototype_learning(f, p, gt, seg, assign="argmax")
    f.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: PF.proto_losses(x, p, t, temperature=0.5, backend=case.backend), (f,))


def _ppc_ppd_check(case, lse, own, target, ignore_index, temperature, weights=(0.7, 3.0), tol=None):
    """The backend's ppc_ppd against reference.losses_from_scores: both losses and both gradients."""
    tol = tol or (F64_TOL if lse.dtype == torch.float64 else case.tol)
    a = [lse.clone().requires_grad_(), own.clone().requires_grad_()]
    b = [lse.clone().requires_grad_(), own.clone().requires_grad_()]
    la = case.be.ppc_ppd(a[0], a[1], target, ignore_index, temperature)
    lb = R.losses_from_scores(b[0], b[1], target, ignore_index, temperature)
    assert la[0].shape == () and la[0].dtype == lse.dtype and la[1].dtype == lse.dtype
    torch.testing.assert_close(torch.stack(la), torch.stack(lb), **tol)
    ga = torch.autograd.grad(weights[0] * la[0] + weights[1] * la[1], a)
    gb = torch.autograd.grad(weights[0] * lb[0] + weights[1] * lb[1], b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, **tol)
    return la, ga


@pytest.mark.parametrize("temperature", [1.0, 0.1])
@pytest.mark.parametrize("ignore_index", [-1, 255, 1 << 40])
@pytest.mark.parametrize("N, K", [(1000, 10), (33, 1), (5000, 3)])
def test_ppc_ppd_op_against_reference(case, N, K, ignore_index, temperature):
    lse, own, target = loss_scores(N, K, device=case.device, ignore_index=ignore_index, seed=N + K)
    for weights in [(1.0, 0.0), (0.0, 1.0), (0.7, 3.0)]:  # each loss's gradient alone and mixed
        _ppc_ppd_check(case, lse, own, target, ignore_index, temperature, weights)


def test_ppc_ppd_op_float64_and_gradcheck(case):
    lse, own, target = loss_scores(300, 4, device=case.device, dtype=torch.float64, seed=3)
    _ppc_ppd_check(case, lse, own, target, -1, 0.3)
    small = [t[:9].clone() for t in (lse, own, target)]
    small[2][:3] = torch.tensor([-1, 5, 14])
    x, y = small[0].requires_grad_(), small[1].requires_grad_()
    assert torch.autograd.gradcheck(lambda u, v: case.be.ppc_ppd(u, v, small[2], -1, 0.3), (x, y))


def test_ppc_ppd_op_edge_cases(case):
    dev = case.device
    # no pixel takes part: both losses 0, gradients 0; and N = 0
    lse, own, target = loss_scores(50, 3, device=dev)
    la, ga = _ppc_ppd_check(case, lse, own, torch.full_like(target, -1), -1, 1.0)
    assert la[0].item() == 0.0 and la[1].item() == 0.0 and not ga[0].any() and not ga[1].any()
    e = torch.empty(0, device=dev)
    la, ga = _ppc_ppd_check(case, e, e.reshape(0, 3), torch.empty(0, dtype=torch.long, device=dev), -1, 1.0)
    assert la[0].item() == 0.0 and ga[1].shape == (0, 3)
    # a target below 0 that is not ignore_index takes part with k = target mod K (torch.remainder)
    _ppc_ppd_check(case, lse, own, torch.where(target < 0, torch.full_like(target, -4), target), 255, 1.0)
    # a non-finite score of an ignored pixel never reaches the losses or the gradients
    own2, lse2 = own.clone(), lse.clone()
    ign = (target == -1).nonzero()[:, 0]
    own2[ign[0]] = float("nan")
    lse2[ign[1]] = float("inf")
    la, ga = _ppc_ppd_check(case, lse2, own2, target, -1, 1.0)
    assert torch.isfinite(torch.stack(la)).all() and torch.isfinite(ga[0]).all() and torch.isfinite(ga[1]).all()
    # int32 targets, and a non-contiguous own
    wide = torch.cat([own, own], dim=1)[:, ::2]
    assert not wide.is_contiguous()
    _ppc_ppd_check(case, lse, wide, target.int(), -1, 0.5)


def test_ppc_ppd_op_is_bitwise_reproducible(case):
    lse, own, target = loss_scores(20000, 10, device=case.device, seed=9)
    first = case.be.ppc_ppd(lse, own, target, -1, 0.1)
    for _ in range(2):
        again = case.be.ppc_ppd(lse, own, target, -1, 0.1)
        assert torch.equal(torch.stack(first), torch.stack(again))


def test_ppc_ppd_op_argument_errors_name_the_argument(case):
    lse, own, target = loss_scores(20, 3, device=case.device)
    be = case.be
    with pytest.raises(ValueError, match="lse"):
        be.ppc_ppd(lse[:, None], own, target, -1, 1.0)
    with pytest.raises(ValueError, match="own"):
        be.ppc_ppd(lse, own[:5], target, -1, 1.0)
    with pytest.raises(ValueError, match="own"):
        be.ppc_ppd(lse, own.double(), target, -1, 1.0)
    with pytest.raises(ValueError, match="target"):
        be.ppc_ppd(lse, own, target.float(), -1, 1.0)
    with pytest.raises(ValueError, match="target"):
        be.ppc_ppd(lse, own, target[:4], -1, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        be.ppc_ppd(lse, own, target, -1, 0.0)


# ---------------------------------------------------------------- dtypes, layouts


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(case, dtype):
    f, p, gt, seg = case.problem(N=300, D=32, C=4, K=3, dtype=dtype)
    f32, p32 = f.float(), p.float()
    a, b = f.clone().requires_grad_(), f32.clone().requires_grad_()
    sa = PF.proto_seg_logits(a, p, backend=case.backend)
    assert sa.dtype == dtype
    sb = R.proto_seg_logits(b, p32)
    torch.testing.assert_close(sa.float(), sb, **HALF_TOL)
    t, new = PF.prototype_learning(f, p, gt, seg, assign="argmax", gamma=0.5, backend=case.backend)
    tr, newr = R.prototype_learning(f32, p32, gt, seg.float(), assign="argmax", gamma=0.5)
    assert new.dtype == dtype and torch.isfinite(new.float()).all()
    assert (t == tr).float().mean() > 0.9  # near-ties may flip at half precision
    torch.testing.assert_close(new.float(), newr, atol=3e-2, rtol=3e-2)
    ppc, ppd = PF.proto_losses(a, p, tr, backend=case.backend)
    ppc_r, ppd_r = R.proto_losses(b, p32, tr)
    assert ppc.dtype == torch.float32  # accumulated in float32
    torch.testing.assert_close(ppc, ppc_r, **HALF_TOL)
    torch.testing.assert_close(ppd, ppd_r, **HALF_TOL)
    (sa.float().sum() * 0.01 + ppc + ppd).backward()
    (sb.sum() * 0.01 + ppc_r + ppd_r).backward()
    assert a.grad.dtype == dtype and torch.isfinite(a.grad.float()).all()
    assert_close_rel(a.grad, b.grad)


def test_mixed_dtypes_half_feats_float_protos(case):
    f, p, _, _ = case.problem(N=64, D=16, C=3, K=2)
    fh = f.half()
    seg = PF.proto_seg_logits(fh, p, backend=case.backend)
    torch.testing.assert_close(seg.float(), R.proto_seg_logits(fh.float(), p), **HALF_TOL)


def test_non_contiguous_inputs(case):
    C, K, D = 4, 3, 16
    f, p, gt, seg = case.problem(N=256, D=2 * D, C=C, K=K)
    fv = f[::2, ::2]  # (128, 16): strided rows and columns
    pv = F.normalize(torch.randn(K, C, D, device=f.device), dim=-1).transpose(0, 1)  # (C, K, D) non-contiguous
    gv = torch.stack([gt, gt], 1)[::2, 0]  # stride 4
    sv = seg[::2].t().contiguous().t()  # column-major
    fc, pc = fv.contiguous(), pv.contiguous()
    assert not fv.is_contiguous() and not pv.is_contiguous() and not gv.is_contiguous()
    torch.testing.assert_close(PF.proto_seg_logits(fv, pv, backend=case.backend), R.proto_seg_logits(fc, pc), **case.tol)
    ta, na = PF.prototype_learning(fv, pv, gv, sv, gamma=0.9, assign="argmax", backend=case.backend)
    tb, nb = R.prototype_learning(fc, pc, gv, sv, gamma=0.9, assign="argmax")
    assert torch.equal(ta, tb)
    torch.testing.assert_close(na, nb, **case.tol)
    a, b = fv.clone().requires_grad_(), fc.clone().requires_grad_()
    la = PF.proto_losses(a, pv, tb, backend=case.backend)
    lb = R.proto_losses(b, pc, tb)
    torch.testing.assert_close(torch.stack(la), torch.stack(lb), **case.tol)
    sum(la).backward()
    sum(lb).backward()
    torch.testing.assert_close(a.grad, b.grad, **case.tol)
    # a stride-0 (expanded) upstream gradient reaches the backward as is
    x, y = fv.clone().requires_grad_(), fc.clone().requires_grad_()
    PF.proto_seg_logits(x, pv, backend=case.backend).sum().backward()
    R.proto_seg_logits(y, pc).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, **case.tol)


# ---------------------------------------------------------------- edge cases (docs/design.md, "Numerics and edge cases")


def _check_learning(case, f, p, gt, seg, assign="argmax", **kw):
    if assign != "argmax":  # one seeded noise for both: the same draw on every backend
        g = torch.Generator().manual_seed(9)
        kw["gumbel_noise"] = R.sample_gumbel((f.shape[0], p.shape[1]), generator=g).to(f.device)
    t, new = PF.prototype_learning(f, p, gt, seg, assign=assign, gamma=0.5, backend=case.backend, **kw)
    tr, newr = R.prototype_learning(f, p, gt, seg, assign=assign, gamma=0.5, **kw)
    assert torch.equal(t, tr)
    torch.testing.assert_close(new, newr, **case.tol)
    assert torch.isfinite(new).all()
    return t, new


@pytest.mark.parametrize("assign", ["argmax", "sample"])
def test_absent_class_keeps_its_prototypes(case, assign):
    f, p, gt, seg = case.problem(N=200, C=5, K=3)
    gt = torch.where(gt == 2, torch.full_like(gt, 4), gt)  # class 2 absent
    _, new = _check_learning(case, f, p, gt, seg, assign)
    torch.testing.assert_close(new[2], p[2], **case.tol)


@pytest.mark.parametrize("assign", ["argmax", "sample"])
def test_single_pixel_class(case, assign):
    f, p, gt, seg = case.problem(N=200, C=5, K=3)
    gt = torch.where(gt == 1, torch.full_like(gt, 0), gt)
    gt[17] = 1  # exactly one pixel of class 1, predicted correctly: its class's whole Sinkhorn problem
    seg[17, 1] += 100
    t, new = _check_learning(case, f, p, gt, seg, assign)
    assert 3 <= int(t[17]) < 6
    assert not torch.allclose(new[1], p[1])


@pytest.mark.parametrize("assign", ["argmax", "sample"])
def test_class_with_every_pixel_mispredicted(case, assign):
    f, p, gt, seg = case.problem(N=200, C=5, K=3)
    seg[:, 3] = -1e4  # class 3 never predicted
    t, new = _check_learning(case, f, p, gt, seg, assign)
    torch.testing.assert_close(new[3], p[3], **case.tol)  # no correct pixel: unchanged
    assert ((t >= 9) & (t < 12)).sum() == (gt == 3).sum()  # but its pixels still get targets


@pytest.mark.parametrize("ignore_index", [-1, 255])
@pytest.mark.parametrize("assign", ["argmax", "sample"])
def test_all_pixels_ignored(case, ignore_index, assign):
    f, p, gt, seg = case.problem(N=64, C=5, K=3)
    gt = torch.full_like(gt, ignore_index)
    t, new = _check_learning(case, f, p, gt, seg, assign, ignore_index=ignore_index)
    assert (t == ignore_index).all()
    torch.testing.assert_close(new, p, **case.tol)
    a = f.clone().requires_grad_()
    ppc, ppd = PF.proto_losses(a, p, t, ignore_index=ignore_index, backend=case.backend)
    assert ppc.item() == 0.0 and ppd.item() == 0.0
    (ppc + ppd).backward()
    assert torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.parametrize("assign", ["argmax", "sample"])
def test_empty_batch(case, assign):
    f, p, gt, seg = case.problem(N=0, C=5, K=3)
    C, K, D = 5, 3, f.shape[1]
    out = case.be.similarity(f, p, gt, seg=True, lse=True, own=True)
    assert out.seg.shape == (0, C) and out.argk.shape == (0, C) and out.lse.shape == (0,) and out.own.shape == (0, K)
    assert PF.proto_seg_logits(f, p, backend=case.backend).shape == (0, C)
    t, new = _check_learning(case, f, p, gt, seg, assign)
    assert t.shape == (0,)
    a = f.clone().requires_grad_()
    ppc, ppd = PF.proto_losses(a, p, t, backend=case.backend)
    assert ppc.item() == 0.0 and ppd.item() == 0.0
    (ppc + ppd).backward()
    assert a.grad.shape == (0, D)
    assert case.be.sinkhorn(torch.zeros(0, K, device=f.device), gt, C, -1, 3, 0.05).shape == (0, K)
    sums, counts = case.be.prototype_sums(f, gt, C * K)
    assert sums.shape == (C * K, D) and (sums == 0).all() and (counts == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("assign", ["argmax", "sample"])
def test_non_finite_rows_never_reach_the_prototypes(case, bad, assign):
    f, p, gt, seg = case.problem(N=300, C=4, K=3)
    seg[:, :] = 0
    seg[torch.arange(300), gt.clamp(min=0)] = 1  # every pixel correct: only the finiteness check keeps them out
    f[5, 3] = bad
    f[gt == 2] = bad  # a whole class of bad rows
    t, new = _check_learning(case, f, p, gt, seg, assign)
    assert torch.isfinite(new).all()
    assert t[5] == -1 and (t[gt == 2] == -1).all()
    torch.testing.assert_close(new[2], p[2], **case.tol)  # its class saw only bad rows
    assert not torch.allclose(new[0], p[0])  # the others still learn


def test_op_argument_errors_name_the_argument(case):
    f, p, gt, _ = case.problem(N=20, D=8, C=3, K=2)
    be = case.be
    with pytest.raises(ValueError, match="feats"):
        be.similarity(f[0], p)
    with pytest.raises(ValueError, match="protos"):
        be.similarity(f, p[:, :, :4])
    with pytest.raises(ValueError, match="labels"):
        be.similarity(f, p, gt[:5], seg=False, own=True)
    with pytest.raises(ValueError, match="temperature"):
        be.similarity(f, p, gt, temperature=0.0)
    with pytest.raises(ValueError, match="gamma"):
        be.prototype_ema(p, torch.zeros(6, 8, device=f.device), torch.zeros(6, device=f.device), 1.5)
    fmap = f.t().reshape(1, 8, 4, 5)
    with pytest.raises(ValueError, match="slot"):
        be.embed_prototype_sums(fmap, None, gt[:5].clamp(min=0), 6)
    if f.device.type == "cpu":  # label ranges on a GPU are device-side asserts (tests/test_edge_cases.py)
        bad = gt.clone()
        bad[4] = 7
        with pytest.raises(ValueError, match=r"labels\[4\] = 7 is outside"):
            be.similarity(f, p, bad, seg=False, own=True)
        with pytest.raises(ValueError, match=r"labels\[4\] = 7 is outside"):
            be.sinkhorn(torch.zeros(20, 2), bad, 3, -1, 3, 0.05)
        with pytest.raises(ValueError, match="slot"):
            be.prototype_sums(f, torch.full((20,), 6), 6)


# ---------------------------------------------------------------- the head, end to end


@pytest.mark.parametrize("assign", ["argmax", "sample"])
@pytest.mark.parametrize("ignore_index", [-1, 255])
def test_head_step_matches_the_official_step(case, ignore_index, assign):
    """ProtoSegHead on this backend against the official step written with the reference alone
    (assign="sample": both draw their noise from the global generator, seeded alike)."""
    torch.manual_seed(0)
    head = ProtoSegHead(16, 5, num_prototype=3, backend=case.backend, assign=assign, gamma=0.9,
                        ignore_index=ignore_index).to(case.device).train()
    oracle = ProtoSegHead(16, 5, num_prototype=3, assign=assign, gamma=0.9, ignore_index=ignore_index)
    oracle.load_state_dict(head.state_dict())
    oracle.to(case.device).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 6, 7, generator=g).to(case.device)
    gt = torch.randint(0, 5, (2, 6, 7), generator=g)
    gt[torch.rand(2, 6, 7, generator=g) < 0.1] = ignore_index
    gt = gt.to(case.device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(3)
    out = head(xa, gt)
    torch.manual_seed(3)
    seg, ppc, ppd, target, new = official_head_step(oracle, xb, gt)
    torch.testing.assert_close(out.seg, seg, **case.tol)
    assert torch.equal(out.target, target)
    assert ((out.target == ignore_index) == (gt.view(-1) == ignore_index)).all()
    torch.testing.assert_close(out.loss_ppc, ppc, **case.tol)
    torch.testing.assert_close(out.loss_ppd, ppd, **case.tol)
    torch.testing.assert_close(head.prototypes, new, **case.tol)
    # official loss: CE(seg) + 0.01 PPC + 0.001 PPD, gradients to the input and the LayerNorms
    gt_ce = gt.masked_fill(gt == ignore_index, -100)
    (F.cross_entropy(out.seg, gt_ce) + 0.01 * out.loss_ppc + 0.001 * out.loss_ppd).backward()
    (F.cross_entropy(seg, gt_ce) + 0.01 * ppc + 0.001 * ppd).backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-4)
    for (n, pa), pb in zip(head.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-4, msg=n)


# ---------------------------------------------------------------- realistic sizes and determinism


def assert_targets_agree(ta, tb, K, min_agree):
    """Targets equal up to near-ties: at least ``min_agree`` of them equal, and every other one
    a different prototype of the same class (never another class, never ignored vs. not)."""
    same = ta == tb
    assert same.float().mean().item() >= min_agree, f"only {same.float().mean().item():.4f} of the targets agree"
    diff = ~same
    assert ((ta[diff] >= 0) & (tb[diff] >= 0)).all() and torch.equal(ta[diff] // K, tb[diff] // K)


# Cityscapes (C=19) and ADE20K (C=150) at 65,536 pixels, D=720: the tiles, grids and
# reductions of the compiled kernels at the sizes users run (GPU only: the CPU paths run these
# in the benchmarks, the interpreter would take hours)
_SIZES = {"cityscapes": (65536, 720, 19, 10), "ade20k": (65536, 720, 150, 10)}


@pytest.mark.parametrize("size", sorted(_SIZES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_realistic_size_step(case, size, dtype):
    if torch.device(case.device).type != "cuda":
        pytest.skip("realistic sizes run on GPUs (python -m protoseg_ext.selftest); the CPU runs them in bench/")
    N, D, C, K = _SIZES[size]
    f, p, gt, seg = case.problem(N=N, D=D, C=C, K=K, dtype=dtype, seed=2)
    low = dtype in (torch.float16, torch.bfloat16)
    tol = HALF_TOL if low else case.tol
    ref_dtype = torch.float32 if low else dtype
    a, b = f.clone().requires_grad_(), f.to(ref_dtype).clone().requires_grad_()
    sa = PF.proto_seg_logits(a, p, backend=case.backend)
    sb = R.proto_seg_logits(b, p.to(ref_dtype))
    torch.testing.assert_close(sa.to(ref_dtype), sb, **tol)
    target = torch.where(gt >= 0, gt * K + 3, gt)
    la = PF.proto_losses(a, p, target, backend=case.backend)
    lb = R.proto_losses(b, p.to(ref_dtype), target)
    torch.testing.assert_close(torch.stack(la).to(ref_dtype), torch.stack(lb), **tol)
    (sa.to(ref_dtype).mean() + sum(la)).backward()
    (sb.mean() + sum(lb)).backward()
    if low:
        assert_close_rel(a.grad, b.grad)
    else:
        torch.testing.assert_close(a.grad, b.grad, **tol)
    ta, na = PF.prototype_learning(f, p, gt, seg, assign="argmax", backend=case.backend)
    tb, nb = R.prototype_learning(f.to(ref_dtype), p.to(ref_dtype), gt, seg.to(ref_dtype), assign="argmax")
    assert_targets_agree(ta, tb, K, 0.95 if low else 0.999)
    torch.testing.assert_close(na.to(ref_dtype), nb, **(dict(atol=3e-2, rtol=3e-2) if low else tol))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_ppc_ppd_gradient_alone(case, dtype):
    """Under AMP the PPC/PPD part of the gradient is small (weights 0.01, 0.001): it must not
    underflow in the backward; judged against float64 on that part alone."""
    f, p, gt, _ = case.problem(N=512, D=64, C=5, K=4, dtype=dtype)
    target = torch.where(gt >= 0, gt * 4 + 1, gt)
    a, b = f.clone().requires_grad_(), f.double().clone().requires_grad_()
    la = PF.proto_losses(a, p, target, backend=case.backend)
    lb = R.proto_losses(b, p.double(), target)
    (0.01 * la[0] + 0.001 * la[1]).backward()
    (0.01 * lb[0] + 0.001 * lb[1]).backward()
    assert_close_rel(a.grad, b.grad, tol=3e-2)


def test_deterministic_mode_is_bitwise_reproducible(case):
    """With torch.use_deterministic_algorithms(True), a whole head step is bitwise equal run to run."""
    big = torch.device(case.device).type == "cuda"
    B, D, H, W, C = (2, 720, 128, 128, 19) if big else (2, 16, 12, 10, 5)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, D, H, W, generator=g).to(case.device)
    gt = torch.randint(-1, C, (B, H, W), generator=g).to(case.device)
    prev = torch.are_deterministic_algorithms_enabled()
    runs = []
    try:
        torch.use_deterministic_algorithms(True)
        for _ in range(2):
            torch.manual_seed(0)
            head = ProtoSegHead(D, C, backend=case.backend).to(case.device).train()
            xi = x.clone().requires_grad_()
            out = head(xi, gt)
            (out.seg.square().mean() + out.loss_ppc + out.loss_ppd).backward()
            runs.append((out.seg.detach(), out.target, head.prototypes.clone(), xi.grad))
    finally:
        torch.use_deterministic_algorithms(prev)
    for u, v in zip(*runs):
        assert torch.equal(u, v)


# ---------------------------------------------------------------- errors that a GPU reports on the device

_OUT_OF_RANGE = """
import sys, torch
import protoseg_ext.functional as PF
from protoseg_ext.testing import make_problem
f, p, gt, seg = make_problem(N=50, C=5, K=3, device=sys.argv[1])
gt[7] = 5
PF.prototype_learning(f, p, gt, seg, backend=sys.argv[2])
torch.cuda.synchronize()
print("DID NOT RAISE")
"""


def test_labels_out_of_range_raise(case):
    """A label outside [0, C) that is not ignore_index raises. On a GPU that is a device-side
    assert, which poisons the CUDA context of its process: it runs in a subprocess there."""
    if torch.device(case.device).type == "cuda":
        import subprocess
        import sys

        res = subprocess.run([sys.executable, "-c", _OUT_OF_RANGE, case.device, case.backend], capture_output=True,
                             text=True, timeout=600)
        assert res.returncode != 0 and "DID NOT RAISE" not in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
        assert "outside" in res.stderr or "device-side assert" in res.stderr, res.stderr[-2000:]
        return
    f, p, gt, seg = case.problem(N=50, C=5, K=3)
    gt[7] = 5
    with pytest.raises(ValueError, match=r"gt\[7\] = 5 is outside \[0, 5\)"):
        PF.prototype_learning(f, p, gt, seg, backend=case.backend)
    gt[7] = -3
    with pytest.raises(ValueError, match="gt"):
        PF.prototype_learning(f, p, gt, seg, backend=case.backend)
    t = torch.zeros(50, dtype=torch.long, device=case.device)
    t[3] = 15  # C*K = 15
    with pytest.raises(ValueError, match=r"target\[3\] = 15"):
        PF.proto_losses(f, p, t, backend=case.backend)


def test_tensors_on_another_gpu_than_the_current_one(case):
    """Every launch runs on its tensors' device, not on the current one (multi-GPU machines)."""
    if torch.device(case.device).type != "cuda" or torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dev = f"cuda:{torch.cuda.device_count() - 1}"
    with torch.cuda.device(0):
        head = ProtoSegHead(16, 5, num_prototype=3, backend=case.backend, assign="argmax").to(dev).train()
        oracle = ProtoSegHead(16, 5, num_prototype=3, assign="argmax")
        oracle.load_state_dict(head.state_dict())
        oracle.to(dev).train()
        x = torch.randn(2, 16, 8, 8, device=dev)
        gt = torch.randint(-1, 5, (2, 8, 8), device=dev)
        out = head(x, gt)
        seg, ppc, ppd, target, new = official_head_step(oracle, x, gt)
        torch.cuda.synchronize(dev)
    torch.testing.assert_close(out.seg, seg, **case.tol)
    assert torch.equal(out.target, target)
    torch.testing.assert_close(head.prototypes, new, **case.tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_updates_prototypes_in_float32_for_half_maps(case, dtype):
    """A 16-bit map: the momentum update runs on the float32 buffer, as the official code's does under autocast
    (its einsum alone sees 16-bit prototypes). A 16-bit copy of the prototypes in the update would round away
    most of a gamma = 0.999 step: an entry moves by about 1e-4, a bfloat16 ulp near 0.1 is 5e-4."""
    torch.manual_seed(0)
    head = ProtoSegHead(64, 5, num_prototype=3, backend=case.backend, assign="argmax").to(case.device)
    oracle = ProtoSegHead(64, 5, num_prototype=3, assign="argmax")
    oracle.load_state_dict(head.state_dict())
    oracle.to(case.device).train()
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 64, 8, 8, generator=g) + torch.randn(1, 64, 1, 1, generator=g)).to(case.device, dtype)
    with torch.no_grad():
        gt = head.eval()(x).seg.argmax(1)  # every pixel predicted right: every one takes part in the update
        p0 = F.normalize(head.prototypes, p=2, dim=-1)
        head.train()(x, gt)
        new = official_head_step(oracle, x, gt)[4]
    moved, expected = head.prototypes - p0, new - p0
    assert head.prototypes.dtype == torch.float32 and expected.abs().max() > 2e-5
    torch.testing.assert_close(moved, expected, atol=2e-6, rtol=2e-2)


def test_head_bad_label_raises_before_any_update(case):
    """A label out of range stops the step with a clear error; the prototypes stay as they were."""
    if torch.device(case.device).type == "cuda":
        pytest.skip("on a GPU this is a device-side assert (test_labels_out_of_range_raise)")
    head = ProtoSegHead(16, 5, num_prototype=3, backend=case.backend).to(case.device).train()
    before = head.prototypes.clone()
    gt = torch.randint(0, 5, (2, 6, 7), device=case.device)
    gt[1, 2, 3] = 9
    with pytest.raises(ValueError, match=r"gt\[\d+\] = 9 is outside \[0, 5\)"):
        head(torch.randn(2, 16, 6, 7, device=case.device), gt)
    assert torch.equal(head.prototypes, before)
