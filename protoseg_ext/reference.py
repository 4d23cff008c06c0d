"""Eager, readable statement of ProtoSeg's prototype machinery (official mode).

This module is the oracle of every test: each fused kernel must agree with it.
It follows the public reference code of "Rethinking Semantic Segmentation: A
Prototype View" (Zhou et al., CVPR 2022) step by step, including its per-class
Python loop, its boolean-index copies and the full ``(N, C*K)`` similarity
matrix, so that it is easy to check against the paper and the official code.

Shapes: ``feats (N, D)`` L2-normalised pixel embeddings, ``protos (C, K, D)``
L2-normalised prototypes, ``gt (N,)`` integer labels with ``ignore_index`` for
unlabeled pixels.

Two deliberate, documented choices go beyond the official code:

* Gumbel noise for the official ``assign="gumbel"`` mode (and for
  ``assign="sample"``, ours: ``argmax(log L + g)``, a draw from the row L) is drawn once for all
  pixels, as an ``(N, K)`` tensor of standard Gumbel noise
  (:func:`sample_gumbel`), instead of class by class inside the loop. The
  distribution of the assignment is the same; drawing it once lets every
  backend use one random stream, so a seeded run gives the same prototypes on
  every backend.
* A pixel whose feature row is not finite (NaN or inf) is treated as ignored by
  prototype learning: it joins no Sinkhorn problem, updates no prototype and
  gets ``target = ignore_index``. In the official code such a row makes the
  whole Sinkhorn matrix of its class NaN (the first normalisation divides by a
  NaN sum), so the class's prototype sums and counts are NaN, its update test
  ``torch.sum(n) > 0`` is False and its prototypes are left unchanged for that
  step, while every pixel of the class gets the target of prototype 0 (arg-max
  of a NaN row) and the row's PPC logits are NaN. The prototypes stay finite;
  the NaN reaches the network through the loss instead. Here the row's class
  is still updated from its finite pixels.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .checks import acc_dtype

__all__ = [
    "similarity",
    "similarity_outputs",
    "prototype_sums",
    "proto_seg_logits",
    "sinkhorn",
    "sinkhorn_class",
    "sample_gumbel",
    "prototype_learning",
    "momentum_update",
    "proto_losses",
    "l2_normalize",
    "mask_norm",
]


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x / max(||x||_2, 1e-12)`` along the last dimension (official ``l2_normalize``)."""
    return F.normalize(x, p=2, dim=-1)


def similarity(feats: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """``S (N, C*K)``: cosine similarity of every pixel with every prototype.

    Column ``c*K + k`` is prototype ``k`` of class ``c``.
    """
    C, K, D = protos.shape
    return feats @ protos.reshape(C * K, D).t()


def similarity_outputs(feats, protos, labels, ignore_index=-1, temperature=1.0, compute_seg=True, compute_lse=False,
                       compute_own=False, normalize=False):
    """The outputs of the fused ``similarity`` op, from the full ``S`` (see csrc/protoseg.cpp).

    ``(seg (N, C), argk (N, C) uint8, lse (N,), own (N, K))``, each ``(0,)`` when
    not asked for; computed in float32 (float64 for float64 feats), ``seg`` in
    feats' dtype. ``normalize`` L2-normalises the rows of ``feats`` first.
    Differentiable w.r.t. ``feats`` by autograd.
    """
    work = acc_dtype(feats.dtype)
    C, K, D = protos.shape
    N = feats.shape[0]
    x = feats.to(work)
    if normalize:
        x = l2_normalize(x)
    S = similarity(x, protos.to(work))
    masks = S.view(N, C, K)
    none = x.new_empty((0,))
    seg = argk = lse = own = none
    if compute_seg:
        seg, argk = masks.max(dim=2)
        seg, argk = seg.to(feats.dtype), argk.to(torch.uint8)
    if compute_lse:
        lse = torch.logsumexp(S / temperature, dim=1)
    if compute_own:
        labels = labels.long()
        keep = labels != ignore_index
        own = masks[torch.arange(N, device=x.device), torch.where(keep, labels, 0)] * keep[:, None]
    return seg, argk, lse, own


def proto_seg_logits(feats: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """``seg (N, C)``: for each class, the similarity of its nearest prototype.

    Official: ``masks = einsum('nd,kmd->nmk', feats, protos)``,
    ``seg = amax(masks, dim=1)``; the gradient flows to the arg-max prototype.
    """
    masks = torch.einsum("nd,kmd->nmk", feats, protos)  # (N, K, C)
    return torch.amax(masks, dim=1)


def sinkhorn_class(q0: torch.Tensor, iters: int = 3, eps: float = 0.05) -> torch.Tensor:
    """Sinkhorn-Knopp of one class, exactly in the official order.

    ``q0 (n_c, K)`` similarities of the class's pixels to its K prototypes.
    Returns ``L (n_c, K)`` whose rows sum to 1. Computed in float32 (float64
    for float64 input): ``exp(1 / 0.05)`` overflows float16.
    """
    work = acc_dtype(q0.dtype)
    L = torch.exp(q0.to(work) / eps).t()  # (K, n_c)
    K, B = L.shape
    L = L / torch.sum(L)
    for _ in range(iters):
        L = L / torch.sum(L, dim=1, keepdim=True)  # each prototype column sums to 1
        L = L / K
        L = L / torch.sum(L, dim=0, keepdim=True)  # each pixel row sums to 1
        L = L / B
    L = L * B
    return L.t()


def sinkhorn(
    own: torch.Tensor,
    gt: torch.Tensor,
    num_classes: int,
    ignore_index: int = -1,
    iters: int = 3,
    eps: float = 0.05,
) -> torch.Tensor:
    """Sinkhorn for every class, one class at a time (official loop).

    ``own (N, K)`` is each pixel's similarity to the K prototypes of its own
    class ``gt[n]``. Returns ``Q (N, K)``: row n is the Sinkhorn assignment of
    pixel n within its class; rows of ignored pixels (label ``ignore_index`` or
    a non-finite ``own`` row) are zero.
    """
    work = acc_dtype(own.dtype)
    Q = torch.zeros(own.shape, dtype=work, device=own.device)
    ok = torch.isfinite(own).all(dim=1)
    for c in range(num_classes):
        sel = (gt == c) & ok
        if not bool(sel.any()):
            continue
        Q[sel] = sinkhorn_class(own[sel], iters, eps)
    return Q


def sample_gumbel(shape, *, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard Gumbel noise ``-log(Exp(1))``, as ``F.gumbel_softmax`` draws it."""
    e = torch.empty(shape, dtype=torch.float32, device=device).exponential_(generator=generator)
    return -e.log()


def momentum_update(old_value: torch.Tensor, new_value: torch.Tensor, momentum: float) -> torch.Tensor:
    """Official EMA: ``momentum * old + (1 - momentum) * new``."""
    return momentum * old_value + (1 - momentum) * new_value


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
    return_sums: bool = False,
):
    """Official ``prototype_learning`` (docs/design.md, "Prototype learning"), with a Python loop over classes.

    Returns ``(target (N,) int64, new_protos (C, K, D))``; with
    ``return_sums=True`` also ``(sums (C, K, D), counts (C, K))``, the
    per-prototype feature sums and pixel counts that drive the EMA.
    """
    if assign not in ("gumbel", "argmax", "sample"):
        raise ValueError(f"assign must be 'gumbel', 'argmax' or 'sample', got {assign!r}")
    C, K, D = protos.shape
    N = feats.shape[0]
    gt = gt.long()
    work = acc_dtype(feats.dtype)
    f32 = feats.to(work)
    P = protos.to(work)
    masks = torch.einsum("nd,kmd->nmk", f32, P)  # (N, K, C)
    pred = seg.argmax(dim=1)
    correct = gt == pred
    ok = torch.isfinite(feats).all(dim=1)
    if assign != "argmax" and gumbel_noise is None:
        gumbel_noise = sample_gumbel((N, K), device=feats.device)

    target = torch.full((N,), ignore_index, dtype=torch.long, device=feats.device)
    new = P.clone()
    sums = torch.zeros(C, K, D, dtype=work, device=feats.device)
    counts = torch.zeros(C, K, dtype=work, device=feats.device)
    for c in range(C):
        sel = (gt == c) & ok
        if not bool(sel.any()):
            continue
        L = sinkhorn_class(masks[sel][:, :, c], sinkhorn_iters, sinkhorn_eps)  # (n_c, K)
        idx = L.argmax(dim=1)
        target[sel] = idx + c * K
        if assign == "gumbel":
            # hard gumbel_softmax(L, tau): argmax of (L + g) / tau == argmax of L + g
            hard = (L + gumbel_noise[sel].to(L.dtype)).argmax(dim=1)
        elif assign == "sample":
            # Gumbel-max draw from the row L (a distribution): argmax of log L + g, never an L = 0 entry
            s = torch.where(L > 0, L.log(), torch.full_like(L, float("-inf")))
            hard = (s + gumbel_noise[sel].to(L.dtype)).argmax(dim=1)
        else:
            hard = idx
        q = F.one_hot(hard, K).to(work)  # (n_c, K)
        m = correct[sel].to(work)[:, None]  # only correctly predicted pixels
        m_q = q * m
        f = m_q.t() @ (f32[sel] * m)  # (K, D)
        n = m_q.sum(dim=0)  # (K,)
        sums[c] = f
        counts[c] = n
        if update and bool((n > 0).any()):
            f = l2_normalize(f)
            new[c, n > 0] = momentum_update(new[c, n > 0], f[n > 0], gamma)
    new = l2_normalize(new).to(protos.dtype)
    if return_sums:
        return target, new, sums, counts
    return target, new


def proto_losses(
    feats: torch.Tensor,
    protos: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -1,
    temperature: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """PPC and PPD (docs/design.md, "Losses") on the full ``(N, C*K)`` similarity matrix.

    PPC: cross-entropy of ``S / temperature`` with ``target``, mean over
    non-ignored pixels. PPD: mean of ``(1 - S[n, target[n]])^2``. A batch with
    no valid pixel gives 0 for both (the official code would give NaN).
    """
    work = acc_dtype(feats.dtype)
    S = similarity(feats.to(work), protos.to(work))
    target = target.long()
    valid = target != ignore_index
    if not bool(valid.any()):
        zero = S.sum() * 0.0
        return zero, zero
    ppc = F.cross_entropy(S / temperature, target, ignore_index=ignore_index)
    logits = S[valid].gather(1, target[valid][:, None])
    ppd = (1 - logits).pow(2).mean()
    return ppc, ppd


def losses_from_scores(lse: torch.Tensor, own: torch.Tensor, target: torch.Tensor, ignore_index: int = -1,
                       temperature: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """PPC and PPD (as :func:`proto_losses`) from the row log-sum-exp ``lse (N,)`` of ``S / temperature``
    and the own-class scores ``own (N, K)``; ``target (N,)`` a prototype index ``c*K + k`` of the class
    whose scores ``own`` holds (``k = target mod K``), or ``ignore_index``. Means over the pixels with
    ``target != ignore_index``; 0 (with zero gradient) when there are none. The ``ppc_ppd`` op."""
    K = own.shape[1]
    valid = target != ignore_index
    k = target.long().remainder(K)  # in [0, K) for any target, ignore_index included
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    # S[n, target[n]], 0 for an ignored pixel: its scores (even NaN) never reach a loss or a gradient
    s_t = torch.where(valid, own.gather(1, k[:, None])[:, 0], zero)
    n_valid = valid.sum().clamp(min=1).to(lse.dtype)
    ppc = torch.where(valid, lse - s_t / temperature, zero).sum() / n_valid
    ppd = torch.where(valid, (1 - s_t) ** 2, zero).sum() / n_valid
    return ppc, ppd


def prototype_ema(protos: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, gamma: float) -> torch.Tensor:
    """The momentum update (docs/design.md, "Prototype learning", steps 5-6) from per-prototype ``sums (C, K, D)`` and ``counts (C, K)``.

    Used by the exact distributed mode, where sums and counts are all-reduced
    before the momentum update.
    """
    C, K, D = protos.shape
    work = acc_dtype(protos.dtype)
    new = protos.to(work).clone()
    sums = sums.reshape(C, K, D).to(work)
    hit = counts.reshape(C, K) > 0
    new[hit] = momentum_update(new[hit], l2_normalize(sums[hit]), gamma)
    return l2_normalize(new).to(protos.dtype)


def prototype_sums(feats: torch.Tensor, slot: torch.Tensor, num_slots: int, normalize: bool = False):
    """Per-prototype ``sums (num_slots, D)`` and ``counts (num_slots,)`` of the rows with
    ``slot >= 0`` and finite features (L2-normalised first when ``normalize``)."""
    work = acc_dtype(feats.dtype)
    x = feats.to(work)
    take = (slot >= 0) & torch.isfinite(x).all(dim=1)
    x = x[take]
    if normalize:
        x = l2_normalize(x)
    idx = slot[take].long()
    sums = torch.zeros(num_slots, feats.shape[1], dtype=work, device=feats.device).index_add_(0, idx, x)
    counts = torch.zeros(num_slots, dtype=work, device=feats.device).index_add_(0, idx, torch.ones_like(idx, dtype=work))
    return sums, counts


def mask_norm(seg: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, batch: int) -> torch.Tensor:
    """The official head's ``mask_norm``: ``LayerNorm(C)`` over each pixel's seg logits.

    ``seg (N, C)`` with ``N = batch * H * W`` -> ``(batch, C, H * W)``, as the
    official ``rearrange(seg, "(b h w) k -> b k h w")`` lays it out.
    """
    N, C = seg.shape
    out = F.layer_norm(seg, (C,), weight, bias, eps)
    return out.reshape(batch, N // batch, C).permute(0, 2, 1)
