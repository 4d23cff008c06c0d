"""What the tests, the benchmarks and ``python -m protoseg_ext.selftest`` share.

* :func:`make_problem` - the one random problem factory (feats, protos, labels, logits);
* :func:`backend_params` / the :func:`device_backend` fixture - every (device, backend)
  pair present, the reference included (Triton on CPU tensors when TRITON_INTERPRET=1);
* :func:`official_head_step` - a ProtoSegHead training step written with
  :mod:`protoseg_ext.reference` alone, the oracle of the head;
* ``test_backends`` - the op x backend table (a pytest module shipped with the
  package, so that an installed wheel can check its GPU backends).

Choose ``TRITON_INTERPRET`` before importing this module (it imports triton
through the backends only when asked).
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

from .. import backends, reference

__all__ = ["make_problem", "backend_params", "device_backend", "assert_close_rel", "official_head_step", "TOL"]

TOL = dict(atol=1e-5, rtol=1e-5)


def make_problem(N=300, D=16, C=5, K=4, *, seed=0, ignore_frac=0.1, ignore_index=-1, dtype=torch.float32,
                 device="cpu", skew=False):
    """Random L2-normalised ``feats (N, D)``, ``protos (C, K, D)``, labels ``gt (N,)`` and logits ``seg (N, C)``.

    ``seg`` is the head's per-class max plus noise, with a third of the labeled
    pixels forced correct, so that some pixels update the prototypes and some
    do not. ``skew`` puts a third of the pixels in class 0. Generated in
    float64 on the CPU, then cast and moved.
    """
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    protos = F.normalize(torch.randn(C, K, D, generator=g, dtype=torch.float64), dim=-1)
    if skew:
        gt = torch.where(torch.rand(N, generator=g) < 0.35, 0, torch.randint(0, C, (N,), generator=g))
    else:
        gt = torch.randint(0, C, (N,), generator=g)
    gt = torch.where(torch.rand(N, generator=g) < ignore_frac, torch.full_like(gt, ignore_index), gt)
    seg = torch.einsum("nd,ckd->nkc", feats, protos).amax(1) + 0.05 * torch.randn(N, C, generator=g, dtype=torch.float64)
    fix = (torch.rand(N, generator=g) < 0.33) & (gt != ignore_index)
    seg[fix, gt[fix].clamp(min=0)] += 10.0
    return feats.to(dtype).to(device), protos.to(dtype).to(device), gt.to(device), seg.to(dtype).to(device)


def backend_params() -> List[Tuple[str, str]]:
    """Every (device, backend) pair that can run here: each backend on each device it supports."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(d, b) for d in devices for b in backends.BACKENDS if backends.get_backend(b).usable(torch.device(d))]


def assert_close_rel(a, b, tol=2e-2):
    """``max |a - b| <= tol * max |b|``: low-precision results judged at the scale of the values."""
    a, b = a.double(), b.double()
    scale = b.abs().max().clamp(min=1e-30)
    err = (a - b).abs().max()
    assert err <= tol * scale, f"max abs error {err.item():.3g} > {tol} * max |ref| = {(tol * scale).item():.3g}"


def official_head_step(head, feats, gt, gumbel_noise=None):
    """The official head's step on ``head``'s parameters, with :mod:`protoseg_ext.reference` alone.

    Returns ``(seg (B, C, H, W), ppc, ppd, target, new_prototypes)``; differentiable
    w.r.t. ``feats`` and the LayerNorms' parameters. ``gt`` at feature resolution.
    """
    B, D, H, W = feats.shape
    C = head.num_classes
    x = F.normalize(head.feat_norm(feats.permute(0, 2, 3, 1).reshape(-1, D)), p=2, dim=-1)
    protos = F.normalize(head.prototypes, p=2, dim=-1).to(x.dtype)
    seg = head.mask_norm(reference.proto_seg_logits(x, protos))
    gt = gt.reshape(-1).long()
    ign = head.target_ignore
    gt = torch.where(gt == head.ignore_index, torch.full_like(gt, ign), gt)
    with torch.no_grad():
        target, new = reference.prototype_learning(
            x.detach(), protos, gt, seg.detach(), head.gamma, head.assign, gumbel_noise, ign, head.sinkhorn_iters,
            head.sinkhorn_eps, update=head.training and head.update_prototype,
        )
    ppc, ppd = reference.proto_losses(x, protos, target, ign, head.temperature)
    return seg.reshape(B, H, W, C).permute(0, 3, 1, 2), ppc, ppd, target, new


def _device_backend_fixture():
    import pytest

    params = backend_params()

    @pytest.fixture(params=params, ids=[f"{d}-{b}" for d, b in params])
    def device_backend(request):
        """``(device, backend)``: every backend present, on every device it runs on."""
        return request.param

    return device_backend


try:  # a pytest fixture when pytest is installed (tests, selftest); the rest needs no pytest
    device_backend = _device_backend_fixture()
except ImportError:  # pragma: no cover
    device_backend = None
