"""Backends and the choice between them.

Every fused backend offers the same four ops with the same contract (see
``csrc/protoseg.cpp``): ``similarity`` (differentiable w.r.t. feats),
``sinkhorn``, ``prototype_sums`` and ``prototype_ema``. ``"reference"`` is the
eager oracle of ``protoseg_ext.reference``.

Selection: ``backend="auto"`` takes ``PROTOSEG_BACKEND`` if set, else the best
backend for the tensors' device (CPU: ``"cpu"``; CUDA: ``"triton"``, then
``"cuda"``; then ``"reference"``). A backend asked for by name that cannot run
raises, saying why.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F

from . import ops

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
    ops.register_fakes("protoseg_ext", cache=True)
    ops.register_similarity_autograd("protoseg_ext")
    ops.register_mask_norm("protoseg_ext")
    _ext = _C
    return _ext


class Backend:
    """A set of the four fused ops, with the reasons it cannot run somewhere."""

    name = "?"

    def not_supported_reasons(self, device: torch.device) -> List[str]:
        raise NotImplementedError

    def usable(self, device: torch.device) -> bool:
        return not self.not_supported_reasons(device)


class _OpsBackend(Backend):
    """A backend whose ops live in a ``torch.ops`` namespace."""

    namespace = "?"
    # the protoseg_ext schemas: similarity takes cache_bytes (keep softmax(S) for
    # the backward within a byte budget) and normalize; prototype_sums normalize
    supports_cache = False

    @property
    def _ops(self):
        return getattr(torch.ops, self.namespace)

    def similarity(self, feats, protos, labels, ignore_index, temperature, compute_seg, compute_lse, compute_own,
                   cache_bytes=0, normalize=False):
        """``(seg, argk, lse, own)``; see csrc/protoseg.cpp. ``cache_bytes`` > 0 lets
        the backward reuse softmax(S) instead of recomputing S, if it fits;
        ``normalize`` L2-normalises the rows of ``feats`` inside the kernel."""
        args = (feats, protos, labels, int(ignore_index), float(temperature), compute_seg, compute_lse, compute_own)
        if self.supports_cache:
            return self._ops.similarity(*args, int(cache_bytes), bool(normalize))[:4]
        if normalize:
            args = (F.normalize(feats, p=2, dim=-1),) + args[1:]
        return self._ops.similarity(*args)

    def sinkhorn(self, own, labels, num_classes, ignore_index, iters, eps):
        return self._ops.sinkhorn(own, labels, int(num_classes), int(ignore_index), int(iters), float(eps))

    def prototype_sums(self, feats, slot, num_slots, normalize=False):
        if self.supports_cache:
            return self._ops.prototype_sums(feats, slot, int(num_slots), bool(normalize))
        if normalize:
            feats = F.normalize(feats, p=2, dim=-1)
        return self._ops.prototype_sums(feats, slot, int(num_slots))

    def prototype_ema(self, protos, sums, counts, gamma):
        return self._ops.prototype_ema(protos, sums, counts, float(gamma))


class CpuBackend(_OpsBackend):
    name = "cpu"
    namespace = "protoseg_ext"
    supports_cache = True

    def not_supported_reasons(self, device):
        reasons = []
        if load_extension() is None:
            reasons.append(_ext_error)
        if device is not None and torch.device(device).type != "cpu":
            reasons.append(f"'cpu' runs on CPU tensors, these are on {device}")
        return reasons


class CudaBackend(_OpsBackend):
    name = "cuda"
    namespace = "protoseg_ext"
    supports_cache = True  # same schema as "cpu" (cache_bytes, normalize)

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
    name = "reference"

    def not_supported_reasons(self, device):
        return []


_INSTANCES = {
    "cpu": CpuBackend(),
    "cuda": CudaBackend(),
    "triton": TritonBackend(),
    "reference": ReferenceBackend(),
}


def default_cache_bytes() -> int:
    """Memory the head may spend keeping softmax(S) (N x C*K) for the backward.

    ``PROTOSEG_CACHE_MB`` (default 1024 MiB; 0 disables). Within the budget a
    training step costs two GEMMs; beyond it the backward recomputes S.
    """
    return int(float(os.environ.get("PROTOSEG_CACHE_MB", "1024")) * (1 << 20))


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
    """The backend to run on ``device``; see the module docstring."""
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a string, got {type(backend).__name__}")
    device = torch.device(device)
    if backend == "auto":
        env = os.environ.get("PROTOSEG_BACKEND", "").strip()
        if env and env != "auto":
            backend = env
        else:
            for name in _auto_order(device):
                if _INSTANCES[name].usable(device):
                    return _INSTANCES[name]
    be = get_backend(backend)
    reasons = be.not_supported_reasons(device)
    if reasons:
        raise RuntimeError(f"backend {backend!r} cannot run on {device}: " + "; ".join(reasons))
    return be
