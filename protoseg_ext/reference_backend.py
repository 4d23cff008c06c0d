"""The ``reference`` backend: the ops of the contract (:class:`protoseg_ext.backends.Backend`) in
plain PyTorch, from the eager oracle :mod:`protoseg_ext.reference`; any device, materialises
``(N, C*K)``.

The head's embedding is composed here (the compiled backends fuse it into their kernels):
:meth:`ReferenceBackend.embed_similarity` and :meth:`ReferenceBackend.embed_prototype_sums` run
:func:`embed` and ``similarity`` / ``prototype_sums`` ``embed_chunk`` pixels at a time, each chunk
under activation checkpointing, so no (N, D) copy of the map is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import checks, reference
from .backends import Backend, EmbedSimilarityOut, FeatNorm, SimilarityOut

__all__ = ["ReferenceBackend", "embed", "embed_stats", "pixel_chunks", "composed_mask_norm"]


def embed(feats: torch.Tensor, feat_norm: FeatNorm = None) -> torch.Tensor:
    """The head's embedding rows before the L2 normalisation, ``(N, D)``: ``feats`` (N, D) or the map
    (B, D, H, W) as rows (pixel n = b*H*W + h*W + w; a copy unless channels-last), LayerNorm'd."""
    x = feats if feats.dim() == 2 else feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    if feat_norm is not None:
        w, b, eps = feat_norm
        x = F.layer_norm(x, (x.shape[1],), w, b, eps)
    return x


@torch.no_grad()
def embed_stats(feats: torch.Tensor, feat_norm: FeatNorm = None) -> torch.Tensor:
    """``embed_similarity``'s ``stats`` (3, N) in the accumulation dtype: each pixel's LayerNorm mean,
    1 / sqrt(biased variance + eps) and 1 / max(||y||, 1e-12) of the LayerNorm's output y (without
    the LayerNorm: 0, 1 and 1 / max(||x||, 1e-12)), computed in float64; NaN in all three for a
    pixel with a NaN or inf entry, or whose sum of squares overflows the accumulation dtype."""
    acc = checks.acc_dtype(feats.dtype)
    x = embed(feats).double()
    if feat_norm is not None:
        w, b, eps = feat_norm
        mean = x.mean(dim=1)
        rstd = torch.rsqrt(x.var(dim=1, unbiased=False) + eps)
        y = (x - mean[:, None]) * rstd[:, None] * w.double() + b.double()
    else:
        mean, rstd, y = torch.zeros_like(x[:, 0]), torch.ones_like(x[:, 0]), x
    sq = (y * y).sum(dim=1)
    inv = 1.0 / sq.sqrt().clamp_min(1e-12)
    big = torch.finfo(acc).max
    bad = ~torch.isfinite(x).all(dim=1) | ~((x * x).sum(dim=1) <= big) | ~(sq <= big)
    out = torch.stack((mean, rstd, inv)).to(acc)
    out[:, bad] = float("nan")
    return out


def pixel_chunks(feats: torch.Tensor, chunk: int):
    """``(n0, n1, piece)`` for consecutive pixel ranges ``[n0, n1)`` of ``feats`` (N, D) or the map
    (B, D, H, W), each ``piece`` a view (whole image rows of the map) of at most about ``chunk``
    pixels (at least one image row)."""
    if feats.dim() == 2:
        for n0 in range(0, feats.shape[0], chunk):
            yield n0, min(feats.shape[0], n0 + chunk), feats[n0:n0 + chunk]
        return
    B, _, H, W = feats.shape
    step = max(1, chunk // max(W, 1))
    for b in range(B):
        for h0 in range(0, H, step):
            h1 = min(H, h0 + step)
            n0 = (b * H + h0) * W
            yield n0, n0 + (h1 - h0) * W, feats[b:b + 1, :, h0:h1]


def composed_mask_norm(seg, weight, bias, eps, batch):
    """:meth:`Backend.mask_norm` in PyTorch: ``F.layer_norm`` over C as ``(batch, C, N // batch)``, and
    its arg-max over C."""
    out = F.layer_norm(seg, (seg.shape[1],), weight, bias, eps)
    pred = out.detach().argmax(dim=1)
    return out.reshape(batch, -1, seg.shape[1]).permute(0, 2, 1), pred


class ReferenceBackend(Backend):
    """The ops in plain PyTorch (:mod:`protoseg_ext.reference`): any device, materialises ``(N, C*K)``."""

    name = "reference"
    # pixels per chunk of the composed embedding (embed_similarity, embed_prototype_sums)
    embed_chunk = 1 << 16

    def device_reasons(self, device):
        return []

    def similarity(self, feats, protos, labels=None, *, ignore_index=-1, temperature=1.0, seg=True, lse=False,
                   own=False, cache_bytes=0, normalize=False):
        checks.similarity_args(feats, protos, labels, ignore_index, temperature, own)
        return SimilarityOut(*reference.similarity_outputs(feats, protos, labels, ignore_index, temperature, seg, lse,
                                                           own, normalize))

    def embed_similarity(self, feats, feat_norm: FeatNorm, protos, labels=None, *, ignore_index=-1, temperature=1.0,
                         seg=True, lse=False, own=False, cache_bytes=0) -> SimilarityOut:
        """Composed from :meth:`similarity`, ``embed_chunk`` pixels at a time (its outputs are per
        pixel), each chunk under activation checkpointing: the embedding of a chunk lives only
        while it is scored, and the backward recomputes it (and the chunk's scores) instead of
        keeping an (N, D) copy."""
        w, b, eps = feat_norm if feat_norm is not None else (None, None, 0.0)

        def score(x, w, b, lab):
            rows = embed(x, None if w is None else (w, b, eps))
            return tuple(self.similarity(rows, protos, lab, ignore_index=ignore_index, temperature=temperature,
                                         seg=seg, lse=lse, own=own, cache_bytes=cache_bytes, normalize=True))

        grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (feats, w, b))
        pieces = []
        for n0, n1, x in pixel_chunks(feats, self.embed_chunk):
            lab = None if labels is None else labels[n0:n1]
            pieces.append(checkpoint(score, x, w, b, lab, use_reentrant=False) if grads else score(x, w, b, lab))
        if len(pieces) == 1:
            out = SimilarityOut(*pieces[0])
        elif not pieces:  # no pixels
            out = SimilarityOut(*score(feats, w, b, labels))
        else:
            out = SimilarityOut(*(torch.cat(p) for p in zip(*pieces)))
        any_out = seg or lse or own
        stats = (embed_stats(feats, feat_norm) if any_out
                 else torch.empty(0, dtype=checks.acc_dtype(feats.dtype), device=feats.device))
        return EmbedSimilarityOut(*out, stats)

    def sinkhorn(self, own, labels, num_classes, ignore_index, iters, eps):
        checks.sinkhorn_args(own, labels, num_classes, ignore_index, iters, eps)
        return reference.sinkhorn(own, labels, num_classes, ignore_index, iters, eps)

    def prototype_sums(self, feats, slot, num_slots, normalize=False):
        checks.prototype_sums_args(feats, slot, num_slots)
        return reference.prototype_sums(feats, slot, num_slots, normalize)

    def embed_prototype_sums(self, feats, feat_norm: FeatNorm, slot, num_slots, stats=None):
        """Composed ``embed_chunk`` pixels at a time: no (N, D) copy. The oracle checks ``stats``
        and computes the embedding from ``feats`` alone."""
        checks.embed_stats(checks.embed_feats(feats), stats)
        out = None
        for n0, n1, x in pixel_chunks(feats, self.embed_chunk):
            s, c = self.prototype_sums(embed(x, feat_norm), slot[n0:n1], num_slots, True)
            out = (s, c) if out is None else (out[0] + s, out[1] + c)
        return out if out is not None else self.prototype_sums(embed(feats, feat_norm), slot, num_slots, True)

    def prototype_ema(self, protos, sums, counts, gamma):
        checks.prototype_ema_args(protos, sums, counts, gamma)
        return reference.prototype_ema(protos, sums, counts, gamma)

    def mask_norm(self, seg, weight, bias, eps, batch):
        return composed_mask_norm(seg, weight, bias, eps, batch)

    def ppc_ppd(self, lse, own, target, ignore_index, temperature):
        checks.ppc_ppd_args(lse, own, target, temperature)
        return reference.losses_from_scores(lse, own, target, ignore_index, temperature)
