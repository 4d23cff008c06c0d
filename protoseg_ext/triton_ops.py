"""The ``"triton"`` backend: the ops of ``csrc/protoseg.cpp`` as ``torch.ops.protoseg_triton``.

``similarity``, ``similarity_backward``, ``sinkhorn``, ``prototype_sums``,
``prototype_ema``, the PPC and PPD losses (``ppc_ppd``, ``ppc_ppd_backward``),
and the head's embedding fused into the similarity: ``embed_similarity``,
``embed_similarity_backward``, ``embed_prototype_sums``.
Each op is a ``torch.library.custom_op`` with the C++ schema: same arguments,
outputs, dtypes and meaning. Two arguments are accepted and met simply: the
plain ``similarity`` never keeps its softmax cache (``cache_bytes``), so its
``probs`` is always ``(0,)`` and its backward recomputes S tile by tile;
``normalize`` L2-normalises the rows before the kernels (and the backward
chains the gradient through it). The
kernels live in ``protoseg_ext.kernels``. Fake kernels and the autograd of
``similarity`` and ``embed_similarity`` are the shared ones of
:mod:`protoseg_ext.ops`, so ``torch.compile(fullgraph=True)`` traces through
these ops and the backwards are ``protoseg_triton::similarity_backward`` and
``protoseg_triton::embed_similarity_backward``.

The ``embed_*`` ops take ``feats`` as the backbone gives it: ``(N, D)`` rows
or a ``(B, D, H, W)`` map read as it lies (NCHW planes or channels-last;
pixel n = b*H*W + h*W + w; a map whose (H, W) plane has no single pixel
stride is copied first), with the optional LayerNorm over D (``ln_weight``,
``ln_bias`` (D,), ``ln_eps``) and the L2 normalisation done in the kernels'
registers (:mod:`protoseg_ext.kernels.embed`), ``EMBED_CHUNK`` pixels at a
time: nothing of size (N, D) is allocated besides the returned gradient, which
has feats' shape, layout and dtype (d ln_weight / d ln_bias in the
parameters' dtype, ``(0,)`` without the LayerNorm). Within ``cache_bytes``
(``compute_lse`` on, N x C*K values of the accumulation dtype fit) the
forward keeps S itself as ``probs`` (the scores, column ``c*K + k``: this
backend's cache holds S, not softmax(S / t), which its backward forms from
``lse``) and ``embed_similarity_backward`` given it reads S instead of
recomputing it: no GEMM there, and given the forward's ``stats`` too, no
read of the map. ``embed_similarity`` also returns
each pixel's statistics ``stats (5, N)`` (written by the programs that compute
them, no extra pass); ``embed_similarity_backward`` and
``embed_prototype_sums`` given them (checked by :func:`checks.embed_stats`)
skip their statistics pass over the map.

The ops run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was
set before triton was imported (the tests use this). Argument errors raise
``ValueError`` naming the argument (:mod:`protoseg_ext.checks`). A label
outside ``[0, C)`` that is not ``ignore_index`` raises too: on CPU tensors at
once, on a GPU through a device-side assert (no host synchronisation). Every
launch runs on the device of its tensors.

``prototype_sums`` and ``embed_prototype_sums`` are deterministic (sorted
segmented reduction, no float atomics; the embedding's chunks added in order)
when ``torch.are_deterministic_algorithms_enabled()``; otherwise they add the
rows with float atomics (one pass, no sort; the last bits of the sums may vary
between runs). Counts are exact either way. The gradients of the LayerNorm's
parameters are per-program partials summed by ``torch.sum``: deterministic.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks, ops
from .kernels import embed as _embed
from .kernels import labels as _labels
from .kernels import losses as _losses
from .kernels import prototype_update as _update
from .kernels import similarity as _similarity
from .kernels import sinkhorn as _sinkhorn
from .kernels.common import INTERPRET

__all__ = ["NAMESPACE", "EMBED_CHUNK", "similarity", "similarity_backward", "sinkhorn", "prototype_sums",
           "prototype_ema", "embed_similarity", "embed_similarity_backward", "embed_prototype_sums", "ppc_ppd",
           "ppc_ppd_backward"]

NAMESPACE = "protoseg_triton"
# pixels per chunk of the embed_* ops (their (chunk, D) buffers); None: kernels.embed.CHUNK_PIXELS (65,536).
# Read at each call, so tests can lower it.
EMBED_CHUNK: Optional[int] = None


def _on_device(t: Tensor, name: str):
    """The device guard of a launch: ``t``'s GPU (not the current one), after checking where ``t`` lives."""
    if INTERPRET:
        if t.device.type != "cpu":
            raise RuntimeError(f"{name} is on {t.device}: TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors")
        return contextlib.nullcontext()
    if t.device.type != "cuda":
        raise RuntimeError(
            f"{name} is on {t.device}: the Triton kernels run on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1)"
        )
    return torch.cuda.device(t.device)


def _check_labels(labels: Tensor, hi: int, ignore_index: int, name: str = "labels") -> None:
    """Every label in ``[0, hi)`` or ``ignore_index``: one kernel clears a flag on a bad one
    (kernels/labels.py); a GPU call asserts the flag on the device (no host sync), an interpreted
    call (CPU tensors) reads it and raises the host check's ``ValueError``, naming the first bad entry."""
    if not labels.numel():
        return
    ok = _labels.labels_ok(labels, hi, ignore_index)
    msg = f"{name}: a label is outside [0, {hi}) and is not ignore_index ({ignore_index})"
    if labels.device.type == "cuda":
        torch._assert_async(ok, msg)
    elif not bool(ok):
        checks.label_range(labels, name, hi, ignore_index)  # raises, naming the entry
        raise ValueError(msg)


@contextlib.contextmanager
def _launching(feats: Tensor, protos: Tensor, labels: Tensor, ignore_index: int, reads_labels: bool):
    """The launches of a similarity op: on feats' device (:func:`_on_device`), after the device-side label
    check when the kernels read the labels (``reads_labels``: own scores asked for, or their gradient)."""
    with _on_device(feats, "feats"):
        if reads_labels:
            _check_labels(labels, protos.shape[0], ignore_index)
        yield


def _no_probs(feats: Tensor) -> Tensor:
    """The ``probs`` output: ``(0,)`` in the accumulation dtype (the softmax cache is never kept)."""
    return feats.new_empty((0,), dtype=checks.acc_dtype(feats.dtype))


def _flat_lse(grad_lse: Optional[Tensor], lse: Tensor) -> Tuple[Optional[Tensor], Tensor]:
    """``grad_lse`` and ``lse`` as the kernels take them: ``(N,)`` (both as given without grad_lse)."""
    if grad_lse is None:
        return None, lse
    return grad_lse.reshape(-1), lse.reshape(-1)


def _normalize_backward(grad: Tensor, feats: Tensor) -> Tensor:
    """Gradient w.r.t. the raw rows of ``F.normalize(feats)`` given the gradient ``grad`` w.r.t. the result."""
    acc = checks.acc_dtype(feats.dtype)
    x, g = feats.to(acc), grad.to(acc)
    norm = x.norm(dim=1, keepdim=True)
    scale = norm.clamp_min(1e-12)  # F.normalize's eps: below it the rows are divided by eps (no radial part)
    u = x / scale
    radial = torch.where(norm > 1e-12, (g * u).sum(dim=1, keepdim=True), torch.zeros_like(norm))
    return ((g - u * radial) / scale).to(feats.dtype)


# ------------------------------------------------------------------ ops


@torch.library.custom_op(
    f"{NAMESPACE}::similarity",
    mutates_args=(),
    schema="(Tensor feats, Tensor protos, Tensor labels, int ignore_index, float temperature, bool compute_seg, "
    "bool compute_lse, bool compute_own, int cache_bytes=0, bool normalize=False) "
    "-> (Tensor seg, Tensor argk, Tensor lse, Tensor own, Tensor probs)",
)
def similarity(
    feats: Tensor,
    protos: Tensor,
    labels: Tensor,
    ignore_index: int,
    temperature: float,
    compute_seg: bool,
    compute_lse: bool,
    compute_own: bool,
    cache_bytes: int = 0,
    normalize: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One pass over S: ``seg (N, C)``, ``argk (N, C)`` uint8, ``lse (N,)``, ``own (N, K)``, ``probs (0,)``."""
    checks.similarity_args(feats, protos, labels, ignore_index, temperature, compute_own, label_values=False)
    with _launching(feats, protos, labels, ignore_index, compute_own):
        x = F.normalize(feats, p=2, dim=-1) if normalize else feats
        out = _similarity.similarity_forward(x, protos, labels, temperature, compute_seg, compute_lse, compute_own)
        return (*out, _no_probs(feats))


@torch.library.custom_op(
    f"{NAMESPACE}::similarity_backward",
    mutates_args=(),
    schema="(Tensor? grad_seg, Tensor? grad_lse, Tensor? grad_own, Tensor feats, Tensor protos, Tensor labels, "
    "Tensor argk, Tensor lse, int ignore_index, float temperature, Tensor? probs=None, bool normalize=False) -> Tensor",
)
def similarity_backward(
    grad_seg: Optional[Tensor],
    grad_lse: Optional[Tensor],
    grad_own: Optional[Tensor],
    feats: Tensor,
    protos: Tensor,
    labels: Tensor,
    argk: Tensor,
    lse: Tensor,
    ignore_index: int,
    temperature: float,
    probs: Optional[Tensor] = None,
    normalize: bool = False,
) -> Tensor:
    """``d feats (N, D)`` from the gradients of seg, lse and own; S recomputed tile by tile (``probs`` unused)."""
    has_own = grad_own is not None
    checks.similarity_args(feats, protos, labels, ignore_index, temperature, has_own, label_values=False)
    checks.similarity_backward_args(grad_seg, grad_lse, grad_own, feats, protos, argk, lse)
    with _launching(feats, protos, labels, ignore_index, has_own):
        x = F.normalize(feats, p=2, dim=-1) if normalize else feats
        g_lse, lse = _flat_lse(grad_lse, lse)
        grad = _similarity.similarity_backward(grad_seg, g_lse, grad_own, x, protos, labels, argk, lse, temperature)
        return _normalize_backward(grad, feats) if normalize else grad


@torch.library.custom_op(
    f"{NAMESPACE}::sinkhorn",
    mutates_args=(),
    schema="(Tensor own, Tensor labels, int num_classes, int ignore_index, int iters, float eps) -> Tensor",
)
def sinkhorn(own: Tensor, labels: Tensor, num_classes: int, ignore_index: int, iters: int, eps: float) -> Tensor:
    """Sinkhorn-Knopp of every class at once, segmented by label: ``Q (N, K)``, zero rows for ignored pixels."""
    checks.sinkhorn_args(own, labels, num_classes, ignore_index, iters, eps, label_values=False)
    with _on_device(own, "own"):
        _check_labels(labels, num_classes, ignore_index)
        return _sinkhorn.sinkhorn(own, labels, num_classes, iters, eps)


@torch.library.custom_op(
    f"{NAMESPACE}::prototype_sums",
    mutates_args=(),
    schema="(Tensor feats, Tensor slot, int num_slots, bool normalize=False) -> (Tensor sums, Tensor counts)",
)
def prototype_sums(feats: Tensor, slot: Tensor, num_slots: int, normalize: bool = False) -> Tuple[Tensor, Tensor]:
    """Per-prototype sums ``(num_slots, D)`` and counts ``(num_slots,)`` of the finite rows with ``slot >= 0``.

    Deterministic (sorted segmented reduction) when
    ``torch.are_deterministic_algorithms_enabled()``, else float atomics.
    """
    checks.prototype_sums_args(feats, slot, num_slots)
    with _on_device(feats, "feats"):
        x = F.normalize(feats, p=2, dim=-1) if normalize else feats
        deterministic = torch.are_deterministic_algorithms_enabled()
        return _update.prototype_sums(x, slot, num_slots, deterministic=deterministic)


@torch.library.custom_op(
    f"{NAMESPACE}::prototype_ema",
    mutates_args=(),
    schema="(Tensor protos, Tensor sums, Tensor counts, float gamma) -> Tensor",
)
def prototype_ema(protos: Tensor, sums: Tensor, counts: Tensor, gamma: float) -> Tensor:
    """``protos (C, K, D)`` -> L2-normalise(EMA(protos, normalise(sums))) where ``counts > 0``."""
    checks.prototype_ema_args(protos, sums, counts, gamma)
    with _on_device(protos, "protos"):
        return _update.prototype_ema(protos, sums, counts, gamma)


@torch.library.custom_op(
    f"{NAMESPACE}::ppc_ppd",
    mutates_args=(),
    schema="(Tensor lse, Tensor own, Tensor target, int ignore_index, float temperature) "
    "-> (Tensor ppc, Tensor ppd, Tensor count)",
)
def ppc_ppd(lse: Tensor, own: Tensor, target: Tensor, ignore_index: int, temperature: float
            ) -> Tuple[Tensor, Tensor, Tensor]:
    """PPC and PPD from ``lse (N,)`` and ``own (N, K)``, and the count of pixels that take part."""
    checks.ppc_ppd_args(lse, own, target, temperature)
    with _on_device(lse, "lse"):
        return _losses.ppc_ppd(lse, own, target, ignore_index, temperature)


@torch.library.custom_op(
    f"{NAMESPACE}::ppc_ppd_backward",
    mutates_args=(),
    schema="(Tensor grad_ppc, Tensor grad_ppd, Tensor own, Tensor target, Tensor count, int ignore_index, "
    "float temperature) -> (Tensor grad_lse, Tensor grad_own)",
)
def ppc_ppd_backward(grad_ppc: Tensor, grad_ppd: Tensor, own: Tensor, target: Tensor, count: Tensor,
                     ignore_index: int, temperature: float) -> Tuple[Tensor, Tensor]:
    """``grad_lse (N,)`` and ``grad_own (N, K)`` of ``ppc_ppd``; reads the upstream gradients on the device."""
    checks.ppc_ppd_backward_args(grad_ppc, grad_ppd, own, target, count, temperature)
    with _on_device(own, "own"):
        return _losses.ppc_ppd_backward(grad_ppc, grad_ppd, own, target, count, ignore_index, temperature)


# ------------------------------------------------------------------ the head's embedding fused in


@torch.library.custom_op(
    f"{NAMESPACE}::embed_similarity",
    mutates_args=(),
    schema="(Tensor feats, Tensor? ln_weight, Tensor? ln_bias, float ln_eps, Tensor protos, Tensor labels, "
    "int ignore_index, float temperature, bool compute_seg, bool compute_lse, bool compute_own, int cache_bytes=0) "
    "-> (Tensor seg, Tensor argk, Tensor lse, Tensor own, Tensor probs, Tensor stats)",
)
def embed_similarity(
    feats: Tensor,
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    ln_eps: float,
    protos: Tensor,
    labels: Tensor,
    ignore_index: int,
    temperature: float,
    compute_seg: bool,
    compute_lse: bool,
    compute_own: bool,
    cache_bytes: int = 0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``similarity`` of the head's embedding of ``feats`` (N, D) or (B, D, H, W), read as it lies:
    LayerNorm over D (with ``ln_weight``/``ln_bias``) and L2 normalisation fused into the kernel's tiles.
    Also ``stats (5, N)``: each pixel's statistics, written by the programs that compute them; ``probs``:
    S itself (N, C*K) where ``compute_lse`` and ``cache_bytes`` allow, else (0,)."""
    rows = checks.embed_feats(feats)
    checks.similarity_args(rows, protos, labels, ignore_index, temperature, compute_own, label_values=False)
    checks.feat_norm(rows, ln_weight, ln_bias, ln_eps)
    with _launching(feats, protos, labels, ignore_index, compute_own):
        N, CK = rows.shape[0], protos.shape[0] * protos.shape[1]
        if compute_lse and ops.cache_fits(N, CK, feats.dtype, cache_bytes):  # S kept for the backward
            probs = feats.new_empty((N, CK), dtype=checks.acc_dtype(feats.dtype))
        else:
            probs = _no_probs(feats)
        seg, argk, lse, own, stats = _embed.embed_similarity_forward(
            feats, ln_weight, ln_bias, ln_eps, protos, labels, temperature, compute_seg, compute_lse, compute_own,
            chunk=EMBED_CHUNK, scores=probs)
        return seg, argk, lse, own, probs, stats


@torch.library.custom_op(
    f"{NAMESPACE}::embed_similarity_backward",
    mutates_args=(),
    schema="(Tensor? grad_seg, Tensor? grad_lse, Tensor? grad_own, Tensor feats, Tensor? ln_weight, "
    "Tensor? ln_bias, float ln_eps, Tensor protos, Tensor labels, Tensor argk, Tensor lse, int ignore_index, "
    "float temperature, Tensor? probs=None, Tensor? stats=None) -> (Tensor grad_feats, Tensor grad_weight, "
    "Tensor grad_bias)",
)
def embed_similarity_backward(
    grad_seg: Optional[Tensor],
    grad_lse: Optional[Tensor],
    grad_own: Optional[Tensor],
    feats: Tensor,
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    ln_eps: float,
    protos: Tensor,
    labels: Tensor,
    argk: Tensor,
    lse: Tensor,
    ignore_index: int,
    temperature: float,
    probs: Optional[Tensor] = None,
    stats: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(d feats (feats' shape and layout), d ln_weight, d ln_bias)`` ((0,) without the LayerNorm);
    ``probs``: the forward's kept S (N, C*K), read instead of recomputing S tile by tile (None or (0,):
    recomputed); ``stats``: the forward's, read instead of the statistics pass (None: computed)."""
    has_own = grad_own is not None
    rows = checks.embed_feats(feats)
    checks.similarity_args(rows, protos, labels, ignore_index, temperature, has_own, label_values=False)
    checks.similarity_backward_args(grad_seg, grad_lse, grad_own, rows, protos, argk, lse)
    checks.feat_norm(rows, ln_weight, ln_bias, ln_eps)
    given = checks.embed_stats(rows, stats, _embed.STATS_ROWS)
    cached = checks.scores_cache(rows, protos, probs)
    with _launching(feats, protos, labels, ignore_index, has_own):
        g_lse, lse = _flat_lse(grad_lse, lse)
        return _embed.embed_similarity_backward(grad_seg, g_lse, grad_own, feats, ln_weight, ln_bias, ln_eps, protos,
                                                labels, argk, lse, temperature, chunk=EMBED_CHUNK,
                                                stats=stats if given else None, scores=probs if cached else None)


@torch.library.custom_op(
    f"{NAMESPACE}::embed_prototype_sums",
    mutates_args=(),
    schema="(Tensor feats, Tensor? ln_weight, Tensor? ln_bias, float ln_eps, Tensor slot, int num_slots, "
    "Tensor? stats=None) -> (Tensor sums, Tensor counts)",
)
def embed_prototype_sums(
    feats: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], ln_eps: float, slot: Tensor, num_slots: int,
    stats: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """``prototype_sums`` of the embedding ``embed_similarity`` scores (LayerNorm'd, L2-normalised pixels),
    chunk by chunk; deterministic when ``torch.are_deterministic_algorithms_enabled()``. ``stats``:
    ``embed_similarity``'s for the same feats and LayerNorm, read instead of the statistics pass."""
    rows = checks.embed_feats(feats)
    checks.floating(feats, "feats")
    checks.prototype_sums_args(rows, slot, num_slots)
    checks.feat_norm(rows, ln_weight, ln_bias, ln_eps)
    given = checks.embed_stats(rows, stats, _embed.STATS_ROWS)
    with _on_device(feats, "feats"):
        deterministic = torch.are_deterministic_algorithms_enabled()
        return _embed.embed_prototype_sums(feats, ln_weight, ln_bias, ln_eps, slot, num_slots,
                                           deterministic=deterministic, chunk=EMBED_CHUNK,
                                           stats=stats if given else None)


ops.register(NAMESPACE, keeps_probs=("embed",))  # embed_similarity keeps S; similarity never keeps probs
