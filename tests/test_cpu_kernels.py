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


_POOL_SCRIPT = r"""
import json, sys
import torch, torch.nn.functional as F
from protoseg_ext import ProtoSegHead, backends

stats = backends.cpu_buffer_pool_stats
OPS = torch.ops.protoseg_ext
MiB = 1 << 20
out = {"cap": stats()["cap_bytes"], "start": stats()}


def similarity(N, D=512, C=64, K=10):  # the softmax cache (N, C*K) fp32 comes from the pool: N * 2560 bytes
    g = torch.Generator().manual_seed(N)
    f = torch.randn(N, D, generator=g)
    p = F.normalize(torch.randn(C, K, D, generator=g), dim=-1)
    return OPS.similarity(f, p, torch.randint(0, C, (N,), generator=g), -1, 1.0, True, True, True, 1 << 30, True)


r = similarity(8192)
out["live_8192"] = stats()
del r
out["freed_8192"] = stats()
r = similarity(8192)
out["again_8192"] = stats()
del r
r = similarity(12288)  # another size: the idle buffer of 8192 rows is released, not kept beside it
out["other_12288"] = stats()
del r
out["freed_12288"] = stats()


def steps(D, H, W, C=52, K=10):
    head = ProtoSegHead(D, C, K, backend="cpu", ignore_index=-1, assign="argmax")
    gt = torch.randint(0, C, (1, H, W), generator=torch.Generator().manual_seed(1))
    x = torch.randn(1, D, H, W).requires_grad_(True)
    after = []
    for step in range(4):
        o = head(x, gt)
        (o.seg.sum() * 0 + o.loss_ppc + o.loss_ppd).backward()
        del o
        x.grad = None
        after.append(stats())
    return after


# training steps of the head: map (1, 256, 128, 256), N = 32,768, C = 52: the softmax cache (65 MiB),
# the prototype sums' partials (16 blocks x 520 x 256 float64, 16.25 MiB; freed before the backward
# asks for the gradient) and the feature gradient (32 MiB) are pooled
out["steps"] = steps(256, 128, 256)
# D = C * K = 520, N = 16,384: the softmax cache and the feature gradient have the same size (32.5 MiB),
# requested twice per step, the partials (16 x 520 x 520 float64, 33 MiB) between them
out["steps_same"] = steps(520, 128, 128)
print("POOL " + json.dumps(out))
"""


@pytest.mark.skipif("cpu" not in backends.available_backends(), reason="needs the compiled CPU kernels")
@pytest.mark.parametrize("pool_mb", [None, 30, 0])
def test_buffer_pool_keeps_only_what_the_next_step_reuses(pool_mb):
    """Freed buffers are kept for a request of the same size only: a new size releases the old ones,
    steps of one shape hold the same buffers step after step (nothing accumulates), and a buffer over
    PROTOSEG_POOL_MB goes back to the OS when freed."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("PROTOSEG_POOL_MB", None)
    if pool_mb is not None:
        env["PROTOSEG_POOL_MB"] = str(pool_mb)
    r = subprocess.run([sys.executable, "-c", _POOL_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("POOL "))[5:])
    MiB = 1 << 20
    cap = 1024 * MiB if pool_mb is None else pool_mb * MiB
    assert s["cap"] == cap
    assert s["start"]["idle_bytes"] == 0 and s["start"]["live_bytes"] == 0
    p8, p12 = 8192 * 2560, 12288 * 2560  # 20 MiB, 30 MiB
    grad, probs, partial = 32768 * 256 * 4, 32768 * 520 * 4, 16 * 520 * 256 * 8
    assert s["live_8192"]["live_bytes"] == p8  # pooled or not, counted while alive
    if pool_mb == 0:  # pool off: nothing is ever idle
        for k in ("freed_8192", "freed_12288", *range(4)):
            st = s["steps"][k] if isinstance(k, int) else s[k]
            assert st["idle_bytes"] == 0 and st["live_bytes"] == 0 and st["reused"] == 0, (k, st)
        return
    assert s["freed_8192"]["idle_bytes"] == p8 and s["freed_8192"]["live_bytes"] == 0
    assert s["again_8192"]["reused"] == 1 and s["again_8192"]["idle_bytes"] == 0
    assert s["other_12288"]["idle_bytes"] == 0  # 8192's buffer is gone, not waiting beside it
    assert s["freed_12288"]["idle_bytes"] == (p12 if p12 <= cap else 0)
    def check_steps(steps, buffers):
        kept = [b for b in buffers if b <= cap]
        for st in steps[1:]:  # after every step: the buffers of this shape that fit the cap, nothing else
            assert st["live_bytes"] == 0, st
            assert st["idle_bytes"] == sum(kept) and st["idle_buffers"] == len(kept), st
        # from the third step on, every pooled request is served by the previous step's buffers (the
        # first step's gradient is requested when its partial is idle: a new size, which releases it)
        assert steps[3]["reused"] - steps[1]["reused"] == 2 * len(kept)
        assert steps[3]["allocated"] - steps[1]["allocated"] == 2 * (len(buffers) - len(kept))
        return sum(kept)

    kept = check_steps(s["steps"], (grad, probs, partial))
    same = 16384 * 520 * 4
    kept_same = check_steps(s["steps_same"], (same, same, 16 * 520 * 520 * 8))
    peak = max(st["peak_idle_bytes"] for st in s["steps"] + s["steps_same"])
    assert peak <= max(kept, kept_same, p12 if p12 <= cap else 0, p8)


_EARLY_RELEASE_SCRIPT = r"""
import json, sys
import torch, torch.nn.functional as F
from protoseg_ext import backends
from protoseg_ext import reference as R
from protoseg_ext.testing import embed_reference

OPS = torch.ops.protoseg_ext
stats = backends.cpu_buffer_pool_stats
B, D, H, W, C, K = map(int, sys.argv[1:7])
g = torch.Generator().manual_seed(8)
x0 = torch.randn(B, D, H, W, generator=g) * 2 + 0.5
w0, b0 = torch.randn(D, generator=g), torch.randn(D, generator=g)
p = F.normalize(torch.randn(C, K, D, generator=g), dim=-1)
N = B * H * W
gt = torch.randint(-1, C, (N,), generator=g)
xa, wa, ba = [t.clone().requires_grad_() for t in (x0, w0, b0)]
seg, argk, lse, own, probs, st = OPS.embed_similarity(xa, wa, ba, 1e-5, p, gt, -1, 0.1, True, True, True, 1 << 30)
assert probs.shape == (N, C * K)
cache = probs.numel() * probs.element_size()
wts = [torch.randn(t.shape, generator=g) for t in (seg, lse, own)]
loss = sum((o * u).sum() for o, u in zip((seg, lse, own), wts))
before = stats()["released_early_bytes"]
first = torch.autograd.grad(loss, [xa, wa, ba], retain_graph=True)
released = stats()["released_early_bytes"] - before
second = torch.autograd.grad(loss, [xa, wa, ba])  # through the same graph: the cache as the first left it
seg, argk, lse, own, probs, st = OPS.embed_similarity(xa, wa, ba, 1e-5, p, gt, -1, 0.1, True, True, True, 0)
uncached = torch.autograd.grad(sum((o * u).sum() for o, u in zip((seg, lse, own), wts)), [xa, wa, ba])
xb, wb, bb = [t.double().requires_grad_() for t in (x0, w0, b0)]
ref = R.similarity_outputs(embed_reference(xb, (wb, bb, 1e-5)), p.double(), gt, -1, 0.1, True, True, True)
refg = torch.autograd.grad(sum((o * u.double()).sum() for o, u in zip((ref[0], ref[2], ref[3]), wts)), [xb, wb, bb])
err = lambda a, b: max(((u.double() - v.double()).abs().max() / v.double().abs().max()).item() for u, v in zip(a, b))
print("EARLY " + json.dumps({"cap": stats()["cap_bytes"], "cache": cache,
                             "released": released, "first_ref": err(first, refg), "second_ref": err(second, refg),
                             "first_uncached": err(first, uncached), "second_first": err(second, first)}))
"""


@pytest.mark.skipif("cpu" not in backends.available_backends(), reason="needs the compiled CPU kernels")
@pytest.mark.parametrize("shape, slack_mib", [
    ((2, 24, 64, 192, 19, 10), 8),  # N = 24,576: a (N, 190) float32 cache of 17.8 MiB, from the pool
    # 1,048,576 pixels of one image, 2 columns of tiles (a column: the pixels of one 2 MiB page of a
    # gradient plane), walked one after the other; a (N, 4) cache of 16 MiB in 2 MiB-aligned task ranges
    ((1, 8, 1024, 1024, 2, 2), 0),
])
@pytest.mark.parametrize("pool_mb", [None, 8])
def test_backward_releases_a_cache_the_pool_would_not_keep(pool_mb, shape, slack_mib):
    """A softmax cache larger than PROTOSEG_POOL_MB (freed at once when its tensors go) is handed back
    to the OS by the backward as it reads it, in whole huge pages (with NCHW planes, the tasks taking one
    column of tiles at a time: those whose pixels share the gradient's huge pages); one the pool keeps for
    the next step (the default cap, at this size) is not. Either way the gradients of feats, weight and
    bias match LayerNorm + F.normalize + the reference in float64 and the backward without a cache, and a
    second backward through the same graph (retain_graph=True) finds the released cache gone, recomputes S
    and gives the same gradients (reading the released pages would give zeros there)."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("PROTOSEG_POOL_MB", None)
    if pool_mb is not None:
        env["PROTOSEG_POOL_MB"] = str(pool_mb)
    r = subprocess.run([sys.executable, "-c", _EARLY_RELEASE_SCRIPT, *map(str, shape)], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("EARLY "))[6:])
    MiB = 1 << 20
    B, D, H, W, C, K = shape
    assert s["cache"] == B * H * W * C * K * 4 and s["cache"] >= 16 * MiB  # a pool buffer
    if pool_mb is None:
        assert s["released"] == 0  # kept for the next step: its pages stay
    else:
        # whole 2 MiB pages, all but those a task's range shares with its neighbours' (at most 2 per task)
        assert s["released"] % (2 * MiB) == 0 and s["cache"] - slack_mib * MiB <= s["released"] <= s["cache"], s
    for k in ("first_ref", "second_ref"):
        assert s[k] < 2e-4, s
    assert s["first_uncached"] < 1e-5 and s["second_first"] < 1e-5, s


@pytest.mark.parametrize("cache", [0, 1 << 30])
def test_embed_backward_non_finite_pixels_inside_plane_tiles(cache):
    """A NaN or inf pixel inside a plane tile (pixel 700 of the first 1,024-pixel tile, pixel
    1,100 in the second): with the softmax cache the plane path's backward finds it and sends
    the tile to the row path, without it the statistics do. Every finite pixel's gradient must
    still be that of LayerNorm + F.normalize + the reference, and the weight's and bias's
    gradients non-finite, as the reference's."""
    from protoseg_ext.testing import embed_reference

    B, D, H, W, C, K = 1, 24, 8, 160, 4, 3  # C*K = 12: 1,024-pixel tiles, the second partial
    g = torch.Generator().manual_seed(21)
    x0 = torch.randn(B, D, H, W, generator=g) * 2 + 0.5
    x0.view(D, -1)[:, 700] = float("nan")
    x0.view(D, -1)[:, 1100] = float("inf")
    w0, b0 = torch.randn(D, generator=g), torch.randn(D, generator=g)
    p = F.normalize(torch.randn(C, K, D, generator=g), dim=-1)
    gt = torch.randint(-1, C, (B * H * W,), generator=g)
    be = backends.resolve("cpu", "cpu")
    xa, wa, ba = [t.clone().requires_grad_() for t in (x0, w0, b0)]
    out = be.embed_similarity(xa, (wa, ba, 1e-5), p, gt, temperature=0.7, seg=True, lse=True, own=True,
                              cache_bytes=cache)
    xb, wb, bb = [t.double().requires_grad_() for t in (x0, w0, b0)]
    ref = R.similarity_outputs(embed_reference(xb, (wb, bb, 1e-5)), p.double(), gt, -1, 0.7, True, True, True)
    wts = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in (ref[0], ref[2], ref[3])]
    la = sum((o.double() * w).sum() for o, w in zip((out.seg, out.lse, out.own), wts))
    lb = sum((o * w).sum() for o, w in zip((ref[0], ref[2], ref[3]), wts))
    ga = torch.autograd.grad(la, [xa, wa, ba])
    gb = torch.autograd.grad(lb, [xb, wb, bb])
    finite = torch.ones(H * W, dtype=torch.bool)
    finite[[700, 1100]] = False
    gxa, gxb = ga[0].view(D, -1), gb[0].view(D, -1)
    torch.testing.assert_close(gxa[:, finite].double(), gxb[:, finite], atol=1e-4, rtol=1e-4)
    assert not torch.isfinite(gxa[:, ~finite]).all()
    for u, v in zip(ga[1:], gb[1:]):
        assert not torch.isfinite(v).all() and not torch.isfinite(u).all()


def _embed_sums64(x, w, b, eps, p, T):
    """Rows 3-5 of the CPU embed_similarity's stats in float64: sum w y, sum w xhat y, sum_k softmax(S / T)_k S_k."""
    D = x.shape[1]
    rows = x.double().permute(0, 2, 3, 1).reshape(-1, D)
    xhat = (rows - rows.mean(1, keepdim=True)) / (rows.var(1, unbiased=False, keepdim=True) + eps).sqrt()
    y = xhat * w.double() + b.double()
    S = F.normalize(y, dim=1) @ p.double().reshape(-1, D).t()
    return (w.double() * y).sum(1), (w.double() * xhat * y).sum(1), (torch.softmax(S / T, 1) * S).sum(1)


@pytest.mark.parametrize("temperature", [0.1, 1.0, 0.01])
def test_embed_backward_takes_the_forwards_sums_and_reads_the_map_once(temperature):
    """With the softmax cache and the LayerNorm, the CPU forward keeps 3 more rows of stats (sum w y,
    sum w xhat y, sum p S) and its backward takes every per-pixel sum from them, the cache and dS
    (plane_embed.h, backward_given). Checked: the rows against float64; a tile with a pixel far from
    zero mean (the forward's row path) has rows 3 and 4 +inf there; gradients of feats, weight and
    bias against LayerNorm + F.normalize + the reference in float64 (tau = 0.1: the shifted exp,
    tau = 1: the direct one, tau = 0.01: cached entries that vanish, whose tiles read the map for
    their sums), ignored labels included; the backward reads row 5 (changing it changes the
    gradient, except at tau = 0.01, where no tile reads it), and given only stats[:3] it reads the
    map for those sums and agrees."""
    from protoseg_ext.testing import embed_reference

    B, D, H, W, C, K = 2, 24, 8, 160, 4, 3  # C*K = 12: tiles of 1,024 pixels, 2 per image
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(B, D, H, W, generator=g) * 2 + 0.5
    x0[1, :, 0, 3] = 60 + torch.randn(D, generator=g)  # |mean| / std beyond the fold's guard (16)
    w0, b0 = torch.randn(D, generator=g), torch.randn(D, generator=g)
    p = F.normalize(torch.randn(C, K, D, generator=g), dim=-1)
    N = B * H * W
    gt = torch.randint(-1, C, (N,), generator=g)
    seg, argk, lse, own, probs, stats = OPS.embed_similarity(x0, w0, b0, 1e-5, p, gt, -1, temperature, True, True,
                                                             True, 1 << 30)
    assert stats.shape == (6, N) and probs.shape == (N, C * K)
    if temperature == 0.01:  # some cached entries the backward would read back (the arg-max k of each class) vanish
        assert (probs.view(N, K, C).gather(1, argk.long().unsqueeze(1)) < 1e-30).any()
    wy, wxy, ps = _embed_sums64(x0, w0, b0, 1e-5, p, temperature)
    far = 1 * H * W + 3  # the far pixel; its tile (the first of image 1) took the row path
    on_plane = torch.ones(N, dtype=torch.bool)
    on_plane[H * W:H * W + 1024] = False
    assert torch.isinf(stats[3:5, ~on_plane]).all()
    torch.testing.assert_close(stats[3, on_plane].double(), wy[on_plane], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats[4, on_plane].double(), wxy[on_plane], rtol=1e-4, atol=1e-4)
    keep = torch.arange(N) != far
    torch.testing.assert_close(stats[5, keep].double(), ps[keep], rtol=1e-5, atol=1e-5)

    be = backends.resolve("cpu", "cpu")
    xa, wa, ba = [t.clone().requires_grad_() for t in (x0, w0, b0)]
    out = be.embed_similarity(xa, (wa, ba, 1e-5), p, gt, temperature=temperature, seg=True, lse=True, own=True,
                              cache_bytes=1 << 30)
    xb, wb, bb = [t.double().requires_grad_() for t in (x0, w0, b0)]
    ref = R.similarity_outputs(embed_reference(xb, (wb, bb, 1e-5)), p.double(), gt, -1, temperature, True, True,
                               True)
    wts = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in (ref[0], ref[2], ref[3])]
    la = sum((o.double() * u).sum() for o, u in zip((out.seg, out.lse, out.own), wts))
    lb = sum((o * u).sum() for o, u in zip((ref[0], ref[2], ref[3]), wts))
    ga = torch.autograd.grad(la, [xa, wa, ba])
    gb = torch.autograd.grad(lb, [xb, wb, bb])
    for u, v in zip(ga, gb):
        scale = v.abs().max().item()
        torch.testing.assert_close(u.double(), v, atol=2e-4 * scale, rtol=2e-4)

    gs, gl, go = [u.float() for u in wts]
    args = (gs, gl, go, x0, w0, b0, 1e-5, p, gt, argk, lse, -1, temperature, probs)
    given = OPS.embed_similarity_backward(*args, stats)
    first3 = OPS.embed_similarity_backward(*args, stats[:3].contiguous())
    for u, v in zip(given, first3):
        torch.testing.assert_close(u, v, atol=1e-4 * v.abs().max().item(), rtol=1e-4)
    moved = stats.clone()
    moved[5] += 0.1
    moved_gx = OPS.embed_similarity_backward(*args, moved)[0]
    if temperature == 0.01:  # every tile has a vanishing entry: none reads row 5
        assert torch.equal(moved_gx, given[0])
    else:  # read: the gradient follows it
        assert (moved_gx - given[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"stats must be embed_similarity's \(6, N\) = \(6, 2560\) or its first 3"):
        OPS.embed_similarity_backward(*args, stats[:4])
