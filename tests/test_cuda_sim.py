"""The CUDA kernels (csrc/cuda/*.cu) run on the CPU by the cuda_sim emulator.

tools/cuda_sim compiles csrc/cuda of this checkout as C++ (cached by source
hash) and registers its ops as ``torch.ops.protoseg_cudasim``, the CUDA host
code and kernels running on CPU tensors: one fiber per CUDA thread, real
barriers and warp collectives, NaN-filled shared and fresh memory, bounds-
checked pointers. Every op is compared here with protoseg_ext/reference.py on
values and gradients, edge cases included; ``-m cuda_sim`` selects these tests.
PROTOSEG_SIM_ORDER (forward, reverse, random) sets the order in which threads
run between barriers; several tests run all three.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from protoseg_ext import reference as R
from protoseg_ext.testing import as_layout, embed_problem, embed_reference, loss_scores, make_problem

pytestmark = [
    pytest.mark.cuda_sim,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cuda_sim needs Linux (ucontext fibers)"),
]

ROOT = Path(__file__).resolve().parents[1]
ORDERS = ["forward", "reverse", "random"]
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _gpu_model():
    """tools/gpu_model.py as a module (its launch counting and tile sizes)."""
    if str(ROOT / "tools") not in sys.path:
        sys.path.insert(0, str(ROOT / "tools"))
    import gpu_model

    return gpu_model


def _builder():
    spec = importlib.util.spec_from_file_location("cuda_sim_build", ROOT / "tools" / "cuda_sim" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def sim():
    return _builder().load(ROOT)


@pytest.fixture(params=ORDERS)
def order(request, monkeypatch):
    monkeypatch.setenv("PROTOSEG_SIM_ORDER", request.param)
    monkeypatch.setenv("PROTOSEG_SIM_SEED", "7")
    return request.param


def _work(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tol(dtype):
    # outputs in the working dtype, from inputs rounded to `dtype` (the reference sees the same rounded inputs)
    return {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5)}.get(
        dtype, dict(atol=1e-4, rtol=1e-4))


def _ref(f, p, gt, ignore_index=-1, T=1.0, normalize=False):
    """reference.similarity_outputs in float64: (seg, argk, lse, own), differentiable w.r.t. f."""
    return R.similarity_outputs(f if f.dtype == torch.float64 else f.double(), p.double(), gt, ignore_index, T,
                                True, True, True, normalize)


# --------------------------------------------------------------------------- similarity

SIM_CASES = [  # N, D, C, K
    (300, 16, 5, 4),
    (200, 40, 19, 10),  # D not a multiple of 32
    (70, 33, 150, 3),  # C = 150: lanes take several classes
    (20, 16, 150, 10),  # C*K = 1,500: the epilogue holds rows whole, 47 KiB + 4 KiB (the opt-in); float64: in groups
    (65, 24, 7, 1),  # K = 1
]


@pytest.mark.parametrize("N, D, C, K", SIM_CASES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("normalize", [False, True])
def test_similarity_forward(sim, N, D, C, K, dtype, normalize):
    f, p, gt, _ = make_problem(N=N, D=D, C=C, K=K, dtype=dtype, seed=N + C)
    if normalize:
        f = f * (1 + torch.arange(N, dtype=f.dtype)[:, None] / 7)  # raw rows of varying norm
    w = _work(dtype)
    seg, argk, lse, own, probs = sim.similarity(f, p, gt, -1, 0.5, True, True, True, 1 << 30, normalize)
    ref_seg, _, ref_lse, ref_own = _ref(f, p, gt, -1, 0.5, normalize)
    S = R.similarity(R.l2_normalize(f.double()) if normalize else f.double(), p.double())
    tol = _tol(dtype)
    torch.testing.assert_close(seg.double(), ref_seg, **(tol if dtype in (torch.float32, torch.float64) else dict(atol=2e-2, rtol=2e-2)))
    assert seg.dtype == dtype and lse.dtype == w and own.dtype == w
    near_tie = (S.view(N, C, K).topk(min(2, K), -1).values.diff(dim=-1).abs() < 1e-3).any(-1) if K > 1 else torch.zeros(N, C, dtype=torch.bool)
    assert torch.equal(argk.long()[~near_tie], S.view(N, C, K).argmax(-1)[~near_tie])
    torch.testing.assert_close(lse.double(), ref_lse, **tol)
    torch.testing.assert_close(own.double(), ref_own, **tol)
    torch.testing.assert_close(probs.double(), torch.softmax(S / 0.5, 1), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("normalize", [False, True])
def test_similarity_own_only(sim, order, dtype, normalize):
    """compute_own alone: similarity_own_kernel, K dot products per pixel (no GEMM)."""
    N, D, C, K = 150, 45, 6, 5
    f, p, gt, _ = make_problem(N=N, D=D, C=C, K=K, dtype=dtype, seed=3, ignore_index=255)
    seg, argk, lse, own, probs = sim.similarity(f, p, gt, 255, 1.0, False, False, True, 0, normalize)
    assert seg.numel() == lse.numel() == probs.numel() == 0
    ref = _ref(f, p, gt, 255, normalize=normalize)[3]
    torch.testing.assert_close(own.double(), ref, **_tol(dtype))


def test_similarity_all_pixels_ignored(sim):
    """Every label ignore_index: own-class scores zero, and their gradient too."""
    N, D, C, K = 80, 24, 5, 3
    f, p, gt, _ = make_problem(N=N, D=D, C=C, K=K, seed=6)
    gt = torch.full_like(gt, -1)
    for compute_seg in (False, True):
        seg, argk, lse, own, _ = sim.similarity(f, p, gt, -1, 1.0, compute_seg, compute_seg, True, 0, False)
        assert own.shape == (N, K) and (own == 0).all()
    grad = sim.similarity_backward(None, None, torch.randn(N, K), f, p, gt, argk, lse, -1, 1.0, None, False)
    assert torch.equal(grad, torch.zeros_like(f))


def test_similarity_tiles(sim):
    """More rows than one tile (16 MiB of S): the epilogue runs on several tiles and a partial last one."""
    N, D, C, K = 20000, 8, 30, 10  # 128-row multiples: 13,952 rows per fp32 tile
    f, p, gt, _ = make_problem(N=N, D=D, C=C, K=K, seed=5)
    seg, argk, lse, own, _ = sim.similarity(f, p, gt, -1, 1.0, True, True, True, 0, False)
    ref_seg, _, ref_lse, ref_own = _ref(f, p, gt)
    torch.testing.assert_close(seg.double(), ref_seg, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=0)
    torch.testing.assert_close(own.double(), ref_own, atol=2e-5, rtol=0)


def _reference_grads(f, p, gt, T, normalize, g_seg, g_lse, g_own, ignore_index=-1):
    x = f.detach().double().requires_grad_()
    seg, _, lse, own = _ref(x, p, gt, ignore_index, T, normalize)
    loss = x.sum() * 0
    if g_seg is not None:
        loss = loss + (seg * g_seg.double()).sum()
    if g_lse is not None:
        loss = loss + (lse * g_lse.double()).sum()
    if g_own is not None:
        loss = loss + (own * g_own.double()).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return grad


GRAD_PARTS = {"seg": (1, 0, 0), "lse": (0, 1, 0), "own": (0, 0, 1), "all": (1, 1, 1)}


@pytest.mark.parametrize("parts", list(GRAD_PARTS))
@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_similarity_backward(sim, parts, cached, normalize, dtype):
    N, D, C, K, T = 120, 37, 9, 4, 0.7
    f, p, gt, _ = make_problem(N=N, D=D, C=C, K=K, dtype=dtype, seed=11)
    if normalize:
        f = f * 3
    g = torch.Generator().manual_seed(1)
    use = GRAD_PARTS[parts]
    g_seg = torch.randn(N, C, generator=g, dtype=_work(dtype)) if use[0] else None
    g_lse = torch.randn(N, generator=g, dtype=_work(dtype)) if use[1] else None
    g_own = torch.randn(N, K, generator=g, dtype=_work(dtype)) if use[2] else None
    seg, argk, lse, own, probs = sim.similarity(f, p, gt, -1, T, True, True, True, (1 << 30) if cached else 0,
                                                normalize)
    assert probs.numel() == (N * C * K if cached else 0)
    grad = sim.similarity_backward(g_seg, g_lse, g_own, f, p, gt, argk, lse, -1, T, probs if cached else None,
                                   normalize)
    ref = _reference_grads(f, p, gt, T, normalize, g_seg, g_lse, g_own)
    assert grad.dtype == dtype and grad.shape == f.shape
    torch.testing.assert_close(grad.double(), ref, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_similarity_backward_half(sim, dtype):
    N, D, C, K = 90, 40, 7, 3
    f, p, gt, _ = make_problem(N=N, D=D, C=C, K=K, dtype=dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    g_lse = torch.randn(N, generator=g)
    g_own = torch.randn(N, K, generator=g)
    _, argk, lse, _, _ = sim.similarity(f, p, gt, -1, 1.0, True, True, True, 0, False)
    grad = sim.similarity_backward(None, g_lse, g_own, f, p, gt, argk, lse, -1, 1.0, None, False)
    ref = _reference_grads(f, p, gt, 1.0, False, None, g_lse, g_own)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref, atol=3e-2, rtol=3e-2)


def test_similarity_autograd_through_the_registered_backward(sim):
    """The autograd formula of protoseg_ext/ops.py on the emulated ops: PPC/PPD-style loss, d feats."""
    from protoseg_ext import ops

    ops.register("protoseg_cudasim")  # once per process
    N, D, C, K = 100, 20, 6, 3
    f, p, gt, _ = make_problem(N=N, D=D, C=C, K=K, seed=4)
    a = f.clone().requires_grad_()
    seg, argk, lse, own, probs = sim.similarity(a, p, gt, -1, 1.0, True, True, True, 0, False)
    t = torch.randint(0, K, (N,), generator=torch.Generator().manual_seed(0))
    loss = lse.sum() - own.gather(1, t[:, None]).sum() + seg.square().sum()
    loss.backward()
    b = f.clone().double().requires_grad_()
    r_seg, _, r_lse, r_own = _ref(b, p, gt)
    ref = r_lse.sum() - r_own.gather(1, t[:, None]).sum() + r_seg.square().sum()
    ref.backward()
    torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------- the head's embedding


def _embed_problem(B, D, H, W, C, K, seed, dtype=torch.float32):
    return embed_problem(B, D, H, W, C, K, seed=seed, dtype=dtype)


def _embed_check(sim, x, w, b, p, gt, layout, layer_norm, cached, tol, T=0.7, parts=(1, 1, 1), seed=0):
    """embed_similarity and its backward on the emulator against LayerNorm + F.normalize + the reference
    (float64 autograd): seg, lse, own, and d feats, d weight, d bias under random upstream gradients."""
    xin = as_layout(x, layout)
    kept = xin.clone()
    lw, lb = (w, b) if layer_norm else (None, None)
    seg, argk, lse, own, probs, _ = sim.embed_similarity(xin, lw, lb, 1e-5, p, gt, -1, T, True, True, True,
                                                      (1 << 30) if cached else 0)
    assert probs.numel() == (gt.numel() * p.shape[0] * p.shape[1] if cached else 0)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = R.similarity_outputs(embed_reference(leaves[0], (leaves[1], leaves[2], 1e-5) if layer_norm else None),
                               p.double(), gt, -1, T, True, True, True)
    for u, v in zip((seg, lse, own), (ref[0], ref[2], ref[3])):
        torch.testing.assert_close(u.double(), v, **tol)
    assert seg.dtype == x.dtype
    g = torch.Generator().manual_seed(seed)
    ups = [torch.randn(r.shape, generator=g, dtype=torch.float64) if on else None
           for r, on in zip((ref[0], ref[2], ref[3]), parts)]
    work = _work(x.dtype)
    gx, gw, gb = sim.embed_similarity_backward(*[u.to(work) if u is not None else None for u in ups], xin, lw, lb,
                                               1e-5, p, gt, argk, lse, -1, T, probs if cached else None)
    assert torch.equal(xin, kept)  # the input is never written
    loss = sum((r * u).sum() for r, u in zip((ref[0], ref[2], ref[3]), ups) if u is not None)
    n = 3 if layer_norm else 1
    want = torch.autograd.grad(loss, leaves[:n])
    assert gx.shape == xin.shape and gx.dtype == x.dtype
    torch.testing.assert_close(gx.double(), as_layout(want[0], layout), **tol)
    if layer_norm:
        torch.testing.assert_close(gw.double(), want[1], **tol)
        torch.testing.assert_close(gb.double(), want[2], **tol)
    else:
        assert gw.numel() == gb.numel() == 0
    return seg, argk, lse, own


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("cached", [True, False])
def test_embed_similarity(sim, layout, layer_norm, cached):
    """The embedding kernels (statistics, folded GEMM + affine epilogue, L2 + LayerNorm backward) on an NCHW
    map read as it lies, a channels-last map and (N, D) rows; D not a multiple of the 8 channel groups."""
    x, w, b, p, gt = _embed_problem(2, 37, 5, 7, 4, 3, seed=11)
    _embed_check(sim, x, w, b, p, gt, layout, layer_norm, cached, dict(atol=2e-5, rtol=2e-5))


@pytest.mark.parametrize("parts", list(GRAD_PARTS))
def test_embed_similarity_backward_parts(sim, order, parts):
    """Each upstream gradient alone (seg: arg-max entries only; own; lse: dense), threads in every order."""
    x, w, b, p, gt = _embed_problem(1, 40, 6, 7, 5, 4, seed=12)
    _embed_check(sim, x, w, b, p, gt, "nchw", True, False, dict(atol=2e-5, rtol=2e-5), parts=GRAD_PARTS[parts])


@pytest.mark.parametrize("dtype", FLOATS)
def test_embed_similarity_dtypes(sim, dtype):
    """float64 to 1e-10; float16/bfloat16 maps (the reference sees the same rounded inputs) loosely."""
    x, w, b, p, gt = _embed_problem(2, 24, 4, 5, 6, 3, seed=13, dtype=dtype)
    tol = _tol(dtype) if dtype in (torch.float32, torch.float64) else dict(atol=2e-2, rtol=2e-2)
    _embed_check(sim, x, w, b, p, gt, "nchw", True, False, tol)


def _meter_events(sim, fn):
    """fn() under the emulator's traffic meter: its result and the meter's records (kernels and GEMMs)."""
    sim.cudasim_meter("start")
    try:
        out = fn()
    finally:
        sim.cudasim_meter("stop")
    return out, json.loads(sim.cudasim_meter("json"))


def _gemms(sim, fn):
    """fn() under the meter: its result and the GEMM records (name, a, b, out, m, n, k)."""
    out, evs = _meter_events(sim, fn)
    return out, [(e["name"], e["a"], e["b"], e["out"], e["m"], e["n"], e["k"]) for e in evs if e["type"] == "gemm"]


@pytest.mark.parametrize("layout", ["nchw", "rows"])
@pytest.mark.parametrize("dtype, pdtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                           (torch.float16, torch.float16)])
@pytest.mark.parametrize("D", [40, 12])
def test_embed_similarity_16bit_gemms_on_tensor_cores(sim, layout, dtype, pdtype, D):
    """16-bit maps: the folded forward GEMM and the backward's dS @ P run as 16-bit GEMMs with fp32 output
    (mm.dtype_out; tensor cores on a GPU), never as an fp32 GEMM on the map (only the (C*K, D) x (D,) mv of
    the prototypes' bias term is fp32): forward X [hi; lo]^T (N = 2 C*K) where C*K <= D, [X | X] [hi | lo]^T
    (K = 2 D) where C*K > D (D = 12 against C*K = 18), backward [hi | lo (| hi)] @ [P; P (; Plo)] (K = 2 C*K
    for bf16 prototypes, 3 C*K otherwise). The split keeps fp32-level accuracy: with fp32 LayerNorm and
    prototypes, lse, own, d weight and d bias (all fp32) match the reference from the same rounded map to the
    float32 tolerance, where one rounding of P * w or of dS to bfloat16 is off by about 1e-3."""
    x, w, b, p, gt = _embed_problem(2, D, 4, 5, 6, 3, seed=23)
    x = x.to(dtype)
    w, b, p = w.to(pdtype), b.to(pdtype), p.to(pdtype)
    N, CK = gt.numel(), 6 * 3
    fwd_gemm = (2 * CK, D) if CK <= D else (CK, 2 * D)  # (N, K) of the folded GEMM
    tol = dict(atol=2e-2, rtol=2e-2) if pdtype != torch.float32 else dict(atol=2e-5, rtol=2e-5)
    xin = as_layout(x, layout)
    (seg, argk, lse, own, _, _), fwd = _gemms(sim, lambda: sim.embed_similarity(xin, w, b, 1e-5, p, gt, -1, 0.7, True,
                                                                              True, True, 0))
    name = {torch.bfloat16: "BFloat16", torch.float16: "Half"}[dtype]
    tiles = 2 if layout == "nchw" else 1  # a tile per image of a map, one of the (N, D) rows
    n = N // tiles
    assert [g for g in fwd if g[0] != "mv"] == [("mm.dtype_out", name, name, "Float", n, *fwd_gemm)] * tiles, fwd
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = R.similarity_outputs(embed_reference(leaves[0], (leaves[1], leaves[2], 1e-5)), p.double(), gt, -1, 0.7,
                               True, True, True)
    for u, v in ((lse, ref[2]), (own, ref[3])):
        torch.testing.assert_close(u.double(), v, **tol)
    torch.testing.assert_close(seg.double(), ref[0], atol=2e-2, rtol=2e-2)  # seg is stored in the map's dtype
    g = torch.Generator().manual_seed(3)
    ups = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in (ref[0], ref[2], ref[3])]
    (gx, gw, gb), bwd = _gemms(sim, lambda: sim.embed_similarity_backward(
        *[u.float() for u in ups], xin, w, b, 1e-5, p, gt, argk, lse, -1, 0.7, None))
    terms = 2 if pdtype == torch.bfloat16 else 3
    assert [g for g in bwd if g[0] != "mv"] == [("mm.dtype_out", name, name, "Float", n, *fwd_gemm),  # S again
                                                ("mm.dtype_out", "BFloat16", "BFloat16", "Float", n, D, terms * CK)
                                                ] * tiles, bwd
    want = torch.autograd.grad(sum((r * u).sum() for r, u in zip((ref[0], ref[2], ref[3]), ups)), leaves)
    torch.testing.assert_close(gx.double(), as_layout(want[0], layout), atol=2e-2, rtol=2e-2)  # stored in 16 bits
    torch.testing.assert_close(gw.double(), want[1], **tol)
    torch.testing.assert_close(gb.double(), want[2], **tol)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [5, 30])
def test_embed_kernels_coalesced(sim, layout, dtype, C):
    """The per-pixel kernels over the map (statistics, the prototype sums' fused embedding, the backward, and
    in bf16 with C*K > D the copy [X | X] of the split GEMM along K) read and write whole sectors in every
    layout: within 1.25x of the ideal sectors of the bytes they request, as the meter counts them (a lane per
    pixel along a unit channel stride would be about 8x in bf16)."""
    x, w, b, p, gt = _embed_problem(2, 64, 8, 16, C, 3, seed=24)
    x, w, b, p = x.to(dtype), w.to(dtype), b.to(dtype), p.to(dtype)
    xin = as_layout(x, layout)
    slot = gt.clamp(min=-1) * 3
    kernels = {"embed_stats_kernel", "embed_rows_kernel", "embed_backward_kernel"}
    if dtype == torch.bfloat16 and C * 3 > 64:
        kernels.add("embed_kcat_kernel")

    def step():
        _, argk, lse, _, _, _ = sim.embed_similarity(xin, w, b, 1e-5, p, gt, -1, 1.0, True, True, True, 0)
        gl = torch.randn(lse.shape, dtype=lse.dtype)
        sim.embed_similarity_backward(None, gl, None, xin, w, b, 1e-5, p, gt, argk, lse, -1, 1.0, None)
        sim.embed_prototype_sums(xin, w, b, 1e-5, slot, C * 3)

    _, evs = _meter_events(sim, step)
    evs = [e for e in evs if e["type"] == "kernel"]
    seen = set()
    for e in evs:
        name = e["name"].split("<")[0]
        if name in ("embed_stats_kernel", "embed_rows_kernel", "embed_backward_kernel", "embed_kcat_kernel"):
            seen.add(name)
            assert e["sectors"] <= 1.25 * e["ideal_sectors"], (name, e["sectors"], e["ideal_sectors"])
    assert seen == kernels, seen


@pytest.mark.parametrize("dtype, C", [(torch.bfloat16, 4), (torch.bfloat16, 40), (torch.float32, 40)])
def test_embed_similarity_forward_launches_per_tile(sim, monkeypatch, dtype, C):
    """The forward launches two kernels and one GEMM per tile: the statistics (which, for the bf16 GEMM
    along K, C*K = 120 > D = 32, also write its [X | X]) and the epilogue (which finishes the rows that the
    affine map cannot give: a far-from-mean pixel and a NaN one here); no copy kernel, no scores kernel.
    Before the tiles, one kernel for the operands (embed_operands_kernel: P, P w and its bf16 parts, rho,
    beta). 4 tiles of 64 pixels; lse and own against the reference."""
    monkeypatch.setenv("PROTOSEG_SIM_TILE_ROWS", "64")
    x, w, b, p, gt = _embed_problem(2, 32, 8, 16, C, 3, seed=26, dtype=torch.float64)
    x[1, :, 3, :2] += 60  # |mean| / std = 30: scores from z (fixed_scores_row)
    xin = x.to(dtype)
    xin[0, :, 5, 7] = float("nan")
    (seg, argk, lse, own, _, _), evs = _meter_events(
        sim, lambda: sim.embed_similarity(xin, w.float(), b.float(), 1e-5, p.float(), gt, -1, 0.5, True, True,
                                          True, 0))
    names = [e["name"].split("<")[0] for e in evs]
    gemm = "mm.dtype_out" if dtype == torch.bfloat16 else "mm"
    assert names == ["embed_operands_kernel"] + ["embed_stats_kernel", gemm, "similarity_epilogue_kernel"] * 4, names
    k = 64 if C == 40 and dtype == torch.bfloat16 else 32  # along K: [X | X] [hi | lo]^T
    assert [e["k"] for e in evs if e["name"] == gemm] == [k] * 4
    xd = xin.double()
    xd[0, :, 5, 7] = 0
    _, _, r_lse, r_own = R.similarity_outputs(embed_reference(xd, (w, b, 1e-5)), p, gt, -1, 0.5, True, True, True)
    nan_px = 5 * 16 + 7
    ok = torch.ones(lse.shape[0], dtype=torch.bool)
    ok[nan_px] = False
    assert torch.isnan(lse[nan_px])
    torch.testing.assert_close(lse.double()[ok], r_lse[ok], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(own.double()[ok], r_own[ok], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16])
def test_embed_ops_launch_little_besides_their_tiles(sim, monkeypatch, pdtype):
    """Every GPU launch of the embedding's forward and backward on a bf16 map (4 tiles of 64 pixels), as
    tools/gpu_model.py counts them: the operands in one kernel (embed_operands_kernel: P, P w and its bf16
    parts, rho, beta; the backward's split P and P w), then per tile the forward's statistics, GEMM and
    epilogue, the backward's grad epilogue, GEMM and embed_backward_kernel; besides, the forward zero-fills
    its outputs, and the backward converts seg's gradient to float32, zeroes the partials of d w and d b, sums
    each, and converts them to bf16 parameters' dtype. (The operands took 10 ATen ops forward with fp32
    parameters, 13 with bf16 ones, 15 backward, and GEMMs for beta and P w.)"""
    from torch.profiler import ProfilerActivity, profile

    gpu_model = _gpu_model()

    monkeypatch.setenv("PROTOSEG_SIM_TILE_ROWS", "64")
    x, w, b, p, gt = _embed_problem(2, 32, 8, 16, 6, 3, seed=27)
    xin, w, b, p = x.to(torch.bfloat16), w.to(pdtype), b.to(pdtype), p.to(pdtype)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seg, argk, lse, own, probs, st = sim.embed_similarity(xin, w, b, 1e-5, p, gt, -1, 0.5, True, True, True,
                                                              1 << 30)
    assert gpu_model.count_launches(prof.events()) == {"kernels": 1 + 2 * 4, "gemms": 4, "aten": 1, "total": 14}
    gs, gl = torch.randn(seg.shape).to(seg.dtype), torch.randn(lse.shape)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        gx, gw, gb = sim.embed_similarity_backward(gs, gl, None, xin, w, b, 1e-5, p, gt, argk, lse, -1, 0.5, probs,
                                                   st)
    aten = 4 if pdtype == torch.float32 else 6
    assert gpu_model.count_launches(prof.events()) == {"kernels": 1 + 2 * 4, "gemms": 4, "aten": aten,
                                                       "total": 13 + aten}
    xd = xin.double().requires_grad_()
    wd, bd = w.double().requires_grad_(), b.double().requires_grad_()
    r_seg, _, r_lse, _ = R.similarity_outputs(embed_reference(xd, (wd, bd, 1e-5)), p.double(), gt, -1, 0.5, True,
                                              True, False)
    torch.autograd.backward([r_seg, r_lse], [gs.double(), gl.double()])
    torch.testing.assert_close(gw.double(), wd.grad, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gb.double(), bd.grad, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gx.double(), xd.grad, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("C, K", [(19, 10), (150, 10), (3, 256)])
def test_similarity_epilogue_coalesced(sim, C, K):
    """The forward epilogue reads the S tile in whole sectors (staged per class group through shared memory):
    within 1.25x of the ideal sectors of the bytes it requests at C*K = 190, 1,500 and 768 (a lane per class
    reading its K scores was 2.9x at C = 19, K = 10; rows shorter than a sector, C*K < 8, cannot be), with the
    values of the reference."""
    x, w, b, p, gt = _embed_problem(1, 32, 8, 16, C, K, seed=25)
    (seg, argk, lse, own, _, _), evs = _meter_events(
        sim, lambda: sim.embed_similarity(x, w, b, 1e-5, p, gt, -1, 0.5, True, True, True, 1 << 30))
    evs = [e for e in evs if e["type"] == "kernel" and e["name"].startswith("similarity_epilogue_kernel")]
    assert evs
    for e in evs:
        assert e["sectors"] <= 1.25 * e["ideal_sectors"], (e["sectors"], e["ideal_sectors"])
    ref = R.similarity_outputs(embed_reference(x.double(), (w.double(), b.double(), 1e-5)), p.double(), gt, -1, 0.5,
                               True, True, True)
    torch.testing.assert_close(seg.double(), ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(own.double(), ref[3], atol=1e-5, rtol=1e-5)


def test_embed_similarity_offsets_overflow_and_nan(sim):
    """Pixels far from zero mean (|mean| / std = 30: recomputed from z, not through the folded GEMM), a
    finite pixel whose float32 sums of squares overflow (its statistics in float64), and a NaN pixel (NaN
    scores, as the reference's): every other pixel exact, in value and gradient."""
    x, w, b, p, gt = _embed_problem(2, 24, 4, 6, 3, 4, seed=14, dtype=torch.float64)
    x[1] += 60
    x[0, :, 1, 2] *= 1e20
    x = x.float()
    xin = x.clone()
    xin[0, :, 2, 3] = float("nan")
    seg, argk, lse, own, _, _ = sim.embed_similarity(xin, w.float(), b.float(), 1e-5, p.float(), gt, -1, 1.0, True,
                                                  True, True, 0)
    nan_px = 2 * 6 + 3
    assert torch.isnan(seg[nan_px]).all() and torch.isnan(lse[nan_px])
    ok = torch.ones(seg.shape[0], dtype=torch.bool)
    ok[nan_px] = False
    xd, wd, bd = [t.double().requires_grad_() for t in (x, w, b)]
    ref = R.similarity_outputs(embed_reference(xd, (wd, bd, 1e-5)), p.double(), gt, -1, 1.0, True, True, True)
    for u, v in zip((seg, lse, own), (ref[0], ref[2], ref[3])):
        torch.testing.assert_close(u.double()[ok], v[ok], atol=1e-5, rtol=1e-5)
    _, argk, lse, _, _, _ = sim.embed_similarity(x, w.float(), b.float(), 1e-5, p.float(), gt, -1, 1.0, True, True,
                                              True, 0)  # the backward without the NaN pixel
    g = torch.Generator().manual_seed(1)
    up = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in (ref[0], ref[2], ref[3])]
    gx, gw, gb = sim.embed_similarity_backward(*[u.float() for u in up], x, w.float(), b.float(), 1e-5, p.float(), gt,
                                               argk, lse, -1, 1.0, None)
    want = torch.autograd.grad(sum((r * u).sum() for r, u in zip((ref[0], ref[2], ref[3]), up)), (xd, wd, bd))
    scale = x.double().abs().amax(1, keepdim=True).clamp(min=1)  # d feats scales like 1 / the pixel's spread
    torch.testing.assert_close(gx.double() * scale, want[0] * scale, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw.double(), want[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gb.double(), want[2], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("C, K", [(60, 10), (150, 10), (70, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embed_similarity_epilogue_maps_long_rows(sim, C, K, dtype):
    """The forward epilogue applies the folded GEMM's per-row affine map as it stages a row, in groups of
    classes: rows longer than one group (32 classes at K = 10; 12 at K = 40, 480 columns, not a multiple of
    the warp) held whole in the stage (C*K = 600: 19 KiB per block; 1,500: 47 KiB, above 48 KiB with the
    static rho and beta, so with the opt-in) or, too long for it (C*K = 2,800), written back mapped for the
    softmax rows and own; for bf16 the two halves of the split GEMM added; with far-from-mean, overflowing
    and NaN pixels among them (scores recomputed by the epilogue from the pixels: fixed_scores_row). seg, lse, own
    and the cached softmax rows against the reference."""
    x, w, b, p, gt = _embed_problem(2, 24, 4, 6, C, K, seed=16, dtype=torch.float64)
    x[1, :, :2] += 60  # |mean| / std = 30: recomputed from z
    x[0, :, 1, 2] *= 1e20  # float32 squares overflow: NaN stats, recomputed in float64
    xin = x.to(dtype)
    xin[0, :, 2, 3] = float("nan")
    T = 0.7
    seg, argk, lse, own, probs, stats = sim.embed_similarity(xin, w.float(), b.float(), 1e-5, p.float(), gt, -1, T,
                                                             True, True, True, 1 << 30)
    nan_px = 2 * 6 + 3
    assert torch.isnan(stats[:, 1 * 6 + 2]).all()  # the overflow pixel's stats are NaN (recomputed by the kernels)
    assert torch.isnan(lse[nan_px]) and torch.isnan(probs.view(-1, C * K)[nan_px]).all()
    ok = torch.ones(seg.shape[0], dtype=torch.bool)
    ok[nan_px] = False
    xd = xin.double()
    xd[0, :, 2, 3] = 0
    z = embed_reference(xd, (w.double(), b.double(), 1e-5))
    ref = R.similarity_outputs(z, p.double(), gt, -1, T, True, True, True)
    S = R.similarity(z, p.double())
    tol = dict(atol=1e-5, rtol=1e-5)  # the map's rounding is the reference's too: fp32 scores either way
    seg_tol = tol if dtype == torch.float32 else dict(atol=8e-3, rtol=8e-3)  # seg is rounded to bf16
    torch.testing.assert_close(seg.double()[ok], ref[0][ok], **seg_tol)
    for u, v in zip((lse, own), (ref[2], ref[3])):
        torch.testing.assert_close(u.double()[ok], v[ok], **tol)
    torch.testing.assert_close(probs.view(-1, C * K).double()[ok], torch.softmax(S / T, 1)[ok], **tol)


def test_embed_similarity_tiles(sim):
    """Images of more than one tile (16 MiB of S: 2,688 pixels at C*K = 1,500), the last tile partial. The
    gradient of seg is left out: with 1,500 prototypes in D = 8, near ties make its arg-max a coin toss."""
    x, w, b, p, gt = _embed_problem(2, 8, 50, 60, 150, 10, seed=15)
    _embed_check(sim, x, w, b, p, gt, "nchw", True, False, dict(atol=2e-5, rtol=2e-5), T=1.0, parts=(0, 1, 1))


def test_embed_similarity_autograd_through_the_registered_backward(sim):
    """protoseg_ext/ops.py's autograd of embed_similarity on the emulated ops: gradients reach feats, weight, bias."""
    _register_embed_autograd()
    x, w, b, p, gt = _embed_problem(2, 16, 3, 4, 5, 3, seed=16)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    seg, _, lse, own, _, _ = sim.embed_similarity(*leaves[:1], leaves[1], leaves[2], 1e-5, p, gt, -1, 1.0, True, True,
                                               True, 0)
    (lse.sum() - own[:, 0].sum() + seg.square().sum()).backward()
    ref_leaves = [t.double().requires_grad_() for t in (x, w, b)]
    r_seg, _, r_lse, r_own = R.similarity_outputs(embed_reference(ref_leaves[0], (ref_leaves[1], ref_leaves[2], 1e-5)),
                                                  p.double(), gt, -1, 1.0, True, True, True)
    (r_lse.sum() - r_own[:, 0].sum() + r_seg.square().sum()).backward()
    for a, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), r.grad, atol=2e-5, rtol=2e-5)


def _register_embed_autograd():
    from protoseg_ext import ops

    ops.register("protoseg_cudasim")  # once per process


def test_embed_similarity_gradcheck(sim):
    """gradcheck in float64 through the registered autograd: feats (NCHW), LayerNorm weight and bias."""
    _register_embed_autograd()
    x, w, b, p, gt = _embed_problem(2, 6, 2, 3, 3, 2, seed=19, dtype=torch.float64)

    def fn(x, w, b):
        seg, _, lse, own, _, _ = sim.embed_similarity(x, w, b, 1e-5, p, gt, -1, 0.7, True, True, True, 0)
        return seg, lse, own

    assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_() for t in (x, w, b)))


def _sums_problem(layout, layer_norm):
    """The embedded sums' problem: a (2, 20, 6, 5) float64 map with a NaN and an inf pixel, one far from zero
    mean and one whose float32 squares overflow, 12 slots (pixels of slot 5 among the bad ones). Returns
    ``(generator, x, ln (float64, or None), slot, the float32 map in layout, its weight, its bias)``; the
    generator goes on for the caller's draws."""
    g = torch.Generator().manual_seed(17)
    x = torch.randn(2, 20, 6, 5, generator=g, dtype=torch.float64)
    x[1, :, 2, 3] = float("nan")
    x[1, :, 2, 4] = float("inf")
    x[0, :, 3, 2] += 500
    x[0, :, 4, 1] *= 1e20
    ln = (torch.randn(20, generator=g, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64),
          1e-5) if layer_norm else None
    slot = torch.randint(-1, 12, (60,), generator=g)
    slot[30 + 13] = slot[30 + 14] = slot[17] = slot[21] = 5
    xin = as_layout(x.float(), layout)
    lw, lb = (ln[0].float(), ln[1].float()) if layer_norm else (None, None)
    return g, x, ln, slot, xin, lw, lb


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
@pytest.mark.parametrize("layer_norm", [True, False])
def test_embed_prototype_sums(sim, sums_mode, layout, layer_norm):
    """Sums of the embedding per slot; NaN and inf pixels never reach them, a pixel far from zero mean and
    one whose float32 squares overflow do (the reference: the embedding in float64)."""
    _, x, ln, slot, xin, lw, lb = _sums_problem(layout, layer_norm)
    sums, counts = sim.embed_prototype_sums(xin, lw, lb, 1e-5, slot, 12)
    rs, rc = R.prototype_sums(embed_reference(x.float().double(), ln), slot, 12)
    assert sums.dtype == torch.float32 and torch.equal(counts.double(), rc)
    torch.testing.assert_close(sums.double(), rs, atol=1e-5, rtol=1e-5)


def test_embed_argument_errors_name_the_argument(sim):
    x, w, b, p, gt = _embed_problem(1, 8, 2, 3, 2, 2, seed=18)
    with pytest.raises(ValueError, match="ln_weight and ln_bias"):
        sim.embed_similarity(x, w, None, 1e-5, p, gt, -1, 1.0, True, False, False, 0)
    with pytest.raises(ValueError, match="ln_weight must be"):
        sim.embed_similarity(x, w[:5], b, 1e-5, p, gt, -1, 1.0, True, False, False, 0)
    with pytest.raises(ValueError, match="ln_eps"):
        sim.embed_prototype_sums(x, w, b, 0.0, gt.clamp(min=0), 4)
    with pytest.raises(ValueError, match="feats must be"):
        sim.embed_similarity(x[0], w, b, 1e-5, p, gt, -1, 1.0, True, False, False, 0)



# --------------------------------------------------------------------------- embed_similarity's stats


def _stats_problem(layout, dtype, seed=31):
    """A small map with a NaN pixel, an inf pixel and a pixel far from zero mean (|mean| / std = 30), as
    ``layout``, in ``dtype``; the LayerNorm and protos in float32 (float64 for a float64 map)."""
    x, w, b, p, gt = _embed_problem(2, 37, 5, 7, 4, 3, seed=seed)
    x[0, :, 1, 2] += 60
    x[1, :, 2, 3] = float("nan")
    x[0, :, 4, 5] = float("inf")
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    bad = torch.zeros(gt.numel(), dtype=torch.bool)
    bad[35 + 2 * 7 + 3] = bad[4 * 7 + 5] = True  # pixel n = b*H*W + h*W + w
    return as_layout(x.to(dtype), layout), w.to(pdt), b.to(pdt), p.to(pdt), gt, bad


def _stats_sums_reference(xin, w, b, eps=1e-5):
    """Rows 3 and 4 of the CUDA stats in float64: w . z and (w xhat) . z of each pixel (z = y / ||y||, y the
    LayerNorm of its entries x, xhat = (x - mean) / sqrt(var + eps)), from xin as the ops read it."""
    x = (xin.double().permute(0, 2, 3, 1).reshape(-1, xin.shape[1]) if xin.dim() == 4 else xin.double())
    mu = x.mean(1, keepdim=True)
    xhat = (x - mu) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + eps)
    y = xhat * w.double() + b.double()
    z = y / y.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.stack([(w.double() * z).sum(1), (w.double() * xhat * z).sum(1)])


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_embed_similarity_stats(sim, layout, layer_norm, dtype):
    """The forward's 6th output: each pixel's LayerNorm mean, 1 / std and 1 / ||y|| (without the LayerNorm 0, 1,
    1 / ||x||), as reference_backend.embed_stats computes them in float64 from the same (rounded) map, then
    w . z and (w xhat) . z (0 without the LayerNorm), which the backward reads instead of a pass over the
    map: (5, N) contiguous in the accumulation dtype; NaN in all five for the NaN and the inf pixel, nowhere
    else."""
    from protoseg_ext.reference_backend import embed_stats

    xin, w, b, p, gt, bad = _stats_problem(layout, dtype)
    lw, lb = (w, b) if layer_norm else (None, None)
    out = sim.embed_similarity(xin, lw, lb, 1e-5, p, gt, -1, 0.7, True, True, True, 0)
    assert len(out) == 6
    stats = out[5]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert stats.shape == (5, gt.numel()) and stats.dtype == acc and stats.is_contiguous()
    want = embed_stats(xin, (lw, lb, 1e-5) if layer_norm else None)
    assert torch.isnan(want[:, bad]).all() and not torch.isnan(want[:, ~bad]).any()  # the reference's rule
    assert torch.isnan(stats[:, bad]).all() and not torch.isnan(stats[:, ~bad]).any()
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats[:3, ~bad], want[:, ~bad], **tol)
    if layer_norm:
        sums = _stats_sums_reference(xin, w, b)
        torch.testing.assert_close(stats[3:, ~bad].double(), sums[:, ~bad], **tol)
    else:
        assert torch.equal(stats[0, ~bad], torch.zeros_like(stats[0, ~bad]))
        assert torch.equal(stats[1, ~bad], torch.ones_like(stats[1, ~bad]))
        assert torch.equal(stats[3:, ~bad], torch.zeros_like(stats[3:, ~bad]))
    # nothing computed: no stats
    assert sim.embed_similarity(xin, lw, lb, 1e-5, p, gt, -1, 0.7, False, False, False, 0)[5].shape == (0,)


def test_embed_similarity_stats_zero_pixel_and_overflow(sim):
    """A zero pixel (1 / ||x|| at its cap 1e12, no LayerNorm) and a finite pixel whose float32 sums of squares
    overflow: NaN stats, as the reference's (its kernels then recompute it in float64: the scores are finite)."""
    from protoseg_ext.reference_backend import embed_stats

    x, w, b, p, gt = _embed_problem(1, 24, 3, 4, 3, 2, seed=32)
    x[0, :, 0, 1] = 0
    x[0, :, 2, 2] *= 1e20
    x = x.float()
    for ln in ((w.float(), b.float(), 1e-5), None):
        out = sim.embed_similarity(x, *(ln[:2] if ln else (None, None)), 1e-5, p.float(), gt, -1, 1.0, True, True,
                                   True, 0)
        want = embed_stats(x, ln)
        assert torch.isnan(want[:, 10]).all() and torch.isnan(out[5][:, 10]).all()
        assert torch.isfinite(out[0][10]).all() and torch.isfinite(out[2][10])
        ok = torch.ones(12, dtype=torch.bool)
        ok[10] = False
        torch.testing.assert_close(out[5][:3, ok], want[:, ok], atol=1e-5, rtol=1e-5)
        if ln is not None:
            torch.testing.assert_close(out[5][3:, ok].double(), _stats_sums_reference(x, *ln[:2])[:, ok],
                                       atol=1e-5, rtol=1e-5)
        if ln is None:
            assert out[5][2, 1].item() == pytest.approx(1e12)


def _backward_map_reads(sim, x, w, b, p, gt, T, cached, stats_rows=5, layout="nchw"):
    """embed_similarity (its stats given to the backward, their first stats_rows rows) and its backward
    under the meter, upstream gradients of seg, lse and own: the gradients, checked against the float64
    reference, and how many bytes embed_backward_kernel loaded over those of the map and of G = dS P."""
    xin = as_layout(x, layout)
    seg, argk, lse, own, probs, stats = sim.embed_similarity(xin, w, b, 1e-5, p, gt, -1, T, True, True, True,
                                                          (1 << 30) if cached else 0)
    g = torch.Generator().manual_seed(5)
    ups = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (seg, lse, own)]
    (gx, gw, gb), evs = _meter_events(sim, lambda: sim.embed_similarity_backward(
        *[u.float() for u in ups], xin, w, b, 1e-5, p, gt, argk, lse, -1, T, probs if cached else None,
        stats[:stats_rows].contiguous()))
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = R.similarity_outputs(embed_reference(leaves[0], (leaves[1], leaves[2], 1e-5)), p.double(), gt, -1, T,
                               True, True, True)
    want = torch.autograd.grad(sum((r * u).sum() for r, u in zip((ref[0], ref[2], ref[3]), ups)), leaves)
    tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx.double(), as_layout(want[0], layout), **tol)
    torch.testing.assert_close(gw.double(), want[1], **tol)
    torch.testing.assert_close(gb.double(), want[2], **tol)
    loaded = sum(e["bytes_loaded"] for e in evs if e["type"] == "kernel" and e["name"].startswith("embed_backward"))
    return loaded / (2 * x.numel() * 4)  # the map and G, float32: one read of each


@pytest.mark.parametrize("cached", [True, False])
def test_embed_backward_one_pass_from_the_epilogue_sums(sim, cached):
    """embed_backward_kernel reads the map and G once: the grad epilogue sums z . G = dS . S, w . G = dS . P w
    and b . G = dS . P b per pixel, and the forward's stats carry w . z and (w xhat) . z (rows 3 and 4), so
    its first pass over x and G is skipped; stats of 3 rows alone, or a temperature at which the softmax
    cache underflows at an arg-max entry (its score then unknown), take that pass again for the blocks
    concerned. The gradients match the float64 reference every way."""
    x, w, b, p, gt = _embed_problem(2, 40, 4, 9, 6, 3, seed=41)
    # the ratio counts the per-pixel loads besides (each warp's stats, at D = 40 a third of a map read)
    one = _backward_map_reads(sim, x, w, b, p, gt, 0.7, cached)
    two = _backward_map_reads(sim, x, w, b, p, gt, 0.7, cached, stats_rows=3)
    assert one < 1.5 and two > one + 0.9, (one, two)
    if cached:  # exp(S / 0.01 - lse) underflows for the far classes: their arg-max entries fall back
        cold = _backward_map_reads(sim, x, w, b, p, gt, 0.01, cached)
        assert one + 0.3 < cold, (one, cold)
    assert _backward_map_reads(sim, x, w, b, p, gt, 0.7, cached, layout="channels_last") < 1.5


def _embed_stats_launches(sim, fn):
    """fn() under the meter: its result and how many times embed_stats_kernel ran."""
    out, evs = _meter_events(sim, fn)
    return out, sum(1 for e in evs if e["type"] == "kernel" and e["name"].startswith("embed_stats_kernel"))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("cached", [True, False])
def test_embed_backward_with_stats(sim, layout, layer_norm, cached):
    """embed_similarity_backward given the forward's stats: no statistics pass of its own (no embed_stats_kernel
    launch), and the same gradients bit for bit as without them (the same statistics), which match the float64
    reference; a far-from-mean pixel and a finite pixel whose float32 sums overflow (NaN stats, recomputed in
    float64) included."""
    x, w, b, p, gt = _embed_problem(2, 37, 5, 7, 4, 3, seed=33)
    x[0, :, 1, 2] += 60
    x[1, :, 3, 1] *= 1e20
    x = x.float()
    xin = as_layout(x, layout)
    w, b, p = w.float(), b.float(), p.float()
    lw, lb = (w, b) if layer_norm else (None, None)
    T = 0.7
    seg, argk, lse, own, probs, stats = sim.embed_similarity(xin, lw, lb, 1e-5, p, gt, -1, T, True, True, True,
                                                             (1 << 30) if cached else 0)
    assert torch.isnan(stats[:, 35 + 3 * 7 + 1]).all()  # the overflow pixel
    g = torch.Generator().manual_seed(5)
    ups = [torch.randn(t.shape, generator=g) for t in (seg, lse, own)]
    args = (*ups, xin, lw, lb, 1e-5, p, gt, argk, lse, -1, T, probs if cached else None)
    without, n_without = _embed_stats_launches(sim, lambda: sim.embed_similarity_backward(*args))
    given, n_given = _embed_stats_launches(sim, lambda: sim.embed_similarity_backward(*args, stats))
    assert n_without == (2 if layout == "nchw" else 1) and n_given == 0  # a tile per image of NCHW planes
    for u, v in zip(without, given):
        assert torch.equal(u, v)
    empty, _ = _embed_stats_launches(sim, lambda: sim.embed_similarity_backward(*args, stats.new_empty(0)))
    for u, v in zip(without, empty):  # (0,): none given
        assert torch.equal(u, v)
    xd, wd, bd = [t.double().requires_grad_() for t in (x, w, b)]
    ref = R.similarity_outputs(embed_reference(xd, (wd, bd, 1e-5) if layer_norm else None), p.double(), gt, -1, T,
                               True, True, True)
    want = torch.autograd.grad(sum((r * u.double()).sum() for r, u in zip((ref[0], ref[2], ref[3]), ups)),
                               (xd, wd, bd) if layer_norm else (xd,))
    gx = given[0].double()
    if layout == "rows":  # (N, D) back to (B, D, H, W)
        gx = gx.reshape(2, 5, 7, 37).permute(0, 3, 1, 2)
    scale = x.double().abs().amax(1, keepdim=True).clamp(min=1)  # d feats scales like 1 / the pixel's spread
    torch.testing.assert_close(gx * scale, want[0] * scale, atol=1e-4, rtol=1e-4)
    if layer_norm:
        torch.testing.assert_close(given[1].double(), want[1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(given[2].double(), want[2], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_embed_backward_with_stats_dtypes(sim, dtype):
    """The same with a bf16 map (fp32 stats; the split GEMMs) and a float64 one: bit for bit as without stats."""
    x, w, b, p, gt = _embed_problem(2, 24, 4, 5, 6, 3, seed=34, dtype=dtype)
    if dtype == torch.bfloat16:
        w, b, p = w.float(), b.float(), p.float()
    seg, argk, lse, own, _, stats = sim.embed_similarity(x, w, b, 1e-5, p, gt, -1, 1.0, True, True, True, 0)
    assert stats.dtype == _work(dtype)
    g = torch.Generator().manual_seed(6)
    ups = [torch.randn(t.shape, generator=g, dtype=_work(dtype)) for t in (seg, lse, own)]
    args = (*ups, x, w, b, 1e-5, p, gt, argk, lse, -1, 1.0, None)
    for u, v in zip(sim.embed_similarity_backward(*args), sim.embed_similarity_backward(*args, stats)):
        assert torch.equal(u, v)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
@pytest.mark.parametrize("layer_norm", [True, False])
def test_embed_prototype_sums_with_stats(sim, sums_mode, layout, layer_norm):
    """embed_prototype_sums given embed_similarity's stats: no statistics pass (no embed_stats_kernel launch), the
    same sums and counts as without them (bit for bit in the deterministic mode; the atomic one adds in thread
    order) and as the float64 reference; NaN and inf pixels never reach them, a pixel far from zero mean and one
    whose float32 squares overflow (NaN stats: recomputed in float64) do."""
    g, x, ln, slot, xin, lw, lb = _sums_problem(layout, layer_norm)
    p = F.normalize(torch.randn(4, 3, 20, generator=g), dim=-1)
    gt = torch.randint(-1, 4, (60,), generator=g)
    stats = sim.embed_similarity(xin, lw, lb, 1e-5, p, gt, -1, 1.0, False, True, False, 0)[5]
    (s0, c0), n0 = _embed_stats_launches(sim, lambda: sim.embed_prototype_sums(xin, lw, lb, 1e-5, slot, 12))
    (s1, c1), n1 = _embed_stats_launches(sim, lambda: sim.embed_prototype_sums(xin, lw, lb, 1e-5, slot, 12, stats))
    assert n0 > 0 and n1 == 0
    assert torch.equal(c0, c1)
    if sums_mode == "deterministic":
        assert torch.equal(s0, s1)
    else:
        torch.testing.assert_close(s1, s0, atol=1e-6, rtol=1e-6)
    rs, rc = R.prototype_sums(embed_reference(x.float().double(), ln), slot, 12)
    assert torch.equal(c1.double(), rc)
    torch.testing.assert_close(s1.double(), rs, atol=1e-5, rtol=1e-5)


def test_embed_stats_errors_name_the_argument(sim):
    """Stats of the wrong shape, dtype or layout are refused by the backward and the prototype sums, naming stats."""
    x, w, b, p, gt = _embed_problem(1, 8, 2, 3, 2, 2, seed=18, dtype=torch.float32)
    seg, argk, lse, own, _, stats = sim.embed_similarity(x, w, b, 1e-5, p, gt, -1, 1.0, True, True, True, 0)
    slot = gt.clamp(min=0)

    def bwd(st):
        return sim.embed_similarity_backward(None, torch.ones_like(lse), None, x, w, b, 1e-5, p, gt, argk, lse, -1,
                                             1.0, None, st)

    def sums(st):
        return sim.embed_prototype_sums(x, w, b, 1e-5, slot, 4, st)

    for call in (bwd, sums):
        with pytest.raises(ValueError, match=r"stats must be embed_similarity's \(5, N\) = \(5, 6\) or its first 3"):
            call(torch.cat([stats, stats[:, :1]], 1))
        with pytest.raises(ValueError, match=r"stats must be embed_similarity's \(5, N\)"):
            call(stats[:2])
        with pytest.raises(ValueError, match="stats must be Float"):
            call(stats.double())
        with pytest.raises(ValueError, match="stats must be contiguous"):
            call(stats.t().contiguous().t())


# --------------------------------------------------------------------------- sinkhorn

SINKHORN_CASES = {
    "small": dict(N=400, C=6, K=5),
    "skewed_multi_part": dict(N=9000, C=3, K=10, skew=True),  # G = 3 parts per class
    "k1": dict(N=120, C=4, K=1),
    "c150": dict(N=3000, C=150, K=4),
    "k256": dict(N=300, C=2, K=256),  # one row per step of a block
}


def _own_problem(N, C, K, seed=0, skew=False, ignore_index=-1, dtype=torch.float32):
    f, p, gt, _ = make_problem(N=N, D=16, C=C, K=K, seed=seed, skew=skew, ignore_index=ignore_index)
    own = _ref(f, p, gt, ignore_index)[3]
    return own.to(dtype), gt


@pytest.mark.parametrize("case", list(SINKHORN_CASES))
def test_sinkhorn(sim, order, case):
    kw = SINKHORN_CASES[case]
    own, gt = _own_problem(**kw)
    Q = sim.sinkhorn(own, gt, kw["C"], -1, 3, 0.05)
    torch.testing.assert_close(Q, R.sinkhorn(own, gt, kw["C"], -1, 3, 0.05).float(), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", FLOATS)
def test_sinkhorn_dtypes(sim, dtype):
    own, gt = _own_problem(500, 5, 4, seed=1, dtype=dtype)
    Q = sim.sinkhorn(own, gt, 5, -1, 3, 0.05)
    assert Q.dtype == _work(dtype)
    ref = R.sinkhorn(own, gt, 5, -1, 3, 0.05)
    torch.testing.assert_close(Q, ref.to(Q.dtype), **({} if dtype != torch.float64 else dict(atol=1e-12, rtol=1e-10)))


def test_sinkhorn_edge_cases(sim):
    # empty class, single-pixel class, ignore_index 255, a non-finite row
    own, gt = _own_problem(300, 5, 3, seed=2, ignore_index=255)
    gt = torch.where(gt == 2, torch.full_like(gt, 4), gt)  # class 2 empty
    gt = torch.where(gt == 1, torch.full_like(gt, 0), gt)
    gt[17] = 1
    own[5, 1] = float("nan")
    Q = sim.sinkhorn(own, gt, 5, 255, 3, 0.05)
    ref = R.sinkhorn(own, gt, 5, 255, 3, 0.05)
    torch.testing.assert_close(Q, ref.float(), atol=2e-6, rtol=1e-5)
    assert torch.equal(Q[17], ref[17].float()) and (Q[5] == 0).all() and (Q[gt == 255] == 0).all()
    # every pixel ignored, and N = 0
    Q = sim.sinkhorn(own, torch.full_like(gt, -1), 5, -1, 3, 0.05)
    assert (Q == 0).all()
    assert sim.sinkhorn(own[:0], gt[:0], 5, -1, 3, 0.05).shape == (0, 3)


# --------------------------------------------------------------------------- prototype sums + EMA


def _sums_ref(x, slot, S, normalize):
    return R.prototype_sums(x.double(), slot, S, normalize)  # float64


@pytest.fixture(params=["deterministic", "atomic"])
def sums_mode(request):
    det = request.param == "deterministic"
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(det)
    yield request.param
    torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("N, D, S", [(500, 24, 30), (1500, 45, 600), (64, 720, 5), (100, 7, 1)])
@pytest.mark.parametrize("normalize", [False, True])
def test_prototype_sums(sim, sums_mode, order, N, D, S, normalize):
    g = torch.Generator().manual_seed(N + S)
    x = torch.randn(N, D, generator=g)
    slot = torch.randint(-1, S, (N,), generator=g)
    x[3, 1] = float("inf")  # a non-finite row takes no part
    sums, counts = sim.prototype_sums(x, slot, S, normalize)
    ref, ref_counts = _sums_ref(x, slot, S, normalize)
    assert torch.equal(counts.double(), ref_counts)
    torch.testing.assert_close(sums.double(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", FLOATS)
def test_prototype_sums_dtypes(sim, sums_mode, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(700, 40, generator=g).to(dtype)
    slot = torch.randint(-1, 12, (700,), generator=g)
    sums, counts = sim.prototype_sums(x, slot, 12, True)
    ref, ref_counts = _sums_ref(x, slot, 12, True)
    assert sums.dtype == _work(dtype) and torch.equal(counts.double(), ref_counts)
    torch.testing.assert_close(sums.double(), ref, **(dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-5)))


def test_prototype_sums_deterministic_is_order_independent(sim, monkeypatch):
    """Deterministic mode: the same bits whatever order the threads and blocks run in."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2000, 50, generator=g)
    slot = torch.randint(-1, 7, (2000,), generator=g)
    torch.use_deterministic_algorithms(True)
    try:
        outs = []
        for o in ORDERS:
            monkeypatch.setenv("PROTOSEG_SIM_ORDER", o)
            outs.append(sim.prototype_sums(x, slot, 7, False))
    finally:
        torch.use_deterministic_algorithms(False)
    for s, c in outs[1:]:
        assert torch.equal(s, outs[0][0]) and torch.equal(c, outs[0][1])


def test_prototype_sums_edge_cases(sim, sums_mode):
    x = torch.randn(50, 33)
    sums, counts = sim.prototype_sums(x, torch.full((50,), -1), 6, False)  # every row left out
    assert (sums == 0).all() and (counts == 0).all()
    sums, counts = sim.prototype_sums(x[:0], torch.zeros(0, dtype=torch.long), 6, False)  # N = 0
    assert sums.shape == (6, 33) and (counts == 0).all()


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("C, K, D", [(5, 4, 16), (3, 1, 200), (150, 2, 33)])
def test_prototype_ema(sim, order, dtype, C, K, D):
    g = torch.Generator().manual_seed(C)
    p = F.normalize(torch.randn(C, K, D, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    sums = torch.randn(C * K, D, generator=g)
    counts = torch.randint(0, 3, (C * K,), generator=g).float()  # some prototypes get no pixel
    new = sim.prototype_ema(p, sums, counts, 0.9)
    ref = R.prototype_ema(p, sums, counts, 0.9)
    assert new.dtype == dtype
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(new, ref, **({} if dtype in (torch.float16, torch.bfloat16) else tol))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N, K, ignore_index, T", [(3000, 10, -1, 0.1), (300000, 3, 255, 1.0), (7, 1, -1, 0.5),
                                                   (0, 4, -1, 1.0)])
def test_ppc_ppd(sim, order, dtype, N, K, ignore_index, T):
    """ppc_ppd and its backward against reference.losses_from_scores: both losses, both gradients; N = 300,000
    takes the forward's whole grid (1,024 blocks, each summing several slices) and N = 0 the finishing
    kernel alone."""
    lse, own, target = loss_scores(N, K, C=7, dtype=dtype, ignore_index=ignore_index, seed=N + K)
    if N > 5:
        target[5] = -3  # not ignore_index: takes part, k = -3 mod K
    ppc, ppd, count = sim.ppc_ppd(lse, own, target, ignore_index, T)
    a, b = lse.double().requires_grad_(), own.double().requires_grad_()
    r_ppc, r_ppd = R.losses_from_scores(a, b, target, ignore_index, T)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-6)
    assert ppc.dtype == dtype and ppc.shape == () and float(count) == float((target != ignore_index).sum())
    torch.testing.assert_close(torch.stack([ppc, ppd]).double(), torch.stack([r_ppc, r_ppd]).detach(), **tol)
    g_ppc, g_ppd = torch.tensor(0.7, dtype=dtype), torch.tensor(-3.0, dtype=dtype)
    g_lse, g_own = sim.ppc_ppd_backward(g_ppc, g_ppd, own, target, count, ignore_index, T)
    r_lse, r_own = torch.autograd.grad(0.7 * r_ppc - 3.0 * r_ppd, (a, b), allow_unused=True)
    assert g_lse.dtype == dtype and g_own.shape == (N, K)
    torch.testing.assert_close(g_lse.double(), torch.zeros_like(a) if r_lse is None else r_lse, **tol)
    torch.testing.assert_close(g_own.double(), torch.zeros_like(b) if r_own is None else r_own, **tol)


def test_ppc_ppd_edge_cases_and_autograd(sim):
    """No pixel takes part (losses and gradients 0), a NaN score of an ignored pixel (never read), the same
    bits on every run, and the registered autograd."""
    _register_embed_autograd()
    lse, own, target = loss_scores(2000, 5, C=7, seed=4)
    out = sim.ppc_ppd(lse, own, torch.full_like(target, -1), -1, 1.0)
    assert [float(t) for t in out] == [0.0, 0.0, 0.0]
    ign = (target == -1).nonzero()[:, 0]
    own[ign[0]] = float("nan")
    lse[ign[1]] = float("inf")
    first = sim.ppc_ppd(lse, own, target, -1, 0.5)
    assert torch.isfinite(torch.stack(first)).all()
    assert torch.equal(torch.stack(first), torch.stack(sim.ppc_ppd(lse, own, target, -1, 0.5)))
    a, b = lse.clone().requires_grad_(), own.clone().requires_grad_()
    ppc, ppd, _ = sim.ppc_ppd(a, b, target, -1, 0.5)
    (ppc + 2 * ppd).backward()
    ra, rb = lse.double().requires_grad_(), own.double().requires_grad_()
    r = R.losses_from_scores(ra, rb, target, -1, 0.5)
    (r[0] + 2 * r[1]).backward()
    torch.testing.assert_close(a.grad.double(), ra.grad, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(b.grad.double(), rb.grad, atol=1e-7, rtol=1e-6)
    assert torch.isfinite(b.grad).all()
    with pytest.raises(ValueError, match="own"):
        sim.ppc_ppd(lse, own.double(), target, -1, 1.0)
    with pytest.raises(ValueError, match="grad_ppd"):
        sim.ppc_ppd_backward(torch.tensor(1.0), torch.ones(2), own, target, torch.tensor(3.0), -1, 1.0)


def test_ppc_ppd_launches(sim):
    """Every GPU launch of the losses in a training step, as tools/gpu_model.py counts them: two kernels forward
    (the block partials and the finishing block) and one backward through the registered autograd, no ATen op
    (their composition took about 15 ops each way)."""
    from torch.profiler import ProfilerActivity, profile

    gpu_model = _gpu_model()
    _register_embed_autograd()
    lse, own, target = loss_scores(5000, 10, C=7, seed=6)
    a, b = lse.clone().requires_grad_(), own.clone().requires_grad_()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ppc, ppd, _ = sim.ppc_ppd(a, b, target, -1, 0.1)
    assert gpu_model.count_launches(prof.events()) == {"kernels": 2, "gemms": 0, "aten": 0, "total": 2}
    loss = 0.01 * ppc + 0.001 * ppd
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.autograd.backward(loss)
    # one kernel; the seed's ones_like and the two MulBackward0 of the weights are the caller's ops
    assert gpu_model.count_launches(prof.events()) == {"kernels": 1, "gemms": 0, "aten": 3, "total": 4}
    a, b = lse.clone().requires_grad_(), own.clone().requires_grad_()  # fresh leaves: no gradient to add to
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        p2, _, _ = sim.ppc_ppd(a, b, target, -1, 0.1)
        p2.backward()  # PPD unused: the backward fills its gradient with one zero
    assert gpu_model.count_launches(prof.events()) == {"kernels": 3, "gemms": 0, "aten": 2, "total": 5}  # + ones_like


# --------------------------------------------------------------------------- the whole update


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prototype_learning_pipeline(sim, sums_mode, dtype):
    """The ops in the order prototype learning calls them, against reference.prototype_learning (argmax mode)."""
    N, D, C, K, gamma = 2000, 40, 19, 10, 0.5
    f, p, gt, seg = make_problem(N=N, D=D, C=C, K=K, dtype=dtype, seed=8, skew=True)
    gt = torch.where(gt == 3, torch.full_like(gt, 4), gt)  # class 3 absent
    _, _, _, own, _ = sim.similarity(f, p, gt, -1, 1.0, False, False, True, 0, False)
    Q = sim.sinkhorn(own, gt, C, -1, 3, 0.05)
    idx = Q.argmax(1)
    valid = (gt >= 0) & (Q.sum(1) > 0)
    target = torch.where(valid, gt * K + idx, torch.full_like(gt, -1))
    correct = valid & (seg.argmax(1) == gt)
    slot = torch.where(correct, target, torch.full_like(target, -1))
    sums, counts = sim.prototype_sums(f, slot, C * K, False)
    new = sim.prototype_ema(p, sums, counts, gamma)
    t_ref, new_ref = R.prototype_learning(f, p, gt, seg, assign="argmax", gamma=gamma)
    assert torch.equal(target, t_ref)
    torch.testing.assert_close(new.double(), new_ref.double(), **(dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)))


# --------------------------------------------------------------------------- errors the emulator must report


def test_label_out_of_range_is_a_device_assert(sim):
    f, p, gt, _ = make_problem(N=50, C=5, K=3)
    gt[7] = 5
    with pytest.raises(RuntimeError, match=r"sinkhorn_keys_kernel.*device-side assert.*labels: a label is outside"):
        sim.sinkhorn(torch.zeros(50, 3), gt, 5, -1, 3, 0.05)
    with pytest.raises(RuntimeError, match=r"similarity_own_kernel.*device-side assert"):
        sim.similarity(f, p, gt, -1, 1.0, False, False, True, 0, False)
    with pytest.raises(RuntimeError, match=r"similarity_epilogue_kernel.*device-side assert"):
        sim.similarity(f, p, gt, -1, 1.0, True, True, True, 0, False)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match=r"prototype_keys_kernel.*slot: an entry is >= num_slots"):
            sim.prototype_sums(f, torch.full((50,), 6), 6, False)
    finally:
        torch.use_deterministic_algorithms(False)
    with pytest.raises(RuntimeError, match=r"prototype_sums_atomic_kernel.*slot: an entry is >= num_slots"):
        sim.prototype_sums(f, torch.full((50,), 6), 6, False)


def test_argument_errors_name_the_argument(sim):
    f, p, gt, _ = make_problem(N=20, C=3, K=2)
    with pytest.raises(ValueError, match="own: K"):
        sim.sinkhorn(torch.zeros(20, 300), gt, 3, -1, 3, 0.05)
    with pytest.raises(ValueError, match="protos"):
        sim.similarity(f, p[0], gt, -1, 1.0, True, False, False, 0, False)


# --------------------------------------------------------------------------- the emulator itself (tools/cuda_sim/selftest.cu)


def _selftest(sim, case, x):
    return sim.cudasim_selftest(case, x)


def test_emulator_runs_a_correct_kernel(sim, order):
    x = torch.randn(128 * 5)
    torch.testing.assert_close(_selftest(sim, "block_sum", x), x.view(5, 128).sum(1), atol=1e-5, rtol=1e-5)
    assert torch.equal(_selftest(sim, "shifted_copy", x[:100]), x[:100])


@pytest.mark.parametrize(
    "case, x, match",
    [
        ("oob_read", torch.randn(100), r"shifted_copy_kernel.*thread \(35, 0, 0\).*out-of-bounds read of `x`: element 100 of float"),
        ("oob_write", torch.randn(100), r"write_before_start_kernel.*thread \(0, 0, 0\).*out-of-bounds access of `y`: element -1"),
        ("divergent_barrier", torch.zeros(1), r"divergent_barrier_kernel.*different __syncthreads.*selftest.cu"),
        ("deadlock", torch.zeros(1), r"deadlock_kernel.*deadlock: .*__shfl_xor_sync.*__syncthreads"),
        ("shuffle_exited_lane", torch.zeros(1), r"shuffle_exited_lane_kernel.*names lane 16 .*exited"),
        ("launch_bounds", torch.randn(256), r"block_sum_kernel.*256 threads per block, above __launch_bounds__\(128\)"),
        ("empty_grid", torch.randn(256), r"block_sum_kernel.*invalid configuration argument: grid \(0, 1, 1\)"),
        ("dynamic_shared_oob", torch.zeros(1), r"dynamic_shared_kernel.*out-of-bounds access of `extern __shared__ array`"),
        ("big_dynamic_shared_no_optin", torch.zeros(1),
         r"big_dynamic_shared_kernel<1>.*invalid configuration argument.*dynamic shared 65536 bytes \(above 48 KiB: "
         r"cudaFuncSetAttribute"),
        ("big_dynamic_shared_beside_static", torch.zeros(1),
         r"big_dynamic_shared_kernel<2>.*shared memory above the 48 KiB per block \(static 4096 \+ dynamic 46080 "
         r"bytes, without the opt-in"),
        ("big_dynamic_shared_above_device", torch.zeros(1),
         r"big_dynamic_shared_kernel<3>.*shared memory above the 227 KiB per block \(static 4096 \+ dynamic 232448 "
         r"bytes, with the opt-in\)"),
        ("big_dynamic_shared_above_optin", torch.zeros(1),
         r"big_dynamic_shared_kernel<5>.*invalid configuration argument.*dynamic shared 81920 bytes \(above the "
         r"kernel's cudaFuncAttributeMaxDynamicSharedMemorySize, 65536 bytes\)"),
        ("optin_above_device", torch.zeros(1), r"CUDA error from cudaFuncSetAttribute"),
        ("device_assert", torch.tensor([0, 1, -2, 3], dtype=torch.int32), r"assert_kernel.*thread \(2, 0, 0\).*device-side assert.*x: an entry is negative"),
    ],
)
def test_emulator_stops_a_faulty_kernel_and_names_it(sim, case, x, match):
    with pytest.raises(RuntimeError, match=match):
        _selftest(sim, case, x)


@pytest.mark.parametrize(
    "case, match",
    [
        ("shared_race", r"shared_race_kernel.*data race on shared memory __shared__ s at byte offset \d+ \(float\): "
                        r"thread \(\d+, 0, 0\) of block \(0, 0, 0\) (writes|reads) it at tools/cuda_sim/selftest.cu:\d+, "
                        r"and thread \(\d+, 0, 0\) of block \(0, 0, 0\) (wrote|read) it at tools/cuda_sim/selftest.cu:\d+"),
        ("warp_exchange_across", r"warp_exchange_kernel.*data race on shared memory __shared__ s"),
        ("global_race", r"global_race_kernel.*data race on global memory `y` at byte offset 0 \(float\): "
                        r"thread \(0, 0, 0\) of block \(\d, 0, 0\) (writes|reads) it .*another block"),
        ("atomic_plain", r"atomic_plain_kernel.*data race on global memory `y`.*an atomic and a plain access"),
        ("shared_2d_oob", r"shared_2d_kernel.*out-of-bounds access of `s`: element 8 of float .*holds 8 elements"),
        ("local_array_oob", r"local_array_kernel.*out-of-bounds index 4 of the local array `a` of 4 entries"),
        ("shared_scalar_race", r"shared_scalar_kernel.*data race on shared memory __shared__ flag at byte offset 0"),
        ("view_copy_oob", r"view_copy_kernel.*thread \(5, 0, 0\).*out-of-bounds read of `xv`: element 5 of float.*holds 5 "),
    ],
)
def test_race_checker_names_the_race(sim, order, case, match):
    """Whatever the order of the threads: the kernel, both threads, the variable, the offset, both lines."""
    with pytest.raises(RuntimeError, match=match):
        _selftest(sim, case, torch.arange(10.0) if case.startswith("view") else torch.zeros(1))


def test_race_checker_lines_are_the_accesses(sim):
    """The two source lines of a report are the lines of the two accesses (the write and the read)."""
    src = (ROOT / "tools" / "cuda_sim" / "selftest.cu").read_text().splitlines()
    write = 1 + next(i for i, l in enumerate(src) if "s[t] = float(t);" in l and "shared_race" in "".join(src[i - 4:i]))
    read = write + 1
    with pytest.raises(RuntimeError) as e:
        _selftest(sim, "shared_race", torch.zeros(1))
    lines = sorted(int(m) for m in __import__("re").findall(r"it at tools/cuda_sim/selftest.cu:(\d+)", str(e.value)))
    assert lines == [write, read], str(e.value)


def test_race_checker_accepts_ordered_accesses(sim, order):
    """Ordered by __syncwarp within a warp, by __syncthreads, or atomic against atomic: no report."""
    y = _selftest(sim, "warp_exchange", torch.zeros(1))
    assert torch.equal(y, torch.tensor([float((t & ~31) + (t + 1) % 32) for t in range(64)]))
    assert _selftest(sim, "shared_2d", torch.zeros(1))[0] == 15.0
    assert _selftest(sim, "local_array", torch.zeros(1))[0] == 4.0
    assert (_selftest(sim, "shared_scalar", torch.zeros(1)) == 7.0).all()
    x = torch.arange(10.0)
    assert torch.equal(_selftest(sim, "view_copy", x), torch.cat([x[:5], torch.zeros(5)]))
    torch.testing.assert_close(_selftest(sim, "block_sum", torch.ones(256)), torch.full((2,), 128.0))


GARBAGE = os.environ.get("PROTOSEG_SIM_POISON") == "garbage"  # CI runs this file with each poison


def _stale(y):
    """Where y holds the emulator's poison: NaN, or (PROTOSEG_SIM_POISON=garbage) finite floats whose bytes
    are all 0x40..0x4F or 0xC0..0xCF (so |y| >= 2 and never an integer that a kernel here writes)."""
    if not GARBAGE:
        return torch.isnan(y)
    b = y.contiguous().view(torch.uint8).view(-1, 4)
    return torch.isfinite(y) & ((b & 0x70) == 0x40).all(1).view(y.shape)


def test_emulator_shared_memory_starts_poisoned(sim, order):
    # a read before the barrier that publishes the value: poison, whatever the order
    assert _stale(_selftest(sim, "unpublished_shared", torch.zeros(1))).all()
    # threads that exited before a barrier do not hold it up; what they did not write is poison
    y = _selftest(sim, "early_exit", torch.zeros(1))
    assert _stale(y[:32]).all() and torch.equal(y[32:], torch.arange(32.0))
    y = _selftest(sim, "dynamic_shared", torch.zeros(1))
    assert torch.equal(y, torch.arange(63, -1, -1.0) * 10)


def test_emulator_dynamic_shared_memory_above_48_kib_with_the_opt_in(sim):
    """64 KiB of dynamic shared memory beside a 4 KiB static array, after cudaFuncSetAttribute(kernel,
    cudaFuncAttributeMaxDynamicSharedMemorySize, 64 KiB), as on a GPU; without it, or above the device's 227
    KiB, the launch fails (test_emulator_stops_a_faulty_kernel_and_names_it)."""
    y = _selftest(sim, "big_dynamic_shared", torch.zeros(1))
    n, b = 16384, 64
    i = torch.arange(n, dtype=torch.float64)
    want = torch.arange(b - 1, -1, -1.0, dtype=torch.float64) + (n - 1 - i).view(-1, b).sum(0)
    assert torch.equal(y.double(), want)


def test_emulator_fresh_memory_is_poisoned(sim):
    """at::empty of the host code: the kernel writes only the first 100 entries of a buffer of 128."""
    y = _selftest(sim, "partial_write", torch.ones(100))
    assert torch.equal(y[:100], torch.ones(100)) and _stale(y[100:]).all()


def test_rewrite_poisons_every_fresh_buffer():
    """The rewrite of every compiled file (csrc/*.h too): at::empty, empty_like, empty_strided, new_empty."""
    B = _builder()
    src = "a = at::empty({n}, o); b = at::empty_like(a); c = at::empty_strided({2}, {1}, o); d = x.y.new_empty({3});"
    out = B.poison_fresh_memory(src)
    assert "at::" not in out, out
    assert "::cudasim::empty({n}, o)" in out and "::cudasim::empty_like(a)" in out
    assert "::cudasim::empty_strided({2}, {1}, o)" in out and "::cudasim::new_empty(x.y, {3})" in out
    assert B.poison_fresh_memory("p->new_empty({1})") == "::cudasim::new_empty(*p, {1})"


# --------------------------------------------------------------------------- the traffic meter


def _metered(sim, case, x):
    return _meter_events(sim, lambda: _selftest(sim, case, x))


def test_meter_coalesced_copy(sim, order):
    """256 floats, 4 blocks of 64: 8 warps, each one load and one store of 32 consecutive floats (128 B, 4
    sectors, ideal 4); 1 KiB loaded, 1 KiB stored, 2 KiB of distinct sectors."""
    x = torch.randn(256)
    y, ev = _metered(sim, "shifted_copy", x)
    assert torch.equal(y, x)
    (k,) = ev
    assert k["name"] == "shifted_copy_kernel" and k["grid"] == [4, 1, 1]
    assert (k["bytes_loaded"], k["bytes_stored"]) == (1024, 1024)
    assert (k["instructions"], k["sectors"], k["ideal_sectors"]) == (16, 64, 64)
    assert k["unique_bytes"] == 2048 and k["l2_hit_bytes"] == 0


def test_meter_strided_copy(sim):
    """y[i] = x[2 i], 128 entries: each warp's load spans 256 B (8 sectors, ideal 4: half of each sector
    unused), its store 128 B (4 sectors); distinct: all 32 sectors of x (1 KiB) and 512 B of y."""
    x = torch.randn(256)
    y, ev = _metered(sim, "strided_copy", x)
    assert torch.equal(y, x[::2])
    (k,) = ev
    assert (k["bytes_loaded"], k["bytes_stored"]) == (512, 512)
    assert (k["instructions"], k["sectors"], k["ideal_sectors"]) == (8, 4 * 8 + 4 * 4, 4 * 4 + 4 * 4)
    assert k["unique_bytes"] == 1024 + 512


def test_meter_broadcast_load(sim):
    """y[i] = x[0], 128 entries: each warp's load is one address (1 sector, ideal 1), its store 4 sectors."""
    x = torch.randn(1)
    y, ev = _metered(sim, "broadcast", x.expand(128).contiguous())
    (k,) = ev
    assert (k["bytes_loaded"], k["bytes_stored"]) == (512, 512)
    assert (k["instructions"], k["sectors"], k["ideal_sectors"]) == (8, 4 * 1 + 4 * 4, 4 * 1 + 4 * 4)
    assert k["unique_bytes"] == 32 + 512


@pytest.mark.parametrize("case", ["gemm", "gemm_bf16"])
def test_meter_gemm_flops(sim, case):
    """A host GEMM (m, n, k) = (16, 16, 8): 2 m n k = 4,096 flops; operands and output bytes by dtype. The
    16-bit GEMM with fp32 output (mm.dtype_out) runs, as an fp32 GEMM of the upcast operands."""
    x = torch.randn(128)
    y, ev = _metered(sim, case, x)
    a = x.view(16, 8)
    if case == "gemm_bf16":
        a = a.bfloat16().float()
    torch.testing.assert_close(y, a @ a.T, atol=1e-6, rtol=1e-6)
    (g,) = ev
    elem = 2 if case == "gemm_bf16" else 4
    assert g["type"] == "gemm" and (g["m"], g["n"], g["k"]) == (16, 16, 8) and g["flops"] == 4096
    assert g["name"] == ("mm.dtype_out" if case == "gemm_bf16" else "mm")
    assert (g["a"], g["out"]) == (("BFloat16" if case == "gemm_bf16" else "Float"), "Float")
    assert g["bytes"] == 2 * 16 * 8 * elem + 16 * 16 * 4


def test_meter_l2_hits(sim):
    """The second of two copies of one buffer reads sectors the first touched: assumed L2 hits."""
    x = torch.randn(256)
    # y1 held, so that the second y cannot reuse its memory
    (y1, y2), (a, b) = _meter_events(sim, lambda: (_selftest(sim, "shifted_copy", x),
                                                   _selftest(sim, "shifted_copy", x)))
    assert y1.data_ptr() != y2.data_ptr()
    assert a["l2_hit_bytes"] == 0 and b["l2_hit_bytes"] == 1024  # x again; y is a fresh buffer


def test_meter_reuse_distance_counts_the_rest_of_the_producer(sim):
    """A touch is placed where it falls in its event: copying x twice, x's sector k is read at about the
    same rank in both copies, so every reuse distance is about one copy's traffic (x and y, 2 KiB), not
    the few bytes the second copy touched before it (an event-end stamp gave 0 to 2 KiB)."""
    x = torch.randn(256)
    (y1, y2), (a, b) = _meter_events(sim, lambda: (_selftest(sim, "shifted_copy", x),
                                                   _selftest(sim, "shifted_copy", x)))
    dist = {int(k): v for k, v in b["reuse"].items()}
    assert sum(dist.values()) == 1024 and b["reuse_tile"] == {} and b["tile"] is None
    assert all(1900 <= d <= 2200 for d in dist), dist


def test_meter_tile_reuse_is_reported_apart(sim):
    """In a tile loop (meter_tile), a reuse from the same tile or the one before goes to reuse_tile with
    the tile's (loop rows, rows); from two tiles back, another loop, or outside a loop, to reuse."""
    x = torch.randn(256)
    held = []  # every copy's output kept, so that no y reuses an earlier one's memory

    def copies():
        sim.cudasim_meter("tile:1000:64")
        held.append(_selftest(sim, "shifted_copy", x))  # 0: x first touched
        held.append(_selftest(sim, "shifted_copy", x))  # 1: same tile
        sim.cudasim_meter("tile:1000:64")
        held.append(_selftest(sim, "shifted_copy", x))  # 2: the tile before
        sim.cudasim_meter("tiles_end")
        sim.cudasim_meter("tile:500:32")
        held.append(_selftest(sim, "shifted_copy", x))  # 3: another loop
        sim.cudasim_meter("tiles_end")
        held.append(_selftest(sim, "shifted_copy", x))  # 4: outside loops

    _, ev = _meter_events(sim, copies)
    assert [e["tile"] for e in ev] == [[1000, 64], [1000, 64], [1000, 64], [500, 32], None]
    near = [sum(e["reuse_tile"].values()) for e in ev]
    far = [sum(e["reuse"].values()) for e in ev]
    assert near == [0, 1024, 1024, 0, 0] and far == [0, 0, 0, 1024, 1024], (near, far)
    for bad in ("tile:12", "tile:a:b", "tile:10:0", "tile:10:5x"):
        with pytest.raises(ValueError, match="tile:<loop rows>:<rows>"):
            sim.cudasim_meter(bad)


def test_meter_gemm_counts_the_bytes_of_a_strided_operand(sim):
    """A GEMM on the first 8 columns of an (8, 32) plane, transposed (a tile of an NCHW map): its
    operands touch 8 runs of 32 bytes (8 sectors, the same for the operand and its transpose), not the
    928-byte span between them; the output 8 x 8 fp32 is 8 sectors more."""
    x = torch.randn(256)
    y, ev = _metered(sim, "gemm_strided", x)
    a = x.view(8, 32)[:, :8].t()
    torch.testing.assert_close(y, a @ a.T, atol=1e-6, rtol=1e-6)
    (g,) = ev
    assert g["unique_bytes"] == 32 * (8 + 8), g["unique_bytes"]


def test_similarity_runs_the_16bit_gemm(sim):
    """bfloat16 feats and prototypes: similarity_tile_gemm's tensor-core branch (mm.dtype_out) runs, and the
    scores match the reference from the same rounded inputs."""
    f, p, gt, _ = make_problem(N=300, D=40, C=6, K=4, dtype=torch.bfloat16, seed=21)
    (seg, argk, lse, own, _), gemms = _gemms(sim, lambda: sim.similarity(f, p, gt, -1, 1.0, True, True, True, 0,
                                                                          False))
    assert gemms == [("mm.dtype_out", "BFloat16", "BFloat16", "Float", 300, 24, 40)]
    _, _, ref_lse, ref_own = _ref(f, p, gt)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(own.double(), ref_own, atol=1e-5, rtol=1e-5)


def test_gpu_model_json():
    """tools/gpu_model.py --json: one object, kernels and step, in the issue's schema; the step's modelled time
    is the sum of its kernels', no kernel beats its ideal sectors, and the GEMMs' flops are 2 N D CK twice
    (forward scores, backward d z) at least."""
    from gpu_model_json import CITYSCAPES_GEMM_FLOPS, per_unit_launches, run_gpu_model_json

    out = run_gpu_model_json("cuda")
    names = [k["name"] for k in out["kernels"]]
    for kernel in ("embed_stats_kernel", "embed_backward_kernel", "sinkhorn_iterate_kernel", "prototype_ema_kernel"):
        assert any(n.startswith(kernel) for n in names), names
    assert all(k["sectors"] >= k["ideal_sectors"] > 0 for k in out["kernels"] if k["bytes_loaded"] > 1e5)
    step = out["step"]
    assert step["flops"] >= 2 * CITYSCAPES_GEMM_FLOPS and step["roofline_us"] < step["modelled_us"]
    # the EMA at a full update (every prototype: read protos and sums, write protos; fp32), not its growth
    # over the small maps carried to N
    ema = next(k for k in out["kernels"] if k["name"].startswith("prototype_ema_kernel"))
    CKD = 19 * 10 * 720 * 4
    assert 2 * CKD <= ema["unique_bytes"] <= 3.3 * CKD, ema
    # per tile: the stats and the epilogue (which finishes the rows the affine map cannot give) forward,
    # the grad epilogue and embed_backward_kernel backward, a GEMM each way (C*K < D: no [X | X] copy),
    # and no other ATen op (the LayerNorm's partial gradients are summed once per call, not per tile)
    per = per_unit_launches(out)
    assert (per["kernels"], per["gemms"], per["aten"]) == (4, 2, 0), per
    assert out["step"]["launch_counts"]["units"] == 4  # 2 images of 32,768 pixels, 22,016 rows a tile


@pytest.mark.parametrize("B, H, W, C, K", [(1, 10, 30, 70, 240), (1, 200, 170, 1, 2), (2, 4, 50, 20, 10)])
def test_gpu_model_tile_rows_are_the_codes(sim, monkeypatch, B, H, W, C, K):
    """tools/gpu_model.py's cuda_tile_rows, behind the meter's launch counts at the real sizes, against the
    tiles the CUDA code runs (csrc/cuda/similarity_common.cuh's tile_rows): one forward epilogue per tile,
    counted by the emulator's meter. C*K = 16,800: 128-row tiles (the floor), 300 pixels in 3; C*K = 2:
    32,768-row tiles (the cap), 34,000 pixels in 2; C*K = 200: 20,864 rows, one tile per image of 200."""
    gpu_model = _gpu_model()

    monkeypatch.delenv("PROTOSEG_SIM_TILE_ROWS", raising=False)
    x, w, b, p, gt = _embed_problem(B, 2, H, W, C, K, seed=21)
    _, evs = _meter_events(sim, lambda: sim.embed_similarity(x, w, b, 1e-5, p, gt, -1, 1.0, False, True, False, 0))
    tiles = sum(1 for e in evs if e["name"].startswith("similarity_epilogue_kernel"))
    assert tiles == gpu_model.units_at("cuda", B, H * W, C * K) == {16800: 3, 2: 2, 200: 2}[C * K]


def test_gpu_model_count_launches():
    """tools/gpu_model.py's count_launches on a hand-built profile: a scope once (not the ATen op under it),
    an outermost ATen op that copies, fills or computes once, a view or a same-dtype `to` (a leaf in
    NO_LAUNCH, or a dispatcher record such as `detach` under aten::detach) and an autograd node that runs
    nothing never."""
    gpu_model = _gpu_model()

    class Ev:
        def __init__(self, name, *children):
            self.name, self.cpu_children, self.cpu_parent = name, list(children), None
            for c in children:
                c.cpu_parent = self

        def all(self):
            return [self] + [e for c in self.cpu_children for e in c.all()]

    roots = [
        Ev("aten::detach", Ev("detach")),
        Ev("aten::to"),
        Ev("aten::reshape", Ev("aten::view")),
        Ev("aten::to", Ev("aten::_to_copy", Ev("aten::empty_strided"), Ev("aten::copy_"))),
        Ev("aten::zeros", Ev("aten::empty"), Ev("aten::zero_")),
        Ev("cudasim::launch"),
        Ev("cudasim::gemm", Ev("aten::mm")),
        Ev("MulBackward0", Ev("aten::mul")),
        Ev("AddBackward0"),
    ]
    events = [e for r in roots for e in r.all()]
    assert gpu_model.count_launches(events) == {"kernels": 1, "gemms": 1, "aten": 3, "total": 5}


def test_emulator_warp_collectives(sim, order):
    x = torch.tensor([(7 * i + 3) % 19 for i in range(32)], dtype=torch.int32)
    out = _selftest(sim, "warp_ops", x).view(9, 32).tolist()
    v = x.tolist()
    lanes = range(32)
    assert out[0] == [v[5]] * 32
    assert out[1] == [v[(l // 8) * 8 + (l + 3) % 8] for l in lanes]
    assert out[2] == [v[l ^ 6] for l in lanes]
    assert out[3] == [v[l - 3] if l % 16 >= 3 else v[l] for l in lanes]
    assert out[4] == [v[l + 2] if l + 2 < 32 else v[l] for l in lanes]
    ballot = sum(1 << l for l in lanes if v[l] > 10) & 0x7FFFFFFF
    assert out[5] == [ballot] * 32
    assert out[6] == [int(7 in v)] * 32 and out[7] == [1] * 32 and out[8] == [int(all(e > 0 for e in v))] * 32


def test_emulator_atomics(sim, order):
    x = torch.arange(64 * 6, dtype=torch.int32)
    out = _selftest(sim, "atomics", x).tolist()
    assert out[0] == 64 * 6
    assert out[1:] == [int(x[i::4].sum()) for i in range(4)]


# --------------------------------------------------------------------------- mutations: the emulator catches them

_MUTATION_SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys, torch
    root, which = sys.argv[1], sys.argv[2]
    sys.path.insert(0, root)  # protoseg_ext of this checkout (testing helpers, reference)
    spec = importlib.util.spec_from_file_location("b", root + "/tools/cuda_sim/build.py")
    B = importlib.util.module_from_spec(spec); spec.loader.exec_module(B)
    MUTATIONS = {
        # the barrier that publishes each step's values before the row sums read them
        "barrier": ("    vals[threadIdx.x] = v;\\n    __syncthreads();", "    vals[threadIdx.x] = v;\\n    ;"),
        # an empty part's block leaves before writing its (zero) column sums
        "early_return": ("  const T cm = L.active ? colmax[c * K + L.k] : T(0);",
                         "  if (a >= b) return; const T cm = L.active ? colmax[c * K + L.k] : T(0);"),
    }
    old, new = MUTATIONS.get(which, (None, None))
    def mutate(rel, text):
        if old is not None and rel.endswith("sinkhorn_cuda.cu"):
            assert text.count(old) == 1, "the mutation site moved: update tests/test_cuda_sim.py"
            text = text.replace(old, new)
        return text
    ops = B.load(root, mutate=mutate, tag=which, only=["sinkhorn_cuda.cu"])
    from protoseg_ext.testing import make_problem
    from protoseg_ext import reference as R
    f, p, gt, _ = make_problem(N=9000, D=16, C=4, K=10, skew=True, seed=0)
    gt[gt == 3] = 2
    gt[:2] = 3  # a class of 2 pixels: some of its 3 parts are empty
    C, K = 4, 10
    own = R.similarity_outputs(f, p, gt, -1, 1.0, False, False, True)[3]
    try:
        Q = ops.sinkhorn(own, gt, C, -1, 3, 0.05)
    except RuntimeError as e:
        print("CHECK FAILED: emulator error:", str(e).splitlines()[0]); sys.exit(0)
    ok = torch.allclose(Q, R.sinkhorn(own, gt, C, -1, 3, 0.05), atol=2e-6, rtol=1e-5)
    print("CHECK PASSED" if ok else "CHECK FAILED: Q differs from the reference")
    """
)


@pytest.mark.parametrize("mutation", ["none", "barrier", "early_return"])
def test_a_mutated_kernel_fails_the_check(tmp_path, mutation):
    """A copy of sinkhorn_cuda.cu without one __syncthreads, or with an early return, fails the Sinkhorn check.

    "none" is the control: the same build and check of the file as it is passes.
    """
    script = tmp_path / "mutant.py"
    script.write_text(_MUTATION_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(ROOT), mutation], capture_output=True, text=True,
                       timeout=1800, env=dict(os.environ, PROTOSEG_SIM_ORDER="forward"))
    assert r.returncode == 0, r.stderr[-3000:]
    expect = "CHECK PASSED" if mutation == "none" else "CHECK FAILED"
    assert expect in r.stdout, r.stdout + r.stderr[-2000:]


# --------------------------------------------------------------------------- mutations: the race checker catches them
#
# One library holds every mutant below: each site reads `::cudasim::mutant(ID) ? mutated : original`
# (PROTOSEG_SIM_MUTANT=ID switches one on), so the kernels compile once. Each mutant must make the
# emulator stop the launch with the error named here, with threads in forward order (the order in
# which a schedule-dependent check would let most of them pass).

# id: (file, original text, mutated text, which occurrence, the check that runs the kernel, expected error)
_SYNC = "__syncthreads();"
RACE_MUTANTS = {
    1: ("prototype_update_cuda.cu", "  part[warp][lane] = acc;\n  " + _SYNC,
        "  part[warp][lane] = acc;\n  if (!::cudasim::mutant(1)) " + _SYNC, 0, "sums_det", "data race on shared"),
    2: ("cuda_common.cuh", "  if (lane == 0) scratch[warp] = v;\n  " + _SYNC,
        "  if (lane == 0) scratch[warp] = v;\n  if (!::cudasim::mutant(2)) " + _SYNC, 0, "ema", "data race on shared"),
    3: ("cuda_common.cuh", "  " + _SYNC + "  // scratch may be reused",
        "  if (!::cudasim::mutant(3)) " + _SYNC + "  // scratch may be reused", 0, "ema", "data race on shared"),
    4: ("sinkhorn_cuda.cu", "  red[threadIdx.x] = m;\n  " + _SYNC,
        "  red[threadIdx.x] = m;\n  if (!::cudasim::mutant(4)) " + _SYNC, 0, "sinkhorn", "data race on shared"),
    5: ("sinkhorn_cuda.cu", "  red[threadIdx.x] = sum;\n  " + _SYNC,
        "  red[threadIdx.x] = sum;\n  if (!::cudasim::mutant(5)) " + _SYNC, 0, "sinkhorn", "data race on shared"),
    6: ("sinkhorn_cuda.cu", "    vals[threadIdx.x] = v;\n    " + _SYNC,
        "    vals[threadIdx.x] = v;\n    if (!::cudasim::mutant(6)) " + _SYNC, 0, "sinkhorn", "data race on shared"),
    7: ("sinkhorn_cuda.cu", "(1 at the end)\n    }\n    " + _SYNC,
        "(1 at the end)\n    }\n    if (!::cudasim::mutant(7)) " + _SYNC, 0, "sinkhorn", "data race on shared"),
    8: ("sinkhorn_cuda.cu", "  red[threadIdx.x] = sum;\n  " + _SYNC,
        "  red[threadIdx.x] = sum;\n  if (!::cudasim::mutant(8)) " + _SYNC, 1, "sinkhorn", "data race on shared"),
    9: ("embed_cuda.cu", "  part[8][g][lane] = bad;\n  " + _SYNC,
        "  part[8][g][lane] = bad;\n  if (!::cudasim::mutant(9)) " + _SYNC, 0, "embed", "data race on shared"),
    # embed_backward_kernel's first pass (stats of 3 rows: no sums to take instead of it)
    10: ("embed_cuda.cu", "    red[4][g][lane] = a4;\n    " + _SYNC,
         "    red[4][g][lane] = a4;\n    if (!::cudasim::mutant(10)) " + _SYNC, 0, "embed_two_pass",
         "data race on shared"),
    11: ("embed_cuda.cu", "        tot[j][lane] = v;\n      }\n    }\n    " + _SYNC,
         "        tot[j][lane] = v;\n      }\n    }\n    if (!::cudasim::mutant(11)) " + _SYNC, 0, "embed_two_pass",
         "data race on shared"),
    # ... and the sums it takes instead: warp 0 publishes them and its vote; the grad epilogue's row sums
    # (over the warps of a row: C*K = 36, two warps)
    17: ("embed_cuda.cu", "      if (lane == 0) given_ok = all ? 1 : 0;\n    }\n    " + _SYNC,
         "      if (lane == 0) given_ok = all ? 1 : 0;\n    }\n    if (!::cudasim::mutant(17)) " + _SYNC, 0, "embed",
         "data race on shared"),
    18: ("similarity_cuda.cu", "  if (!sums) return;  // kernel-uniform\n  " + _SYNC,
         "  if (!sums) return;  // kernel-uniform\n  if (!::cudasim::mutant(18)) " + _SYNC, 0, "embed_wide",
         "data race on shared"),
    19: ("similarity_cuda.cu", "      row_lab[threadIdx.x] = lab;\n    }\n  }\n  " + _SYNC,
         "      row_lab[threadIdx.x] = lab;\n    }\n  }\n  if (!::cudasim::mutant(19)) " + _SYNC, 0, "embed",
         "data race on shared"),
    # the prototype sums' atomics made plain read-modify-writes
    12: ("prototype_update_cuda.cu", "atomicAdd(dst + d, static_cast<acc_t>(f[d]));",
         "if (::cudasim::mutant(12)) dst[d] += static_cast<acc_t>(f[d]); else atomicAdd(dst + d, static_cast<acc_t>(f[d]));",
         0, "sums_atomic", "data race on global memory `sums`"),
    13: ("prototype_update_cuda.cu", "if (lane == 0) atomicAdd(counts + s, 1ull);",
         "if (lane == 0) { if (::cudasim::mutant(13)) counts[s] += 1ull; else atomicAdd(counts + s, 1ull); }",
         0, "sums_atomic", "data race on global memory"),
    # a shared index off by one: the middle index of embed_stats_kernel's 3-D array
    14: ("embed_cuda.cu", "v += part[j][h][lane];", "v += part[j][::cudasim::mutant(14) ? h + 1 : h][lane];",
         0, "embed", "out-of-bounds access of `part`"),
    # a row bound off by one (a tile's view is shorter than its buffer: bounds per view catch it): the row
    # past the tile reads the next tile's stats, not yet written (poisoned NaN), so it recomputes them from x
    # past the view of X; with finite stats there it would write past the view of Sbuf
    16: ("embed_cuda.cu", "  if (i >= rows) return;\n  cuda::fixed_scores_row(",
         "  if (i >= rows + (::cudasim::mutant(16) ? 1 : 0)) return;\n  cuda::fixed_scores_row(",
         0, "embed", "out-of-bounds"),
    # a bound off by one: thread K of sinkhorn_gather_max_kernel writes the next part's first column maximum
    15: ("sinkhorn_cuda.cu", "  if (threadIdx.x < K) {", "  if (threadIdx.x < K + (::cudasim::mutant(15) ? 1 : 0)) {",
         0, "sinkhorn", "data race on global memory `part_max`"),
}

_RACE_MUTANT_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, os, sys, torch
    root, spec_json = sys.argv[1], sys.argv[2]
    mutants = {int(k): v for k, v in json.loads(spec_json).items()}
    sys.path.insert(0, root)  # protoseg_ext of this checkout (testing helpers, reference)
    spec = importlib.util.spec_from_file_location("b", root + "/tools/cuda_sim/build.py")
    B = importlib.util.module_from_spec(spec); spec.loader.exec_module(B)
    def mutate(rel, text):
        sites = []  # (position in the original text, length, replacement)
        for mid, (fname, old, new, nth, _, _) in mutants.items():
            if rel.endswith("/" + fname):
                at = -1
                for _ in range(nth + 1):
                    at = text.find(old, at + 1)
                    assert at >= 0, f"mutant {mid}: the site moved in {fname}: update tests/test_cuda_sim.py"
                sites.append((at, len(old), new))
        for at, n, new in sorted(sites, reverse=True):
            text = text[:at] + new + text[at + n:]
        return text
    ops = B.load(root, mutate=mutate, tag="race-mutants-" + str(sorted(mutants.items())))
    from protoseg_ext.testing import make_problem, embed_problem
    from protoseg_ext import reference as R
    def sinkhorn():
        f, p, gt, _ = make_problem(N=3000, D=16, C=4, K=10, skew=True, seed=0)
        own = R.similarity_outputs(f, p, gt, -1, 1.0, False, False, True)[3]
        Q = ops.sinkhorn(own, gt, 4, -1, 3, 0.05)
        return torch.allclose(Q, R.sinkhorn(own, gt, 4, -1, 3, 0.05).float(), atol=2e-6, rtol=1e-5)
    def sums(det):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(600, 40, generator=g)
        slot = torch.randint(-1, 6, (600,), generator=g)
        prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(det)
        try:
            s, c = ops.prototype_sums(x, slot, 6, False)
        finally:
            torch.use_deterministic_algorithms(prev)
        rs, rc = R.prototype_sums(x.double(), slot, 6, False)
        return torch.equal(c.double(), rc) and torch.allclose(s.double(), rs, atol=1e-4, rtol=1e-5)
    def ema():
        g = torch.Generator().manual_seed(2)
        p = torch.nn.functional.normalize(torch.randn(3, 2, 200, generator=g), dim=-1)
        s, c = torch.randn(6, 200, generator=g), torch.tensor([1.0, 0, 2, 1, 0, 3])
        return torch.allclose(ops.prototype_ema(p, s, c, 0.9), R.prototype_ema(p, s, c, 0.9), atol=1e-6, rtol=1e-5)
    def embed(stats_rows=None, C=4):
        x, w, b, p, gt = embed_problem(2, 20, 5, 7, C, 3, seed=3)
        seg, argk, lse, own, _, st = ops.embed_similarity(x, w, b, 1e-5, p, gt, -1, 1.0, True, True, True, 0)
        g = torch.Generator().manual_seed(4)
        ups = [torch.randn(t.shape, generator=g) for t in (seg, lse, own)]
        given = st[:stats_rows].contiguous() if stats_rows else None
        gx, gw, gb = ops.embed_similarity_backward(*ups, x, w, b, 1e-5, p, gt, argk, lse, -1, 1.0, None, given)
        return bool(torch.isfinite(gx).all() and torch.isfinite(seg).all())
    checks = dict(sinkhorn=sinkhorn, sums_det=lambda: sums(True), sums_atomic=lambda: sums(False), ema=ema,
                  embed=embed, embed_two_pass=lambda: embed(3), embed_wide=lambda: embed(C=12))
    out = {}
    for mid in [0] + sorted(mutants):
        os.environ["PROTOSEG_SIM_MUTANT"] = str(mid)
        names = sorted(set(v[4] for v in mutants.values())) if mid == 0 else [mutants[mid][4]]
        res = []
        for name in names:
            try:
                res.append("PASSED" if checks[name]() else "VALUES DIFFER")
            except RuntimeError as e:
                res.append("ERROR: " + str(e).splitlines()[0])
        out[mid] = res
    print("RESULTS " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def race_mutant_results(tmp_path_factory):
    script = tmp_path_factory.mktemp("mutants") / "race_mutants.py"
    script.write_text(_RACE_MUTANT_SCRIPT)
    spec = {str(k): v for k, v in RACE_MUTANTS.items()}
    r = subprocess.run([sys.executable, str(script), str(ROOT), json.dumps(spec)], capture_output=True, text=True,
                       timeout=3000, env=dict(os.environ, PROTOSEG_SIM_ORDER="forward"))
    assert r.returncode == 0, r.stderr[-3000:]
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULTS ")]
    assert line, r.stdout + r.stderr[-2000:]
    return {int(k): v for k, v in json.loads(line[0][len("RESULTS "):]).items()}


def test_race_mutants_control(race_mutant_results):
    """The library with every mutation site in place, none switched on: every check passes, no report."""
    assert all(r == "PASSED" for r in race_mutant_results[0]), race_mutant_results[0]


@pytest.mark.parametrize("mid", sorted(RACE_MUTANTS))
def test_race_mutant_is_caught(race_mutant_results, mid):
    """A barrier removed (each one of every kernel that has one), an atomic made plain, an index off by one:
    the emulator stops the launch and names the race (or the out-of-bounds index), in forward order."""
    (res,) = race_mutant_results[mid]
    assert res.startswith("ERROR: ") and RACE_MUTANTS[mid][5] in res, res
