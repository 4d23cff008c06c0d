"""The "triton" backend against protoseg_ext.reference, on values and gradients.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1,
set below before anything imports triton) on CPU tensors; with a GPU they are
compiled and run on CUDA tensors. The interpreter's cost is per program, so the
problems are small and the launchers pick large tiles; tests that need several
row, class or D blocks force small tiles through the launchers' overrides.
"""

import os

if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

triton = pytest.importorskip("triton")

import protoseg_ext  # noqa: E402
import protoseg_ext.functional as PF  # noqa: E402
from protoseg_ext import backends  # noqa: E402
from protoseg_ext import reference as R  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_GPU = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if HAS_GPU else "cpu"

if not INTERPRET and not HAS_GPU:
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

import protoseg_ext.triton_ops  # noqa: E402,F401  (registers torch.ops.protoseg_triton)
from protoseg_ext.kernels import prototype_update as KU  # noqa: E402
from protoseg_ext.kernels import similarity as KS  # noqa: E402
from protoseg_ext.kernels import sinkhorn as KSK  # noqa: E402

T = torch.ops.protoseg_triton
TOL = dict(atol=1e-5, rtol=1e-5) if INTERPRET else dict(atol=2e-5, rtol=1e-4)  # tf32x3 on a GPU
HALF_TOL = dict(atol=2e-2, rtol=2e-2)


def assert_close_rel(a, b, tol=2e-2):
    """``max |a - b| <= tol * max |b|``: half-precision results judged at the scale of the values."""
    a, b = a.double(), b.double()
    scale = b.abs().max().clamp(min=1e-30)
    err = (a - b).abs().max()
    assert err <= tol * scale, f"max abs error {err.item():.3g} > {tol} * max |ref| = {(tol * scale).item():.3g}"
gpu_only = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (compiled Triton kernels)")
# the interpreter evaluates masked-out lanes too (e.g. inf - inf of a NaN row): numpy warns, harmlessly
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def problem(N=300, D=16, C=5, K=4, *, seed=0, ignore_frac=0.1, ignore_index=-1, dtype=torch.float32, skew=False):
    """L2-normalised ``feats (N, D)``, ``protos (C, K, D)``, labels ``gt (N,)`` and logits ``seg (N, C)``.

    seg is the head's per-class max plus noise, with a third of the labeled
    pixels forced correct, so some pixels update the prototypes and some not.
    """
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    protos = F.normalize(torch.randn(C, K, D, generator=g, dtype=torch.float64), dim=-1)
    if skew:
        gt = torch.where(torch.rand(N, generator=g) < 0.5, 0, torch.randint(0, C, (N,), generator=g))
    else:
        gt = torch.randint(0, C, (N,), generator=g)
    gt = torch.where(torch.rand(N, generator=g) < ignore_frac, torch.full_like(gt, ignore_index), gt)
    seg = torch.einsum("nd,ckd->nkc", feats, protos).amax(1)
    seg = seg + 0.05 * torch.randn(N, C, generator=g, dtype=torch.float64)
    fix = (torch.rand(N, generator=g) < 0.33) & (gt != ignore_index)
    seg[fix, gt[fix].clamp(min=0)] += 10.0
    to = dict(device=DEVICE)
    return feats.to(dtype).to(**to), protos.to(dtype).to(**to), gt.to(**to), seg.to(dtype).to(**to)


def own_scores(f, p, gt):
    """``own (N, K)``: each pixel's similarity to its class's prototypes, zero rows for ignored pixels."""
    N, C, K = f.shape[0], p.shape[0], p.shape[1]
    S = R.similarity(f.double(), p.double()).view(N, C, K)
    valid = (gt >= 0) & (gt < C)
    return (S[torch.arange(N, device=f.device), gt.clamp(0, C - 1)] * valid[:, None]).float()


# ---------------------------------------------------------------- backend plumbing


def test_backend_is_available_and_chosen():
    assert "triton" in protoseg_ext.available_backends()
    assert backends.resolve("triton", DEVICE).name == "triton"
    if HAS_GPU:
        assert backends.resolve("auto", "cuda").name == "triton"  # auto prefers Triton on CUDA
    else:
        assert backends.resolve("auto", "cpu").name != "triton"  # the interpreter is for tests only


def test_schemas_match_the_compiled_ops():
    if backends.load_extension() is None:
        pytest.skip("protoseg_ext._C did not load")
    # the C++ similarity may carry extra trailing options with defaults (its
    # softmax cache) and one more output; Triton recomputes instead
    for op in ("similarity", "similarity_backward", "sinkhorn", "prototype_sums", "prototype_ema"):
        a = getattr(torch.ops.protoseg_ext, op).default._schema
        b = getattr(T, op).default._schema
        args_a = [(x.name, str(x.type)) for x in a.arguments]
        args_b = [(x.name, str(x.type)) for x in b.arguments]
        assert args_a[: len(args_b)] == args_b, op
        assert all(x.has_default_value() for x in a.arguments[len(args_b):]), op
        assert [str(x.type) for x in a.returns][: len(b.returns)] == [str(x.type) for x in b.returns], op


# ---------------------------------------------------------------- similarity


@pytest.mark.parametrize("shape", [(300, 16, 5, 4), (1, 16, 1, 1), (257, 33, 7, 10), (40, 300, 3, 2)])
def test_seg_logits_values_and_grad(shape):
    N, D, C, K = shape
    f, p, _, _ = problem(N, D, C, K)
    a, b = f.clone().requires_grad_(), f.clone().requires_grad_()
    sa = PF.proto_seg_logits(a, p, backend="triton")
    sb = R.proto_seg_logits(b, p)
    torch.testing.assert_close(sa, sb, **TOL)
    w = torch.randn_like(sb)  # non-uniform upstream gradient
    (sa * w).sum().backward()
    (sb * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, **TOL)


@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_fused_outputs_and_every_gradient_with_small_tiles(temperature):
    """Several row, class and D blocks and D slices: the tile loops and their masks."""
    N, D, C, K = 70, 40, 9, 3
    f, p, gt, _ = problem(N, D, C, K)
    tiles = dict(BLOCK_N=16, BLOCK_C=4, BLOCK_D=16)  # 5 row blocks, 3 class blocks (4 + 4 + 1), 3 D chunks
    seg, argk, lse, own = KS.similarity_forward(f, p, gt, temperature, True, True, True, tiles=tiles)
    S = R.similarity(f, p)
    torch.testing.assert_close(seg, S.view(N, C, K).amax(2), **TOL)
    assert torch.equal(argk.long(), S.view(N, C, K).argmax(2))
    torch.testing.assert_close(lse, torch.logsumexp(S / temperature, 1), **TOL)
    torch.testing.assert_close(own, own_scores(f, p, gt), **TOL)
    # d feats through the three outputs, against autograd of the eager formulas
    x = f.clone().requires_grad_()
    Sx = R.similarity(x, p)
    g_seg, g_lse = torch.randn(N, C, device=DEVICE), torch.randn(N, device=DEVICE)
    g_own = torch.randn(N, K, device=DEVICE)
    sel = Sx.view(N, C, K)[torch.arange(N, device=DEVICE), gt.clamp(min=0)] * (gt >= 0)[:, None]
    loss = (Sx.view(N, C, K).amax(2) * g_seg).sum() + (torch.logsumexp(Sx / temperature, 1) * g_lse).sum()
    (loss + (sel * g_own).sum()).backward()
    for bwd_tiles in (dict(tiles, BLOCK_DO=16), dict(tiles, BLOCK_DO=64)):  # 3 D slices, then 1
        dx = KS.similarity_backward(g_seg, g_lse, g_own, f, p, gt, argk, lse, temperature, tiles=bwd_tiles)
        torch.testing.assert_close(dx, x.grad, **TOL)
    # each gradient alone (the others None)
    for gs, gl, go in ((g_seg, None, None), (None, g_lse, None), (None, None, g_own)):
        y = f.clone().requires_grad_()
        Sy = R.similarity(y, p)
        parts = []
        if gs is not None:
            parts.append((Sy.view(N, C, K).amax(2) * gs).sum())
        if gl is not None:
            parts.append((torch.logsumexp(Sy / temperature, 1) * gl).sum())
        if go is not None:
            own_y = Sy.view(N, C, K)[torch.arange(N, device=DEVICE), gt.clamp(min=0)] * (gt >= 0)[:, None]
            parts.append((own_y * go).sum())
        sum(parts).backward()
        dx = KS.similarity_backward(gs, gl, go, f, p, gt, argk, lse, temperature, tiles=tiles)
        torch.testing.assert_close(dx, y.grad, **TOL)


def test_own_class_scores_kernel_matches_fused_forward():
    f, p, gt, _ = problem(90, 24, 4, 3, ignore_frac=0.3)
    only = T.similarity(f, p, gt, -1, 1.0, False, False, True)[3]
    fused = T.similarity(f, p, gt, -1, 1.0, True, True, True)[3]
    small = KS.similarity_forward(f, p, gt, 1.0, False, False, True, tiles=dict(BLOCK_N=16, BLOCK_D=16))[3]
    torch.testing.assert_close(only, own_scores(f, p, gt), **TOL)
    torch.testing.assert_close(fused, only, **TOL)
    torch.testing.assert_close(small, only, **TOL)


def test_seg_logits_gradcheck_float64():
    f, p, _, _ = problem(8, 5, 3, 3, dtype=torch.float64)
    f.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: PF.proto_seg_logits(x, p, backend="triton"), (f,))


def test_float64_backward_all_terms():
    """The float64 backward takes the FMA path for its second product."""
    f, p, gt, _ = problem(50, 12, 4, 3, dtype=torch.float64)
    target = torch.where(gt >= 0, gt * 3 + 1, gt)
    a, b = f.clone().requires_grad_(), f.clone().requires_grad_()
    ppc_a, ppd_a = PF.proto_losses(a, p, target, backend="triton", temperature=0.5)
    ppc_b, ppd_b = R.proto_losses(b, p, target, temperature=0.5)
    torch.testing.assert_close(torch.stack([ppc_a, ppd_a]), torch.stack([ppc_b, ppd_b]), atol=1e-10, rtol=1e-9)
    (ppc_a + 0.3 * ppd_a).backward()
    (ppc_b + 0.3 * ppd_b).backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-9)


# ---------------------------------------------------------------- losses


@pytest.mark.parametrize("ignore_index", [-1, 255])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_losses_values_and_grad(ignore_index, temperature):
    C, K = 5, 4
    f, p, gt, _ = problem(200, 16, C, K, ignore_index=ignore_index, ignore_frac=0.2)
    g = torch.Generator().manual_seed(1)
    target = torch.where(gt != ignore_index, gt * K + torch.randint(0, K, gt.shape, generator=g).to(DEVICE), gt)
    a, b = f.clone().requires_grad_(), f.clone().requires_grad_()
    ppc_a, ppd_a = PF.proto_losses(a, p, target, ignore_index, temperature, backend="triton")
    ppc_b, ppd_b = R.proto_losses(b, p, target, ignore_index, temperature)
    torch.testing.assert_close(ppc_a, ppc_b, **TOL)
    torch.testing.assert_close(ppd_a, ppd_b, **TOL)
    (0.7 * ppc_a + 1.3 * ppd_a).backward()
    (0.7 * ppc_b + 1.3 * ppd_b).backward()
    torch.testing.assert_close(a.grad, b.grad, **TOL)


# ---------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("iters,eps", [(3, 0.05), (1, 0.05), (5, 0.1)])
def test_sinkhorn_matches_official_loop(skew, iters, eps):
    f, p, gt, _ = problem(300, 16, 6, 5, skew=skew)
    own = own_scores(f, p, gt)
    Q = T.sinkhorn(own, gt, 6, -1, iters, eps)
    torch.testing.assert_close(Q, R.sinkhorn(own, gt, 6, -1, iters, eps), **TOL)


def test_sinkhorn_split_classes_and_small_blocks():
    """SPLIT programs per class and several row steps: the merged partials give the same Q."""
    f, p, gt, _ = problem(160, 16, 4, 3, skew=True)
    own = own_scores(f, p, gt)
    ref = R.sinkhorn(own, gt, 4, -1, 3, 0.05)
    for split, block_n in ((1, 16), (3, 16), (7, 32)):
        torch.testing.assert_close(KSK.sinkhorn(own, gt, 4, 3, 0.05, split=split, block_n=block_n), ref, **TOL)


def test_sinkhorn_float64_and_nonfinite_rows():
    f, p, gt, _ = problem(120, 8, 3, 4, dtype=torch.float64)
    own = own_scores(f, p, gt).double()
    own[5] = float("nan")
    own[9, 2] = float("inf")
    Q = T.sinkhorn(own, gt, 3, -1, 3, 0.05)
    assert Q.dtype == torch.float64
    assert torch.isfinite(Q).all() and (Q[5] == 0).all() and (Q[9] == 0).all()
    torch.testing.assert_close(Q, R.sinkhorn(own, gt, 3, -1, 3, 0.05), atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------- prototype sums and EMA


def _sums_reference(f, slot, S):
    ok = (slot >= 0) & torch.isfinite(f).all(1)
    sums = torch.zeros(S, f.shape[1], dtype=torch.float64, device=f.device).index_add_(0, slot[ok], f[ok].double())
    counts = torch.bincount(slot[ok], minlength=S).double()
    return sums, counts


@pytest.mark.parametrize("deterministic", [True, False])
def test_prototype_sums(deterministic):
    N, D, S = 250, 20, 12
    g = torch.Generator().manual_seed(3)
    f = torch.randn(N, D, generator=g).to(DEVICE)
    slot = torch.randint(-1, S, (N,), generator=g).to(DEVICE)
    f[7] = float("nan")  # a NaN row never reaches the sums
    f[11, 3] = float("-inf")
    sums, counts = KU.prototype_sums(f, slot, S, deterministic=deterministic)
    rs, rc = _sums_reference(f, slot, S)
    torch.testing.assert_close(sums.double(), rs, atol=1e-5, rtol=1e-5)
    assert torch.equal(counts.double(), rc)
    assert torch.isfinite(sums).all()


def test_prototype_sums_split_and_small_tiles_are_reproducible():
    N, D, S = 160, 40, 6
    g = torch.Generator().manual_seed(4)
    f = torch.randn(N, D, generator=g).to(DEVICE)
    slot = torch.randint(-1, S, (N,), generator=g).to(DEVICE)
    rs, rc = _sums_reference(f, slot, S)
    for split in (1, 4):
        a = KU.prototype_sums(f, slot, S, deterministic=True, split=split, block_n=16, block_d=16)
        b = KU.prototype_sums(f, slot, S, deterministic=True, split=split, block_n=16, block_d=16)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # bitwise, run to run
        torch.testing.assert_close(a[0].double(), rs, atol=1e-5, rtol=1e-5)
        assert torch.equal(a[1].double(), rc)
    a = KU.prototype_sums(f, slot, S, deterministic=False, block_n=16, block_d=16)
    torch.testing.assert_close(a[0].double(), rs, atol=1e-5, rtol=1e-5)


def test_prototype_sums_path_follows_deterministic_algorithms(monkeypatch):
    seen = []
    real = KU.prototype_sums

    def spy(*args, **kw):
        seen.append(kw["deterministic"])
        return real(*args, **kw)

    monkeypatch.setattr(KU, "prototype_sums", spy)
    f, slot = torch.randn(10, 4, device=DEVICE), torch.arange(10, device=DEVICE) % 3
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        T.prototype_sums(f, slot, 3)
        torch.use_deterministic_algorithms(False)
        T.prototype_sums(f, slot, 3)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert seen == [True, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_prototype_ema(dtype):
    C, K, D = 4, 3, 20
    g = torch.Generator().manual_seed(5)
    protos = F.normalize(torch.randn(C, K, D, generator=g), dim=-1).to(dtype).to(DEVICE)
    sums = torch.randn(C * K, D, generator=g).to(DEVICE)
    counts = torch.randint(0, 3, (C * K,), generator=g).float().to(DEVICE)  # some prototypes get no pixel
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = T.prototype_ema(protos, sums.to(acc), counts.to(acc), 0.9)
    ref = R.prototype_ema(protos, sums.view(C, K, D), counts.view(C, K), 0.9)
    assert out.dtype == dtype and out.shape == (C, K, D)
    tol = TOL if dtype != torch.bfloat16 else HALF_TOL
    torch.testing.assert_close(out, ref, **tol)


# ---------------------------------------------------------------- prototype learning


@pytest.mark.parametrize("ignore_index", [-1, 255])
def test_prototype_learning_argmax_mode_is_exact(ignore_index):
    f, p, gt, seg = problem(300, 16, 5, 4, ignore_index=ignore_index)
    ta, na = PF.prototype_learning(f, p, gt, seg, gamma=0.9, assign="argmax", ignore_index=ignore_index,
                                   backend="triton")
    tb, nb = R.prototype_learning(f, p, gt, seg, gamma=0.9, assign="argmax", ignore_index=ignore_index)
    assert torch.equal(ta, tb)
    torch.testing.assert_close(na, nb, **TOL)


def test_prototype_learning_gumbel_with_given_noise():
    f, p, gt, seg = problem(300, 16, 5, 4)
    noise = R.sample_gumbel((300, 4), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    ta, na = PF.prototype_learning(f, p, gt, seg, gamma=0.9, assign="gumbel", gumbel_noise=noise, backend="triton")
    tb, nb = R.prototype_learning(f, p, gt, seg, gamma=0.9, assign="gumbel", gumbel_noise=noise)
    assert torch.equal(ta, tb)
    torch.testing.assert_close(na, nb, **TOL)


def test_head_training_step_matches_reference():
    torch.manual_seed(0)
    B, D, H, W, C, K = 2, 16, 6, 5, 4, 3
    kw = dict(num_prototype=K, gamma=0.9, assign="argmax")
    ha = protoseg_ext.ProtoSegHead(D, C, backend="triton", **kw).to(DEVICE).train()
    hb = protoseg_ext.ProtoSegHead(D, C, backend="reference", **kw).to(DEVICE).train()
    hb.load_state_dict(ha.state_dict())
    x = torch.randn(B, D, H, W, device=DEVICE)
    gt = torch.randint(-1, C, (B, H, W), device=DEVICE)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    oa, ob = ha(xa, gt), hb(xb, gt)
    torch.testing.assert_close(oa.seg, ob.seg, **TOL)
    assert torch.equal(oa.target, ob.target)
    torch.testing.assert_close(oa.loss_ppc, ob.loss_ppc, **TOL)
    torch.testing.assert_close(oa.loss_ppd, ob.loss_ppd, **TOL)
    torch.testing.assert_close(ha.prototypes, hb.prototypes, **TOL)
    (oa.seg.square().mean() + oa.loss_ppc + oa.loss_ppd).backward()
    (ob.seg.square().mean() + ob.loss_ppc + ob.loss_ppd).backward()
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)


# ---------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    C, K = 5, 4
    f, p, gt, seg = problem(200, 32, C, K, dtype=dtype)
    f32, p32 = f.float(), p.float()
    a, b = f.clone().requires_grad_(), f32.clone().requires_grad_()
    sa = PF.proto_seg_logits(a, p, backend="triton")
    assert sa.dtype == dtype
    sb = R.proto_seg_logits(b, p32)
    torch.testing.assert_close(sa.float(), sb, **HALF_TOL)
    target = torch.where(gt >= 0, gt * K + 2, gt)
    ppc_a, ppd_a = PF.proto_losses(a, p, target, backend="triton")
    ppc_b, ppd_b = R.proto_losses(b, p32, target)
    assert ppc_a.dtype == torch.float32  # accumulated in float32
    torch.testing.assert_close(ppc_a, ppc_b, **HALF_TOL)
    torch.testing.assert_close(ppd_a, ppd_b, **HALF_TOL)
    (sa.float().sum() * 0.01 + ppc_a + ppd_a).backward()
    (sb.sum() * 0.01 + ppc_b + ppd_b).backward()
    assert a.grad.dtype == dtype
    assert_close_rel(a.grad, b.grad)
    # Sinkhorn runs in float32: the targets mostly agree with the float32 oracle
    ta, na = PF.prototype_learning(f, p, gt, seg, gamma=0.9, assign="argmax", backend="triton")
    tb, nb = R.prototype_learning(f32, p32, gt, seg.float(), gamma=0.9, assign="argmax")
    assert (ta == tb).float().mean() > 0.9
    assert na.dtype == dtype and torch.isfinite(na.float()).all()
    torch.testing.assert_close(na.float().norm(dim=-1), torch.ones(C, K, device=DEVICE), atol=1e-2, rtol=0)


def test_mixed_dtypes_half_feats_float_protos():
    f, p, _, _ = problem(64, 16, 3, 2)
    fh = f.half()
    seg = PF.proto_seg_logits(fh, p, backend="triton")
    torch.testing.assert_close(seg.float(), R.proto_seg_logits(fh.float(), p), **HALF_TOL)


# ---------------------------------------------------------------- edge cases (SPEC 5)


def test_absent_single_pixel_and_all_mispredicted_classes():
    C, K = 5, 3
    f, p, gt, seg = problem(120, 16, C, K)
    gt = torch.where(gt == 1, torch.full_like(gt, 3), gt)  # class 1 absent
    gt[gt == 2] = 4
    gt[17] = 2  # class 2: a single pixel
    seg[gt == 0, 0] -= 100.0  # class 0: every pixel mispredicted
    ta, na = PF.prototype_learning(f, p, gt, seg, gamma=0.9, assign="argmax", backend="triton")
    tb, nb = R.prototype_learning(f, p, gt, seg, gamma=0.9, assign="argmax")
    assert torch.equal(ta, tb)
    torch.testing.assert_close(na, nb, **TOL)
    torch.testing.assert_close(na[1], F.normalize(p[1], dim=-1), **TOL)  # absent: unchanged
    torch.testing.assert_close(na[0], F.normalize(p[0], dim=-1), **TOL)  # no correct pixel: unchanged
    assert ta[17] // K == 2  # the single pixel is its class's whole Sinkhorn problem


@pytest.mark.parametrize("ignore_index", [-1, 255])
def test_all_ignored_gives_zero_losses_zero_grad_and_unchanged_prototypes(ignore_index):
    f, p, _, seg = problem(50, 16, 3, 2)
    gt = torch.full((50,), ignore_index, device=DEVICE)
    x = f.clone().requires_grad_()
    ppc, ppd = PF.proto_losses(x, p, gt, ignore_index, backend="triton")
    assert ppc.item() == 0 and ppd.item() == 0
    (ppc + ppd).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    target, new = PF.prototype_learning(f, p, gt, seg, assign="argmax", ignore_index=ignore_index, backend="triton")
    assert (target == ignore_index).all()
    torch.testing.assert_close(new, F.normalize(p, dim=-1), **TOL)


def test_empty_batch():
    C, K, D = 3, 2, 8
    p = F.normalize(torch.randn(C, K, D, device=DEVICE), dim=-1)
    f = torch.zeros(0, D, device=DEVICE, requires_grad=True)
    gt = torch.zeros(0, dtype=torch.long, device=DEVICE)
    seg, argk, lse, own = T.similarity(f.detach(), p, gt, -1, 1.0, True, True, True)
    assert seg.shape == (0, C) and argk.shape == (0, C) and lse.shape == (0,) and own.shape == (0, K)
    s = PF.proto_seg_logits(f, p, backend="triton")
    s.sum().backward()
    assert f.grad.shape == (0, D)
    ppc, ppd = PF.proto_losses(f, p, gt, backend="triton")
    assert ppc.item() == 0 and ppd.item() == 0
    target, new = PF.prototype_learning(f.detach(), p, gt, torch.zeros(0, C, device=DEVICE), backend="triton")
    assert target.shape == (0,)
    torch.testing.assert_close(new, p, **TOL)
    assert T.sinkhorn(torch.zeros(0, K, device=DEVICE), gt, C, -1, 3, 0.05).shape == (0, K)
    sums, counts = T.prototype_sums(f.detach(), gt, C * K)
    assert sums.shape == (C * K, D) and (sums == 0).all() and (counts == 0).all()
    assert T.similarity_backward(None, None, None, f.detach(), p, gt, argk, lse, -1, 1.0).shape == (0, D)


def test_nan_feature_rows_never_reach_the_prototypes():
    f, p, gt, seg = problem(150, 16, 4, 3, ignore_frac=0.0)
    f[3] = float("nan")
    f[40, 5] = float("inf")
    seg[3, gt[3]] += 100.0  # "correct", so only the finiteness check keeps them out
    seg[40, gt[40]] += 100.0
    target, new = PF.prototype_learning(f, p, gt, seg, gamma=0.5, assign="argmax", backend="triton")
    assert torch.isfinite(new).all()
    assert target[3] == -1 and target[40] == -1
    tb, nb = R.prototype_learning(f, p, gt, seg, gamma=0.5, assign="argmax")
    assert torch.equal(target, tb)
    torch.testing.assert_close(new, nb, **TOL)


def test_non_contiguous_inputs():
    C, K, D = 4, 3, 16
    f, p, gt, seg = problem(128, 2 * D, C, K)
    fv = f[::2, ::2]  # (64, 16): strided rows and columns
    pv = F.normalize(torch.randn(K, C, D, device=DEVICE), dim=-1).transpose(0, 1)  # (C, K, D) non-contiguous
    gv = gt[::2]
    sv = seg[::2]
    fc, pc = fv.contiguous(), pv.contiguous()
    a, b = fv.clone().requires_grad_(), fc.clone().requires_grad_()
    torch.testing.assert_close(PF.proto_seg_logits(fv, pv, backend="triton"), R.proto_seg_logits(fc, pc), **TOL)
    target = torch.where(gv >= 0, gv * K, gv)
    la = PF.proto_losses(a[:, :], pv, target, backend="triton")
    lb = R.proto_losses(b, pc, target)
    torch.testing.assert_close(torch.stack(la), torch.stack(lb), **TOL)
    sum(la).backward()
    sum(lb).backward()
    torch.testing.assert_close(a.grad, b.grad, **TOL)
    ta, na = PF.prototype_learning(fv, pv, gv, sv, gamma=0.9, assign="argmax", backend="triton")
    tb, nb = R.prototype_learning(fc, pc, gv, sv, gamma=0.9, assign="argmax")
    assert torch.equal(ta, tb)
    torch.testing.assert_close(na, nb, **TOL)
    # a stride-0 (expanded) upstream gradient reaches the backward kernel as is
    x = fv.clone().requires_grad_()
    PF.proto_seg_logits(x, pv, backend="triton").sum().backward()
    y = fc.clone().requires_grad_()
    R.proto_seg_logits(y, pc).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, **TOL)


def test_argument_errors_name_the_argument():
    f, p, gt, _ = problem(20, 8, 3, 2)
    with pytest.raises(ValueError, match="feats"):
        T.similarity(f[0], p, gt, -1, 1.0, True, False, False)
    with pytest.raises(ValueError, match="protos"):
        T.similarity(f, p[:, :, :4], gt, -1, 1.0, True, False, False)
    with pytest.raises(ValueError, match="labels"):
        T.similarity(f, p, gt[:5], -1, 1.0, False, False, True)
    if not HAS_GPU:  # label ranges are checked on CPU tensors (a GPU check would sync)
        bad = gt.clone()
        bad[4] = 7
        with pytest.raises(ValueError, match=r"labels\[4\] = 7"):
            T.sinkhorn(torch.zeros(20, 2), bad, 3, -1, 3, 0.05)
        with pytest.raises(ValueError, match="num_slots"):
            T.prototype_sums(f, torch.full((20,), 6), 6)
    with pytest.raises(ValueError, match="temperature"):
        T.similarity(f, p, gt, -1, 0.0, True, False, False)
    with pytest.raises(ValueError, match="gamma"):
        T.prototype_ema(p, torch.zeros(6, 8), torch.zeros(6), 1.5)


# ---------------------------------------------------------------- torch.library


def _opcheck_cases():
    f, p, gt, _ = problem(40, 8, 3, 2)
    seg, argk, lse, own = T.similarity(f, p, gt, -1, 1.0, True, True, True)
    slot = torch.where(gt >= 0, gt * 2, gt)
    sums, counts = T.prototype_sums(f, slot, 6)
    fg = f.clone().requires_grad_()
    return {
        "similarity": (fg, p, gt, -1, 1.0, True, True, True),
        "similarity_backward": (torch.randn_like(seg), torch.randn_like(lse), torch.randn_like(own),
                                f, p, gt, argk, lse, -1, 1.0),
        "sinkhorn": (own, gt, 3, -1, 3, 0.05),
        "prototype_sums": (f, slot, 6),
        "prototype_ema": (p, sums, counts, 0.9),
    }


@pytest.mark.parametrize("op", ["similarity", "similarity_backward", "sinkhorn", "prototype_sums", "prototype_ema"])
def test_opcheck(op):
    args = _opcheck_cases()[op]
    torch.library.opcheck(getattr(T, op).default, args)


def test_torch_compile_fullgraph():
    """Dynamo traces the functional API through the custom ops (fake kernels) and the autograd formula."""
    f, p, gt, _ = problem(64, 16, 3, 2)
    target = torch.where(gt >= 0, gt * 2 + 1, gt)

    def step(x):
        seg = PF.proto_seg_logits(x, p, backend="triton")
        ppc, ppd = PF.proto_losses(x, p, target, backend="triton")
        return seg.square().mean() + ppc + ppd

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a, b = f.clone().requires_grad_(), f.clone().requires_grad_()
    la, lb = compiled(a), step(b)
    torch.testing.assert_close(la, lb, **TOL)
    la.backward()
    lb.backward()
    torch.testing.assert_close(a.grad, b.grad, **TOL)


# ---------------------------------------------------------------- 64-bit offsets

_BIG_OFFSETS = textwrap.dedent(
    """
    import os
    import torch, torch.nn.functional as F
    from protoseg_ext import reference as R
    import protoseg_ext.triton_ops
    T = torch.ops.protoseg_triton
    dev = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    N, D, C, K = 3, 32, 3, 2
    stride = 2**30 + 64  # row 2 starts at element 2**31 + 128: past int32
    # 4 GiB of address space; only the pages of the 3 rows are ever touched
    buf = torch.empty(stride * (N - 1) + D, dtype=torch.float16, device=dev)
    feats = buf.as_strided((N, D), (stride, 1))
    feats.copy_(F.normalize(torch.randn(N, D, generator=torch.Generator().manual_seed(0)), dim=1).to(dev))
    assert (N - 1) * feats.stride(0) > 2**31 - 1
    dense = feats.float()
    p = F.normalize(torch.randn(C, K, D, generator=torch.Generator().manual_seed(1)), dim=-1).to(dev)
    gt = torch.tensor([2, 0, 1], device=dev)
    seg, argk, lse, own = T.similarity(feats, p.half(), gt, -1, 1.0, True, True, True)
    S = R.similarity(dense, p.half().float())
    torch.testing.assert_close(seg.float(), S.view(N, C, K).amax(2), atol=2e-3, rtol=0)
    torch.testing.assert_close(lse, torch.logsumexp(S, 1), atol=2e-3, rtol=0)
    g = torch.ones(N, C, dtype=torch.float16, device=dev)
    dx = T.similarity_backward(g, None, None, feats, p.half(), gt, argk, lse, -1, 1.0)
    x = dense.clone().requires_grad_()
    R.proto_seg_logits(x, p.half().float()).sum().backward()
    torch.testing.assert_close(dx.float(), x.grad, atol=2e-3, rtol=0)
    for det in (True, False):
        torch.use_deterministic_algorithms(det)
        sums, counts = T.prototype_sums(feats, gt * K, C * K)
        torch.testing.assert_close(sums[gt * K], dense, atol=1e-3, rtol=0)
    print("ok")
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux lazy allocation of untouched pages")
def test_element_offsets_beyond_int32():
    """feats with a row stride of 2**30 + 64: the offset of row 2 exceeds 2**31 - 1.

    Every kernel computes row offsets in int64 (``program_id(0).to(tl.int64)``);
    with int32 arithmetic the offset wraps and the read goes elsewhere (wrong
    values or a crash). Runs in a subprocess so that a crash fails this test
    only; the 4 GiB buffer is address space, not memory (untouched pages).
    """
    if not INTERPRET and torch.cuda.get_device_properties(0).total_memory < 8 * 2**30:
        pytest.skip("needs 4 GiB of free GPU memory")
    overcommit = "/proc/sys/vm/overcommit_memory"
    if os.path.exists(overcommit) and open(overcommit).read().strip() == "2":
        pytest.skip("strict overcommit: a 4 GiB reservation would be charged in full")
    res = subprocess.run([sys.executable, "-c", _BIG_OFFSETS], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ))
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-2000:] + res.stderr[-4000:]


# ---------------------------------------------------------------- GPU only


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cityscapes_sized_step(dtype):
    """A realistic shape (several tiles of every kind) on the compiled kernels."""
    C, K = 19, 10
    f, p, gt, seg = problem(8192, 256, C, K, dtype=dtype, seed=2)
    tol = TOL if dtype == torch.float32 else HALF_TOL
    a, b = f.clone().requires_grad_(), f.float().clone().requires_grad_()
    sa = PF.proto_seg_logits(a, p, backend="triton")
    sb = R.proto_seg_logits(b, p.float())
    torch.testing.assert_close(sa.float(), sb, **tol)
    target = torch.where(gt >= 0, gt * K + 3, gt)
    la = PF.proto_losses(a, p, target, backend="triton")
    lb = R.proto_losses(b, p.float(), target)
    torch.testing.assert_close(torch.stack(la), torch.stack(lb), **tol)
    (sa.float().mean() + sum(la)).backward()
    (sb.mean() + sum(lb)).backward()
    if dtype == torch.float32:
        torch.testing.assert_close(a.grad, b.grad, **tol)
    else:
        assert_close_rel(a.grad, b.grad)
    ta, na = PF.prototype_learning(f, p, gt, seg, assign="argmax", backend="triton")
    tb, nb = R.prototype_learning(f.float(), p.float(), gt, seg.float(), assign="argmax")
    agree = (ta == tb).float().mean().item()
    assert agree == 1.0 if dtype == torch.float32 else agree > 0.95
    torch.testing.assert_close(na.float(), nb, **tol)


@gpu_only
def test_gpu_deterministic_sums_are_bitwise_reproducible_and_match_atomics():
    N, D, S = 65536, 256, 190
    g = torch.Generator(device="cuda").manual_seed(0)
    f = torch.randn(N, D, device="cuda", generator=g)
    slot = torch.randint(-1, S, (N,), device="cuda", generator=g)
    a = KU.prototype_sums(f, slot, S, deterministic=True)
    b = KU.prototype_sums(f, slot, S, deterministic=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = KU.prototype_sums(f, slot, S, deterministic=False)
    torch.testing.assert_close(c[0], a[0], atol=1e-3, rtol=1e-5)
    assert torch.equal(c[1], a[1])


@gpu_only
def test_gpu_matches_cuda_backend():
    if "cuda" not in protoseg_ext.available_backends():
        pytest.skip("the CUDA C++ backend is not built")
    f, p, gt, seg = problem(4096, 128, 19, 10, seed=3)
    ta, na = PF.prototype_learning(f, p, gt, seg, assign="argmax", backend="triton")
    tb, nb = PF.prototype_learning(f, p, gt, seg, assign="argmax", backend="cuda")
    assert torch.equal(ta, tb)
    torch.testing.assert_close(na, nb, **TOL)


# ---------------------------------------------------------------- roofline


def test_h100_roofline():
    from protoseg_ext.kernels.roofline import OPS, h100_roofline

    N, D, C, K = 65536, 720, 19, 10
    for op in OPS:
        for dtype in (torch.float32, torch.bfloat16, "float16", "fp64"):
            r = h100_roofline(op, N, D, C, K, dtype)
            assert {"flops", "bytes", "t_compute_s", "t_memory_s", "bound"} <= set(r)
            assert r["flops"] > 0 and r["bytes"] > 0
            assert r["bound"] == ("compute" if r["t_compute_s"] >= r["t_memory_s"] else "memory")
    r = h100_roofline("seg_logits", N, D, C, K, torch.bfloat16)
    assert r["flops"] >= 2 * N * D * C * K
    assert r["t_memory_s"] == pytest.approx((N * D * 2 + C * K * D * 2 + N * C * 3) / 3.35e12)
    with pytest.raises(ValueError):
        h100_roofline("nope", N, D, C, K, torch.float32)
