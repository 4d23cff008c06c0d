"""The backend contract and the choice between backends.

Every backend (``"cpu"``, ``"cuda"``, ``"triton"``, ``"reference"``) fulfils
one contract, :class:`Backend`: the same eight ops with the same signatures and
meaning (the schemas of ``csrc/protoseg.cpp``; docs/design.md, "The backend
contract"), so that nothing above this module asks which backend it runs. The
implementations live beside it: :mod:`protoseg_ext.compiled_backends` (``cpu``,
``cuda``, ``triton``: the registered ops of :mod:`protoseg_ext.ops`) and
:mod:`protoseg_ext.reference_backend` (plain PyTorch, from the eager oracle
:mod:`protoseg_ext.reference`).

Selection: ``backend="auto"`` takes ``PROTOSEG_BACKEND`` if set, else the best
backend for the tensors' device (CPU: ``"cpu"``; CUDA: ``"triton"``, then
``"cuda"``; then ``"reference"``). A backend asked for by name that cannot run
raises, saying why (:meth:`Backend.not_supported_reasons`).
"""

from __future__ import annotations

import os
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from .ops import cpu_buffer_pool_stats, release_cpu_buffers  # noqa: F401  (documented here, in README)

BACKENDS = ("cpu", "cuda", "triton", "reference")

FeatNorm = Optional[Tuple[torch.Tensor, torch.Tensor, float]]  # the LayerNorm over D: (weight, bias, eps)


class SimilarityOut(NamedTuple):
    """Outputs of :meth:`Backend.similarity`; those not asked for are ``(0,)`` placeholders."""

    seg: torch.Tensor  # (N, C) max_k S, feats' dtype
    argk: torch.Tensor  # (N, C) uint8 arg-max k
    lse: torch.Tensor  # (N,) logsumexp_j S[n, j] / temperature, accumulation dtype
    own: torch.Tensor  # (N, K) S[n, labels[n]*K + k], zero rows where labels[n] == ignore_index


class EmbedSimilarityOut(NamedTuple):
    """Outputs of :meth:`Backend.embed_similarity`: :class:`SimilarityOut`'s, and the pixels' statistics."""

    seg: torch.Tensor
    argk: torch.Tensor
    lse: torch.Tensor
    own: torch.Tensor
    # (3, N) accumulation dtype: each pixel's LayerNorm mean, 1 / std and 1 / ||y|| (NaN where not
    # finite), for :meth:`Backend.embed_prototype_sums` of the same map; (0,) when nothing is computed.
    # The cpu backend's is (6, N), the cuda and triton backends' (5, N): rows their backward reads
    # (csrc/protoseg.cpp, kernels/embed.py)
    stats: torch.Tensor


class Backend:
    """The contract every backend fulfils: the same ops, signatures and meaning.

    * :meth:`similarity` - one pass over ``S = feats @ protos.view(C*K, D).T``
      giving the outputs asked for by keyword; differentiable w.r.t. ``feats``;
    * :meth:`embed_similarity` - :meth:`similarity` of the head's embedding
      (LayerNorm over D, then L2) of the backbone's map as it lies;
      differentiable w.r.t. the map and the LayerNorm's weight and bias;
    * :meth:`sinkhorn` - Sinkhorn-Knopp of every class at once;
    * :meth:`prototype_sums` - per-prototype feature sums and pixel counts;
    * :meth:`embed_prototype_sums` - :meth:`prototype_sums` of that embedding;
    * :meth:`prototype_ema` - the momentum update of the prototypes;
    * :meth:`mask_norm` - the head's LayerNorm over C, laid out as an image;
    * :meth:`ppc_ppd` - the PPC and PPD losses from the row log-sum-exp and own-class scores.

    The exact semantics are those of the schemas in ``csrc/protoseg.cpp``
    (docs/design.md); :mod:`protoseg_ext.checks` holds the argument rules. A
    backend says why it cannot run somewhere, or cannot run an op on given
    inputs, with :meth:`not_supported_reasons`; an op called on inputs it
    names there raises (no silent fallback).
    """

    name = "?"

    def not_supported_reasons(self, device, op: Optional[str] = None, **inputs: torch.Tensor) -> List[str]:
        """Why this backend cannot run on tensors on ``device`` (empty if it can).

        With ``op`` (a method name of the contract) and its tensor arguments by name
        (``seg=..., weight=...``), also why it cannot run that op on those inputs
        (dtypes, shapes): ``be.not_supported_reasons(seg.device, "mask_norm", seg=seg,
        weight=w, bias=b)``. ``be.not_supported_reasons(device)`` alone is the device check.
        """
        return self.device_reasons(device) + (self.input_reasons(op, inputs) if op is not None else [])

    def device_reasons(self, device) -> List[str]:
        """Why this backend cannot run on ``device`` at all (the build, the driver, the device type)."""
        raise NotImplementedError

    def input_reasons(self, op: str, inputs: Dict[str, torch.Tensor]) -> List[str]:
        """Why ``op`` cannot take these ``inputs`` here; a backend with no limits beyond the argument
        rules of :mod:`protoseg_ext.checks` (which raise ``ValueError`` themselves) returns ``[]``."""
        return []

    def usable(self, device) -> bool:
        return not self.not_supported_reasons(device)

    def similarity(self, feats, protos, labels=None, *, ignore_index=-1, temperature=1.0, seg=True, lse=False,
                   own=False, cache_bytes=0, normalize=False) -> SimilarityOut:
        """``feats (N, D)``, ``protos (C, K, D)``; ``labels (N,)`` needed for ``own``.

        ``cache_bytes`` > 0 lets the backward reuse softmax(S) instead of
        recomputing S, if it fits (a backend may always recompute);
        ``normalize`` L2-normalises the rows of ``feats`` inside the op, and the
        gradient is then w.r.t. the raw rows.
        """
        raise NotImplementedError

    def embed_similarity(self, feats, feat_norm: FeatNorm, protos, labels=None, *, ignore_index=-1, temperature=1.0,
                         seg=True, lse=False, own=False, cache_bytes=0) -> EmbedSimilarityOut:
        """:meth:`similarity` of the head's embedding, from what the backbone gives: ``feats``
        (N, D) or the map (B, D, H, W) (pixel n = b*H*W + h*W + w), ``feat_norm`` None or the
        LayerNorm over D as ``(weight, bias, eps)``, then the L2 normalisation. Differentiable
        w.r.t. ``feats`` and the LayerNorm's weight and bias. The compiled backends fuse it
        into their kernels; the reference backend composes it from :meth:`similarity`. Also
        returns each pixel's statistics (``stats``), which :meth:`embed_prototype_sums` and the
        backward reuse instead of reading the map once more."""
        raise NotImplementedError

    def sinkhorn(self, own, labels, num_classes, ignore_index, iters, eps) -> torch.Tensor:
        """``Q (N, K)``: rows sum to 1, zero rows for ignored or non-finite pixels."""
        raise NotImplementedError

    def prototype_sums(self, feats, slot, num_slots, normalize=False):
        """``sums (num_slots, D)``, ``counts (num_slots,)`` of the finite rows with ``slot >= 0``."""
        raise NotImplementedError

    def embed_prototype_sums(self, feats, feat_norm: FeatNorm, slot, num_slots, stats=None):
        """:meth:`prototype_sums` of the L2-normalised embedding of :meth:`embed_similarity`'s input,
        read as that op reads it (no (N, D) copy). ``stats``: that op's ``stats`` for the same
        ``feats`` and ``feat_norm`` (saves a pass over the map), or None."""
        raise NotImplementedError

    def prototype_ema(self, protos, sums, counts, gamma) -> torch.Tensor:
        """L2-normalise(EMA(protos, normalise(sums))) where ``counts > 0``."""
        raise NotImplementedError

    def mask_norm(self, seg, weight, bias, eps, batch):
        """``LayerNorm(C)`` of ``seg (N, C)`` as ``(batch, C, N // batch)``, and its arg-max over C ``(N,)``."""
        raise NotImplementedError

    def ppc_ppd(self, lse, own, target, ignore_index, temperature):
        """PPC and PPD (0-dim, lse's dtype) from :meth:`similarity`'s ``lse (N,)`` and ``own (N, K)``
        and the prototype targets ``target (N,)`` (``c*K + k`` of the class ``own`` holds, or
        ``ignore_index``): :func:`protoseg_ext.reference.losses_from_scores`. Differentiable w.r.t.
        ``lse`` and ``own``."""
        raise NotImplementedError


_INSTANCES: Dict[str, Backend] = {}


def _instances() -> Dict[str, Backend]:
    """The backend of each name (a tool may replace one, as tools/gpu_model.py does with the emulator)."""
    if len(_INSTANCES) < len(BACKENDS):  # the implementations import this module: build them on first use
        from .compiled_backends import CpuBackend, CudaBackend, TritonBackend
        from .reference_backend import ReferenceBackend

        for be in (CpuBackend(), CudaBackend(), TritonBackend(), ReferenceBackend()):
            _INSTANCES.setdefault(be.name, be)
    return _INSTANCES


def default_cache_bytes() -> int:
    """Memory the head may spend keeping softmax(S) (N x C*K) for the backward.

    ``PROTOSEG_CACHE_MB`` (default 2048 MiB, enough for a full-resolution
    Cityscapes step: 1024 x 2048 pixels, C*K = 190; 0 disables). Within the budget a
    training step costs two GEMMs; beyond it the backward recomputes S.
    """
    return int(float(os.environ.get("PROTOSEG_CACHE_MB", "2048")) * (1 << 20))


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    return _instances()[name]


def available_backends() -> List[str]:
    """Backends this build can run on some device of this machine."""
    out = []
    for name in BACKENDS:
        be = _instances()[name]
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        if any(be.usable(torch.device(d)) for d in devices):
            out.append(name)
    return out


def _auto_order(device: torch.device):
    if device.type == "cuda":
        return ("triton", "cuda", "reference")
    if device.type == "cpu":
        return ("cpu", "reference")
    return ("reference",)


def resolve(backend: str, device) -> Backend:
    """The backend to run on ``device``; see the module docstring.

    The error a user sees lists each candidate's :meth:`Backend.not_supported_reasons`.
    """
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a string, got {type(backend).__name__}")
    device = torch.device(device)
    source = f"backend {backend!r}"
    if backend == "auto":
        env = os.environ.get("PROTOSEG_BACKEND", "").strip()
        if env and env != "auto":
            backend, source = env, f"PROTOSEG_BACKEND={env!r}"
        else:
            why = {}
            for name in _auto_order(device):
                why[name] = _instances()[name].not_supported_reasons(device)
                if not why[name]:
                    return _instances()[name]
            raise RuntimeError(
                f"no backend can run on {device}: " + "; ".join(f"{n}: {', '.join(r)}" for n, r in why.items())
            )
    if backend not in BACKENDS:
        raise ValueError(f"{source}: backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    be = _instances()[backend]
    reasons = be.not_supported_reasons(device)
    if reasons:
        raise RuntimeError(f"{source} cannot run on {device}: " + "; ".join(reasons))
    return be
