"""The CPU mask_norm op (the head's LayerNorm over C, written as (B, C, H*W)) against reference.mask_norm."""

import os
import subprocess
import sys

import pytest
import torch

import protoseg_ext  # noqa: F401  (registers the ops)
from protoseg_ext import ProtoSegHead, reference

OPS = torch.ops.protoseg_ext


def _inputs(B, HW, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    seg = (torch.randn(B * HW, C, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    w = (torch.randn(C, generator=g, dtype=torch.float64)).to(dtype)
    b = (torch.randn(C, generator=g, dtype=torch.float64)).to(dtype)
    return seg, w, b


TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}


# HW not a multiple of the 64-pixel block, C = 1 (zero variance), one pixel, ADE20K-size C
@pytest.mark.parametrize("B,HW,C", [(2, 35, 19), (3, 130, 1), (1, 1, 5), (1, 200, 150), (4, 64, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_match_reference(B, HW, C, dtype):
    seg, w, b = _inputs(B, HW, C, dtype)
    sa, wa, ba = (t.clone().requires_grad_() for t in (seg, w, b))
    sb, wb, bb = (t.double().requires_grad_() for t in (seg, w, b))  # the oracle in float64
    out, mean, rstd, pred = OPS.mask_norm(sa, wa, ba, 1e-5, B)
    ref = reference.mask_norm(sb, wb, bb, 1e-5, B)
    assert out.shape == (B, C, HW) and out.is_contiguous()
    torch.testing.assert_close(out, ref.to(dtype), **TOL[dtype])
    var, mu = torch.var_mean(seg.double(), dim=1, unbiased=False)
    torch.testing.assert_close(mean.double(), mu, **TOL[dtype])
    torch.testing.assert_close(rstd.double(), (var + 1e-5).rsqrt(), **TOL[dtype])
    assert torch.equal(pred, out.detach().permute(0, 2, 1).reshape(-1, C).argmax(dim=1))
    g = torch.randn(B, C, HW, dtype=dtype, generator=torch.Generator().manual_seed(1))
    ga = torch.autograd.grad(out, (sa, wa, ba), g)
    gb = torch.autograd.grad(ref, (sb, wb, bb), g.double())
    for x, y, name in zip(ga, gb, ("seg", "weight", "bias")):
        torch.testing.assert_close(x, y.to(dtype), **TOL[dtype], msg=name)


def test_gradcheck_float64():
    seg, w, b = _inputs(2, 9, 4, torch.float64)
    args = [t.clone().requires_grad_() for t in (seg, w, b)]
    assert torch.autograd.gradcheck(lambda s, w, b: OPS.mask_norm(s, w, b, 1e-5, 2)[0], args)


def test_empty_and_nan_rows():
    seg, w, b = _inputs(1, 0, 6, torch.float32)
    out, mean, rstd, pred = OPS.mask_norm(seg, w, b, 1e-5, 1)
    assert out.shape == (1, 6, 0) and mean.shape == rstd.shape == pred.shape == (0,)
    seg, w, b = _inputs(2, 70, 6, torch.float32)
    seg[3, 2] = float("nan")
    out, _, _, pred = OPS.mask_norm(seg, w, b, 1e-5, 2)
    ref = reference.mask_norm(seg, w, b, 1e-5, 2)
    torch.testing.assert_close(out, ref, equal_nan=True, **TOL[torch.float32])
    assert torch.isnan(out[0, :, 3]).all() and torch.isfinite(out[:, :, 4:]).all()
    assert torch.equal(pred, out.permute(0, 2, 1).reshape(-1, 6).argmax(dim=1))  # NaN counts as the maximum


def test_weight_gradient_is_the_same_for_any_thread_count():
    seg, w, b = _inputs(2, 5000, 19, torch.float32)  # several 4096-pixel partial-sum chunks
    g = torch.randn(2, 19, 5000, generator=torch.Generator().manual_seed(2))
    _, mean, rstd, _ = OPS.mask_norm(seg, w, b, 1e-5, 2)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(OPS.mask_norm_backward(g, seg, w, mean, rstd))
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(*results):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(6), torch.ones(6), torch.zeros(6), 1e-5, 1), "seg must be"),
        ((torch.randn(6, 3).half(), torch.ones(3).half(), torch.zeros(3).half(), 1e-5, 1), "seg must be float32"),
        ((torch.randn(6, 3), torch.ones(4), torch.zeros(3), 1e-5, 1), "weight must be"),
        ((torch.randn(6, 3), torch.ones(3), torch.zeros(3).double(), 1e-5, 1), "bias must have seg's dtype"),
        ((torch.randn(6, 3), torch.ones(3), torch.zeros(3), -1.0, 1), "eps must be"),
        ((torch.randn(6, 3), torch.ones(3), torch.zeros(3), 1e-5, 4), "batch must be"),
        ((torch.randn(6, 0), torch.ones(0), torch.zeros(0), 1e-5, 1), "C >= 1"),
    ],
)
def test_bad_arguments_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        OPS.mask_norm(*args)


def test_backward_rejects_a_gradient_of_the_wrong_shape():
    seg, w, b = _inputs(2, 10, 3, torch.float32)
    _, mean, rstd, _ = OPS.mask_norm(seg, w, b, 1e-5, 2)
    with pytest.raises(ValueError, match="grad_out must be"):
        OPS.mask_norm_backward(torch.randn(2, 4, 10), seg, w, mean, rstd)


def test_opcheck():
    seg, w, b = _inputs(2, 70, 5, torch.float32)
    args = (seg.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 1e-5, 2)
    torch.library.opcheck(OPS.mask_norm, args)
    _, mean, rstd, _ = OPS.mask_norm(seg.detach(), w.detach(), b.detach(), 1e-5, 2)
    torch.library.opcheck(OPS.mask_norm_backward, (torch.randn(2, 5, 70), seg.detach(), w.detach(), mean, rstd))


def test_head_uses_the_op_and_falls_back_for_other_norms():
    x = torch.randn(2, 8, 5, 6)
    gt = torch.randint(0, 4, (2, 5, 6))
    head = ProtoSegHead(8, 4, num_prototype=2, assign="argmax", backend="cpu")
    assert head(x, gt).seg.is_contiguous()  # written as an image by the op
    for norm in (head.mask_norm, torch.nn.LayerNorm(4, elementwise_affine=False)):  # op, then module path
        head.mask_norm = norm
        head.eval()
        with torch.no_grad():
            out = head(x).seg
            raw = reference.proto_seg_logits(head.embed(x), torch.nn.functional.normalize(head.prototypes, dim=-1))
            ref = norm(raw).view(2, 5, 6, 4).permute(0, 3, 1, 2)
        assert out.shape == (2, 4, 5, 6) and out.is_contiguous() == (norm.weight is not None)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_cpu_backend_states_its_mask_norm_limits():
    """The cpu backend names the inputs its mask_norm kernel does not take (instead of quietly
    computing something else), raises on them, and the head routes them to the module."""
    from protoseg_ext import backends

    be = backends.get_backend("cpu")
    seg, w, b = _inputs(2, 6, 4, torch.float32)
    assert be.not_supported_reasons(seg.device, "mask_norm", seg=seg, weight=w, bias=b) == []
    assert be.not_supported_reasons(seg.device) == []  # the device-only form of the public API
    half = seg.to(torch.bfloat16)
    reasons = be.not_supported_reasons(seg.device, "mask_norm", seg=half, weight=w, bias=b)
    assert any("bfloat16" in r for r in reasons), reasons
    assert any("no bias" in r or "needs a bias" in r
               for r in be.not_supported_reasons(seg.device, "mask_norm", seg=seg, weight=w, bias=None))
    with pytest.raises(ValueError, match="float32 or float64 seg, got torch.bfloat16"):
        be.mask_norm(half, w.to(torch.bfloat16), b.to(torch.bfloat16), 1e-5, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert any("autocast" in r for r in be.not_supported_reasons(seg.device, "mask_norm", seg=seg, weight=w,
                                                                      bias=b))
    assert backends.get_backend("reference").not_supported_reasons(seg.device, "mask_norm", seg=half) == []
    # the head: a bfloat16 step on the cpu backend takes the module path, with the module's values
    head = ProtoSegHead(8, 4, num_prototype=2, assign="argmax", backend="cpu").to(torch.bfloat16).eval()
    x = torch.randn(2, 8, 5, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        out = head(x).seg
        h32 = head.float()  # the same step in float32: bfloat16 rounding apart, the same values
        raw = reference.proto_seg_logits(h32.embed(x.float()), torch.nn.functional.normalize(h32.prototypes, dim=-1))
        ref = h32.mask_norm(raw).view(2, 5, 6, 4).permute(0, 3, 1, 2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


def test_pooled_buffers_are_never_shared_while_alive():
    """The softmax cache and the feature gradient come from a reuse pool; two live ones never alias."""
    code = r"""
import sys, torch, torch.nn.functional as F, protoseg_ext
OPS = torch.ops.protoseg_ext
REUSE = int(sys.argv[1])
N, D, C, K = 8192, 512, 64, 10   # probs (N, C*K) 21 MB, grad (N, D) 17 MB: both pooled
f = torch.randn(N, D); p = F.normalize(torch.randn(C, K, D), dim=-1); gt = torch.randint(0, C, (N,))
outs = [OPS.similarity(f, p, gt, -1, 1.0, True, True, True, 1 << 30, True) for _ in range(2)]
assert outs[0][4].data_ptr() != outs[1][4].data_ptr()
torch.testing.assert_close(outs[0][4], outs[1][4], atol=0, rtol=0)
ptr = outs[1][4].data_ptr()
del outs[1]
again = OPS.similarity(f * 2, p, gt, -1, 1.0, True, True, True, 1 << 30, True)  # same values: rows normalised
assert again[4].data_ptr() == ptr or not REUSE  # the freed buffer was reused
torch.testing.assert_close(again[4], outs[0][4], atol=1e-6, rtol=1e-5)
g = [OPS.similarity_backward(None, torch.ones(N), None, f, p, gt, outs[0][1], outs[0][2], -1, 1.0, outs[0][4], True)
     for _ in range(2)]
assert g[0].data_ptr() != g[1].data_ptr()
released = protoseg_ext.backends.cpu_buffer_pool_stats()["released_early_bytes"]
if REUSE:  # the cache is kept for the next step: the second backward reads it as the first did
    assert released == 0 and torch.equal(g[0], g[1])
else:  # pool off: the first backward handed the cache's pages back, the second recomputed S
    assert released > 0
    torch.testing.assert_close(g[0], g[1], atol=1e-6, rtol=1e-5)
print("ok")
"""
    # MKL's GEMM pinned to one code path and thread count (conditional numerical reproducibility): with
    # its defaults, two calls on the same operands can differ in the last bit (a buffer's alignment, or
    # fewer threads under load), and the checks below compare the two calls bitwise
    mkl = {"MKL_CBWR": "COMPATIBLE", "MKL_DYNAMIC": "FALSE"}
    for reuse, env in ((1, {}), (0, {"PROTOSEG_POOL_MB": "0"})):  # pool off: same results, fresh buffers
        r = subprocess.run([sys.executable, "-c", code, str(reuse)], capture_output=True, text=True,
                           env={**os.environ, **mkl, **env}, timeout=300)
        assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_batch_stays_symbolic_under_export():
    """`batch` is a SymInt: an exported graph keeps the batch dimension dynamic and runs at another batch."""

    class Norm(torch.nn.Module):
        def __init__(self, C):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(C))
            self.bias = torch.nn.Parameter(torch.randn(C))

        def forward(self, x):  # (B, HW, C)
            return OPS.mask_norm(x.reshape(-1, x.shape[-1]), self.weight, self.bias, 1e-5, x.shape[0])[0]

    m = Norm(5)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(m, (torch.randn(2, 7, 5),), dynamic_shapes={"x": {0: batch}})
    x = torch.randn(3, 7, 5)
    out = program.module()(x)
    ref = reference.mask_norm(x.reshape(-1, 5), m.weight.detach(), m.bias.detach(), 1e-5, 3)
    assert out.shape == (3, 5, 7)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
