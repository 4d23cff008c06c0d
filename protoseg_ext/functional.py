"""Functional API (SPEC section 6): seg logits, prototype learning, PPC/PPD losses.

Each function checks its arguments (a ``ValueError`` names the bad one), picks
a backend (see :mod:`protoseg_ext.backends`) and either runs the eager oracle
(``"reference"``) or composes the four fused ops, never materialising the
``(N, C*K)`` similarity matrix.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import backends, reference

__all__ = ["proto_seg_logits", "prototype_learning", "proto_losses", "sample_gumbel"]

sample_gumbel = reference.sample_gumbel

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_feats_protos(feats, protos):
    if not isinstance(feats, torch.Tensor) or feats.dim() != 2:
        raise ValueError(f"feats must be a (N, D) tensor, got {_shape(feats)}")
    if not isinstance(protos, torch.Tensor) or protos.dim() != 3:
        raise ValueError(f"protos must be a (C, K, D) tensor, got {_shape(protos)}")
    if feats.dtype not in _FLOATS:
        raise ValueError(f"feats must be float32, float64, float16 or bfloat16, got {feats.dtype}")
    if protos.dtype not in _FLOATS:
        raise ValueError(f"protos must be float32, float64, float16 or bfloat16, got {protos.dtype}")
    if protos.shape[2] != feats.shape[1]:
        raise ValueError(
            f"protos must be (C, K, D) with D = feats.shape[1] = {feats.shape[1]}, got shape {tuple(protos.shape)}"
        )
    if protos.shape[0] < 1 or not 1 <= protos.shape[1] <= 256:
        raise ValueError(f"protos must have C >= 1 classes and 1 <= K <= 256 prototypes, got shape {tuple(protos.shape)}")
    if protos.device != feats.device:
        raise ValueError(f"protos is on {protos.device} but feats is on {feats.device}; all inputs must be on one device")


def _check_labels(x, name, n, device, lo_hi, ignore_index):
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.shape[0] != n:
        raise ValueError(f"{name} must be a ({n},) integer tensor (one entry per row of feats), got {_shape(x)}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but feats is on {device}; all inputs must be on one device")
    # A host-side range check costs a sync on a GPU (there a device-side assert
    # or the kernel's own check reports it) and breaks a torch.compile graph.
    if x.device.type == "cpu" and not _compiling() and x.numel():
        lo, hi = lo_hi
        bad = ((x < lo) | (x >= hi)) & (x != ignore_index)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{name}[{i}] = {int(x[i])} is outside [{lo}, {hi}) and is not ignore_index ({ignore_index})"
            )


def _shape(x):
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _check_ignore_index(ignore_index, num_targets):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if 0 <= ignore_index < num_targets:
        raise ValueError(
            f"ignore_index {ignore_index} is a valid prototype target in [0, C*K = {num_targets}): it would "
            "silently drop those pixels; use a negative ignore_index (e.g. -1), or one >= C*K"
        )


def proto_seg_logits(feats: torch.Tensor, protos: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``seg (N, C)``: ``max_k`` cosine similarity of each pixel to each class's prototypes.

    ``feats (N, D)`` L2-normalised, ``protos (C, K, D)``. Differentiable w.r.t.
    ``feats`` (the gradient reaches the arg-max prototype only).
    """
    _check_feats_protos(feats, protos)
    be = backends.resolve(backend, feats.device)
    if be.name == "reference":
        return reference.proto_seg_logits(feats, protos.to(feats.dtype))
    empty = torch.empty(0, dtype=torch.long, device=feats.device)
    seg, _, _, _ = be.similarity(feats, protos, empty, -1, 1.0, True, False, False)
    return seg


def _check_learning_args(gamma, assign, gumbel_noise, sinkhorn_iters, sinkhorn_eps, N, K, device):
    if assign not in ("gumbel", "argmax"):
        raise ValueError(f"assign must be 'gumbel' or 'argmax', got {assign!r}")
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if isinstance(sinkhorn_iters, bool) or not isinstance(sinkhorn_iters, int) or sinkhorn_iters < 1:
        raise ValueError(f"sinkhorn_iters must be an int >= 1, got {sinkhorn_iters!r}")
    if not float(sinkhorn_eps) > 0:
        raise ValueError(f"sinkhorn_eps must be > 0, got {sinkhorn_eps}")
    if gumbel_noise is not None:
        if not isinstance(gumbel_noise, torch.Tensor) or tuple(gumbel_noise.shape) != (N, K):
            raise ValueError(f"gumbel_noise must be a ({N}, {K}) tensor, got {_shape(gumbel_noise)}")
        if not gumbel_noise.dtype.is_floating_point:
            raise ValueError(f"gumbel_noise must be a floating tensor, got {gumbel_noise.dtype}")
        if gumbel_noise.device != device:
            raise ValueError(f"gumbel_noise is on {gumbel_noise.device} but feats is on {device}")


def assign_and_sums(be, feats, protos, gt, pred, own, assign, gumbel_noise, ignore_index, sinkhorn_iters, sinkhorn_eps,
                    normalize=False):
    """Fused steps 2a-2d of SPEC 2 from the own-class scores ``own (N, K)``.

    ``pred (N,)`` is the predicted class of each pixel (``seg.argmax(dim=1)``):
    only pixels with ``pred == gt`` take part in the prototype sums.

    Returns ``target (N,)`` and the per-prototype ``sums (C*K, D)`` and
    ``counts (C*K,)`` of the correctly predicted pixels (``feats`` rows
    L2-normalised first when ``normalize``).
    """
    C, K = protos.shape[0], protos.shape[1]
    gt = gt.long()
    Q = be.sinkhorn(own, gt, C, ignore_index, sinkhorn_iters, sinkhorn_eps)  # (N, K), zero rows = ignored
    best, idx = Q.max(dim=1)
    valid = best > 0  # Sinkhorn rows sum to 1; zero rows are ignored or non-finite pixels
    base = gt.clamp(min=0) * K
    target = torch.where(valid, base + idx, torch.full_like(gt, ignore_index))
    if assign == "gumbel":
        if gumbel_noise is None:
            gumbel_noise = reference.sample_gumbel(Q.shape, device=Q.device)
        hard = (Q + gumbel_noise.to(Q.dtype)).argmax(dim=1)  # hard gumbel_softmax(Q, tau) sample
    else:
        hard = idx
    correct = pred == gt
    slot = torch.where(valid & correct, base + hard, torch.full_like(gt, -1))
    sums, counts = be.prototype_sums(feats, slot, C * K, normalize)
    return target, sums, counts


@torch.no_grad()
def prototype_learning(
    feats: torch.Tensor,
    protos: torch.Tensor,
    gt: torch.Tensor,
    seg: torch.Tensor,
    gamma: float = 0.999,
    assign: str = "gumbel",
    gumbel_noise: Optional[torch.Tensor] = None,
    ignore_index: int = -1,
    sinkhorn_iters: int = 3,
    sinkhorn_eps: float = 0.05,
    update: bool = True,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sinkhorn assignment and momentum update of the prototypes (SPEC 2); no autograd.

    ``feats (N, D)``, ``protos (C, K, D)``, ``gt (N,)`` integer, ``seg (N, C)``
    the logits whose arg-max decides which pixels are correct. Returns
    ``target (N,) int64`` (``gt*K + k``, ``ignore_index`` where ignored) and
    ``new_protos (C, K, D)``, L2-normalised (unchanged but normalised when
    ``update=False``). ``protos`` itself is not modified.
    """
    _check_feats_protos(feats, protos)
    N = feats.shape[0]
    C, K = protos.shape[0], protos.shape[1]
    _check_ignore_index(ignore_index, C * K)
    _check_labels(gt, "gt", N, feats.device, (0, C), ignore_index)
    if not isinstance(seg, torch.Tensor) or tuple(seg.shape) != (N, C):
        raise ValueError(f"seg must be a ({N}, {C}) tensor of logits, got {_shape(seg)}")
    if seg.device != feats.device:
        raise ValueError(f"seg is on {seg.device} but feats is on {feats.device}")
    _check_learning_args(gamma, assign, gumbel_noise, sinkhorn_iters, sinkhorn_eps, N, K, feats.device)
    be = backends.resolve(backend, feats.device)
    if be.name == "reference":
        target, new = reference.prototype_learning(
            feats, protos, gt, seg, gamma, assign, gumbel_noise, ignore_index, sinkhorn_iters, sinkhorn_eps, update
        )
        return target, new
    _, _, _, own = be.similarity(feats, protos, gt.long(), ignore_index, 1.0, False, False, True)
    target, sums, counts = assign_and_sums(
        be, feats, protos, gt, seg.argmax(dim=1), own, assign, gumbel_noise, ignore_index, sinkhorn_iters,
        sinkhorn_eps,
    )
    if not update:
        counts = torch.zeros_like(counts)
    return target, be.prototype_ema(protos, sums, counts, gamma)


def losses_from_scores(lse, own, target, K, ignore_index, temperature):
    """PPC and PPD from the row log-sum-exp ``lse (N,)`` and own-class scores ``own (N, K)``.

    ``target`` lies in the class whose scores ``own`` holds. Means over the
    non-ignored pixels; 0 (with zero gradient) when there are none.
    """
    valid = target != ignore_index
    k = torch.where(valid, target % K, torch.zeros_like(target))
    s_t = own.gather(1, k[:, None])[:, 0]  # S[n, target[n]]
    n_valid = valid.sum().clamp(min=1).to(lse.dtype)
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    ppc = torch.where(valid, lse - s_t / temperature, zero).sum() / n_valid
    ppd = torch.where(valid, (1 - s_t) ** 2, zero).sum() / n_valid
    return ppc, ppd


def proto_losses(
    feats: torch.Tensor,
    protos: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -1,
    temperature: float = 1.0,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """PPC and PPD losses (SPEC 3), differentiable w.r.t. ``feats``.

    ``target (N,)`` in ``[0, C*K)`` or ``ignore_index``. PPC is the
    cross-entropy of ``S / temperature`` over all ``C*K`` prototypes; PPD the
    mean of ``(1 - S[n, target[n]])^2``. Never materialises ``(N, C*K)``.
    """
    _check_feats_protos(feats, protos)
    N = feats.shape[0]
    C, K = protos.shape[0], protos.shape[1]
    _check_ignore_index(ignore_index, C * K)
    _check_labels(target, "target", N, feats.device, (0, C * K), ignore_index)
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    be = backends.resolve(backend, feats.device)
    if be.name == "reference":
        return reference.proto_losses(feats, protos, target, ignore_index, temperature)
    target = target.long()
    labels = torch.where(target != ignore_index, target.div(K, rounding_mode="floor"), target)
    _, _, lse, own = be.similarity(feats, protos, labels, ignore_index, temperature, False, True, True)
    return losses_from_scores(lse, own, target, K, ignore_index, temperature)
