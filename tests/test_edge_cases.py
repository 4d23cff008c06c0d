"""The legal corner cases of SPEC 5-6 and the errors of bad input."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import protoseg_ext.functional as PF
from protoseg_ext import reference as R
from conftest import make_problem

TOL = dict(atol=1e-5, rtol=1e-5)


def _check_learning(f, p, gt, seg, backend, **kw):
    t, new = PF.prototype_learning(f, p, gt, seg, assign="argmax", gamma=0.5, backend=backend, **kw)
    tr, newr = R.prototype_learning(f, p, gt, seg, assign="argmax", gamma=0.5, **kw)
    assert torch.equal(t, tr)
    torch.testing.assert_close(new, newr, **TOL)
    assert torch.isfinite(new).all()
    return t, new


def test_absent_class_keeps_its_prototypes(device_backend):
    device, backend = device_backend
    f, p, gt, seg = make_problem(N=200, C=5, K=3, device=device)
    gt = torch.where(gt == 2, torch.full_like(gt, 4), gt)  # class 2 absent
    _, new = _check_learning(f, p, gt, seg, backend)
    torch.testing.assert_close(new[2], p[2], **TOL)


def test_single_pixel_class(device_backend):
    device, backend = device_backend
    f, p, gt, seg = make_problem(N=200, C=5, K=3, device=device)
    gt = torch.where(gt == 1, torch.full_like(gt, 0), gt)
    gt[17] = 1  # exactly one pixel of class 1, predicted correctly
    seg[17, 1] += 100
    t, new = _check_learning(f, p, gt, seg, backend)
    assert 3 <= int(t[17]) < 6
    assert not torch.allclose(new[1], p[1])


def test_class_with_every_pixel_mispredicted(device_backend):
    device, backend = device_backend
    f, p, gt, seg = make_problem(N=200, C=5, K=3, device=device)
    seg[:, 3] = -1e4  # class 3 never predicted
    t, new = _check_learning(f, p, gt, seg, backend)
    torch.testing.assert_close(new[3], p[3], **TOL)  # no correct pixel: unchanged
    assert ((t >= 9) & (t < 12)).sum() == (gt == 3).sum()  # but its pixels still get targets


@pytest.mark.parametrize("ignore_index", [-1, 255])
def test_all_pixels_ignored(device_backend, ignore_index):
    device, backend = device_backend
    f, p, gt, seg = make_problem(N=64, C=5, K=3, device=device)
    gt = torch.full_like(gt, ignore_index)
    t, new = _check_learning(f, p, gt, seg, backend, ignore_index=ignore_index)
    assert (t == ignore_index).all()
    torch.testing.assert_close(new, p, **TOL)
    a = f.clone().requires_grad_()
    ppc, ppd = PF.proto_losses(a, p, t, ignore_index=ignore_index, backend=backend)
    assert ppc.item() == 0.0 and ppd.item() == 0.0
    (ppc + ppd).backward()
    assert torch.equal(a.grad, torch.zeros_like(a))


def test_empty_batch(device_backend):
    device, backend = device_backend
    f, p, gt, seg = make_problem(N=0, C=5, K=3, device=device)
    seg_out = PF.proto_seg_logits(f, p, backend=backend)
    assert seg_out.shape == (0, 5)
    t, new = _check_learning(f, p, gt, seg, backend)
    assert t.shape == (0,)
    a = f.clone().requires_grad_()
    ppc, ppd = PF.proto_losses(a, p, t, backend=backend)
    assert ppc.item() == 0.0 and ppd.item() == 0.0
    (ppc + ppd).backward()
    assert a.grad.shape == (0, f.shape[1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rows_never_reach_the_prototypes(device_backend, bad):
    device, backend = device_backend
    f, p, gt, seg = make_problem(N=300, C=4, K=3, device=device)
    seg[:, :] = 0
    seg[torch.arange(300), gt.clamp(min=0)] = 1  # every pixel correct
    f[5, 3] = bad
    f[gt == 2] = bad  # a whole class of bad rows
    t, new = _check_learning(f, p, gt, seg, backend)
    assert torch.isfinite(new).all()
    assert t[5] == -1 and (t[gt == 2] == -1).all()
    torch.testing.assert_close(new[2], p[2], **TOL)  # its class saw only bad rows
    assert not torch.allclose(new[0], p[0])  # the others still learn


def test_labels_out_of_range_raise(device_backend):
    device, backend = device_backend
    f, p, gt, seg = make_problem(N=50, C=5, K=3, device=device)
    gt[7] = 5
    with pytest.raises(ValueError, match=r"gt\[7\] = 5 is outside \[0, 5\)"):
        PF.prototype_learning(f, p, gt, seg, backend=backend)
    gt[7] = -3
    with pytest.raises(ValueError, match="gt"):
        PF.prototype_learning(f, p, gt, seg, backend=backend)
    t = torch.zeros(50, dtype=torch.long, device=device)
    t[3] = 15  # C*K = 15
    with pytest.raises(ValueError, match=r"target\[3\] = 15"):
        PF.proto_losses(f, p, t, backend=backend)


def test_kernel_label_check_without_python_check():
    """The C++ op checks labels itself (the path torch.compile takes)."""
    from protoseg_ext import backends

    be = backends.get_backend("cpu")
    f, p, gt, _ = make_problem(N=20, C=3, K=2)
    gt[4] = 9
    with pytest.raises(ValueError, match="outside"):
        be.similarity(f, p, gt, -1, 1.0, False, False, True)
    with pytest.raises(ValueError, match="outside"):
        be.sinkhorn(torch.zeros(20, 2), gt, 3, -1, 3, 0.05)
    with pytest.raises(ValueError, match="slot"):
        be.prototype_sums(f, torch.full((20,), 6), 6)


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
    from conftest import make_problem
    import protoseg_ext.functional as PF
    f, p, gt, seg = make_problem(N=20000, D=64, C=19, K=10, skew=True)
    torch.manual_seed(0)
    t, new = PF.prototype_learning(f, p, gt, seg, gamma=0.9, backend="cpu")
    a = f.clone().requires_grad_()
    ppc, ppd = PF.proto_losses(a, p, t, backend="cpu")
    (ppc + ppd).backward()
    seg2 = PF.proto_seg_logits(f, p, backend="cpu")
    torch.save({"t": t, "new": new, "ppc": ppc.detach(), "grad": a.grad, "seg": seg2}, sys.argv[3])
    """
)


def test_same_bits_with_one_and_two_threads(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "run.py"
    script.write_text(_THREADS_SCRIPT)
    outs = []
    for n in (1, 2):
        out = tmp_path / f"out{n}.pt"
        env = dict(os.environ, OMP_NUM_THREADS=str(n))
        subprocess.run([sys.executable, str(script), str(n), here, str(out)], check=True, env=env)
        outs.append(torch.load(out))
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), k
