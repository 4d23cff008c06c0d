"""Functional API: seg logits, prototype learning, PPC/PPD losses, and the training objective.

The semantics are those of docs/design.md; the public names are README's "Usage".

Each function checks its arguments (:mod:`protoseg_ext.checks`; a
``ValueError`` names the bad one), picks a backend (see
:mod:`protoseg_ext.backends`) and composes its ops, the same way on every
backend: the fused ones never materialise the ``(N, C*K)`` similarity matrix.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import backends, checks, reference

__all__ = ["proto_seg_logits", "prototype_learning", "proto_losses", "sample_gumbel", "draw_slots",
           "official_objective", "PPC_WEIGHT", "PPD_WEIGHT"]

sample_gumbel = reference.sample_gumbel

# the official Cityscapes weights of the two prototype losses (docs/design.md, "Losses")
PPC_WEIGHT = 0.01
PPD_WEIGHT = 0.001


def official_objective(ce, ppc, ppd, ppc_weight: float = PPC_WEIGHT, ppd_weight: float = PPD_WEIGHT):
    """The training objective of the official ProtoSeg: ``ce + 0.01 * ppc + 0.001 * ppd`` (by default).

    ``ce`` the segmentation cross-entropy, ``ppc`` and ``ppd`` the prototype losses (as
    :func:`proto_losses` or ``ProtoSegHead``'s ``loss_ppc`` / ``loss_ppd`` give them). The
    trainer, the benchmarks and the selftest all call this one function.
    """
    return ce + ppc_weight * ppc + ppd_weight * ppd


def proto_seg_logits(feats: torch.Tensor, protos: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``seg (N, C)``: ``max_k`` cosine similarity of each pixel to each class's prototypes.

    ``feats (N, D)`` L2-normalised, ``protos (C, K, D)``. Differentiable w.r.t.
    ``feats`` (the gradient reaches the arg-max prototype only).
    """
    checks.feats_protos(feats, protos)
    be = backends.resolve(backend, feats.device)
    return be.similarity(feats, protos, seg=True).seg


def draw_slots(Q: torch.Tensor, gumbel_noise: torch.Tensor, mode: str) -> torch.Tensor:
    """The update slot of each row of the Sinkhorn plan ``Q (N, K)`` under noise ``g (N, K)``.

    ``"gumbel"`` (official, the hard ``gumbel_softmax(Q, tau)``): ``argmax(Q + g)``.
    ``"sample"``: ``argmax(log Q + g)``, the Gumbel-max draw from the
    categorical distribution ``Q[n]``; ``log 0 = -inf`` entries are never drawn
    (their score stays -inf whatever ``g``), so a row with any positive entry
    draws one of those. All-zero rows (ignored pixels) give slot 0; callers mask them.
    """
    g = gumbel_noise.to(Q.dtype)
    if mode == "gumbel":
        return (Q + g).argmax(dim=1)
    if mode == "sample":
        neg_inf = torch.full_like(Q, float("-inf"))
        return torch.where(Q > 0, Q.log() + g, neg_inf).argmax(dim=1)
    raise ValueError(f"mode must be 'gumbel' or 'sample', got {mode!r}")


def assign_slots(be, own, gt, pred, num_classes, *, mode: str = "gumbel", gumbel_noise=None, ignore_index: int = -1,
                 sinkhorn_iters: int = 3, sinkhorn_eps: float = 0.05):
    """Sinkhorn, targets and update slots (docs/design.md, "Prototype learning", steps 1-4) from
    the own-class scores ``own (N, K)``, on backend ``be``.

    ``pred (N,)`` is the predicted class of each pixel (``seg.argmax(dim=1)``):
    only pixels with ``pred == gt`` take part in the prototype sums. Returns
    ``target (N,)`` and ``slot (N,)``: the prototype ``c*K + k`` each pixel
    adds to, -1 for pixels that add to none. ``mode`` picks the slot from the
    Sinkhorn row ``Q[n]`` (see :func:`draw_slots`):
    ``"gumbel"`` (official) ``argmax(Q + g)``, ``"argmax"`` ``argmax(Q)``,
    ``"sample"`` ``argmax(log Q + g)``, a draw with probabilities ``Q[n]``;
    ``g`` is ``gumbel_noise`` or, when None, drawn here from torch's global
    generator (one ``(N, K)`` draw for every backend).
    """
    K = own.shape[1]
    gt = gt.long()
    Q = be.sinkhorn(own, gt, num_classes, ignore_index, sinkhorn_iters, sinkhorn_eps)  # (N, K), zero rows = ignored
    best, idx = Q.max(dim=1)
    valid = best > 0  # Sinkhorn rows sum to 1; zero rows are ignored or non-finite pixels
    # (few launches on a GPU: the fills are Python scalars; in argmax mode the target's column is the slot's)
    cls = gt.clamp(min=0)
    column = idx.add(cls, alpha=K)  # gt * K + k
    target = torch.where(valid, column, ignore_index)
    if mode != "argmax" and gumbel_noise is None:
        gumbel_noise = reference.sample_gumbel(Q.shape, device=Q.device)
    if mode != "argmax":
        column = draw_slots(Q, gumbel_noise, mode).add(cls, alpha=K)
    slot = torch.where(valid & (pred == gt), column, -1)
    return target, slot


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
    """Sinkhorn assignment and momentum update of the prototypes (docs/design.md, "Prototype learning"); no autograd.

    ``feats (N, D)``, ``protos (C, K, D)``, ``gt (N,)`` integer, ``seg (N, C)``
    the logits whose arg-max decides which pixels are correct. Returns
    ``target (N,) int64`` (``gt*K + k``, ``ignore_index`` where ignored) and
    ``new_protos (C, K, D)``, L2-normalised (unchanged but normalised when
    ``update=False``). ``protos`` itself is not modified.

    ``assign`` chooses the prototype each pixel updates, from its Sinkhorn row
    ``Q[n]`` (which sums to 1): ``"gumbel"`` (official) ``argmax(Q + g)``,
    close to uniform since ``Q`` lies in [0, 1] and ``g`` is standard Gumbel;
    ``"argmax"`` ``argmax(Q)`` (deterministic, the PPC/PPD target);
    ``"sample"`` ``argmax(log Q + g)``, a true draw with ``P(k) = Q[n, k]``
    (entries with ``Q = 0`` are never drawn). ``gumbel_noise`` ``(N, K)``
    fixes ``g`` (one stream shared by every backend); None draws it from
    torch's global generator.
    """
    checks.feats_protos(feats, protos)
    N = feats.shape[0]
    C, K = protos.shape[0], protos.shape[1]
    checks.ignore_index(ignore_index, C * K)
    checks.labels(gt, "gt", feats, C, ignore_index)
    if not isinstance(seg, torch.Tensor) or tuple(seg.shape) != (N, C):
        raise ValueError(f"seg must be a ({N}, {C}) tensor of logits, got {checks.shape_of(seg)}")
    checks.same_device(feats, seg, "feats", "seg")
    checks.gamma(gamma)
    checks.assign(assign)
    checks.sinkhorn_settings(sinkhorn_iters, sinkhorn_eps)
    checks.gumbel_noise(gumbel_noise, N, K, feats.device)
    be = backends.resolve(backend, feats.device)
    gt = gt.long()
    own = be.similarity(feats, protos, gt, ignore_index=ignore_index, seg=False, own=True).own
    target, slot = assign_slots(be, own, gt, seg.argmax(dim=1), C, mode=assign, gumbel_noise=gumbel_noise,
                                ignore_index=ignore_index, sinkhorn_iters=sinkhorn_iters, sinkhorn_eps=sinkhorn_eps)
    sums, counts = be.prototype_sums(feats, slot, C * K)
    if not update:
        counts = torch.zeros_like(counts)
    return target, be.prototype_ema(protos, sums, counts, gamma)


def proto_losses(
    feats: torch.Tensor,
    protos: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -1,
    temperature: float = 1.0,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """PPC and PPD losses (docs/design.md, "Losses"), differentiable w.r.t. ``feats``.

    ``target (N,)`` in ``[0, C*K)`` or ``ignore_index``. PPC is the
    cross-entropy of ``S / temperature`` over all ``C*K`` prototypes; PPD the
    mean of ``(1 - S[n, target[n]])^2``. Never materialises ``(N, C*K)``
    (except on the ``"reference"`` backend).
    """
    checks.feats_protos(feats, protos)
    C, K = protos.shape[0], protos.shape[1]
    checks.ignore_index(ignore_index, C * K)
    checks.labels(target, "target", feats, C * K, ignore_index)
    checks.positive(temperature, "temperature")
    be = backends.resolve(backend, feats.device)
    target = target.long()
    labels = torch.where(target != ignore_index, target.div(K, rounding_mode="floor"), target)
    sim = be.similarity(feats, protos, labels, ignore_index=ignore_index, temperature=temperature, seg=False, lse=True,
                        own=True)
    return be.ppc_ppd(sim.lse, sim.own, target, ignore_index, temperature)
