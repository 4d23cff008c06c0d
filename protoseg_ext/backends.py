"""Backends and the choice between them.

Every backend (``"cpu"``, ``"cuda"``, ``"triton"``, ``"reference"``) fulfils
one contract, :class:`Backend`: the same ops with the same signatures and
meaning (the schemas of ``csrc/protoseg.cpp``), so that nothing above this
module asks which backend it runs. ``"reference"`` implements the ops in plain
PyTorch, from the eager oracle :mod:`protoseg_ext.reference`.

Selection: ``backend="auto"`` takes ``PROTOSEG_BACKEND`` if set, else the best
backend for the tensors' device (CPU: ``"cpu"``; CUDA: ``"triton"``, then
``"cuda"``; then ``"reference"``). A backend asked for by name that cannot run
raises, saying why.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import checks, ops, reference

BACKENDS = ("cpu", "cuda", "triton", "reference")

_ext = None
_ext_error: Optional[str] = None
_ext_loaded = False


def _base_version(v: str) -> str:
    return v.split("+")[0]


def load_extension():
    """Import ``protoseg_ext._C`` once; on failure warn and remember why."""
    global _ext, _ext_error, _ext_loaded
    if _ext_loaded:
        return _ext
    _ext_loaded = True
    try:
        from . import _C  # registers torch.ops.protoseg_ext.*
    except Exception as e:  # ImportError, OSError (undefined symbol), ...
        _ext_error = (
            f"the compiled library protoseg_ext._C did not load ({type(e).__name__}: {e}); "
            "rebuild it with `pip install --no-build-isolation -e .`"
        )
        warnings.warn(_ext_error + "; the 'reference' (and 'triton') backends still work", RuntimeWarning, stacklevel=3)
        return None
    built, running = _C.BUILD_TORCH_VERSION, torch.__version__
    if _base_version(built) != _base_version(running):
        _ext_error = (
            f"protoseg_ext._C was built for torch {built} but torch {running} is installed; "
            "rebuild with `pip install --no-build-isolation -e .`"
        )
        warnings.warn(_ext_error, RuntimeWarning, stacklevel=3)
        return None
    ops.register_fakes("protoseg_ext")
    ops.register_similarity_autograd("protoseg_ext")
    ops.register_mask_norm("protoseg_ext")
    ops.register_embed_similarity("protoseg_ext")
    _ext = _C
    return _ext


class SimilarityOut(NamedTuple):
    """Outputs of :meth:`Backend.similarity`; those not asked for are ``(0,)`` placeholders."""

    seg: torch.Tensor  # (N, C) max_k S, feats' dtype
    argk: torch.Tensor  # (N, C) uint8 arg-max k
    lse: torch.Tensor  # (N,) logsumexp_j S[n, j] / temperature, accumulation dtype
    own: torch.Tensor  # (N, K) S[n, labels[n]*K + k], zero rows where labels[n] == ignore_index


class Backend:
    """The contract every backend fulfils: the same ops, signatures and meaning.

    * :meth:`similarity` - one pass over ``S = feats @ protos.view(C*K, D).T``
      giving the outputs asked for by keyword; differentiable w.r.t. ``feats``;
    * :meth:`sinkhorn` - Sinkhorn-Knopp of every class at once;
    * :meth:`prototype_sums` - per-prototype feature sums and pixel counts;
    * :meth:`prototype_ema` - the momentum update of the prototypes;
    * :meth:`mask_norm` - the head's LayerNorm over C, laid out as an image.

    The exact semantics are those of the schemas in ``csrc/protoseg.cpp``;
    :mod:`protoseg_ext.checks` holds the argument rules. A backend says why it
    cannot run somewhere with :meth:`not_supported_reasons`.
    """

    name = "?"

    def not_supported_reasons(self, device) -> List[str]:
        """Why this backend cannot run on tensors on ``device`` (empty if it can)."""
        raise NotImplementedError

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

    def sinkhorn(self, own, labels, num_classes, ignore_index, iters, eps) -> torch.Tensor:
        """``Q (N, K)``: rows sum to 1, zero rows for ignored or non-finite pixels."""
        raise NotImplementedError

    def prototype_sums(self, feats, slot, num_slots, normalize=False):
        """``sums (num_slots, D)``, ``counts (num_slots,)`` of the finite rows with ``slot >= 0``."""
        raise NotImplementedError

    def prototype_ema(self, protos, sums, counts, gamma) -> torch.Tensor:
        """L2-normalise(EMA(protos, normalise(sums))) where ``counts > 0``."""
        raise NotImplementedError

    # pixels per chunk of the composed embedding (the default embed_similarity, embed_prototype_sums)
    embed_chunk = 1 << 16

    def embed_similarity(self, feats, feat_norm: FeatNorm, protos, labels=None, *, ignore_index=-1, temperature=1.0,
                         seg=True, lse=False, own=False, cache_bytes=0) -> SimilarityOut:
        """:meth:`similarity` of the head's embedding, from what the backbone gives: ``feats``
        (N, D) or the map (B, D, H, W) (pixel n = b*H*W + h*W + w), ``feat_norm`` None or the
        LayerNorm over D as ``(weight, bias, eps)``, then the L2 normalisation. Differentiable
        w.r.t. ``feats`` and the LayerNorm's weight and bias.

        This default composes it from :meth:`similarity`, ``embed_chunk`` pixels at a time
        (its outputs are per pixel), each chunk under activation checkpointing: the embedding
        of a chunk lives only while it is scored, and the backward recomputes it (and the
        chunk's scores) instead of keeping an (N, D) copy. This default is the reference
        backend's; the backends with compiled ops (cpu, cuda, triton) fuse it into their
        kernels (``embed_similarity`` of csrc/protoseg.cpp)."""
        w, b, eps = feat_norm if feat_norm is not None else (None, None, 0.0)

        def score(x, w, b, lab):
            rows = embed(x, None if w is None else (w, b, eps))
            return tuple(self.similarity(rows, protos, lab, ignore_index=ignore_index, temperature=temperature,
                                         seg=seg, lse=lse, own=own, cache_bytes=cache_bytes, normalize=True))

        grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (feats, w, b))
        pieces = []
        for n0, n1, x in _pixel_chunks(feats, self.embed_chunk):
            lab = None if labels is None else labels[n0:n1]
            pieces.append(checkpoint(score, x, w, b, lab, use_reentrant=False) if grads else score(x, w, b, lab))
        if len(pieces) == 1:
            return SimilarityOut(*pieces[0])
        if not pieces:  # no pixels
            return SimilarityOut(*score(feats, w, b, labels))
        return SimilarityOut(*(torch.cat(p) for p in zip(*pieces)))

    def embed_prototype_sums(self, feats, feat_norm: FeatNorm, slot, num_slots):
        """:meth:`prototype_sums` of the L2-normalised embedding of :meth:`embed_similarity`'s input
        (composed here ``embed_chunk`` pixels at a time: no (N, D) copy)."""
        out = None
        for n0, n1, x in _pixel_chunks(feats, self.embed_chunk):
            s, c = self.prototype_sums(embed(x, feat_norm), slot[n0:n1], num_slots, True)
            out = (s, c) if out is None else (out[0] + s, out[1] + c)
        return out if out is not None else self.prototype_sums(embed(feats, feat_norm), slot, num_slots, True)

    def mask_norm(self, seg, weight, bias, eps, batch):
        """``LayerNorm(C)`` of ``seg (N, C)`` as ``(batch, C, N // batch)``, and its arg-max over C ``(N,)``."""
        out = F.layer_norm(seg, (seg.shape[1],), weight, bias, eps)
        pred = out.detach().argmax(dim=1)
        return out.reshape(batch, -1, seg.shape[1]).permute(0, 2, 1), pred


FeatNorm = Optional[Tuple[torch.Tensor, torch.Tensor, float]]  # the LayerNorm over D: (weight, bias, eps)


def embed(feats: torch.Tensor, feat_norm: FeatNorm = None) -> torch.Tensor:
    """The head's embedding rows before the L2 normalisation, ``(N, D)``: ``feats`` (N, D) or the map
    (B, D, H, W) as rows (pixel n = b*H*W + h*W + w; a copy unless channels-last), LayerNorm'd."""
    x = feats if feats.dim() == 2 else feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    if feat_norm is not None:
        w, b, eps = feat_norm
        x = F.layer_norm(x, (x.shape[1],), w, b, eps)
    return x


def _pixel_chunks(feats: torch.Tensor, chunk: int):
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


def _labels_or_empty(labels, feats):
    return torch.empty(0, dtype=torch.long, device=feats.device) if labels is None else labels


class _OpsBackend(Backend):
    """A backend whose ops are registered in a ``torch.ops`` namespace with the schemas of csrc/protoseg.cpp."""

    namespace = "?"

    @property
    def _ops(self):
        return getattr(torch.ops, self.namespace)

    def similarity(self, feats, protos, labels=None, *, ignore_index=-1, temperature=1.0, seg=True, lse=False,
                   own=False, cache_bytes=0, normalize=False):
        out = self._ops.similarity(feats, protos, _labels_or_empty(labels, feats), int(ignore_index),
                                   float(temperature), bool(seg), bool(lse), bool(own), int(cache_bytes),
                                   bool(normalize))
        return SimilarityOut(*out[:4])

    def sinkhorn(self, own, labels, num_classes, ignore_index, iters, eps):
        return self._ops.sinkhorn(own, labels, int(num_classes), int(ignore_index), int(iters), float(eps))

    def prototype_sums(self, feats, slot, num_slots, normalize=False):
        return self._ops.prototype_sums(feats, slot, int(num_slots), bool(normalize))

    def prototype_ema(self, protos, sums, counts, gamma):
        return self._ops.prototype_ema(protos, sums, counts, float(gamma))

    def embed_similarity(self, feats, feat_norm, protos, labels=None, *, ignore_index=-1, temperature=1.0, seg=True,
                         lse=False, own=False, cache_bytes=0):
        # one op reads the map as it lies and normalises each tile as it is read: no (N, D) copy
        # (its autograd: protoseg_ext.ops.register_embed_similarity)
        w, b, eps = feat_norm if feat_norm is not None else (None, None, 1e-5)
        out = self._ops.embed_similarity(feats, w, b, float(eps), protos, _labels_or_empty(labels, feats),
                                         int(ignore_index), float(temperature), bool(seg), bool(lse), bool(own),
                                         int(cache_bytes))
        return SimilarityOut(*out[:4])

    def embed_prototype_sums(self, feats, feat_norm, slot, num_slots):
        # the map read as embed_similarity reads it, tile by tile: never an (N, D) copy
        w, b, eps = feat_norm if feat_norm is not None else (None, None, 1e-5)
        sums, counts = self._ops.embed_prototype_sums(feats, w, b, float(eps), slot, int(num_slots))
        return sums, counts


class CpuBackend(_OpsBackend):
    name = "cpu"
    namespace = "protoseg_ext"

    def not_supported_reasons(self, device):
        reasons = []
        if load_extension() is None:
            reasons.append(_ext_error)
        if device is not None and torch.device(device).type != "cpu":
            reasons.append(f"'cpu' runs on CPU tensors, these are on {device}")
        return reasons

    def mask_norm(self, seg, weight, bias, eps, batch):
        # the fused kernel: a contiguous image whose gradient needs no layout copy,
        # and the arg-max from the same pass (float32/float64, no autocast)
        if (
            seg.dtype in (torch.float32, torch.float64)
            and weight is not None
            and bias is not None
            and weight.dtype == seg.dtype
            and bias.dtype == seg.dtype
            and not torch.is_autocast_enabled("cpu")
        ):
            out, _, _, pred = self._ops.mask_norm(seg, weight, bias, float(eps), int(batch))
            return out, pred
        return super().mask_norm(seg, weight, bias, eps, batch)


class CudaBackend(_OpsBackend):
    name = "cuda"
    namespace = "protoseg_ext"

    def not_supported_reasons(self, device):
        ext = load_extension()
        reasons = []
        if ext is None:
            reasons.append(_ext_error)
        elif not ext.WITH_CUDA:
            reasons.append("protoseg_ext._C was built without CUDA (set CUDA_HOME, or PROTOSEG_FORCE_CUDA=1, and rebuild)")
        if not torch.cuda.is_available():
            reasons.append("torch.cuda.is_available() is False (no GPU or driver)")
        if device is not None and torch.device(device).type != "cuda":
            reasons.append(f"'cuda' runs on CUDA tensors, these are on {device}")
        return reasons


class TritonBackend(_OpsBackend):
    name = "triton"
    namespace = "protoseg_triton"
    _error: Optional[str] = None
    _loaded = False

    def _load(self) -> bool:
        cls = type(self)
        if not cls._loaded:
            cls._loaded = True
            try:
                importlib.import_module("protoseg_ext.triton_ops")  # registers torch.ops.protoseg_triton
            except Exception as e:
                cls._error = f"the Triton kernels did not import ({type(e).__name__}: {e})"
        return cls._error is None

    @staticmethod
    def interpreted() -> bool:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"

    def not_supported_reasons(self, device):
        reasons = []
        if not self._load():
            reasons.append(self._error)
        dev = torch.device(device) if device is not None else None
        if self.interpreted():
            if dev is not None and dev.type != "cpu":
                reasons.append(f"TRITON_INTERPRET=1 runs Triton on CPU tensors, these are on {device}")
        else:
            if not torch.cuda.is_available():
                reasons.append("Triton needs a CUDA GPU (or TRITON_INTERPRET=1 for CPU tensors); none is available")
            if dev is not None and dev.type != "cuda":
                reasons.append(f"'triton' runs on CUDA tensors, these are on {device}")
        return reasons


class ReferenceBackend(Backend):
    """The ops in plain PyTorch (:mod:`protoseg_ext.reference`): any device, materialises ``(N, C*K)``."""

    name = "reference"

    def not_supported_reasons(self, device):
        return []

    def similarity(self, feats, protos, labels=None, *, ignore_index=-1, temperature=1.0, seg=True, lse=False,
                   own=False, cache_bytes=0, normalize=False):
        checks.similarity_args(feats, protos, labels, ignore_index, temperature, own)
        return SimilarityOut(*reference.similarity_outputs(feats, protos, labels, ignore_index, temperature, seg, lse,
                                                           own, normalize))

    def sinkhorn(self, own, labels, num_classes, ignore_index, iters, eps):
        checks.sinkhorn_args(own, labels, num_classes, ignore_index, iters, eps)
        return reference.sinkhorn(own, labels, num_classes, ignore_index, iters, eps)

    def prototype_sums(self, feats, slot, num_slots, normalize=False):
        checks.prototype_sums_args(feats, slot, num_slots)
        return reference.prototype_sums(feats, slot, num_slots, normalize)

    def prototype_ema(self, protos, sums, counts, gamma):
        checks.prototype_ema_args(protos, sums, counts, gamma)
        return reference.prototype_ema(protos, sums, counts, gamma)


_INSTANCES = {
    "cpu": CpuBackend(),
    "cuda": CudaBackend(),
    "triton": TritonBackend(),
    "reference": ReferenceBackend(),
}


def default_cache_bytes() -> int:
    """Memory the head may spend keeping softmax(S) (N x C*K) for the backward.

    ``PROTOSEG_CACHE_MB`` (default 2048 MiB, enough for a full-resolution
    Cityscapes step: 1024 x 2048 pixels, C*K = 190; 0 disables). Within the budget a
    training step costs two GEMMs; beyond it the backward recomputes S.
    """
    return int(float(os.environ.get("PROTOSEG_CACHE_MB", "2048")) * (1 << 20))


def cpu_buffer_pool_stats() -> dict:
    """What the ``cpu`` kernels' buffer pool holds (``csrc/cpu/buffer_pool.h``), as a dict of ints.

    ``idle_bytes`` / ``idle_buffers``: freed buffers kept for a later request of
    the same size (the softmax cache, the feature gradient, the prototype sums'
    partials of the last step's shapes; at most ``cap_bytes``, from
    ``PROTOSEG_POOL_MB``, default 1024 MiB); ``live_bytes``: buffers of 16 MiB
    and more handed out and still alive; ``reused`` / ``allocated``: requests
    served from an idle buffer / with a fresh allocation; ``released``: idle
    buffers handed back to the OS; ``peak_idle_bytes``. Raises when the compiled
    library is not loaded.
    """
    ext = load_extension()
    if ext is None:
        raise RuntimeError(f"the compiled protoseg_ext library is not loaded: {_ext_error}")
    return dict(ext.cpu_buffer_pool_stats())


def release_cpu_buffers() -> int:
    """Hands the ``cpu`` buffer pool's idle buffers back to the OS (say, before an evaluation at
    another size); returns the bytes released. The next training step allocates them afresh."""
    ext = load_extension()
    if ext is None:
        raise RuntimeError(f"the compiled protoseg_ext library is not loaded: {_ext_error}")
    return int(ext.cpu_buffer_pool_release())


def get_backend(name: str) -> Backend:
    if name not in _INSTANCES:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    return _INSTANCES[name]


def available_backends() -> List[str]:
    """Backends this build can run on some device of this machine."""
    out = []
    for name in BACKENDS:
        be = _INSTANCES[name]
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
                why[name] = _INSTANCES[name].not_supported_reasons(device)
                if not why[name]:
                    return _INSTANCES[name]
            raise RuntimeError(
                f"no backend can run on {device}: " + "; ".join(f"{n}: {', '.join(r)}" for n, r in why.items())
            )
    if backend not in _INSTANCES:
        raise ValueError(f"{source}: backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    be = _INSTANCES[backend]
    reasons = be.not_supported_reasons(device)
    if reasons:
        raise RuntimeError(f"{source} cannot run on {device}: " + "; ".join(reasons))
    return be
