"""The ``"triton"`` backend: the five ops of ``csrc/protoseg.cpp`` as ``torch.ops.protoseg_triton``.

Each op is a ``torch.library.custom_op`` with the C++ schema (same arguments,
outputs, dtypes and semantics) minus the CPU kernel's optional softmax cache
(``cache_bytes`` / ``probs``): the Triton backward always recomputes S tile by
tile. The kernels live in ``protoseg_ext.kernels``. Fake kernels and the
autograd of ``similarity`` are the shared ones of :mod:`protoseg_ext.ops`, so
``torch.compile(fullgraph=True)`` traces through these ops and the backward is
``protoseg_triton::similarity_backward``.

The ops run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was
set before triton was imported (the tests use this). Argument errors raise
``ValueError`` naming the argument, as the C++ ops do. Label ranges are checked
on CPU tensors only: on a GPU the check would synchronise the host, so there a
label outside ``[0, C)`` is treated as ignored (no out-of-bounds access).

``prototype_sums`` is deterministic (sorted segmented reduction, no float
atomics) when ``torch.are_deterministic_algorithms_enabled()``; otherwise it
adds the rows with float atomics (one pass, no sort; the last bits of the sums
may vary between runs). Counts are exact either way.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import ops
from .kernels import prototype_update as _update
from .kernels import similarity as _similarity
from .kernels import sinkhorn as _sinkhorn
from .kernels.common import INTERPRET

__all__ = ["NAMESPACE", "similarity", "similarity_backward", "sinkhorn", "prototype_sums", "prototype_ema"]

NAMESPACE = "protoseg_triton"

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------ checks


def _check_device(t: Tensor, name: str) -> None:
    if INTERPRET:
        if t.device.type != "cpu":
            raise RuntimeError(f"{name} is on {t.device}: TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors")
    elif t.device.type != "cuda":
        raise RuntimeError(
            f"{name} is on {t.device}: the Triton kernels run on CUDA tensors "
            "(or on CPU tensors with TRITON_INTERPRET=1)"
        )


def _check_dim(t: Tensor, dim: int, name: str, shape: str) -> None:
    if t.dim() != dim:
        raise ValueError(f"{name} must be {shape}, got shape {list(t.shape)}")


def _check_floating(t: Tensor, name: str) -> None:
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def _check_integer(t: Tensor, name: str) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")


def _check_same_device(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}; all inputs must be on one device")


def _check_labels_range(labels: Tensor, C: int, ignore_index: int, name: str = "labels") -> None:
    """Each label in ``[0, C)`` or ``ignore_index``; CPU tensors only (no GPU sync)."""
    if labels.device.type != "cpu" or labels.numel() == 0:
        return
    lab = labels.long()
    bad = ((lab < 0) | (lab >= C)) & (lab != ignore_index)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] = {int(lab[i])} is outside [0, {C}) and is not ignore_index ({ignore_index})")


def _check_row_index(idx: Tensor, name: str, rows: Tensor, rows_name: str) -> None:
    """``idx`` is an integer ``(N,)`` tensor, one entry per row of ``rows``, on its device."""
    _check_dim(idx, 1, name, "(N,)")
    _check_integer(idx, name)
    if idx.shape[0] != rows.shape[0]:
        raise ValueError(f"{name} must have N = {rows.shape[0]} entries, got {idx.shape[0]}")
    _check_same_device(rows, idx, rows_name, name)


def _check_similarity_args(feats: Tensor, protos: Tensor, labels: Tensor, need_labels: bool) -> None:
    _check_dim(feats, 2, "feats", "(N, D)")
    _check_dim(protos, 3, "protos", "(C, K, D)")
    _check_floating(feats, "feats")
    _check_floating(protos, "protos")
    if protos.shape[2] != feats.shape[1]:
        raise ValueError(
            f"protos must be (C, K, D) with D = feats.shape[1] = {feats.shape[1]}, got shape {list(protos.shape)}"
        )
    if not 1 <= protos.shape[1] <= 256:
        raise ValueError(f"protos: K (prototypes per class) must be in [1, 256], got {protos.shape[1]}")
    _check_same_device(feats, protos, "feats", "protos")
    _check_device(feats, "feats")
    if need_labels:
        _check_row_index(labels, "labels", feats, "feats")


# ------------------------------------------------------------------ ops


@torch.library.custom_op(
    f"{NAMESPACE}::similarity",
    mutates_args=(),
    schema="(Tensor feats, Tensor protos, Tensor labels, int ignore_index, float temperature, bool compute_seg, "
    "bool compute_lse, bool compute_own) -> (Tensor seg, Tensor argk, Tensor lse, Tensor own)",
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
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One pass over S: ``seg (N, C)``, ``argk (N, C)`` uint8, ``lse (N,)``, ``own (N, K)`` (see csrc/protoseg.cpp)."""
    _check_similarity_args(feats, protos, labels, compute_own)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if compute_own:
        _check_labels_range(labels, protos.shape[0], ignore_index)
    return _similarity.similarity_forward(feats, protos, labels, temperature, compute_seg, compute_lse, compute_own)


@torch.library.custom_op(
    f"{NAMESPACE}::similarity_backward",
    mutates_args=(),
    schema="(Tensor? grad_seg, Tensor? grad_lse, Tensor? grad_own, Tensor feats, Tensor protos, Tensor labels, "
    "Tensor argk, Tensor lse, int ignore_index, float temperature) -> Tensor",
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
) -> Tensor:
    """``d feats (N, D)`` from the gradients of seg, lse and own; S recomputed tile by tile."""
    has_seg, has_lse, has_own = grad_seg is not None, grad_lse is not None, grad_own is not None
    _check_similarity_args(feats, protos, labels, has_own)
    N, C, K = feats.shape[0], protos.shape[0], protos.shape[1]
    if N > 0:
        if has_seg and (tuple(grad_seg.shape) != (N, C) or tuple(argk.shape) != (N, C)):
            raise ValueError("grad_seg must be (N, C)" if tuple(grad_seg.shape) != (N, C) else "argk must be (N, C)")
        if has_lse and (grad_lse.numel() != N or lse.numel() != N):
            raise ValueError("grad_lse and lse must be (N,)")
        if has_own and tuple(grad_own.shape) != (N, K):
            raise ValueError("grad_own must be (N, K)")
    if has_own:
        _check_labels_range(labels, C, ignore_index)
    return _similarity.similarity_backward(
        grad_seg, grad_lse.reshape(-1) if has_lse else None, grad_own, feats, protos, labels, argk,
        lse.reshape(-1) if has_lse else lse, temperature,
    )


@torch.library.custom_op(
    f"{NAMESPACE}::sinkhorn",
    mutates_args=(),
    schema="(Tensor own, Tensor labels, int num_classes, int ignore_index, int iters, float eps) -> Tensor",
)
def sinkhorn(own: Tensor, labels: Tensor, num_classes: int, ignore_index: int, iters: int, eps: float) -> Tensor:
    """Sinkhorn-Knopp of every class at once, segmented by label: ``Q (N, K)``, zero rows for ignored pixels."""
    _check_dim(own, 2, "own", "(N, K)")
    _check_floating(own, "own")
    _check_row_index(labels, "labels", own, "own")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if iters < 1:
        raise ValueError(f"sinkhorn_iters must be >= 1, got {iters}")
    if not eps > 0:
        raise ValueError(f"sinkhorn_eps must be > 0, got {eps}")
    _check_device(own, "own")
    _check_labels_range(labels, num_classes, ignore_index)
    return _sinkhorn.sinkhorn(own, labels, num_classes, iters, eps)


@torch.library.custom_op(
    f"{NAMESPACE}::prototype_sums",
    mutates_args=(),
    schema="(Tensor feats, Tensor slot, int num_slots) -> (Tensor sums, Tensor counts)",
)
def prototype_sums(feats: Tensor, slot: Tensor, num_slots: int) -> Tuple[Tensor, Tensor]:
    """Per-prototype sums ``(num_slots, D)`` and counts ``(num_slots,)`` of the finite rows with ``slot >= 0``.

    Deterministic (sorted segmented reduction) when
    ``torch.are_deterministic_algorithms_enabled()``, else float atomics.
    """
    _check_dim(feats, 2, "feats", "(N, D)")
    _check_floating(feats, "feats")
    _check_row_index(slot, "slot", feats, "feats")
    if num_slots < 0:
        raise ValueError(f"num_slots must be >= 0, got {num_slots}")
    _check_device(feats, "feats")
    if slot.device.type == "cpu" and slot.numel() and num_slots > 0:
        big = slot.long() >= num_slots
        if bool(big.any()):
            i = int(big.nonzero()[0, 0])
            raise ValueError(f"slot[{i}] = {int(slot[i])} is >= num_slots ({num_slots})")
    deterministic = torch.are_deterministic_algorithms_enabled()
    return _update.prototype_sums(feats, slot, num_slots, deterministic=deterministic)


@torch.library.custom_op(
    f"{NAMESPACE}::prototype_ema",
    mutates_args=(),
    schema="(Tensor protos, Tensor sums, Tensor counts, float gamma) -> Tensor",
)
def prototype_ema(protos: Tensor, sums: Tensor, counts: Tensor, gamma: float) -> Tensor:
    """``protos (C, K, D)`` -> L2-normalise(EMA(protos, normalise(sums))) where ``counts > 0``."""
    _check_dim(protos, 3, "protos", "(C, K, D)")
    _check_floating(protos, "protos")
    C, K, D = protos.shape
    CK = C * K
    if sums.numel() != CK * D:
        raise ValueError(f"sums must have C*K*D = {CK * D} elements, got shape {list(sums.shape)}")
    if counts.numel() != CK:
        raise ValueError(f"counts must have C*K = {CK} elements, got shape {list(counts.shape)}")
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    _check_same_device(protos, sums, "protos", "sums")
    _check_same_device(protos, counts, "protos", "counts")
    _check_device(protos, "protos")
    return _update.prototype_ema(protos, sums, counts, gamma)


ops.register_fakes(NAMESPACE)
ops.register_similarity_autograd(NAMESPACE)
