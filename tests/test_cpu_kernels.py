"""Paths of the CPU kernels that only some shapes or values reach.

- prototype_sums adds rows in the accumulation type between float64 flushes
  and redoes an overflowing float32 squared norm in float64;
- the softmax cache and the feature gradient are written with streaming
  stores from tile buffers, whose destinations are not 16-byte aligned for
  every tile (C*K and D odd, several tiles).
Each is checked against protoseg_ext.reference or a float64 computation.
"""

import pytest
import torch
import torch.nn.functional as F

from protoseg_ext import backends
from protoseg_ext import reference as R

OPS = torch.ops.protoseg_ext


def _sums64(x, slot, S, normalize):
    """Per-slot sums and counts in float64 over the rows with slot >= 0 and finite entries."""
    x64 = x.double()
    keep = (slot >= 0) & torch.isfinite(x64).all(dim=1)
    rows = F.normalize(x64[keep], dim=1) if normalize else x64[keep]
    sums = torch.zeros(S, x.shape[1], dtype=torch.float64).index_add_(0, slot[keep], rows)
    counts = torch.zeros(S, dtype=torch.float64).index_add_(0, slot[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
    return sums, counts


@pytest.mark.parametrize("normalize", [True, False])
def test_prototype_sums_rows_whose_squared_norm_overflows_float32(normalize):
    """Finite rows of magnitude 1e20 (squares past the float32 range) are summed, not mistaken for inf."""
    be = backends.get_backend("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 24, generator=g)
    x[::3] *= 1e20
    x[5, 3] = float("nan")
    x[8, 0] = float("inf")
    slot = torch.randint(0, 6, (300,), generator=g)
    slot[::7] = -1
    if not normalize:
        x[::3] /= 1e20  # sums of raw rows that large would themselves overflow float32
        x[::3] *= 1e19
    sums, counts = be.prototype_sums(x, slot, 6, normalize)
    ref_sums, ref_counts = _sums64(x, slot, 6, normalize)
    assert torch.equal(counts.double(), ref_counts)
    assert torch.isfinite(sums).all()
    scale = ref_sums.abs().amax()
    torch.testing.assert_close(sums.double() / scale, ref_sums / scale, atol=1e-6, rtol=1e-6)


def test_prototype_sums_match_reference_with_overflowing_rows_left_out():
    """Without such rows, the result is reference.prototype_learning's sums (float32 path, several flushes)."""
    be = backends.get_backend("cpu")
    g = torch.Generator().manual_seed(1)
    N, D, S = 30000, 16, 5
    x = torch.randn(N, D, generator=g).abs() + 0.1  # all-positive rows: sums grow with N, rounding shows
    slot = torch.randint(0, S, (N,), generator=g)
    slot[: N // 2] = 0  # one slot takes over half the rows: many rows summed between flushes
    for normalize in (True, False):
        sums, counts = be.prototype_sums(x, slot, S, normalize)
        ref_sums, ref_counts = _sums64(x, slot, S, normalize)
        assert torch.equal(counts.double(), ref_counts)
        torch.testing.assert_close(sums.double(), ref_sums, atol=0, rtol=2e-6)
    # and the same as the reference module's own sums, through prototype_learning
    C, K = 5, 1
    protos = F.normalize(torch.randn(C, K, D, generator=g), dim=-1)
    gt = slot.clone()
    seg = torch.nn.functional.one_hot(gt, C).float()  # every pixel predicted correctly
    _, _, ref_sums, ref_counts = R.prototype_learning(x, protos, gt, seg, assign="argmax", return_sums=True)
    sums, counts = be.prototype_sums(x, gt, C * K, False)
    torch.testing.assert_close(counts.view_as(ref_counts), ref_counts, atol=0, rtol=0)
    torch.testing.assert_close(sums.view_as(ref_sums), ref_sums, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", [True, False])
def test_similarity_streamed_outputs_unaligned_tiles(dtype, normalize):
    """C*K = 301 and D = 5: tile rows (870) times either is not a multiple of 16 bytes, so later tiles start
    unaligned. lse, the kept softmax and the gradient (kept or recomputed) match the reference."""
    g = torch.Generator().manual_seed(2)
    N, D, C, K = 1900, 5, 43, 7
    f = torch.randn(N, D, generator=g, dtype=dtype) * 2
    p = F.normalize(torch.randn(C, K, D, generator=g, dtype=dtype), dim=-1)
    gt = torch.randint(-1, C, (N,), generator=g)
    fin = F.normalize(f, dim=1) if normalize else f
    S = R.similarity(fin, p)
    w = torch.randn(N, generator=g, dtype=dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    grads = []
    for cache in (0, 1 << 30):
        x = f.clone().requires_grad_()
        seg, argk, lse, own, probs = OPS.similarity(x, p, gt, -1, 1.0, True, True, True, cache, normalize)
        torch.testing.assert_close(lse, torch.logsumexp(S, 1), **tol)
        if cache:
            assert probs.shape == (N, C * K)
            # backend-private k-major column order: column k*C + c is prototype k of class c
            ref_probs = torch.softmax(S, 1).view(N, C, K).transpose(1, 2).reshape(N, C * K)
            torch.testing.assert_close(probs, ref_probs, **tol)
        (lse * w).sum().backward()
        grads.append(x.grad)
    xr = f.clone().requires_grad_()
    xin = F.normalize(xr, dim=1) if normalize else xr
    ref = torch.autograd.grad((torch.logsumexp(R.similarity(xin, p), 1) * w).sum(), xr)[0]
    for gr in grads:
        torch.testing.assert_close(gr, ref, **tol)
