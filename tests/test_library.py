"""torch.library registration: opcheck of every compiled op (schema, fake kernel, autograd)."""

import pytest
import torch

from protoseg_ext.testing import make_problem
import protoseg_ext  # noqa: F401  (registers the ops)

OPS = torch.ops.protoseg_ext


def _cases(device):
    f, p, gt, _ = make_problem(N=40, D=8, C=3, K=2, device=device)
    fg = f.clone().requires_grad_()
    own = torch.rand(40, 2, device=device)
    slot = torch.randint(-1, 6, (40,), device=device)
    sums = torch.randn(6, 8, device=device)
    counts = torch.tensor([0.0, 2, 1, 0, 5, 1], device=device)
    N = f.shape[0]
    gs, gl, go = torch.randn(N, 3, device=device), torch.randn(N, device=device), torch.randn(N, 2, device=device)
    _, argk, lse, _, _ = OPS.similarity(f, p, gt, -1, 1.0, True, True, True)
    probs = OPS.similarity(f, p, gt, -1, 1.0, False, True, False, 1 << 20)[4]
    target = torch.where(gt >= 0, gt * 2 + 1, gt)  # prototype targets c*K + k, K = 2
    assert probs.shape == (N, 6)
    fmap = (torch.randn(2, 8, 4, 5, device=device) + 0.3).requires_grad_()  # the head's map: 40 pixels
    w = torch.randn(8, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    _, eargk, else_, _, eprobs, estats = OPS.embed_similarity(fmap.detach(), w.detach(), b.detach(), 1e-5, p, gt, -1,
                                                             1.0, True, True, True, 1 << 20)
    return [
        (OPS.embed_similarity, (fmap, w, b, 1e-5, p, gt, -1, 0.7, True, True, True)),
        (OPS.embed_similarity, (fmap, None, None, 1e-5, p, gt, -1, 1.0, True, True, False, 1 << 20)),
        (OPS.embed_similarity_backward, (gs, gl, go, fmap.detach(), w.detach(), b.detach(), 1e-5, p, gt, eargk, else_,
                                         -1, 1.0)),
        (OPS.embed_similarity_backward, (gs, gl, go, fmap.detach(), w.detach(), b.detach(), 1e-5, p, gt, eargk, else_,
                                         -1, 1.0, eprobs)),
        (OPS.embed_similarity_backward, (gs, gl, go, fmap.detach(), w.detach(), b.detach(), 1e-5, p, gt, eargk, else_,
                                         -1, 1.0, eprobs, estats)),  # the forward's statistics reused
        (OPS.embed_prototype_sums, (fmap.detach(), w.detach(), b.detach(), 1e-5, slot, 6)),
        (OPS.embed_prototype_sums, (fmap.detach(), w.detach(), b.detach(), 1e-5, slot, 6, estats)),
        (OPS.similarity, (fg, p, gt, -1, 1.0, True, True, True)),
        (OPS.similarity, (fg, p, gt, -1, 0.5, False, True, True)),
        (OPS.similarity, (fg, p, gt, -1, 1.0, True, False, False)),
        (OPS.similarity, (f.half(), p.half(), gt, -1, 1.0, True, True, True)),
        (OPS.similarity, (fg, p, gt, -1, 0.5, True, True, True, 1 << 20)),  # softmax kept for the backward
        (OPS.similarity, (fg, p, gt, -1, 0.5, True, True, True, 100)),  # budget too small: recompute
        (OPS.similarity, (fg * 2, p, gt, -1, 0.5, True, True, True, 1 << 20, True)),  # rows normalised inside
        (OPS.similarity_backward, (gs, gl, go, f, p, gt, argk, lse, -1, 1.0)),
        (OPS.similarity_backward, (gs, None, None, f, p, gt, argk, lse, -1, 1.0)),
        (OPS.similarity_backward, (gs, gl, go, f, p, gt, argk, lse, -1, 1.0, probs)),
        (OPS.similarity_backward, (gs, gl, go, f * 2, p, gt, argk, lse, -1, 1.0, None, True)),
        (OPS.sinkhorn, (own, gt, 3, -1, 3, 0.05)),
        (OPS.prototype_sums, (f, slot, 6)),
        (OPS.prototype_sums, (f * 3, slot, 6, True)),
        (OPS.prototype_ema, (p, sums, counts, 0.9)),
        (OPS.ppc_ppd, (lse.detach().clone().requires_grad_(), own.clone().requires_grad_(), target, -1, 0.7)),
        (OPS.ppc_ppd, (lse.double(), own.double().requires_grad_(), gt.int(), 255, 1.0)),  # -1 takes part
        (OPS.ppc_ppd_backward, (torch.tensor(0.3, device=device), torch.tensor(-2.0, device=device), own, target,
                                torch.tensor(7.0, device=device), -1, 0.7)),
    ]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_opcheck_every_op(device):
    for op, args in _cases(device):
        torch.library.opcheck(op, args)


def test_every_schema_is_registered_with_cpu_kernels():
    for name in ("similarity", "similarity_backward", "sinkhorn", "prototype_sums", "prototype_ema", "mask_norm",
                 "mask_norm_backward", "embed_similarity", "embed_similarity_backward", "embed_prototype_sums",
                 "ppc_ppd", "ppc_ppd_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"protoseg_ext::{name}", "CPU"), name
