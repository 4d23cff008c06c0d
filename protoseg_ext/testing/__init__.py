"""What the tests, the benchmarks and ``python -m protoseg_ext.selftest`` share.

* :func:`make_problem` - the random problem of the unit tests (feats, protos, labels, logits);
* :func:`make_inputs` - the realistic one of the benchmarks and the selftest (pixels
  clustered around their class's prototypes, Cityscapes-like label skew, full resolution
  built in chunks);
* :func:`backend_params` / the :func:`device_backend` fixture - every (device, backend)
  pair present, the reference included (Triton on CPU tensors when TRITON_INTERPRET=1);
* :func:`official_head_step` - a ProtoSegHead training step written with
  :mod:`protoseg_ext.reference` alone, the oracle of the head;
* :func:`embed_problem`, :func:`as_layout`, :func:`embed_reference` - the head's map, as the
  backbone may lay it out, and the oracle of its embedding (the embedding ops' tests);
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

__all__ = ["make_problem", "make_inputs", "loss_scores", "class_weights", "backend_params", "device_backend", "assert_close_rel", "official_head_step", "TOL",
           "embed_problem", "as_layout", "embed_reference"]

TOL = dict(atol=1e-5, rtol=1e-5)


def embed_problem(B, D, H, W, C, K, seed=0, offset=0.5, dtype=torch.float64, device="cpu"):
    """A map (B, D, H, W), LayerNorm weight and bias (D,), protos (C, K, D) (drawn in float64, cast to
    ``dtype``) and labels (B*H*W,) with ignored pixels (-1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, H, W, generator=g, dtype=torch.float64) * 2 + offset
    w = torch.randn(D, generator=g, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)
    p = F.normalize(torch.randn(C, K, D, generator=g, dtype=torch.float64), dim=-1)
    gt = torch.randint(-1, C, (B * H * W,), generator=g)
    return [t.to(device, dtype) for t in (x, w, b, p)] + [gt.to(device)]


def as_layout(x, layout):
    """The (B, D, H, W) map ``x`` as the backbone may give it: ``"nchw"``, ``"channels_last"`` or ``"rows"`` (N, D)."""
    return {"nchw": x, "channels_last": x.contiguous(memory_format=torch.channels_last),
            "rows": x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])}[layout]


def embed_reference(x, ln):
    """The head's embedding rows (N, D), the official way: feats (N, D) or (B, D, H, W) as rows, LayerNorm
    over D (``ln`` = (weight, bias, eps), or None), L2 normalisation."""
    rows = x if x.dim() == 2 else x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    if ln is not None:
        rows = F.layer_norm(rows, (rows.shape[1],), ln[0], ln[1], ln[2])
    return F.normalize(rows, dim=-1)


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


LABELS = ("uniform", "skewed")


def class_weights(C: int, labels: str) -> torch.Tensor:
    """Probabilities (C,) of the labelled classes.

    ``uniform``: 1/C each. ``skewed``: Cityscapes-like, class 0 (road) takes
    35% of all pixels (with 10% ignored, 35/90 of the labelled ones) and the
    rest decay as 1/rank.
    """
    if labels == "uniform" or C == 1:
        return torch.full((C,), 1.0 / C, dtype=torch.float64)
    if labels != "skewed":
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    rest = 1.0 / torch.arange(1, C, dtype=torch.float64)
    rest = rest / rest.sum() * (1 - 0.35 / 0.9)
    return torch.cat([torch.tensor([0.35 / 0.9], dtype=torch.float64), rest])


def make_inputs(size, labels: str = "uniform", *, device="cpu", seed: int = 0, dtype=torch.float32,
                chunk: int = 1 << 16, map_shape=None):
    """The realistic problem of the benchmarks and the selftest: ``size = (N, D, C, K, ...)`` ->
    ``feats (N, D)`` L2-normalised, ``protos (C, K, D)`` L2-normalised, ``gt (N,)`` int64.

    10% of ``gt`` is -1 (ignored). Each pixel's feature is a noisy copy of one
    prototype of its class (cosine about 0.7), so Sinkhorn, the arg-max and the
    "correct" mask see realistic data. Built in chunks so that the full-resolution
    sizes need no more than the output. With ``map_shape = (B, D, H, W)`` (B*H*W = N) the
    features come as that NCHW map instead (pixel n = b*H*W + h*W + w), written in place: the same
    values, and no (N, D) copy.
    """
    N, D, C, K = size[:4]
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(C, K, D, generator=g), dim=-1)
    gt = torch.multinomial(class_weights(C, labels), N, replacement=True, generator=g)
    gt[torch.rand(N, generator=g) < 0.1] = -1
    if map_shape is not None:
        B, Dm, H, W = map_shape
        if Dm != D or B * H * W != N:
            raise ValueError(f"map_shape must be (B, {D}, H, W) with B*H*W = {N}, got {tuple(map_shape)}")
        feats = torch.empty(B, D, H * W, dtype=dtype, device=device)
    else:
        feats = torch.empty(N, D, dtype=dtype, device=device)
    flat = protos.reshape(C * K, D)
    for lo in range(0, N, chunk):
        hi = min(N, lo + chunk)
        lab = gt[lo:hi].clamp(min=0)
        k = torch.randint(0, K, (hi - lo,), generator=g)
        x = F.normalize(flat[lab * K + k] + torch.randn(hi - lo, D, generator=g) / D**0.5, dim=-1)
        if map_shape is None:
            feats[lo:hi] = x.to(device=device, dtype=dtype)
            continue
        n0 = lo
        while n0 < hi:  # the chunk's pieces within each image
            n1 = min(hi, (n0 // (H * W) + 1) * (H * W))
            p0 = n0 % (H * W)
            feats[n0 // (H * W), :, p0:p0 + n1 - n0] = x[n0 - lo:n1 - lo].t().to(device=device, dtype=dtype)
            n0 = n1
    if map_shape is not None:
        feats = feats.view(map_shape)
    return feats, protos.to(device=device, dtype=dtype), gt.to(device)


def loss_scores(N, K, *, C=4, dtype=torch.float32, ignore_index=-1, seed=0, device="cpu"):
    """``ppc_ppd``'s inputs as the head makes them: ``lse (N,)`` in [1, 4), own-class scores ``own (N, K)``
    in [-1, 1), prototype targets ``target (N,)`` in ``[0, C*K)`` with about 30% ``ignore_index``."""
    g = torch.Generator().manual_seed(seed)
    own = (torch.rand(N, K, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    lse = (torch.rand(N, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    target = torch.randint(0, C * K, (N,), generator=g)
    target[torch.rand(N, generator=g) < 0.3] = ignore_index
    return lse.to(device), own.to(device), target.to(device)


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
    master = F.normalize(head.prototypes, p=2, dim=-1)
    protos = master.to(x.dtype)  # official under autocast: the einsum casts them; the update stays float32
    seg = head.mask_norm(reference.proto_seg_logits(x, protos))
    gt = gt.reshape(-1).long()
    ign = head.target_ignore
    gt = torch.where(gt == head.ignore_index, torch.full_like(gt, ign), gt)
    update = head.training and head.update_prototype
    with torch.no_grad():
        target, _, sums, counts = reference.prototype_learning(
            x.detach(), protos, gt, seg.detach(), head.gamma, head.assign, gumbel_noise, ign, head.sinkhorn_iters,
            head.sinkhorn_eps, update=False, return_sums=True,  # the update below, on the float32 prototypes
        )
        new = reference.prototype_ema(master, sums, counts, head.gamma) if update else master
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
