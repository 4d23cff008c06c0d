"""The rules every backend and every public function apply to their arguments, stated once.

Each check raises ``ValueError`` naming the bad argument (the C++ front ends
raise the same messages from ``csrc/checks.h``). The op checks
(``similarity_args`` ... ``prototype_ema_args``) are what any backend requires
of a call; the others guard the public functions of
:mod:`protoseg_ext.functional` and :class:`~protoseg_ext.ProtoSegHead`.

Label ranges are checked on the host for CPU tensors only: on a GPU the check
would synchronise the host (the kernels check there instead, with a
device-side assert), and it would break a ``torch.compile`` graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MAX_K = 256  # prototypes per class: argk is stored as uint8


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The working (accumulation) dtype of every backend: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def shape_of(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def floating(t: Tensor, name: str) -> None:
    if t.dtype not in FLOATS:
        raise ValueError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def integer(t: Tensor, name: str) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")


def dim(t, ndim: int, name: str, shape: str) -> None:
    if not isinstance(t, Tensor) or t.dim() != ndim:
        raise ValueError(f"{name} must be a {shape} tensor, got {shape_of(t)}")


def same_device(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}; all inputs must be on one device")


def _host_checks(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.numel() > 0 and not torch.compiler.is_compiling()


def label_range(x: Tensor, name: str, hi: int, ignore_index: int) -> None:
    """Every entry of ``x`` in ``[0, hi)`` or equal to ``ignore_index`` (host check, CPU tensors)."""
    if not _host_checks(x):
        return
    bad = ((x < 0) | (x >= hi)) & (x != ignore_index)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] = {int(x[i])} is outside [0, {hi}) and is not ignore_index ({ignore_index})")


def row_index(x, name: str, rows: Tensor) -> None:
    """``x`` is an integer ``(N,)`` tensor, one entry per row of ``rows`` (``feats``), on its device."""
    n = rows.shape[0]
    if not isinstance(x, Tensor) or x.dim() != 1 or x.shape[0] != n:
        raise ValueError(f"{name} must be a ({n},) integer tensor (one entry per row of feats), got {shape_of(x)}")
    integer(x, name)
    same_device(rows, x, "feats", name)


def labels(x, name: str, rows: Tensor, hi: int, ignore_index: int, values: bool = True) -> None:
    """Labels of the rows of ``rows``: shape, dtype, device and range ``[0, hi)`` or ``ignore_index``
    (``values=False``: the range left to a caller that checks it itself, as the Triton ops do on the device)."""
    row_index(x, name, rows)
    if values:
        label_range(x, name, hi, ignore_index)


def feats_protos(feats, protos) -> None:
    """``feats (N, D)`` and ``protos (C, K, D)``: floating, same D and device, ``1 <= K <= 256``."""
    dim(feats, 2, "feats", "(N, D)")
    dim(protos, 3, "protos", "(C, K, D)")
    floating(feats, "feats")
    floating(protos, "protos")
    if protos.shape[2] != feats.shape[1]:
        raise ValueError(
            f"protos must be (C, K, D) with D = feats.shape[1] = {feats.shape[1]}, got shape {tuple(protos.shape)}"
        )
    if protos.shape[0] < 1 or not 1 <= protos.shape[1] <= MAX_K:
        raise ValueError(
            f"protos must have C >= 1 classes and 1 <= K <= {MAX_K} prototypes, got shape {tuple(protos.shape)}"
        )
    same_device(feats, protos, "feats", "protos")


def positive(value, name: str) -> None:
    if not float(value) > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def ignore_index(value, num_targets: int) -> None:
    """An int that is not a valid prototype target (it would silently drop those pixels)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"ignore_index must be an int, got {value!r}")
    if 0 <= value < num_targets:
        raise ValueError(
            f"ignore_index {value} is a valid prototype target in [0, C*K = {num_targets}): it would "
            "silently drop those pixels; use a negative ignore_index (e.g. -1), or one >= C*K"
        )


def gamma(value) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {value}")


def sinkhorn_settings(iters, eps) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"sinkhorn_iters must be an int >= 1, got {iters!r}")
    positive(eps, "sinkhorn_eps")


# gumbel: the official draw argmax(Q + g); argmax: argmax(Q); sample: argmax(log Q + g), a draw from the row Q
ASSIGN_MODES = ("gumbel", "argmax", "sample")


def assign(value) -> None:
    if value not in ASSIGN_MODES:
        raise ValueError(f"assign must be 'gumbel', 'argmax' or 'sample', got {value!r}")


def gumbel_noise(noise, N: int, K: int, device) -> None:
    if noise is None:
        return
    if not isinstance(noise, Tensor) or tuple(noise.shape) != (N, K):
        raise ValueError(f"gumbel_noise must be a ({N}, {K}) tensor, got {shape_of(noise)}")
    if not noise.dtype.is_floating_point:
        raise ValueError(f"gumbel_noise must be a floating tensor, got {noise.dtype}")
    if noise.device != device:
        raise ValueError(f"gumbel_noise is on {noise.device} but feats is on {device}")


# ------------------------------------------------------------------ the ops' own checks


def similarity_args(feats, protos, labels_, ignore_index_, temperature, need_labels: bool,
                    label_values: bool = True) -> None:
    """``similarity`` / ``similarity_backward``: labels only when the own-class scores are involved
    (``label_values``: :func:`labels`' ``values``)."""
    feats_protos(feats, protos)
    if need_labels:
        labels(labels_, "labels", feats, protos.shape[0], ignore_index_, label_values)
    positive(temperature, "temperature")


def similarity_backward_args(grad_seg, grad_lse, grad_own, feats, protos, argk, lse) -> None:
    N, C, K = feats.shape[0], protos.shape[0], protos.shape[1]
    if grad_seg is not None:
        if tuple(grad_seg.shape) != (N, C):
            raise ValueError(f"grad_seg must be (N, C) = ({N}, {C}), got {shape_of(grad_seg)}")
        if tuple(argk.shape) != (N, C):
            raise ValueError(f"argk must be (N, C) = ({N}, {C}), got {shape_of(argk)}")
    if grad_lse is not None and (grad_lse.numel() != N or lse.numel() != N):
        raise ValueError("grad_lse and lse must be (N,)")
    if grad_own is not None and tuple(grad_own.shape) != (N, K):
        raise ValueError(f"grad_own must be (N, K) = ({N}, {K}), got {shape_of(grad_own)}")


def scores_cache(rows, protos, probs) -> bool:
    """The Triton backward's ``probs``: None, ``(0,)`` (nothing kept) or the forward's cache ``(N, C*K)``,
    contiguous, in the accumulation dtype of ``rows`` (the (N, D) stand-in), on its device. Returns whether
    it is given."""
    if probs is None or (isinstance(probs, Tensor) and probs.dim() == 1 and probs.numel() == 0):
        return False
    N, CK = rows.shape[0], protos.shape[0] * protos.shape[1]
    if not isinstance(probs, Tensor) or tuple(probs.shape) != (N, CK):
        raise ValueError(f"probs must be (N, C*K) = ({N}, {CK}) or (0,), got {shape_of(probs)}")
    _kept_for_backward(rows, probs, "probs")
    return True


def _kept_for_backward(rows, t: Tensor, name: str) -> None:
    """A tensor the forward kept for its backward (of the right shape): the accumulation dtype of ``rows``
    (the (N, D) stand-in), contiguous, on its device."""
    acc = acc_dtype(rows.dtype)
    if t.dtype != acc:
        raise ValueError(f"{name} must be {acc} (the accumulation dtype of feats), got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    same_device(rows, t, "feats", name)


def embed_feats(feats) -> Tensor:
    """``embed_similarity``'s feats, ``(N, D)`` rows or a ``(B, D, H, W)`` map: an ``(N, D)`` stand-in
    (no storage, N = B*H*W) for the shared op checks."""
    if not isinstance(feats, Tensor) or feats.dim() not in (2, 4):
        raise ValueError(f"feats must be (N, D) or (B, D, H, W), got {shape_of(feats)}")
    N = feats.shape[0] if feats.dim() == 2 else feats.shape[0] * feats.shape[2] * feats.shape[3]
    return feats.new_empty(()).expand(N, feats.shape[1])


def feat_norm(rows, ln_weight, ln_bias, ln_eps) -> bool:
    """The head's LayerNorm over D: ``ln_weight`` and ``ln_bias`` (D,) given together (or neither),
    ``ln_eps > 0``; ``rows`` the (N, D) stand-in. Returns whether it is given."""
    ln = ln_weight is not None
    if ln != (ln_bias is not None):
        raise ValueError("ln_weight and ln_bias must be given together")
    if ln:
        D = rows.shape[1]
        for t, name in ((ln_weight, "ln_weight"), (ln_bias, "ln_bias")):
            if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != D:
                raise ValueError(f"{name} must be (D,) = ({D},), got {shape_of(t)}")
            floating(t, name)
        positive(ln_eps, "ln_eps")
        same_device(rows, ln_weight, "feats", "ln_weight")
        same_device(rows, ln_bias, "feats", "ln_bias")
    return ln


def embed_stats(rows, stats, height: int = 3) -> bool:
    """``embed_similarity``'s ``stats`` given to its backward or ``embed_prototype_sums``: None, ``(0,)``
    (the same: none kept) or ``(height, N)`` (the backend's rows: 3 for the reference, 5 for Triton)
    contiguous in the accumulation dtype of ``rows`` (the (N, D) stand-in), on its device. Returns whether
    stats are given."""
    if stats is None or (stats.dim() == 1 and stats.numel() == 0):
        return False
    N = rows.shape[0]
    if not isinstance(stats, Tensor) or stats.dim() != 2 or tuple(stats.shape) != (height, N):
        raise ValueError(f"stats must be embed_similarity's ({height}, N) = ({height}, {N}), got {shape_of(stats)}")
    _kept_for_backward(rows, stats, "stats")
    return True


def sinkhorn_args(own, labels_, num_classes: int, ignore_index_: int, iters, eps, label_values: bool = True) -> None:
    """``sinkhorn``'s arguments (``label_values``: :func:`labels`' ``values``)."""
    dim(own, 2, "own", "(N, K)")
    floating(own, "own")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    sinkhorn_settings(iters, eps)
    labels(labels_, "labels", own, num_classes, ignore_index_, label_values)


def prototype_sums_args(feats, slot, num_slots: int) -> None:
    dim(feats, 2, "feats", "(N, D)")
    floating(feats, "feats")
    row_index(slot, "slot", feats)
    if num_slots < 0:
        raise ValueError(f"num_slots must be >= 0, got {num_slots}")
    if _host_checks(slot):
        big = slot >= num_slots
        if bool(big.any()):
            i = int(big.nonzero()[0, 0])
            raise ValueError(f"slot[{i}] = {int(slot[i])} is >= num_slots ({num_slots})")


def prototype_ema_args(protos, sums, counts, gamma_) -> None:
    dim(protos, 3, "protos", "(C, K, D)")
    floating(protos, "protos")
    C, K, D = protos.shape
    if sums.numel() != C * K * D:
        raise ValueError(f"sums must have C*K*D = {C * K * D} elements, got shape {list(sums.shape)}")
    if counts.numel() != C * K:
        raise ValueError(f"counts must have C*K = {C * K} elements, got shape {list(counts.shape)}")
    gamma(gamma_)
    same_device(protos, sums, "protos", "sums")
    same_device(protos, counts, "protos", "counts")


def _own_and_target(own, target, n=None) -> None:
    """``own (N, K)`` float32/float64 with K >= 1 (N = ``n``, lse's, when given), ``target (N,)`` integer
    on its device."""
    dim(own, 2, "own", "(N, K)")
    if own.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"own must be float32 or float64, got {own.dtype}")
    if (n is not None and own.shape[0] != n) or own.shape[1] < 1:
        what = "K >= 1" if n is None else f"N = {n} (lse's) and K >= 1"
        raise ValueError(f"own must be (N, K) with {what}, got shape {tuple(own.shape)}")
    dim(target, 1, "target", "(N,)")
    integer(target, "target")
    if target.shape[0] != own.shape[0]:
        raise ValueError(f"target must have N = {own.shape[0]} entries, got {target.shape[0]}")
    same_device(own, target, "own", "target")


def ppc_ppd_args(lse, own, target, temperature) -> None:
    """``ppc_ppd``: ``lse (N,)`` float32/float64, ``own (N, K)`` of its dtype, ``target (N,)`` integer."""
    dim(lse, 1, "lse", "(N,)")
    if lse.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"lse must be float32 or float64, got {lse.dtype}")
    _own_and_target(own, target, lse.shape[0])
    if own.dtype != lse.dtype:
        raise ValueError(f"own must have lse's dtype {lse.dtype}, got {own.dtype}")
    same_device(lse, own, "lse", "own")
    positive(temperature, "temperature")


def ppc_ppd_backward_args(grad_ppc, grad_ppd, own, target, count, temperature) -> None:
    """``ppc_ppd_backward``: the two upstream gradients and the saved count hold one value each."""
    _own_and_target(own, target)
    for name, t in (("grad_ppc", grad_ppc), ("grad_ppd", grad_ppd), ("count", count)):
        if not isinstance(t, Tensor) or t.numel() != 1:
            raise ValueError(f"{name} must hold one value, got {shape_of(t)}")
        floating(t, name)
        same_device(own, t, "own", name)
    positive(temperature, "temperature")
