"""Instruction-set variants of the CPU kernels (baseline, AVX2, AVX-512; csrc/cpu/cpu_isa.h).

The variant is chosen once per process, so every variant this machine runs
other than the one of this process is tested by running this file's
reference tests again in a subprocess with PROTOSEG_CPU_ISA set.
"""

import bisect
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import protoseg_ext
import protoseg_ext.functional as PF
from protoseg_ext import backends, ops
from protoseg_ext import reference as R
from protoseg_ext.testing import make_problem

_C = ops.load_extension()
pytestmark = pytest.mark.skipif(_C is None, reason="the compiled library did not load")

ISAS = ["baseline", "avx2", "avx512"]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def _supported():
    return list(_C.cpu_isa_supported())


def _run(code, isa, timeout=300):
    """Runs python code (or, code a list: those arguments) with PROTOSEG_CPU_ISA=isa, this tree importable."""
    env = dict(os.environ, PROTOSEG_CPU_ISA=isa)
    root = os.path.dirname(os.path.dirname(os.path.abspath(protoseg_ext.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    args = [sys.executable] + (code if isinstance(code, list) else ["-c", code])
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=os.path.dirname(os.path.abspath(__file__)))


def test_the_variant_that_runs_is_reported():
    supported = _supported()
    assert supported[0] == "baseline" and set(supported) <= set(ISAS)
    assert _C.CPU_ISA_BUILT.split(",")[: len(supported)] == ISAS[: len(supported)]
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert _C.CPU_ISA_BUILT == "baseline,avx2,avx512"
    forced = os.environ.get("PROTOSEG_CPU_ISA", "")
    assert _C.cpu_isa() == (forced if forced not in ("", "auto") else supported[-1])


# ---------------------------------------------------------------- every kernel against the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(300, 37, 5, 3), (2100, 96, 19, 10)])  # odd D; 3 tiles, D split in lanes
def test_kernels_against_reference(shape, dtype):
    """The variant of this process: every CPU op, values and gradients, against protoseg_ext.reference."""
    N, D, C, K = shape
    tol = TOL[dtype]
    f, p, gt, seg = make_problem(N=N, D=D, C=C, K=K, dtype=dtype, seed=N)
    be = backends.get_backend("cpu")
    # every draw below from a fixed seed: the arg-max outputs are compared exactly, and a random
    # draw with a near tie (two prototypes within rounding) would fail one run in many
    torch.manual_seed(N)

    # seg logits (per-class max) and its gradient through the arg-max prototypes
    a, b = f.clone().requires_grad_(), f.clone().requires_grad_()
    sa, sb = PF.proto_seg_logits(a, p, backend="cpu"), R.proto_seg_logits(b, p)
    torch.testing.assert_close(sa, sb, **tol)
    w = torch.randn_like(sb)
    torch.testing.assert_close(torch.autograd.grad((sa * w).sum(), a)[0], torch.autograd.grad((sb * w).sum(), b)[0],
                               **tol)

    # prototype learning: Sinkhorn, per-prototype sums, EMA (deterministic assignment: exact targets)
    ta, pa = PF.prototype_learning(f, p, gt, seg, gamma=0.9, assign="argmax", backend="cpu")
    tb, pb = R.prototype_learning(f, p, gt, seg, gamma=0.9, assign="argmax")
    assert torch.equal(ta, tb)
    torch.testing.assert_close(pa, pb, **tol)

    # PPC and PPD with their gradients (shifted and direct exp, cached softmax)
    for temperature in (1.0, 0.5):
        a, b = f.clone().requires_grad_(), f.clone().requires_grad_()
        la = PF.proto_losses(a, p, tb, temperature=temperature, backend="cpu")
        lb = R.proto_losses(b, p, tb, temperature=temperature)
        torch.testing.assert_close(torch.stack(la), torch.stack(lb), **tol)
        ga = torch.autograd.grad(0.7 * la[0] + 3.0 * la[1], a)[0]
        gb = torch.autograd.grad(0.7 * lb[0] + 3.0 * lb[1], b)[0]
        torch.testing.assert_close(ga, gb, **tol)

    # the head's path: raw rows normalised in the kernel, backward with and without the softmax cache
    x = f * (torch.rand(N, 1, dtype=dtype) * 3 + 0.1)
    S = R.similarity(F.normalize(x, dim=1), p)  # (N, C*K), class-major columns
    lse_ref = torch.logsumexp(S / 0.5, dim=1)
    own_ref = S.view(N, C, K)[torch.arange(N), gt.clamp(min=0)] * (gt >= 0)[:, None]
    wl, wo = torch.randn(N, dtype=dtype), torch.randn(N, K, dtype=dtype)
    g_ref = None
    for cache in (0, 1 << 30):
        xa = x.clone().requires_grad_()
        seg_a, _, lse, own = be.similarity(xa, p, gt, temperature=0.5, seg=True, lse=True, own=True, cache_bytes=cache,
                                           normalize=True)
        torch.testing.assert_close(seg_a, S.view(N, C, K).amax(2), **tol)
        torch.testing.assert_close(lse, lse_ref, **tol)
        torch.testing.assert_close(own, own_ref, **tol)
        g = torch.autograd.grad((seg_a * w).sum() + (lse * wl).sum() + (own * wo).sum(), xa)[0]
        if g_ref is None:
            xb = x.clone().requires_grad_()
            Sb = R.similarity(F.normalize(xb, dim=1), p)
            ob = Sb.view(N, C, K)[torch.arange(N), gt.clamp(min=0)] * (gt >= 0)[:, None]
            loss_b = (Sb.view(N, C, K).amax(2) * w).sum() + (torch.logsumexp(Sb / 0.5, 1) * wl).sum() + (ob * wo).sum()
            g_ref = torch.autograd.grad(loss_b, xb)[0]
        torch.testing.assert_close(g, g_ref, **tol)
    slot = torch.randint(-1, C * K, (N,))
    sums, counts = be.prototype_sums(x, slot, C * K, True)
    keep = slot >= 0
    ref_sums = torch.zeros(C * K, D, dtype=torch.float64).index_add_(0, slot[keep], F.normalize(x[keep].double(), dim=1))
    torch.testing.assert_close(sums.double(), ref_sums, **tol)
    assert torch.equal(counts.double(), torch.bincount(slot[keep], minlength=C * K).double())

    # the head's embedding fused into the similarity: an NCHW map read in place, the LayerNorm over D
    Bm, Wm = 3, 7
    xm = (f[: (N // (Bm * Wm)) * Bm * Wm].t().reshape(D, Bm, -1, Wm).transpose(0, 1) * 2 + 0.3).contiguous()
    lnw, lnb = torch.randn(D, dtype=dtype), torch.randn(D, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (xm, lnw, lnb)]
    gtm = gt[: xm.shape[0] * xm.shape[2] * Wm]
    ea = be.embed_similarity(leaves[0], (leaves[1], leaves[2], 1e-5), p, gtm, temperature=0.5, seg=True, lse=True,
                             own=True)
    ref_leaves = [t.clone().requires_grad_() for t in (xm, lnw, lnb)]
    rows = F.layer_norm(ref_leaves[0].permute(0, 2, 3, 1).reshape(-1, D), (D,), ref_leaves[1], ref_leaves[2], 1e-5)
    eb = R.similarity_outputs(F.normalize(rows, dim=1), p, gtm, -1, 0.5, True, True, True)
    for u, v in zip(ea, eb):
        torch.testing.assert_close(u, v, **tol)
    loss_a = (ea.seg * 1.5).sum() + ea.lse.sum() + (ea.own * 0.5).sum()
    loss_b = (eb[0] * 1.5).sum() + eb[2].sum() + (eb[3] * 0.5).sum()
    for u, v in zip(torch.autograd.grad(loss_a, leaves), torch.autograd.grad(loss_b, ref_leaves)):
        torch.testing.assert_close(u, v, atol=1e-4 if dtype == torch.float32 else 1e-9, rtol=1e-4)

    # the head's mask_norm (LayerNorm over C, written as (B, C, H*W)), values and gradients
    B = 3
    n = (N // B) * B
    s = (seg[:n] * 3).clone().requires_grad_()
    lw, lb = torch.randn(C, dtype=dtype).requires_grad_(), torch.randn(C, dtype=dtype).requires_grad_()
    out = torch.ops.protoseg_ext.mask_norm(s, lw, lb, 1e-5, B)[0]
    s2, lw2, lb2 = (t.detach().double().requires_grad_() for t in (s, lw, lb))  # the oracle in float64, as
    ref = R.mask_norm(s2, lw2, lb2, 1e-5, B)  # test_mask_norm.py: grad_weight sums N / B rows
    torch.testing.assert_close(out, ref.to(dtype), **tol)
    wm = torch.randn(ref.shape, dtype=torch.float64)
    ga = torch.autograd.grad((out * wm.to(dtype)).sum(), (s, lw, lb))
    gb = torch.autograd.grad((ref * wm).sum(), (s2, lw2, lb2))
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v.to(dtype), **tol)


@pytest.mark.parametrize("isa", ISAS)
def test_every_supported_variant_against_reference(isa):
    """The reference tests above, in a process whose kernels are the variant isa."""
    if isa not in _supported():
        pytest.skip(f"this CPU does not run the {isa} kernels (it runs {', '.join(_supported())})")
    if isa == _C.cpu_isa():
        pytest.skip(f"{isa} is this process's variant: tested above")
    r = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__), "-k",
              "the_variant_that_runs or kernels_against_reference"], isa)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]


# ---------------------------------------------------------------- PROTOSEG_CPU_ISA


_CALL_OP = """
import torch, protoseg_ext, protoseg_ext.functional as PF
from protoseg_ext import ops
ext = ops.load_extension()
try:
    ext.cpu_isa()
except {exc} as e:
    print("QUERY", e)
f = torch.nn.functional.normalize(torch.randn(10, 4), dim=1)
p = torch.nn.functional.normalize(torch.randn(3, 2, 4), dim=-1)
try:
    PF.proto_seg_logits(f, p, backend="cpu")
except {exc} as e:
    print("OP", e)
print("DONE")
"""


def test_unknown_value_is_an_error_naming_the_variable():
    r = _run(_CALL_OP.format(exc="ValueError"), "avx3")
    assert "DONE" in r.stdout, r.stderr
    for where in ("QUERY", "OP"):
        line = next(x for x in r.stdout.splitlines() if x.startswith(where))
        assert "PROTOSEG_CPU_ISA='avx3' is not a CPU kernel variant" in line and "baseline, avx2, avx512" in line, line


def test_a_variant_this_cpu_cannot_run_is_an_error():
    missing = [isa for isa in ISAS if isa not in _supported()]
    if not missing:
        pytest.skip("this CPU runs every variant")
    r = _run(_CALL_OP.format(exc="RuntimeError"), missing[-1])
    assert "DONE" in r.stdout, r.stderr
    for where in ("QUERY", "OP"):
        line = next(x for x in r.stdout.splitlines() if x.startswith(where))
        assert f"PROTOSEG_CPU_ISA={missing[-1]} asks for CPU kernels" in line, line
        assert f"it runs: {', '.join(_supported())}" in line, line


@pytest.mark.parametrize("isa", ["baseline", "auto"])
def test_info_says_which_variant_runs(isa):
    r = _run(["-m", "protoseg_ext.info"], isa)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if "CPU kernels (ISA)" in x)
    if isa == "auto":
        assert re.search(rf"\b{_supported()[-1]} \(the best this CPU runs", line), line
    else:
        assert "baseline (forced by PROTOSEG_CPU_ISA" in line, line
    assert f"runs here: {', '.join(_supported())}" in line, line


# ---------------------------------------------------------------- no wide instruction outside its variant


def _call_graph(so):
    """Functions of so's .text: {start: (name, wide registers used, direct call/jump targets)}, or None if stripped."""
    names = {}
    for line in subprocess.run(["nm", "-C", "--defined-only", so], capture_output=True, text=True).stdout.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "TtWw":
            names[int(parts[0], 16)] = parts[2]
    if not names:
        return None
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-j", ".text", so], capture_output=True, text=True).stdout
    funcs, cur = {}, None
    for line in dis.splitlines():
        m = re.match(r"^([0-9a-f]+) <", line)
        if m:
            cur = int(m.group(1), 16)
            funcs[cur] = (names.get(cur, "?"), set(), set())
            continue
        if cur is None or ":\t" not in line:
            continue
        funcs[cur][1].update(r for r in ("ymm", "zmm") if f"%{r}" in line)
        m = re.search(r"\t(?:call|jmp|j[a-z]+)\s+([0-9a-f]+) <", line)
        if m:
            funcs[cur][2].add(int(m.group(1), 16))
    return funcs


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or not shutil.which("objdump")
                    or not shutil.which("nm"), reason="needs an x86-64 build and binutils")
def test_wide_instructions_only_in_their_variants():
    """No code the baseline kernels can reach uses AVX registers, and none the AVX2 kernels reach uses AVX-512
    ones: an inline function compiled in several variants is kept once by the linker, which must keep a copy
    every caller can run (csrc/cpu/cpu_isa.h). Follows direct calls and jumps from each variant's functions."""
    funcs = _call_graph(_C.__file__)
    if funcs is None:
        pytest.skip("the library has no symbol table (stripped)")
    starts = sorted(funcs)

    def owner(addr):  # the function an address lies in
        i = bisect.bisect_right(starts, addr) - 1
        return starts[i] if i >= 0 else None

    def variant(name):
        return "avx512" if "protoseg::avx512::" in name else "avx2" if "protoseg::avx2::" in name else None

    wide = {"baseline": {"ymm", "zmm"}, "avx2": {"zmm"}}
    for isa, banned in wide.items():
        # roots: our code of this variant (the baseline one: all protoseg code outside the variant namespaces)
        todo = [a for a, (n, _, _) in funcs.items()
                if (variant(n) == isa if isa != "baseline" else "protoseg::" in n and variant(n) is None)]
        seen = set(todo)
        while todo:
            a = todo.pop()
            name, regs, targets = funcs[a]
            assert not regs & banned, f"{name} uses {sorted(regs & banned)} but {isa} code calls it"
            for t in targets:
                f = owner(t)
                # the dispatcher's calls into the other variants are the point of it
                if f is not None and f not in seen and variant(funcs[f][0]) in (None, isa if isa != "baseline" else None):
                    seen.add(f)
                    todo.append(f)
    used = {v: any(variant(n) == v and ("ymm" if v == "avx2" else "zmm") in r for n, r, _ in funcs.values())
            for v in ("avx2", "avx512")}
    assert all(used.values()), f"no wide registers in the variant kernels ({used}): built without their flags?"


def test_bench_providers_name_a_variant():
    """bench/run.py's cpu@<variant> providers: parsed, ordered, and unavailable where this CPU lacks the variant."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import run

    assert run.split_isa("cpu@avx2") == ("cpu", "avx2") and run.split_isa("official") == ("official", None)
    names = ["cpu@avx512", "cpu", "official", "cpu@baseline", "cpu@avx2"]
    assert sorted(names, key=run._provider_order) == ["official", "cpu", "cpu@baseline", "cpu@avx2", "cpu@avx512"]
    for isa in ISAS:
        reason = run.provider_unavailable(f"cpu@{isa}", "cpu")
        assert (reason is None) == (isa in _supported()), (isa, reason)
    with pytest.raises(SystemExit, match="unknown provider 'cpu@sse9'"):
        run.main(["--providers", "cpu@sse9", "--sizes", "tiny"])
