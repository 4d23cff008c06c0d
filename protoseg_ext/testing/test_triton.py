"""What only the "triton" backend has: its launchers' tile overrides, its schemas (the C++ ones),
torch.library's opcheck, torch.compile, 64-bit offsets. The checks every backend shares are in
the op x backend table (test_backends.py).

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
from protoseg_ext import backends, checks, ops  # noqa: E402
from protoseg_ext import reference as R  # noqa: E402
from protoseg_ext.testing import as_layout, embed_reference, make_problem  # noqa: E402
from protoseg_ext.testing import embed_problem as _embed_problem  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_GPU = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if HAS_GPU else "cpu"

if not INTERPRET and not HAS_GPU:
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

import protoseg_ext.triton_ops  # noqa: E402,F401  (registers torch.ops.protoseg_triton)
from protoseg_ext.kernels import embed as KE  # noqa: E402
from protoseg_ext.kernels import labels as KL  # noqa: E402
from protoseg_ext.kernels import prototype_update as KU  # noqa: E402
from protoseg_ext.kernels import tiles as KT  # noqa: E402
from protoseg_ext.kernels import similarity as KS  # noqa: E402
from protoseg_ext.kernels import sinkhorn as KSK  # noqa: E402

T = torch.ops.protoseg_triton
TOL = dict(atol=1e-5, rtol=1e-5) if INTERPRET else dict(atol=2e-5, rtol=1e-4)  # tf32x3 on a GPU


# the interpreter evaluates masked-out lanes too (e.g. inf - inf of a NaN row): numpy warns, harmlessly
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def problem(N=300, D=16, C=5, K=4, **kw):
    """The shared problem factory, on this module's device."""
    return make_problem(N, D, C, K, device=DEVICE, **kw)


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
    """One contract: the Triton ops have exactly the C++ schemas (arguments, defaults, outputs)."""
    if ops.load_extension() is None:
        pytest.skip("protoseg_ext._C did not load")
    for op in ("similarity", "similarity_backward", "sinkhorn", "prototype_sums", "prototype_ema",
               "embed_similarity", "embed_similarity_backward", "embed_prototype_sums", "ppc_ppd", "ppc_ppd_backward"):
        a = getattr(torch.ops.protoseg_ext, op).default._schema
        b = getattr(T, op).default._schema
        assert [(x.name, str(x.type), x.default_value) for x in a.arguments] == [
            (x.name, str(x.type), x.default_value) for x in b.arguments
        ], op
        assert [str(x.type) for x in a.returns] == [str(x.type) for x in b.returns], op


# ---------------------------------------------------------------- similarity


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


# ---------------------------------------------------------------- Sinkhorn


def test_sinkhorn_split_classes_and_small_blocks():
    """SPLIT programs per class and several row steps: the merged partials give the same Q."""
    f, p, gt, _ = problem(160, 16, 4, 3, skew=True)
    own = own_scores(f, p, gt)
    ref = R.sinkhorn(own, gt, 4, -1, 3, 0.05)
    for split, block_n in ((1, 16), (3, 16), (7, 32)):
        torch.testing.assert_close(KSK.sinkhorn(own, gt, 4, 3, 0.05, split=split, block_n=block_n), ref, **TOL)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8],
                         ids=lambda d: str(d).split(".")[-1])
def test_label_check_kernel_flags_a_bad_label_in_any_block(dtype, monkeypatch):
    """labels_ok (one launch, the ops' label-range check) against the rule it checks, with 64-label blocks:
    a bad label in any block clears the flag, ignore_index and the view's stride are honoured."""
    monkeypatch.setattr(KL, "BLOCK_INTERPRET", 64)
    monkeypatch.setattr(KL, "BLOCK_GPU", 64)
    gen = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 5, (1000,), generator=gen).to(dtype).to(DEVICE)
    assert KL.labels_ok(lab, 5, -1).tolist() == [1]
    assert KL.labels_ok(lab[:0], 5, -1).tolist() == [1]
    for i in (0, 63, 64, 999):  # first, block edges, last
        bad = lab.clone()
        bad[i] = 5
        assert KL.labels_ok(bad, 5, -1).tolist() == [0], i
        assert KL.labels_ok(bad, 5, 5).tolist() == [1], i  # it is ignore_index
        assert KL.labels_ok(bad, 6, -1).tolist() == [1], i
        keep = bad[i % 2::2]  # a strided view holds the bad entry; the other one does not
        other = bad[1 - i % 2::2]
        assert KL.labels_ok(keep, 5, -1).tolist() == [0] and KL.labels_ok(other, 5, -1).tolist() == [1], i
    if dtype.is_signed:
        neg = lab.clone()
        neg[500] = -3
        assert KL.labels_ok(neg, 5, -1).tolist() == [0]
        assert KL.labels_ok(neg, 5, -3).tolist() == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=lambda d: str(d).split(".")[-1])
def test_sinkhorn_class_keys(dtype):
    """class_keys (one launch): the label where it is a class and the row's scores are finite, else C;
    NaN, +-inf and out-of-range labels, several programs, own as a transposed view."""
    gen = torch.Generator().manual_seed(1)
    N, K, C = 300, 3, 4
    own = torch.randn(K, N, generator=gen).to(dtype).to(DEVICE).t()  # (N, K), strides (1, N)
    lab = torch.randint(-1, C + 2, (N,), generator=gen).to(DEVICE)
    own[5, 1], own[6, 0], own[7, 2] = float("nan"), float("inf"), float("-inf")
    own[8, 2] = torch.finfo(dtype).max  # finite: takes part
    lab[5:9] = 2
    want = torch.where(torch.isfinite(own).all(1) & (lab >= 0) & (lab < C), lab, torch.full_like(lab, C))
    for block_n in (None, 16, 64):
        got = KSK.class_keys(own, lab, C, block_n=block_n)
        assert got.dtype == torch.int64 and torch.equal(got, want), block_n
    assert want[5:8].tolist() == [C] * 3 and want[8] == 2


# ---------------------------------------------------------------- prototype sums and EMA


def _sums_reference(f, slot, S):
    ok = (slot >= 0) & torch.isfinite(f).all(1)
    sums = torch.zeros(S, f.shape[1], dtype=torch.float64, device=f.device).index_add_(0, slot[ok], f[ok].double())
    counts = torch.bincount(slot[ok], minlength=S).double()
    return sums, counts


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


# ---------------------------------------------------------------- torch.library


def _opcheck_cases():
    f, p, gt, _ = problem(40, 8, 3, 2)
    seg, argk, lse, own, _ = T.similarity(f, p, gt, -1, 1.0, True, True, True)
    slot = torch.where(gt >= 0, gt * 2, gt)
    target = torch.where(gt >= 0, gt * 2 + 1, gt)  # prototype targets c*K + k, K = 2
    sums, counts = T.prototype_sums(f, slot, 6)
    fg = f.clone().requires_grad_()
    return {
        "similarity": (fg, p, gt, -1, 1.0, True, True, True),
        # a softmax budget that would fit: this backend never keeps it, and its fake must say so
        "similarity_cache": (fg, p, gt, -1, 1.0, True, True, True, 1 << 20),
        "similarity_backward": (torch.randn_like(seg), torch.randn_like(lse), torch.randn_like(own),
                                f, p, gt, argk, lse, -1, 1.0),
        "sinkhorn": (own, gt, 3, -1, 3, 0.05),
        "prototype_sums": (f, slot, 6),
        "prototype_ema": (p, sums, counts, 0.9),
        "ppc_ppd": (lse.clone().requires_grad_(), own.clone().requires_grad_(), target, -1, 0.7),
        "ppc_ppd_backward": (torch.tensor(0.3, device=DEVICE), torch.tensor(-2.0, device=DEVICE), own, target,
                             torch.tensor(9.0, device=DEVICE), -1, 0.7),
    }


@pytest.mark.parametrize("op", ["similarity", "similarity_cache", "similarity_backward", "sinkhorn", "prototype_sums",
                                "prototype_ema", "ppc_ppd", "ppc_ppd_backward"])
def test_opcheck(op):
    args = _opcheck_cases()[op]
    torch.library.opcheck(getattr(T, op.replace("_cache", "")).default, args)


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
    seg, argk, lse, own, _ = T.similarity(feats, p.half(), gt, -1, 1.0, True, True, True)
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


def _run_in_4_gib_of_address_space(script):
    """Run ``script`` in a subprocess (a crash fails the calling test only); it must print ``ok``.

    Its 4 GiB buffer is address space, not memory: skipped where that would be charged in full."""
    if not INTERPRET and torch.cuda.get_device_properties(0).total_memory < 8 * 2**30:
        pytest.skip("needs 4 GiB of free GPU memory")
    overcommit = "/proc/sys/vm/overcommit_memory"
    if os.path.exists(overcommit) and open(overcommit).read().strip() == "2":
        pytest.skip("strict overcommit: a 4 GiB reservation would be charged in full")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ))
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-2000:] + res.stderr[-4000:]


@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux lazy allocation of untouched pages")
def test_element_offsets_beyond_int32():
    """feats with a row stride of 2**30 + 64: the offset of row 2 exceeds 2**31 - 1.

    Every kernel computes row offsets in int64 (``program_id(0).to(tl.int64)``);
    with int32 arithmetic the offset wraps and the read goes elsewhere (wrong
    values or a crash). Runs in a subprocess so that a crash fails this test
    only; the 4 GiB buffer is address space, not memory (untouched pages).
    """
    _run_in_4_gib_of_address_space(_BIG_OFFSETS)


_BIG_CHANNEL_OFFSETS = textwrap.dedent(
    """
    import os
    import torch, torch.nn.functional as F
    from protoseg_ext import reference as R
    from protoseg_ext.testing import embed_reference
    import protoseg_ext.triton_ops
    T = torch.ops.protoseg_triton
    dev = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    D, C, K, H, W = 3, 3, 2, 2, 2
    sd = 2**30 + 64  # channel 2 starts at element 2**31 + 128: (D - 1) * stride_d past int32
    # 4 GiB of address space; only the pages of the 3 channels' few pixels are ever touched
    buf = torch.empty(sd * (D - 1) + H * W, dtype=torch.float16, device=dev)
    x = buf.as_strided((1, D, H, W), (sd * D, sd, W, 1))  # an NCHW map whose planes lie 2**30 apart
    x.copy_(torch.randn(1, D, H, W, generator=torch.Generator().manual_seed(0)).to(dev))
    assert (D - 1) * x.stride(1) > 2**31 - 1
    dense = x.float()
    p = F.normalize(torch.randn(C, K, D, generator=torch.Generator().manual_seed(1)), dim=-1).to(dev)
    w = torch.tensor([1.5, 0.5, 1.0], device=dev)
    b = torch.tensor([0.1, -0.2, 0.3], device=dev)
    gt = torch.tensor([2, 0, 1, 1], device=dev)
    slot = torch.tensor([4, 0, 3, 2], device=dev)  # one pixel per prototype: its sum is the pixel
    tol = dict(atol=5e-3, rtol=0)

    # the fused embedding: forward, backward, prototype sums
    seg, argk, lse, own, _, _ = T.embed_similarity(x, w, b, 1e-5, p.half(), gt, -1, 1.0, True, True, True)
    xr = dense.clone().requires_grad_()
    z = embed_reference(xr, (w, b, 1e-5))
    S = R.similarity(z, p.half().float())
    torch.testing.assert_close(seg.float(), S.view(-1, C, K).amax(2), **tol)
    torch.testing.assert_close(lse, torch.logsumexp(S, 1), **tol)
    dx, dw, db = T.embed_similarity_backward(torch.ones_like(seg), None, None, x, w, b, 1e-5, p.half(), gt,
                                             argk, lse, -1, 1.0)
    R.proto_seg_logits(z, p.half().float()).sum().backward()
    torch.testing.assert_close(dx.float(), xr.grad, **tol)
    sums, counts = T.embed_prototype_sums(x, w, b, 1e-5, slot, C * K)
    torch.testing.assert_close(sums[slot], z.detach(), **tol)

    # (N, D) rows of stride (1, sd): the pixel-major view of a channel-planar buffer
    rows = buf.as_strided((H * W, D), (1, sd))
    dense_rows = F.normalize(rows.float(), dim=1)
    rows.copy_(dense_rows.half())
    dense_rows = rows.float()
    seg, argk, lse, own, _ = T.similarity(rows, p.half(), gt, -1, 1.0, True, True, True)
    S = R.similarity(dense_rows, p.half().float())
    torch.testing.assert_close(seg.float(), S.view(-1, C, K).amax(2), **tol)
    dx = T.similarity_backward(torch.ones_like(seg), None, None, rows, p.half(), gt, argk, lse, -1, 1.0)
    xr = dense_rows.clone().requires_grad_()
    R.proto_seg_logits(xr, p.half().float()).sum().backward()
    torch.testing.assert_close(dx.float(), xr.grad, **tol)
    for det in (True, False):
        torch.use_deterministic_algorithms(det)
        sums, counts = T.prototype_sums(rows, slot, C * K)
        torch.testing.assert_close(sums[slot], dense_rows, **tol)
    print("ok")
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux lazy allocation of untouched pages")
def test_channel_offsets_beyond_int32():
    """A map whose channel planes lie 2**30 + 64 elements apart, and (N, D) rows of stride (1, 2**30 + 64):
    the offset of channel 2 exceeds 2**31 - 1 (as at D * H * W > 2**31, e.g. 720 x 2048 x 2048).

    Every kernel forms channel offsets in int64; with int32 ``d * stride_d`` the offset
    wraps. A subprocess, as in :func:`test_element_offsets_beyond_int32`.
    """
    _run_in_4_gib_of_address_space(_BIG_CHANNEL_OFFSETS)


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
    # the fused embedding: the same compulsory bytes plus the LayerNorm's (D,) parameters (and their
    # gradients), more work and, as written, more traffic than it must move
    for plain, fused, params in (("similarity", "embed_similarity", 2), ("similarity_backward",
                                                                          "embed_similarity_backward", 4)):
        a, b = h100_roofline(plain, N, D, C, K, torch.bfloat16), h100_roofline(fused, N, D, C, K, torch.bfloat16)
        assert b["bytes"] == a["bytes"] + params * D * 4
        assert b["flops"] > a["flops"] and b["bytes_impl"] > b["bytes"]
    # the forward writes each pixel's three statistics once, beside the plain forward's traffic
    a, b = h100_roofline("similarity", N, D, C, K, "bf16"), h100_roofline("embed_similarity", N, D, C, K, "bf16")
    assert b["bytes_impl"] == a["bytes_impl"] + 2 * D * 4 + 3 * N * 4
    with pytest.raises(ValueError):
        h100_roofline("nope", N, D, C, K, torch.float32)


# ---------------------------------------------------------------- realistic shapes and launch numerics
# Triton kernels at realistic shapes and the numerics of their launch choices.
#
# * the tiles every launcher picks stay within Triton's element limit for every
#   dtype (the float64 backward builds an (n, j, dout) block);
# * float64 PPC/PPD forward and backward at the Cityscapes head's D, C and K;
# * the backward keeps dS in fp32 for fp16/bf16 inputs: the PPC/PPD gradient
#   (weights 0.01 and 0.001 over n_valid pixels) against the float64 reference;
# * prototype sums judge a float64 row's finiteness in float64.
#

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# (N, D, C, K): Cityscapes HRNet-W48, ADE20K, COCO-Stuff, full resolution, small D and K, one prototype
SHAPES = [(65536, 720, 19, 10), (32768, 720, 150, 10), (32768, 720, 171, 10), (4194304, 256, 19, 10),
          (300, 16, 5, 4), (1000, 33, 3, 1), (4096, 2048, 19, 64)]


def kernel_problem(N, D, C, K, dtype, seed=0, ignore_frac=0.1):
    """L2-normalised ``feats (N, D)`` and ``protos (C, K, D)`` of ``dtype``, PPC/PPD ``target (N,)`` (-1 = ignored)."""
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    protos = F.normalize(torch.randn(C, K, D, generator=g, dtype=torch.float64), dim=-1)
    target = torch.randint(0, C * K, (N,), generator=g)
    target = torch.where(torch.rand(N, generator=g) < ignore_frac, torch.full_like(target, -1), target)
    return feats.to(dtype).to(DEVICE), protos.to(dtype).to(DEVICE), target.to(DEVICE)


def rel_err(a, b):
    """``max |a - b| / max |b|``, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-300)).item()


# ---------------------------------------------------------------- tile sizes


def test_element_limit_is_triton_s():
    assert KT.MAX_NUMEL == triton.language.core.TRITON_MAX_TENSOR_NUMEL


@pytest.mark.parametrize("interpret", [True, False], ids=["interpreter", "gpu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_tiles_within_triton_element_limit(interpret, dtype):
    for N, D, C, K in SHAPES:
        for pass_ in ("fwd", "bwd"):
            cfg = KS.tile_config(pass_, dtype, dtype, N, C, K, D, interpret=interpret)
            kind = KT.kind_of(str(dtype).split(".")[-1], str(dtype).split(".")[-1])
            assert KT.largest_block(pass_, kind, cfg) <= KT.MAX_NUMEL, (pass_, (N, D, C, K), cfg)
            assert cfg["BLOCK_C"] * cfg["BLOCK_K"] >= 16 and cfg["BLOCK_K"] >= K, cfg
            if pass_ == "bwd" and kind == "fp64":  # the FMA second product, the block that used to overflow
                assert cfg["BLOCK_N"] * cfg["BLOCK_C"] * cfg["BLOCK_K"] * cfg["BLOCK_DO"] <= KT.MAX_NUMEL
        # the embedded backward: its dS kernel (the forward's tile shape) and its dS @ protos kernel
        kind = KT.kind_of(str(dtype).split(".")[-1], str(dtype).split(".")[-1])
        for ln in (True, False):
            cfg = KT.similarity_tiles("bwd_ds", kind, C, K, D, N, interpret, layer_norm=ln)
            assert KT.largest_block("bwd_ds", kind, cfg) <= KT.MAX_NUMEL, ((N, D, C, K), cfg)
            assert cfg["BLOCK_C"] * cfg["BLOCK_K"] >= 16 and cfg["BLOCK_K"] >= K, cfg
            if not interpret:
                # prototypes read once per 64+ px (32 for float64, and for the 16-column float32
                # tile of a small C*K, which spills on sm_80 at 64: kernels/tiles.py)
                small_fp32 = kind == "fp32" and cfg["BLOCK_C"] * cfg["BLOCK_K"] <= 16
                assert cfg["BLOCK_N"] >= (32 if kind == "fp64" or small_fp32 else 64), cfg
            # the forward keeping S and the dS kernel reading it (the cache within cache_bytes)
            for pass_ in ("fwd_keep", "bwd_ds_cached"):
                cfg = KT.similarity_tiles(pass_, kind, C, K, D, N, interpret, layer_norm=ln)
                assert KT.largest_block(pass_, kind, cfg) <= KT.MAX_NUMEL, (pass_, (N, D, C, K), cfg)
                assert cfg["BLOCK_C"] * cfg["BLOCK_K"] >= 16 and cfg["BLOCK_K"] >= K, cfg
        x = KT.embed_dx_tiles(kind, C * K, D, N, interpret)
        n, j, do = x["BLOCK_N"], x["BLOCK_J"], x["BLOCK_DO"]
        assert max(n * j, j * do, n * do, n * j * do if kind == "fp64" else 0) <= KT.MAX_NUMEL, x
        assert min(n, j, do) >= 16, x  # tl.dot's smallest dimension


def test_largest_block_counts_the_float64_backward_product():
    cfg = dict(BLOCK_N=256, BLOCK_C=32, BLOCK_K=16, BLOCK_D=256, BLOCK_DO=64)  # the old interpreter tile at D = 64
    assert KT.largest_block("bwd", "fp64", cfg) == 256 * 512 * 64 > KT.MAX_NUMEL
    assert KT.largest_block("bwd", "fp32", cfg) == 256 * 512


# ---------------------------------------------------------------- float64 at a realistic shape


def test_float64_losses_and_gradient_at_cityscapes_d_c_k():
    """PPC/PPD and d feats in float64 at D = 720, C = 19, K = 10 (several row blocks, class blocks, D slices)."""
    N, D, C, K = 200, 720, 19, 10
    f, p, target = kernel_problem(N, D, C, K, torch.float64)
    a, b = f.clone().requires_grad_(), f.clone().requires_grad_()
    ppc_a, ppd_a = PF.proto_losses(a, p, target, backend="triton")
    ppc_b, ppd_b = R.proto_losses(b, p, target)
    torch.testing.assert_close(torch.stack([ppc_a, ppd_a]), torch.stack([ppc_b, ppd_b]), atol=1e-12, rtol=1e-10)
    (ppc_a + 0.5 * ppd_a).backward()
    (ppc_b + 0.5 * ppd_b).backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-13, rtol=1e-9)


def test_float64_seg_logits_gradient_at_ade20k_c():
    N, D, C, K = 300, 256, 150, 10
    f, p, _ = kernel_problem(N, D, C, K, torch.float64)
    a, b = f.clone().requires_grad_(), f.clone().requires_grad_()
    sa, sb = PF.proto_seg_logits(a, p, backend="triton"), R.proto_seg_logits(b, p)
    torch.testing.assert_close(sa, sb, atol=1e-12, rtol=1e-10)
    w = torch.randn(N, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    (sa * w).sum().backward()
    (sb * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------- half inputs: dS kept in fp32


def ulps(a, ref):
    """Largest ``|a - ref|`` in units of the last place of ``a.dtype`` at ``ref`` (float64)."""
    r = ref.to(a.dtype)
    up = torch.nextafter(r, torch.full_like(r, float("inf")))
    return ((a.double() - ref).abs() / (up.double() - r.double())).max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_ppc_ppd_gradient_against_float64(dtype):
    """The gradient of the official 0.01 PPC + 0.001 PPD alone, half inputs, vs float64 on the same values.

    With ~2,000 valid pixels, each softmax entry of dS is about
    0.01 / 2000 / 190 = 2.6e-8, under fp16's smallest subnormal (6e-8): a
    backward that rounds dS to fp16 loses the softmax half of the PPC
    gradient, while d feats, its sum over 190 prototypes, is still
    representable (measured: 13% error against 0.6% with dS in fp32, 11 ulps
    against 0.5). bf16 keeps dS's range but three digits: 640-770 ulps on
    near-zero entries of d feats against 1.
    """
    N, D, C, K = 2200, 16, 19, 10
    f, p, target = kernel_problem(N, D, C, K, dtype, seed=3)
    a = f.clone().requires_grad_()
    ppc, ppd = PF.proto_losses(a, p, target, backend="triton")
    (0.01 * ppc + 0.001 * ppd).backward()
    b = f.double().requires_grad_()
    ppc_r, ppd_r = R.proto_losses(b, p.double(), target)
    (0.01 * ppc_r + 0.001 * ppd_r).backward()
    assert a.grad.dtype == dtype
    assert rel_err(a.grad, b.grad) <= 0.02
    if INTERPRET:  # fp32 products of the GPU's rounded operands, exactly (no TF32): the output rounding alone
        assert ulps(a.grad, b.grad) <= 1.0


def test_dot_config_keeps_ds_in_the_accumulation_dtype():
    from protoseg_ext.kernels.common import TL_DTYPE, dot_config

    for dt in DTYPES:
        for interpret in (True, False):
            cfg = dot_config(dt, dt, interpret=interpret)
            acc = torch.float64 if dt == torch.float64 else torch.float32
            assert cfg["DS_DTYPE"] == TL_DTYPE[acc], (dt, interpret)
            if dt in (torch.float16, torch.bfloat16):
                assert cfg["DOT_DTYPE"] == TL_DTYPE[dt]  # S itself: half operands on the tensor cores
                assert cfg["DS_PRECISION"] == ("ieee" if interpret else "tf32")


# ---------------------------------------------------------------- prototype sums: finiteness in the input dtype


@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
def test_float64_rows_beyond_float32_range_take_part(deterministic):
    """A finite float64 row beyond float32's range (1e300) is summed; a row with inf is not."""
    N, D, S = 40, 6, 5
    g = torch.Generator().manual_seed(0)
    f = torch.randn(N, D, generator=g, dtype=torch.float64)
    slot = torch.randint(0, S, (N,), generator=g)
    f[3] = 1e300 * F.normalize(f[3], dim=0)
    f[7, 2] = float("inf")
    f[11, 0] = float("nan")
    f, slot = f.to(DEVICE), slot.to(DEVICE)
    sums, counts = KU.prototype_sums(f, slot, S, deterministic=deterministic)
    ok = torch.isfinite(f).all(dim=1)
    assert bool(ok[3]) and not bool(ok[7]) and not bool(ok[11])
    ref_counts = torch.zeros(S, dtype=torch.float64, device=f.device).index_add_(0, slot[ok], torch.ones_like(f[ok, 0]))
    ref_sums = torch.zeros(S, D, dtype=torch.float64, device=f.device).index_add_(0, slot[ok], f[ok])
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the head's embedding fused in (embed_*)
# The kernels of kernels/embed.py and the EMBED mode of the similarity kernels,
# against LayerNorm + F.normalize + reference.similarity_outputs, gradients
# w.r.t. feats, ln_weight and ln_bias by autograd in float64.


# float32 feats far from zero mean, against the float64 reference: the interpreter's products are exact
# in float32; a GPU's tf32x3 GEMMs a little less
EMBED_TOL = dict(atol=2e-5, rtol=2e-5) if INTERPRET else dict(atol=5e-5, rtol=2e-4)
EMBED_GRAD_TOL = dict(atol=1e-4, rtol=1e-4) if INTERPRET else dict(atol=3e-4, rtol=3e-4)


def embed_problem(B, D, H, W, C, K, seed=0, offset=0.5, dtype=torch.float64):
    """protoseg_ext.testing.embed_problem on this module's device."""
    return _embed_problem(B, D, H, W, C, K, seed=seed, offset=offset, dtype=dtype, device=DEVICE)


def embed_check(x, w, b, p, gt, layer_norm, layout, temperature=0.7, tol=TOL, grad_tol=None, call=None, seed=5):
    """Run ``call(xin, w, b, p, gt) -> (seg, argk, lse, own, backward)`` and compare with the float64
    reference: values, then d feats / d weight / d bias of a random weighting of seg, lse and own."""
    xin = as_layout(x, layout)
    seg, argk, lse, own, backward = call(xin, w if layer_norm else None, b if layer_norm else None, p, gt)
    xr, wr, br = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = R.similarity_outputs(embed_reference(xr, (wr, br, 1e-5) if layer_norm else None), p.double(), gt, -1,
                               temperature, True, True, True)
    for u, v in zip((seg, lse, own), (ref[0], ref[2], ref[3])):
        torch.testing.assert_close(u.double(), v, **tol)
    g = torch.Generator().manual_seed(seed)
    gs, gl, go = [torch.randn(r.shape, generator=g, dtype=torch.float64).to(DEVICE) for r in (ref[0], ref[2], ref[3])]
    loss = (ref[0] * gs).sum() + (ref[2] * gl).sum() + (ref[3] * go).sum()
    leaves = [xr, wr, br] if layer_norm else [xr]
    want = torch.autograd.grad(loss, leaves)
    dx, dw, db = backward(gs.to(seg.dtype), gl.to(lse.dtype), go.to(own.dtype), xin, argk, lse)
    assert dx.shape == xin.shape and dx.dtype == xin.dtype and dx.stride() == torch.empty_like(xin).stride()
    got = [dx if layout != "rows" else dx.reshape(x.shape[0], x.shape[2], x.shape[3], -1).permute(0, 3, 1, 2)]
    if layer_norm:
        got += [dw, db]
    else:
        assert dw.shape == (0,) and db.shape == (0,)
    for u, v in zip(got, want):
        torch.testing.assert_close(u.double(), v, **(grad_tol or tol))


_GPU_TILES_SCRIPT = textwrap.dedent(
    """
    import torch
    from protoseg_ext import reference as R
    from protoseg_ext.testing import as_layout, embed_problem, embed_reference
    import protoseg_ext.triton_ops
    from protoseg_ext.kernels import common, tiles as KT
    from protoseg_ext.kernels import similarity as KS
    from protoseg_ext.kernels import embed as KE
    T = torch.ops.protoseg_triton
    assert common.INTERPRET and not common.INTERPRET_TILES  # the interpreter, with the GPU's tiles
    cases = 0
    # 200-pixel images (128-pixel blocks: one partial), C = 6 of K = 10 (two 4-class column blocks), D = 40
    # (not a multiple of 16: the 64-row d feats tile) and 48
    for dtype, D, tol in ((torch.float32, 40, dict(atol=1e-4, rtol=1e-4)),
                          (torch.float16, 48, dict(atol=2e-2, rtol=2e-2))):
        B, H, W, C, K = 2, 8, 25, 6, 10
        kind = KT.kind_of(str(dtype).split(".")[-1], str(dtype).split(".")[-1])
        for pass_ in ("fwd", "fwd_keep", "bwd_ds", "bwd_ds_cached"):
            n, j, d = KT.EMBED_GPU_TILES[(pass_, kind)][:3]
            cfg = KS.tile_config(pass_, dtype, dtype, B * H * W, C, K, D, layer_norm=True)
            assert (cfg["BLOCK_N"], cfg["BLOCK_C"] * cfg["BLOCK_K"], cfg["BLOCK_D"]) == (n, j, d), (pass_, cfg)
        x, w, b, p, gt = embed_problem(B, D, H, W, C, K, seed=3, offset=4.0, dtype=dtype)
        xr, wr, br = [t.detach().double().requires_grad_() for t in (x, w, b)]
        ref = R.similarity_outputs(embed_reference(xr, (wr, br, 1e-5)), p.double(), gt, -1, 0.1, True, True, True)
        g = torch.Generator().manual_seed(7)
        gs, gl, go = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in (ref[0], ref[2], ref[3])]
        want = torch.autograd.grad((ref[0] * gs).sum() + (ref[2] * gl).sum() + (ref[3] * go).sum(), (xr, wr, br))
        for layout in ("nchw", "channels_last"):
            xin = as_layout(x, layout)
            for cache in (0, 1 << 30):
                seg, argk, lse, own, probs, stats = T.embed_similarity(xin, w, b, 1e-5, p, gt, -1, 0.1, True, True,
                                                                       True, cache)
                assert probs.numel() == (B * H * W * C * K if cache else 0)
                for u, v in zip((seg, lse, own), (ref[0], ref[2], ref[3])):
                    torch.testing.assert_close(u.double(), v, **tol)
                got = T.embed_similarity_backward(gs.to(seg.dtype), gl.float(), go.float(), xin, w, b, 1e-5, p, gt,
                                                  argk, lse, -1, 0.1, probs, stats)
                for u, v in zip(got, want):
                    torch.testing.assert_close(u.double(), v, **tol)
                cases += 1
    print("ok", cases)
    """
)


@pytest.mark.skipif(not INTERPRET, reason="on a GPU every test runs the GPU's tiles")
def test_embed_kernels_at_the_gpu_tiles():
    """The embedded forward and backward at the tiles a GPU launches (``PROTOSEG_TRITON_GPU_TILES=1``:
    kernels/tiles.py's tables, which the other interpreter tests replace by their own), against the
    float64 reference on values and gradients (map, LayerNorm weight and bias): fp32 and fp16 maps, NCHW
    and channels-last, S recomputed and kept (``cache_bytes``). A subprocess, as the tile choice is
    read at import."""
    env = dict(os.environ, TRITON_INTERPRET="1", PROTOSEG_TRITON_GPU_TILES="1")
    res = subprocess.run([sys.executable, "-c", _GPU_TILES_SCRIPT], capture_output=True, text=True, timeout=900,
                         env=env)
    assert res.returncode == 0 and res.stdout.strip() == "ok 8", res.stdout[-2000:] + res.stderr[-4000:]


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "l2"])
@pytest.mark.parametrize("chunk", [40, 150, None], ids=["part-images", "two-images", "one-chunk"])
def test_embed_kernels_small_tiles_and_chunks(layout, layer_norm, chunk):
    """Several pixel, class and D blocks, D slices and chunks (a pixel range of one image; two whole
    images), far from zero mean (|mean| / std = 15): the launchers with tile overrides."""
    B, D, H, W, C, K = 3, 40, 5, 13, 9, 3  # 65 pixels an image
    x, w, b, p, gt = embed_problem(B, D, H, W, C, K, seed=1, offset=30.0, dtype=torch.float32)
    tiles = dict(BLOCK_N=16, BLOCK_C=4, BLOCK_D=16, BLOCK_DO=16, BLOCK_J=16, EMBED_BLOCK_N=16, EMBED_BLOCK_D=16)

    def call(xin, w_, b_, p_, gt_):
        out = KE.embed_similarity_forward(xin, w_, b_, 1e-5, p_, gt_, 0.7, True, True, True, tiles=tiles, chunk=chunk)

        def backward(gs, gl, go, xin_, argk, lse):
            return KE.embed_similarity_backward(gs, gl, go, xin_, w_, b_, 1e-5, p_, gt_, argk, lse, 0.7, tiles=tiles,
                                                chunk=chunk)

        return (*out[:4], backward)

    embed_check(x, w, b, p, gt, layer_norm, layout, tol=EMBED_TOL,
                grad_tol=EMBED_GRAD_TOL, call=call)


@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "l2"])
@pytest.mark.parametrize("layout", ["nchw", "rows"])
def test_embed_own_only_gathered_matches_reference(layer_norm, layout):
    """own alone (the gathered own_class_scores_kernel in EMBED mode), several pixel and D blocks and chunks,
    against the float64 reference and the fused kernel's own."""
    x, w, b, p, gt = embed_problem(3, 40, 5, 13, 6, 3, seed=10, offset=20.0, dtype=torch.float32)
    xin = as_layout(x, layout)
    wb = (w, b) if layer_norm else (None, None)
    tiles = dict(BLOCK_N=16, BLOCK_D=16, EMBED_BLOCK_N=16, EMBED_BLOCK_D=16)
    own = KE.embed_similarity_forward(xin, *wb, 1e-5, p, gt, 1.0, False, False, True, tiles=tiles, chunk=40)[3]
    fused = KE.embed_similarity_forward(xin, *wb, 1e-5, p, gt, 1.0, True, True, True, chunk=40)[3]
    ref = R.similarity_outputs(embed_reference(x.double(), (w.double(), b.double(), 1e-5) if layer_norm else None),
                               p.double(), gt, -1, 1.0, False, False, True)[3]
    torch.testing.assert_close(own.double(), ref, **EMBED_TOL)
    torch.testing.assert_close(own, fused, **EMBED_TOL)
    assert not own[gt < 0].any()


def test_embed_chunks_cover_every_pixel_once():
    for B, HW, chunk in ((3, 65, 40), (3, 65, 150), (5, 7, 1000), (2, 100, 100), (70000, 1, 1 << 20)):
        seen = []
        for b0, nb, hw0, hwc in KE.pixel_chunks(B, HW, chunk):
            assert nb * hwc <= max(chunk, 1) and nb <= KE.MAX_IMAGES
            seen += [(b0 + i) * HW + hw0 + j for i in range(nb) for j in range(hwc)] if B * HW < 10**4 else [nb * hwc]
        if B * HW < 10**4:
            assert seen == list(range(B * HW)), (B, HW, chunk)
        else:
            assert sum(seen) == B * HW


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
def test_embed_reads_the_map_as_it_lies(layout, monkeypatch):
    """No (N, D) copy of feats and no (N, D) buffer: feats is read through its own strides, the op's
    chunk (``triton_ops.EMBED_CHUNK``) reaches the launchers, and every buffer they allocate is
    chunk-sized; only the returned gradient is (N, D)."""
    B, D, H, W = 2, 20, 4, 9
    x, w, b, p, gt = embed_problem(B, D, H, W, 3, 2, seed=9, dtype=torch.float32)
    xin = as_layout(x, layout)
    assert KE._readable(xin)[0] is xin
    chunks, sizes = [], []
    real_chunks, real_empty, real_zeros = KE.pixel_chunks, torch.empty, torch.zeros

    def spy_chunks(B_, HW_, chunk):
        chunks.append(chunk)
        return real_chunks(B_, HW_, chunk)

    def spy(real):
        def alloc(*shape, **kw):
            t = real(*shape, **kw)
            sizes.append(t.numel())
            return t
        return alloc

    monkeypatch.setattr(KE, "pixel_chunks", spy_chunks)
    monkeypatch.setattr(protoseg_ext.triton_ops, "EMBED_CHUNK", 13)
    monkeypatch.setattr(torch, "empty", spy(real_empty))
    monkeypatch.setattr(torch, "zeros", spy(real_zeros))
    seg, argk, lse, own, _, _ = T.embed_similarity(xin, w, b, 1e-5, p, gt, -1, 1.0, True, True, True)
    T.embed_similarity_backward(torch.ones_like(seg), torch.ones_like(lse), None, xin, w, b, 1e-5, p, gt, argk, lse,
                                -1, 1.0)
    T.embed_prototype_sums(xin, w, b, 1e-5, gt, 3)
    assert chunks == [13, 13, 13]
    assert sizes and max(sizes) < B * H * W * D // 4, sizes  # 13 pixels of 72 a chunk


def _embed_op_call(temperature=0.7):
    def call(xin, w_, b_, p_, gt_):
        seg, argk, lse, own, _, _ = T.embed_similarity(xin, w_, b_, 1e-5, p_, gt_, -1, temperature, True, True, True)

        def backward(gs, gl, go, xin_, argk_, lse_):
            return T.embed_similarity_backward(gs, gl, go, xin_, w_, b_, 1e-5, p_, gt_, argk_, lse_, -1, temperature)

        return seg, argk, lse, own, backward

    return call


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_embed_half_feats(dtype, layout, monkeypatch):
    """Half feats, LayerNorm parameters and prototypes: y rounded to the dot dtype, d feats in feats' dtype,
    against the float64 reference on the same half values (relative to the values' scale)."""
    monkeypatch.setattr(protoseg_ext.triton_ops, "EMBED_CHUNK", 50)  # several chunks through the op
    x, w, b, p, gt = embed_problem(2, 24, 6, 7, 4, 3, seed=2, offset=3.0, dtype=dtype)
    xin = as_layout(x, layout)
    seg, argk, lse, own, _, _ = T.embed_similarity(xin, w, b, 1e-5, p, gt, -1, 1.0, True, True, True)
    assert seg.dtype == dtype and lse.dtype == torch.float32
    xr, wr, br = [t.double().requires_grad_() for t in (x, w, b)]
    ref = R.similarity_outputs(embed_reference(xr, (wr, br, 1e-5)), p.double(), gt, -1, 1.0, True, True, True)
    for u, v in zip((seg, lse, own), (ref[0], ref[2], ref[3])):
        assert rel_err(u, v) <= 1e-2
    g = torch.Generator().manual_seed(3)
    gs, gl, go = [torch.randn(r.shape, generator=g, dtype=torch.float64).to(DEVICE) for r in (ref[0], ref[2], ref[3])]
    want = torch.autograd.grad((ref[0] * gs).sum() + (ref[2] * gl).sum() + (ref[3] * go).sum(), [xr, wr, br])
    dx, dw, db = T.embed_similarity_backward(gs.to(dtype), gl.float(), go.float(), xin, w, b, 1e-5, p, gt, argk,
                                             lse, -1, 1.0)
    assert dx.dtype == dtype and dw.dtype == dtype and dx.stride() == xin.stride()
    for u, v in zip((dx, dw, db), want):
        assert rel_err(u, v) <= 2e-2


@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "l2"])
def test_embed_float64(layer_norm, monkeypatch):
    """float64 end to end (FMA second product), a pixel of zeros (norm below F.normalize's eps: divided
    by eps, no radial part), several chunks; to float64 rounding."""
    monkeypatch.setattr(protoseg_ext.triton_ops, "EMBED_CHUNK", 37)
    x, w, b, p, gt = embed_problem(2, 20, 4, 9, 5, 4, seed=4, offset=5.0)
    if not layer_norm:
        x[1, :, 2, 3] = 0.0
    embed_check(x, w, b, p, gt, layer_norm, "nchw", tol=dict(atol=1e-10, rtol=1e-9), call=_embed_op_call())


def test_embed_all_ignored_and_nan_pixels(monkeypatch):
    """All labels ignored: own is zero and its gradient too. A NaN pixel is NaN in its own lse and own
    only, its gradient (and d weight, d bias, sums over pixels) NaN as autograd's, and it never reaches
    the prototype sums. (seg of a NaN pixel is the plain kernel's, and the interpreter's arg-max
    raises on an all-NaN slice, so seg is left out here.)"""
    monkeypatch.setattr(protoseg_ext.triton_ops, "EMBED_CHUNK", 30)
    x, w, b, p, gt = embed_problem(2, 12, 5, 6, 3, 2, seed=6, dtype=torch.float32)
    ignored = torch.full_like(gt, -1)
    seg, argk, lse, own, _, _ = T.embed_similarity(x, w, b, 1e-5, p, ignored, -1, 1.0, False, False, True)
    assert own.shape == (60, 2) and not own.any()
    dx, dw, db = T.embed_similarity_backward(None, None, torch.randn_like(own), x, w, b, 1e-5, p, ignored, argk, lse,
                                             -1, 1.0)
    assert not dx.any() and not dw.any() and not db.any()
    n_bad = 30 + 2 * 6 + 3
    x[1, :, 2, 3] = float("nan")
    _, argk, lse, own, _, _ = T.embed_similarity(x, w, b, 1e-5, p, gt, -1, 1.0, False, True, True)
    xr, wr, br = [t.double().requires_grad_() for t in (x, w, b)]
    ref = R.similarity_outputs(embed_reference(xr, (wr, br, 1e-5)), p.double(), gt, -1, 1.0, False, True, True)
    torch.testing.assert_close(lse.double(), ref[2], **EMBED_TOL, equal_nan=True)
    torch.testing.assert_close(own.double(), ref[3], **EMBED_TOL, equal_nan=True)
    assert torch.isnan(lse[n_bad]) and torch.isfinite(torch.cat([lse[:n_bad], lse[n_bad + 1:]])).all()
    g = torch.Generator().manual_seed(8)
    gl, go = torch.randn(lse.shape, generator=g).to(DEVICE), torch.randn(own.shape, generator=g).to(DEVICE)
    want = torch.autograd.grad((ref[2] * gl).sum() + (ref[3] * go).sum(), [xr, wr, br])
    got = T.embed_similarity_backward(None, gl, go, x, w, b, 1e-5, p, gt, argk, lse, -1, 1.0)
    for u, v in zip(got, want):
        torch.testing.assert_close(u.double(), v, **EMBED_GRAD_TOL, equal_nan=True)
    assert torch.isnan(got[0][1, :, 2, 3]).all() and torch.isfinite(got[0][0]).all()
    slot = torch.where(gt >= 0, gt * 2, gt)
    slot[n_bad] = 1
    for det in (True, False):
        prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(det)
        try:
            sums, counts = T.embed_prototype_sums(x, w, b, 1e-5, slot, 6)
        finally:
            torch.use_deterministic_algorithms(prev)
        rs, rc = _sums_reference(embed_reference(x.double(), (w.double(), b.double(), 1e-5)), slot, 6)
        assert torch.isfinite(sums).all() and counts[1] == rc[1]
        torch.testing.assert_close(sums.double(), rs, atol=1e-5, rtol=1e-5)
        assert torch.equal(counts.double(), rc)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "l2"])
def test_embed_prototype_sums_chunks_are_reproducible(layout, layer_norm):
    x, w, b, _, gt = embed_problem(2, 20, 6, 11, 3, 2, seed=7, offset=40.0, dtype=torch.float32)
    slot = torch.where(gt >= 0, gt * 2 + 1, gt)
    xin = as_layout(x, layout)
    ln = (w, b) if layer_norm else (None, None)
    rs, rc = _sums_reference(embed_reference(x.double(), (w.double(), b.double(), 1e-5) if layer_norm else None),
                             slot, 6)
    small = dict(EMBED_BLOCK_N=16, EMBED_BLOCK_D=16)
    for chunk in (17, 66, None):
        a = KE.embed_prototype_sums(xin, *ln, 1e-5, slot, 6, deterministic=True, tiles=small, chunk=chunk)
        c = KE.embed_prototype_sums(xin, *ln, 1e-5, slot, 6, deterministic=True, tiles=small, chunk=chunk)
        assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])  # bitwise, run to run
        torch.testing.assert_close(a[0].double(), rs, atol=1e-5, rtol=1e-5)
        assert torch.equal(a[1].double(), rc)
        # the atomic path: every chunk adds straight into the returned sums and counts
        s_at, c_at = KE.embed_prototype_sums(xin, *ln, 1e-5, slot, 6, deterministic=False, tiles=small, chunk=chunk)
        torch.testing.assert_close(s_at.double(), rs, atol=1e-5, rtol=1e-5)
        assert torch.equal(c_at.double(), rc)


# ---------------------------------------------------------------- the forward's statistics, reused


def _bad_pixels(x, overflow):
    """Non-finite pixels in the map ``x`` (B, D, H, W), in place: a NaN, a +inf and a -inf entry, and
    (``overflow``, float32) a finite pixel whose sums of squares overflow float32. Returns their rows n."""
    B, D, H, W = x.shape
    bad = [(0, 1, 2), (1, 0, 0), (B - 1, H - 1, W - 1)]
    x[0, 3, 1, 2] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    x[B - 1, D - 1, H - 1, W - 1] = float("-inf")
    if overflow:  # +-1e20 alternating: finite entries, squares past float32's range (with or without the mean)
        x[1, :, 2, 3] = torch.tensor([1e20, -1e20], dtype=x.dtype).repeat(D // 2 + 1)[:D]
        bad.append((1, 2, 3))
    return sorted(b * H * W + h * W + w for b, h, w in bad)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_embed_forward_stats_match_reference(layout, layer_norm, dtype):
    """embed_similarity's stats (5, N): each pixel's mean, 1 / std and 1 / ||y|| as
    reference_backend.embed_stats has them, then the LayerNorm backward's sums over D, sum_d y_d w_d
    and sum_d y_d w_d xhat_d (0 without the LayerNorm) (NaN columns for the NaN, inf and overflowing
    pixels), written by the fused forward (any of seg, lse, own) and by the own-only forward's
    statistics kernel, over several pixel blocks and chunks; (0,) when nothing is computed."""
    x, w, b, p, gt = embed_problem(3, 40, 5, 13, 6, 3, seed=11, offset=20.0, dtype=dtype)
    bad = _bad_pixels(x, overflow=dtype == torch.float32)
    xin = as_layout(x, layout)
    ln = (w, b) if layer_norm else (None, None)
    want = _stats_reference(x, (w, b) if layer_norm else None)
    assert want.shape == (5, x.shape[0] * x.shape[2] * x.shape[3]) and want.dtype == torch.float32
    assert torch.isnan(want[:, bad]).all() and torch.isfinite(want.sum(0)).sum() == want.shape[1] - len(bad)
    tiles = dict(BLOCK_N=16, BLOCK_C=4, BLOCK_D=16, EMBED_BLOCK_N=16, EMBED_BLOCK_D=16)
    for flags in ((True, True, True), (True, False, False), (False, True, False), (False, False, True)):
        stats = KE.embed_similarity_forward(xin, *ln, 1e-5, p, gt, 1.0, *flags, tiles=tiles, chunk=40)[4]
        assert stats.dtype == torch.float32 and stats.is_contiguous(), flags
        _assert_stats_close(stats, want, msg=str(flags))
        assert torch.isnan(stats[:, bad]).all()
    out = T.embed_similarity(xin, *ln, 1e-5, p, gt, -1, 1.0, True, True, True)
    _assert_stats_close(out[5], want)
    assert T.embed_similarity(xin, *ln, 1e-5, p, gt, -1, 1.0, False, False, False)[5].shape == (0,)


def _assert_stats_close(stats, want, msg=None):
    """Triton's stats against :func:`_stats_reference`: the statistics to 1e-5, the two sums over D (float32
    sums of D terms of either sign, up to 60 here) to 1e-4 absolute."""
    torch.testing.assert_close(stats[:3], want[:3], atol=1e-5, rtol=1e-5, equal_nan=True, msg=msg)
    torch.testing.assert_close(stats[3:], want[3:], atol=1e-4, rtol=1e-5, equal_nan=True, msg=msg)


def _stats_reference(x, ln):
    """The Triton stats (5, N) of the map ``x`` in its accumulation dtype, from float64: reference_backend's
    (3, N) (mean, 1 / std, 1 / ||y||), then sum_d y_d w_d and sum_d y_d w_d xhat_d of the LayerNorm'd
    pixel y = xhat w + b (0 without the LayerNorm); NaN columns where the first three are."""
    from protoseg_ext.reference_backend import embed_stats

    first = embed_stats(x, (ln[0], ln[1], 1e-5) if ln is not None else None)  # NaN where x's dtype overflows
    sums = torch.zeros(2, first.shape[1], dtype=torch.float64, device=x.device)
    if ln is not None:
        x64, w64, b64 = x.double(), ln[0].double(), ln[1].double()
        st = embed_stats(x64, (w64, b64, 1e-5))
        rows = x64.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        xhat = (rows - st[0][:, None]) * st[1][:, None]
        yw = (xhat * w64 + b64) * w64
        sums = torch.stack((yw.sum(1), (yw * xhat).sum(1)))
    sums[:, torch.isnan(first[0]).cpu()] = float("nan")
    return torch.cat((first.double(), sums)).to(first.dtype)


def test_embed_forward_stats_float64():
    """float64 feats: stats in float64, to float64 rounding."""
    x, w, b, p, gt = embed_problem(2, 20, 4, 9, 5, 4, seed=4, offset=5.0)
    for ln in ((w, b), (None, None)):
        stats = T.embed_similarity(x, *ln, 1e-5, p, gt, -1, 1.0, True, True, True)[5]
        assert stats.dtype == torch.float64 and stats.shape == (5, 72)
        torch.testing.assert_close(stats, _stats_reference(x, ln if ln[0] is not None else None), atol=1e-12,
                                   rtol=1e-12)


def _with_determinism(det, fn):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(det)
    try:
        return fn()
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "l2"])
def test_embed_backward_given_stats_equals_without(layout, layer_norm):
    """The backward given the forward's stats (no statistics pass; with the LayerNorm one pass for its
    two sums) gives what it gives without them, to rounding, and the float64 reference's gradient:
    several pixel blocks and chunks, far from zero mean. A block holding a NaN pixel (NaN stats)
    computes its statistics as without stats: the same NaN gradient for that pixel (and d weight,
    d bias), the same finite one for the other pixels of the block."""
    B, D, H, W, C, K = 3, 40, 5, 13, 9, 3
    x, w, b, p, gt = embed_problem(B, D, H, W, C, K, seed=1, offset=30.0, dtype=torch.float32)
    tiles = dict(BLOCK_N=16, BLOCK_C=4, BLOCK_D=16, BLOCK_DO=16, BLOCK_J=16, EMBED_BLOCK_N=16, EMBED_BLOCK_D=16)
    seen = {}

    def call(xin, w_, b_, p_, gt_):
        seg, argk, lse, own, stats = KE.embed_similarity_forward(xin, w_, b_, 1e-5, p_, gt_, 0.7, True, True, True,
                                                                 tiles=tiles, chunk=40)
        assert stats.shape == (5, B * H * W)

        def backward(gs, gl, go, xin_, argk_, lse_):
            args = (gs, gl, go, xin_, w_, b_, 1e-5, p_, gt_, argk_, lse_, 0.7)
            given = KE.embed_similarity_backward(*args, tiles=tiles, chunk=40, stats=stats)
            seen["without"] = KE.embed_similarity_backward(*args, tiles=tiles, chunk=40)
            seen["given"] = given
            return given

        return seg, argk, lse, own, backward

    embed_check(x, w, b, p, gt, layer_norm, layout, tol=EMBED_TOL, grad_tol=EMBED_GRAD_TOL, call=call)
    for u, v in zip(seen["given"], seen["without"]):
        torch.testing.assert_close(u, v, atol=1e-6, rtol=1e-5)
    # the stats are what the kernels use: other (finite) stats give another gradient
    xin = as_layout(x, layout)
    ln = (w, b) if layer_norm else (None, None)
    seg, argk, lse, own, stats = KE.embed_similarity_forward(xin, *ln, 1e-5, p, gt, 0.7, True, True, True)
    args = (torch.ones_like(seg), torch.ones_like(lse), None, xin, *ln, 1e-5, p, gt, argk, lse, 0.7)
    for row in (2, 3, 4) if layer_norm else (2,):  # inv; the LayerNorm backward's two sums
        wrong = stats.clone()
        wrong[row] *= 1.5
        assert not torch.allclose(KE.embed_similarity_backward(*args, stats=wrong)[0],
                                  KE.embed_similarity_backward(*args, stats=stats)[0], atol=0, rtol=1e-3), row
    # a NaN pixel: the op given the forward's stats against the op without them
    x[1, 5, 2, 3] = float("nan")
    xin = as_layout(x, layout)
    ln = (w, b) if layer_norm else (None, None)
    seg, argk, lse, own, _, stats = T.embed_similarity(xin, *ln, 1e-5, p, gt, -1, 1.0, False, True, True)
    assert torch.isnan(stats[:, H * W + 2 * W + 3]).all()
    g = torch.Generator().manual_seed(3)
    gl, go = torch.randn(lse.shape, generator=g), torch.randn(own.shape, generator=g)
    args = (None, gl, go, xin, *ln, 1e-5, p, gt, argk, lse, -1, 1.0)
    given, without = T.embed_similarity_backward(*args, None, stats), T.embed_similarity_backward(*args)
    for u, v in zip(given, without):
        torch.testing.assert_close(u, v, atol=1e-6, rtol=1e-5, equal_nan=True)
    dx = given[0] if layout != "rows" else given[0].reshape(B, H, W, D).permute(0, 3, 1, 2)
    assert torch.isnan(dx[1, :, 2, 3]).all() and torch.isfinite(dx[0]).all() and torch.isfinite(dx[2]).all()


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_embed_backward_given_scores_equals_recomputed(layout, layer_norm, dtype):
    """The forward keeping S (``scores``: the op's cache) writes S itself, column c*K + k, as the float64
    reference has it; the backward given it (no GEMM: S read from the cache) gives the reference's
    gradients and what the backward that recomputes S gives, to rounding, over several pixel blocks and
    chunks, far from zero mean; other (finite) scores give another gradient, so the cache is what it
    reads. Through the op: ``probs`` is S within ``cache_bytes`` ((0,) beyond it or without lse), and a
    NaN pixel gives the same NaN gradient for its pixel and the same finite ones elsewhere either way."""
    B, D, H, W, C, K = 3, 40, 5, 13, 9, 3
    x, w, b, p, gt = embed_problem(B, D, H, W, C, K, seed=2, offset=30.0, dtype=dtype)
    tiles = dict(BLOCK_N=16, BLOCK_C=4, BLOCK_D=16, BLOCK_DO=16, BLOCK_J=16, EMBED_BLOCK_N=16, EMBED_BLOCK_D=16)
    acc = checks.acc_dtype(dtype)
    N = B * H * W
    seen = {}

    def call(xin, w_, b_, p_, gt_):
        scores = torch.full((N, C * K), float("nan"), dtype=acc, device=DEVICE)
        seg, argk, lse, own, stats = KE.embed_similarity_forward(xin, w_, b_, 1e-5, p_, gt_, 0.7, True, True, True,
                                                                 tiles=tiles, chunk=40, scores=scores)
        seen["scores"] = scores

        def backward(gs, gl, go, xin_, argk_, lse_):
            args = (gs, gl, go, xin_, w_, b_, 1e-5, p_, gt_, argk_, lse_, 0.7)
            seen["given"] = KE.embed_similarity_backward(*args, tiles=tiles, chunk=40, stats=stats, scores=scores)
            seen["recomputed"] = KE.embed_similarity_backward(*args, tiles=tiles, chunk=40, stats=stats)
            return seen["given"]

        return seg, argk, lse, own, backward

    tol = EMBED_TOL if dtype == torch.float32 else TOL
    grad_tol = EMBED_GRAD_TOL if dtype == torch.float32 else None
    embed_check(x, w, b, p, gt, layer_norm, layout, tol=tol, grad_tol=grad_tol, call=call)
    z = embed_reference(x.double(), (w.double(), b.double(), 1e-5) if layer_norm else None)
    want = z @ p.double().reshape(C * K, D).t()  # S, column c*K + k
    torch.testing.assert_close(seen["scores"].double(), want, **tol)
    for u, v in zip(seen["given"], seen["recomputed"]):
        torch.testing.assert_close(u, v, atol=1e-6, rtol=1e-5)
    xin = as_layout(x, layout)
    ln = (w, b) if layer_norm else (None, None)
    seg, argk, lse, own, stats = KE.embed_similarity_forward(xin, *ln, 1e-5, p, gt, 0.7, True, True, True)
    scores = seen["scores"]
    args = (torch.ones_like(seg), torch.ones_like(lse), None, xin, *ln, 1e-5, p, gt, argk, lse, 0.7)
    assert not torch.allclose(KE.embed_similarity_backward(*args, scores=scores * 0.9)[0],
                              KE.embed_similarity_backward(*args, scores=scores)[0], atol=0, rtol=1e-3)
    # through the op: probs is S within cache_bytes, (0,) beyond it or without lse
    fit = N * C * K * scores.element_size()
    out = T.embed_similarity(xin, *ln, 1e-5, p, gt, -1, 0.7, True, True, True, fit)
    torch.testing.assert_close(out[4], scores, **tol)  # (other tiles: other rounding)
    assert T.embed_similarity(xin, *ln, 1e-5, p, gt, -1, 0.7, True, True, True, fit - 1)[4].shape == (0,)
    assert T.embed_similarity(xin, *ln, 1e-5, p, gt, -1, 0.7, True, False, True, fit)[4].shape == (0,)
    # a NaN pixel: the op given the cache against the op without it
    x[1, 5, 2, 3] = float("nan")
    xin = as_layout(x, layout)
    seg, argk, lse, own, probs, stats = T.embed_similarity(xin, *ln, 1e-5, p, gt, -1, 1.0, True, True, True, fit)
    assert probs.shape == (N, C * K) and torch.isnan(probs[H * W + 2 * W + 3]).all()
    g = torch.Generator().manual_seed(3)
    gs, gl, go = (torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (seg, lse, own))
    bwd = (gs, gl, go, xin, *ln, 1e-5, p, gt, argk, lse, -1, 1.0)
    given, without = T.embed_similarity_backward(*bwd, probs, stats), T.embed_similarity_backward(*bwd, None, stats)
    for u, v in zip(given, without):
        torch.testing.assert_close(u, v, atol=1e-6, rtol=1e-5, equal_nan=True)
    dx = given[0] if layout != "rows" else given[0].reshape(B, H, W, D).permute(0, 3, 1, 2)
    assert torch.isnan(dx[1, :, 2, 3]).all() and torch.isfinite(dx[0]).all() and torch.isfinite(dx[2]).all()


def test_embed_scores_errors_name_the_argument():
    """A ``probs`` given to the backward that is not the forward's kept S, (N, C*K) contiguous in the
    accumulation dtype, raises a ValueError naming ``probs``; None and (0,) mean "recompute S"."""
    x, w, b, p, gt = embed_problem(1, 8, 2, 3, 3, 2, dtype=torch.float32)
    seg, argk, lse, own, probs, stats = T.embed_similarity(x, w, b, 1e-5, p, gt, -1, 1.0, True, True, True, 1 << 20)
    assert probs.shape == (6, 6)
    bwd = (torch.ones_like(seg), torch.ones_like(lse), None, x, w, b, 1e-5, p, gt, argk, lse, -1, 1.0)
    for bad, match in ((probs[:-1], r"probs must be \(N, C\*K\) = \(6, 6\) or \(0,\), got shape"),
                       (probs[:, :4], r"probs must be \(N, C\*K\) = \(6, 6\)"),
                       (probs.double(), "probs must be torch.float32"),
                       (probs.t().contiguous().t(), "probs must be contiguous")):
        with pytest.raises(ValueError, match=match):
            T.embed_similarity_backward(*bwd, bad, stats)
    want = T.embed_similarity_backward(*bwd, probs, stats)
    for none in (None, probs.new_empty((0,))):
        for u, v in zip(T.embed_similarity_backward(*bwd, none, stats), want):
            torch.testing.assert_close(u, v, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="scores must be a contiguous"):
        KE.embed_similarity_forward(x, w, b, 1e-5, p, gt, 1.0, True, False, True, scores=probs)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "l2"])
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic"])
def test_embed_prototype_sums_given_stats_equal_without(layout, layer_norm, deterministic):
    """embed_prototype_sums given the forward's stats (the rows read once) equals itself without them
    (to rounding; bitwise run to run when deterministic) and the float64 reference, with NaN, inf and
    overflowing pixels in the map (NaN stats: their blocks compute the statistics as without stats),
    over several chunks and pixel blocks."""
    x, w, b, p, gt = embed_problem(2, 20, 6, 11, 3, 2, seed=7, offset=40.0, dtype=torch.float32)
    bad = _bad_pixels(x, overflow=True)
    slot = torch.where(gt >= 0, gt * 2 + 1, gt)
    slot[bad] = 2
    xin = as_layout(x, layout)
    ln = (w, b) if layer_norm else (None, None)
    stats = T.embed_similarity(xin, *ln, 1e-5, p, gt, -1, 1.0, False, True, False)[5]
    assert torch.isnan(stats[:, bad]).all()
    small = dict(EMBED_BLOCK_N=16, EMBED_BLOCK_D=16)
    good = torch.ones_like(slot, dtype=torch.bool)
    good[bad] = False
    rs, rc = _sums_reference(embed_reference(x.double(), (w.double(), b.double(), 1e-5) if layer_norm else None),
                             torch.where(good, slot, -1), 6)
    for chunk in (17, None):
        a = KE.embed_prototype_sums(xin, *ln, 1e-5, slot, 6, deterministic=deterministic, tiles=small, chunk=chunk,
                                    stats=stats)
        c = KE.embed_prototype_sums(xin, *ln, 1e-5, slot, 6, deterministic=deterministic, tiles=small, chunk=chunk)
        torch.testing.assert_close(a[0], c[0], atol=1e-6, rtol=1e-5)
        assert torch.equal(a[1], c[1])
        if deterministic:
            again = KE.embed_prototype_sums(xin, *ln, 1e-5, slot, 6, deterministic=True, tiles=small, chunk=chunk,
                                            stats=stats)
            assert torch.equal(a[0], again[0]) and torch.equal(a[1], again[1])
        finite = torch.ones(6, dtype=torch.bool)
        finite[2] = False  # the slot of the bad pixels: the overflowing one's z is the kernels' own rounding
        torch.testing.assert_close(a[0][finite].double(), rs[finite], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(a[0]).all()
    wrong = stats.clone()
    wrong[2] *= 1.5  # the stats are what the kernels use: other (finite) stats give other sums
    assert not torch.allclose(KE.embed_prototype_sums(xin, *ln, 1e-5, slot, 6, tiles=small, chunk=17, stats=wrong)[0],
                              KE.embed_prototype_sums(xin, *ln, 1e-5, slot, 6, tiles=small, chunk=17, stats=stats)[0])
    sums, counts = _with_determinism(deterministic, lambda: T.embed_prototype_sums(xin, *ln, 1e-5, slot, 6, stats))
    s0, c0 = _with_determinism(deterministic, lambda: T.embed_prototype_sums(xin, *ln, 1e-5, slot, 6))
    torch.testing.assert_close(sums, s0, atol=1e-6, rtol=1e-5)
    assert torch.equal(counts, c0)


def test_embed_stats_errors_name_the_argument():
    """Stats that are not the forward's (5, N) contiguous accumulation-dtype tensor raise a ValueError
    naming ``stats``; None and (0,) mean "none given"."""
    x, w, b, p, gt = embed_problem(1, 8, 2, 3, 3, 2, dtype=torch.float32)
    seg, argk, lse, own, _, stats = T.embed_similarity(x, w, b, 1e-5, p, gt, -1, 1.0, True, True, True)
    slot = gt.clamp(min=0)
    bwd = (torch.ones_like(seg), None, None, x, w, b, 1e-5, p, gt, argk, lse, -1, 1.0, None)
    for bad, match in ((stats[:, :-1], r"stats must be embed_similarity's \(5, N\) = \(5, 6\), got shape"),
                       (stats[:3], r"stats must be embed_similarity's \(5, N\) = \(5, 6\)"),
                       (stats.double(), "stats must be torch.float32"),
                       (stats.half(), "stats must be torch.float32"),
                       (stats.t().contiguous().t(), "stats must be contiguous")):
        with pytest.raises(ValueError, match=match):
            T.embed_similarity_backward(*bwd, bad)
        with pytest.raises(ValueError, match=match):
            T.embed_prototype_sums(x, w, b, 1e-5, slot, 3, bad)
    for none in (None, stats.new_empty((0,))):
        torch.testing.assert_close(T.embed_prototype_sums(x, w, b, 1e-5, slot, 3, none),
                                   T.embed_prototype_sums(x, w, b, 1e-5, slot, 3, stats), atol=1e-6, rtol=1e-5)


def test_embed_argument_errors_name_the_argument():
    x, w, b, p, gt = embed_problem(1, 8, 2, 3, 3, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"feats must be \(N, D\) or \(B, D, H, W\), got shape"):
        T.embed_similarity(x[0], w, b, 1e-5, p, gt, -1, 1.0, True, False, False)
    with pytest.raises(ValueError, match="ln_weight and ln_bias must be given together"):
        T.embed_similarity(x, w, None, 1e-5, p, gt, -1, 1.0, True, False, False)
    with pytest.raises(ValueError, match=r"ln_weight must be \(D,\) = \(8,\), got shape"):
        T.embed_similarity(x, w[:4], b, 1e-5, p, gt, -1, 1.0, True, False, False)
    with pytest.raises(ValueError, match=r"ln_bias must be \(D,\) = \(8,\), got shape"):
        T.embed_prototype_sums(x, w, b[:4], 1e-5, gt.clamp(min=0), 3)
    with pytest.raises(ValueError, match="ln_eps must be > 0, got 0.0"):
        T.embed_similarity_backward(None, None, None, x, w, b, 0.0, p, gt, gt, gt, -1, 1.0)
    with pytest.raises(ValueError, match="protos"):
        T.embed_similarity(x, w, b, 1e-5, p[:, :, :4], gt, -1, 1.0, True, False, False)
    with pytest.raises(ValueError, match="slot"):
        T.embed_prototype_sums(x, w, b, 1e-5, gt[:3], 3)


def _embed_opcheck_cases():
    x, w, b, p, gt = embed_problem(2, 8, 3, 4, 3, 2, dtype=torch.float32)
    seg, argk, lse, own, _, stats = T.embed_similarity(x, w, b, 1e-5, p, gt, -1, 1.0, True, True, True)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    return {
        "embed_similarity": (*leaves[:1], leaves[1], leaves[2], 1e-5, p, gt, -1, 0.7, True, True, True),
        "embed_similarity_cache": (*leaves[:1], leaves[1], leaves[2], 1e-5, p, gt, -1, 0.7, True, True, True, 1 << 20),
        "embed_similarity_backward": (torch.randn_like(seg), torch.randn_like(lse), torch.randn_like(own),
                                      x.contiguous(memory_format=torch.channels_last), w, b, 1e-5, p, gt, argk, lse,
                                      -1, 1.0),
        "embed_similarity_backward_stats": (torch.randn_like(seg), torch.randn_like(lse), torch.randn_like(own), x, w,
                                            b, 1e-5, p, gt, argk, lse, -1, 1.0, None, stats),
        "embed_prototype_sums": (x, w, b, 1e-5, torch.where(gt >= 0, gt * 2, gt), 6),
        "embed_prototype_sums_stats": (x, w, b, 1e-5, torch.where(gt >= 0, gt * 2, gt), 6, stats),
    }


@pytest.mark.parametrize("op", ["embed_similarity", "embed_similarity_cache", "embed_similarity_backward",
                                "embed_similarity_backward_stats", "embed_prototype_sums",
                                "embed_prototype_sums_stats"])
def test_embed_opcheck(op):
    name = op.replace("_cache", "").replace("_stats", "")
    torch.library.opcheck(getattr(T, name).default, _embed_opcheck_cases()[op])


def test_embed_torch_compile_fullgraph():
    """Dynamo traces the backend's embed_similarity (fake kernels) and its autograd (d feats, d weight, d bias)."""
    x, w, b, p, gt = embed_problem(2, 16, 3, 5, 3, 2, dtype=torch.float32)
    be = backends.get_backend("triton")

    def step(x_, w_, b_):
        out = be.embed_similarity(x_, (w_, b_, 1e-5), p, gt, seg=True, lse=True, own=True)
        return out.seg.square().mean() + out.lse.mean() + out.own.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = [t.clone().requires_grad_() for t in (x, w, b)]
    c = [t.clone().requires_grad_() for t in (x, w, b)]
    la, lc = compiled(*a), step(*c)
    torch.testing.assert_close(la, lc, **TOL)
    la.backward()
    lc.backward()
    for u, v in zip(a, c):
        torch.testing.assert_close(u.grad, v.grad, **TOL)
