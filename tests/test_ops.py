"""Every fused op against protoseg_ext.reference, on values and gradients.

Parametrised over (device, backend): "cpu" here, plus "cuda"/"triton" on a GPU
machine (see conftest.py).
"""

import pytest
import torch
import torch.nn.functional as F

import protoseg_ext.functional as PF
from protoseg_ext import reference as R
from conftest import make_problem

TOL = dict(atol=1e-5, rtol=1e-5)


def _args(device_backend, **kw):
    device, backend = device_backend
    return make_problem(device=device, **kw), backend


# ---------------------------------------------------------------- seg logits


@pytest.mark.parametrize("shape", [(300, 16, 5, 4), (1, 8, 1, 1), (257, 33, 7, 10), (64, 720, 3, 2)])
def test_seg_logits_values_and_grad(device_backend, shape):
    N, D, C, K = shape
    (f, p, _, _), backend = _args(device_backend, N=N, D=D, C=C, K=K)
    a = f.clone().requires_grad_()
    b = f.clone().requires_grad_()
    sa = PF.proto_seg_logits(a, p, backend=backend)
    sb = R.proto_seg_logits(b, p)
    torch.testing.assert_close(sa, sb, **TOL)
    w = torch.randn_like(sb)  # non-uniform upstream gradient
    (sa * w).sum().backward()
    (sb * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, **TOL)


def test_seg_logits_gradcheck(device_backend):
    (f, p, _, _), backend = _args(device_backend, N=40, D=6, C=3, K=3, dtype=torch.float64)
    f.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: PF.proto_seg_logits(x, p, backend=backend), (f,))


# ---------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("iters,eps", [(3, 0.05), (1, 0.05), (5, 0.1)])
def test_sinkhorn_matches_official_loop(device_backend, skew, iters, eps):
    from protoseg_ext import backends

    (f, p, gt, _), backend = _args(device_backend, N=400, C=6, K=5, skew=skew)
    be = backends.get_backend(backend)
    own = R.similarity(f, p).view(f.shape[0], p.shape[0], p.shape[1])
    own = own[torch.arange(f.shape[0]), gt.clamp(min=0)] * (gt >= 0)[:, None]
    Q = be.sinkhorn(own.float(), gt, p.shape[0], -1, iters, eps)
    Qr = R.sinkhorn(own.float(), gt, p.shape[0], -1, iters, eps)
    torch.testing.assert_close(Q, Qr, atol=1e-5, rtol=1e-4)
    valid = gt >= 0
    torch.testing.assert_close(Q[valid].sum(1), torch.ones(int(valid.sum()), device=Q.device), atol=1e-5, rtol=0)
    assert (Q[~valid] == 0).all()


# ---------------------------------------------------------------- prototype learning


def _learn(f, p, gt, seg, backend, **kw):
    return PF.prototype_learning(f, p, gt, seg, backend=backend, **kw), R.prototype_learning(f, p, gt, seg, **kw)


@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("gamma", [0.999, 0.5, 0.0])
def test_prototype_learning_argmax_exact(device_backend, skew, gamma):
    (f, p, gt, seg), backend = _args(device_backend, N=500, C=6, K=5, skew=skew)
    (t, new), (tr, newr) = _learn(f, p, gt, seg, backend, gamma=gamma, assign="argmax")
    assert torch.equal(t, tr)
    torch.testing.assert_close(new, newr, **TOL)
    torch.testing.assert_close(new.norm(dim=-1), torch.ones(new.shape[:2], device=new.device), **TOL)


def test_prototype_learning_gumbel_with_noise(device_backend):
    (f, p, gt, seg), backend = _args(device_backend, N=500, C=6, K=5)
    noise = R.sample_gumbel((f.shape[0], p.shape[1]), generator=torch.Generator().manual_seed(3)).to(f.device)
    (t, new), (tr, newr) = _learn(f, p, gt, seg, backend, gamma=0.5, gumbel_noise=noise)
    assert torch.equal(t, tr)
    torch.testing.assert_close(new, newr, **TOL)
    # the official quirk: the EMA assignment differs from the target for many pixels
    _, new_argmax = PF.prototype_learning(f, p, gt, seg, gamma=0.5, assign="argmax", backend=backend)
    assert not torch.allclose(new, new_argmax)


def test_prototype_learning_gumbel_seeded_same_as_reference(device_backend):
    (f, p, gt, seg), backend = _args(device_backend, N=300, C=4, K=3)
    torch.manual_seed(7)
    t, new = PF.prototype_learning(f, p, gt, seg, gamma=0.5, backend=backend)
    torch.manual_seed(7)
    tr, newr = R.prototype_learning(f, p, gt, seg, gamma=0.5)
    assert torch.equal(t, tr)
    torch.testing.assert_close(new, newr, **TOL)


def test_prototype_learning_no_update_and_input_untouched(device_backend):
    (f, p, gt, seg), backend = _args(device_backend)
    p0 = p.clone()
    t, new = PF.prototype_learning(f, p, gt, seg, update=False, assign="argmax", backend=backend)
    tr, _ = R.prototype_learning(f, p, gt, seg, update=False, assign="argmax")
    assert torch.equal(p, p0)
    assert torch.equal(t, tr)
    torch.testing.assert_close(new, F.normalize(p, dim=-1), **TOL)


# 20,000 rows: the CPU kernel sums them in 3 row blocks and merges the partials
@pytest.mark.parametrize("N", [400, 20000])
def test_prototype_learning_update_sums(device_backend, N):
    """The per-prototype sums/counts, checked directly against the reference."""
    from protoseg_ext import backends, functional

    (f, p, gt, seg), backend = _args(device_backend, N=N, C=5, K=4)
    be = backends.get_backend(backend)
    _, _, _, own = be.similarity(f, p, gt, -1, 1.0, False, False, True)
    t, sums, counts = functional.assign_and_sums(be, f, p, gt, seg.argmax(dim=1), own, "argmax", None, -1, 3, 0.05)
    tr, _, sums_r, counts_r = R.prototype_learning(f, p, gt, seg, assign="argmax", return_sums=True)
    assert torch.equal(t, tr)
    torch.testing.assert_close(sums.view_as(sums_r), sums_r, **TOL)
    torch.testing.assert_close(counts.view_as(counts_r), counts_r, atol=0, rtol=0)
    assert counts.sum() > 0


# ---------------------------------------------------------------- losses


@pytest.mark.parametrize("temperature", [1.0, 0.1])
@pytest.mark.parametrize("ignore_index", [-1, 255])
def test_losses_values_and_grad(device_backend, temperature, ignore_index):
    (f, p, gt, seg), backend = _args(device_backend, N=400, C=5, K=4, ignore_index=ignore_index)
    t, _ = R.prototype_learning(f, p, gt, seg, assign="argmax", ignore_index=ignore_index)
    a = f.clone().requires_grad_()
    b = f.clone().requires_grad_()
    la = PF.proto_losses(a, p, t, ignore_index=ignore_index, temperature=temperature, backend=backend)
    lb = R.proto_losses(b, p, t, ignore_index=ignore_index, temperature=temperature)
    torch.testing.assert_close(la[0], lb[0], **TOL)
    torch.testing.assert_close(la[1], lb[1], **TOL)
    for wa, wb in [(1.0, 0.0), (0.0, 1.0), (0.7, 3.0)]:  # each loss's gradient alone and mixed
        ga = torch.autograd.grad(wa * la[0] + wb * la[1], a, retain_graph=True)[0]
        gb = torch.autograd.grad(wa * lb[0] + wb * lb[1], b, retain_graph=True)[0]
        torch.testing.assert_close(ga, gb, **TOL)


def test_losses_gradcheck(device_backend):
    (f, p, gt, seg), backend = _args(device_backend, N=30, D=6, C=3, K=2, dtype=torch.float64)
    t, _ = R.prototype_learning(f, p, gt, seg, assign="argmax")
    f.requires_grad_()
    fn = lambda x: PF.proto_losses(x, p, t, temperature=0.5, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (f,))


def test_similarity_op_gradcheck_all_outputs(device_backend):
    """The raw op: seg, lse and own outputs at once, with the labels path."""
    from protoseg_ext import backends

    (f, p, gt, _), backend = _args(device_backend, N=25, D=5, C=3, K=2, dtype=torch.float64)
    be = backends.get_backend(backend)
    f.requires_grad_()

    def fn(x):
        seg, _, lse, own = be.similarity(x, p, gt, -1, 0.7, True, True, True)
        return seg, lse, own

    assert torch.autograd.gradcheck(fn, (f,))


def test_similarity_op_outputs(device_backend):
    from protoseg_ext import backends

    (f, p, gt, _), backend = _args(device_backend, N=200, C=5, K=4)
    be = backends.get_backend(backend)
    seg, argk, lse, own = be.similarity(f, p, gt, -1, 0.5, True, True, True)
    S = R.similarity(f, p)  # (N, C*K)
    masks = S.view(-1, 5, 4)
    torch.testing.assert_close(seg, masks.amax(2), **TOL)
    assert torch.equal(argk.long(), masks.argmax(2))
    torch.testing.assert_close(lse, torch.logsumexp(S / 0.5, 1), **TOL)
    ref_own = masks[torch.arange(200), gt.clamp(min=0)] * (gt >= 0)[:, None]
    torch.testing.assert_close(own, ref_own, **TOL)
    assert seg.dtype == f.dtype and lse.dtype == torch.float32 and own.dtype == torch.float32


@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_similarity_lse_and_softmax_cache_for_any_row_scale(device_backend, scale, temperature):
    """Rows of S well inside float range take exp(S) directly, rows up to |S / tau| = 200 the shifted path;
    both give the row log-sum-exp, and the backward (kept softmax or recomputed) the same gradient."""
    from protoseg_ext import backends

    (f, p, gt, _), backend = _args(device_backend, N=300, C=5, K=4)
    be = backends.get_backend(backend)
    f = f * scale
    f[7] *= 3  # one row far out: its tile takes the shifted path whenever that row needs it
    S = R.similarity(f, p) / temperature
    lse = be.similarity(f, p, gt, -1, temperature, True, True, True)[2]
    torch.testing.assert_close(lse, torch.logsumexp(S, 1), atol=1e-5, rtol=1e-5)
    g = torch.randn(300, device=f.device)
    grads = []
    for cache in (0, 1 << 20):
        if not be.supports_cache and cache:
            continue
        x = f.clone().requires_grad_()
        (be.similarity(x, p, gt, -1, temperature, True, True, True, cache)[2] * g).sum().backward()
        grads.append(x.grad)
    ref = torch.autograd.grad((torch.logsumexp(R.similarity(f.requires_grad_(), p) / temperature, 1) * g).sum(), f)[0]
    for gr in grads:
        torch.testing.assert_close(gr, ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- dtypes, layouts


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(device_backend, dtype):
    (f, p, gt, seg), backend = _args(device_backend, N=300, D=32, C=4, K=3, dtype=dtype)
    f32, p32 = f.float(), p.float()
    seg_h = PF.proto_seg_logits(f, p, backend=backend)
    assert seg_h.dtype == dtype
    torch.testing.assert_close(seg_h.float(), R.proto_seg_logits(f32, p32), atol=2e-2, rtol=2e-2)
    t, new = PF.prototype_learning(f, p, gt, seg, assign="argmax", gamma=0.5, backend=backend)
    tr, newr = R.prototype_learning(f32, p32, gt, seg.float(), assign="argmax", gamma=0.5)
    assert new.dtype == dtype and torch.isfinite(new.float()).all()
    assert (t == tr).float().mean() > 0.9  # near-ties may flip at half precision
    torch.testing.assert_close(new.float(), newr, atol=3e-2, rtol=3e-2)
    a = f.clone().requires_grad_()
    ppc, ppd = PF.proto_losses(a, p, tr, backend=backend)
    ppc_r, ppd_r = R.proto_losses(f32, p32, tr)
    assert ppc.dtype == torch.float32
    torch.testing.assert_close(ppc, ppc_r, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ppd, ppd_r, atol=2e-2, rtol=2e-2)
    (ppc + ppd).backward()
    assert a.grad.dtype == dtype and torch.isfinite(a.grad.float()).all()


def test_non_contiguous_inputs(device_backend):
    (f, p, gt, seg), backend = _args(device_backend, N=200, D=16, C=4, K=3)
    fT = f.t().contiguous().t()  # same values, column-major
    pT = p.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    gt2 = torch.stack([gt, gt], 1)[:, 0]  # stride 2
    seg2 = seg.t().contiguous().t()
    assert not fT.is_contiguous() and not pT.is_contiguous() and not gt2.is_contiguous()
    torch.testing.assert_close(PF.proto_seg_logits(fT, pT, backend=backend), R.proto_seg_logits(f, p), **TOL)
    t, new = PF.prototype_learning(fT, pT, gt2, seg2, assign="argmax", backend=backend)
    tr, newr = R.prototype_learning(f, p, gt, seg, assign="argmax")
    assert torch.equal(t, tr)
    torch.testing.assert_close(new, newr, **TOL)
    a = fT.clone().requires_grad_()
    ppc, ppd = PF.proto_losses(a, pT, tr, backend=backend)
    torch.testing.assert_close(torch.stack([ppc, ppd]), torch.stack(R.proto_losses(f, p, tr)), **TOL)


# ---------------------------------------------------------------- fused L2 normalisation


def test_similarity_normalize_flag_matches_normalize_then_similarity(device_backend):
    """normalize=True (the head's path) == F.normalize first, values and gradients."""
    from protoseg_ext import backends

    (f, p, gt, _), backend = _args(device_backend, N=300, D=16, C=5, K=4)
    be = backends.get_backend(backend)
    x = f * torch.rand(f.shape[0], 1, device=f.device) * 3 + 0.0  # raw rows of any length
    x[3] = 0  # a zero row: F.normalize leaves it zero
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    oa = be.similarity(a, p, gt, -1, 0.5, True, True, True, 1 << 20, True)
    ob = be.similarity(F.normalize(b, dim=-1), p, gt, -1, 0.5, True, True, True, 1 << 20, False)
    for u, v in zip(oa, ob):
        torch.testing.assert_close(u, v, **TOL)
    w = [torch.randn_like(oa[0]), torch.randn_like(oa[2]), torch.randn_like(oa[3])]
    ga = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip((oa[0], oa[2], oa[3]), w)), a)[0]
    gb = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip((ob[0], ob[2], ob[3]), w)), b)[0]
    torch.testing.assert_close(ga, gb, **TOL)
    slot = torch.randint(-1, 20, (300,), device=f.device)
    sa, ca = be.prototype_sums(x, slot, 20, True)
    sb, cb = be.prototype_sums(F.normalize(x, dim=-1), slot, 20, False)
    torch.testing.assert_close(sa, sb, **TOL)
    assert torch.equal(ca, cb)


@pytest.mark.parametrize("cache", [0, 1 << 20])
def test_similarity_normalize_gradcheck(device_backend, cache):
    from protoseg_ext import backends

    (f, p, gt, _), backend = _args(device_backend, N=20, D=5, C=3, K=2, dtype=torch.float64)
    be = backends.get_backend(backend)
    x = (f * 2.5).requires_grad_()

    def fn(x):
        seg, _, lse, own = be.similarity(x, p, gt, -1, 0.7, True, True, True, cache, True)
        return seg, lse, own

    assert torch.autograd.gradcheck(fn, (x,))
