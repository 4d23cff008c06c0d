"""The backends with compiled ops: ``cpu`` and ``cuda`` (``torch.ops.protoseg_ext``, from
``protoseg_ext._C``) and ``triton`` (``torch.ops.protoseg_triton``, from
:mod:`protoseg_ext.triton_ops`). All three call the ops of the contract
(:class:`protoseg_ext.backends.Backend`) through one class, :class:`OpsBackend`,
that differs only by namespace and by what each says it cannot run.
"""

from __future__ import annotations

import importlib
import os
from typing import List, Optional

import torch

from . import ops
from .backends import Backend, EmbedSimilarityOut, SimilarityOut
from .reference_backend import composed_mask_norm

__all__ = ["OpsBackend", "CpuBackend", "CudaBackend", "TritonBackend"]


def _labels_or_empty(labels, feats):
    return torch.empty(0, dtype=torch.long, device=feats.device) if labels is None else labels


class OpsBackend(Backend):
    """A backend whose ops are registered in a ``torch.ops`` namespace with the schemas of csrc/protoseg.cpp.

    ``mask_norm`` is a compiled op only in ``protoseg_ext`` on CPU (:class:`CpuBackend`); elsewhere it
    is ``F.layer_norm``, composed as the reference backend composes it.
    """

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
        # (its autograd: the "embed" family of protoseg_ext.ops)
        w, b, eps = feat_norm if feat_norm is not None else (None, None, 1e-5)
        out = self._ops.embed_similarity(feats, w, b, float(eps), protos, _labels_or_empty(labels, feats),
                                         int(ignore_index), float(temperature), bool(seg), bool(lse), bool(own),
                                         int(cache_bytes))
        return EmbedSimilarityOut(*out[:4], out[5])

    def embed_prototype_sums(self, feats, feat_norm, slot, num_slots, stats=None):
        # the map read as embed_similarity reads it, tile by tile: never an (N, D) copy
        w, b, eps = feat_norm if feat_norm is not None else (None, None, 1e-5)
        sums, counts = self._ops.embed_prototype_sums(feats, w, b, float(eps), slot, int(num_slots), stats)
        return sums, counts

    def mask_norm(self, seg, weight, bias, eps, batch):
        return composed_mask_norm(seg, weight, bias, eps, batch)

    def ppc_ppd(self, lse, own, target, ignore_index, temperature):
        # one reduction forward, one elementwise kernel backward (the "losses" family of protoseg_ext.ops)
        ppc, ppd, _ = self._ops.ppc_ppd(lse, own, target, int(ignore_index), float(temperature))
        return ppc, ppd


def _extension_reasons() -> List[str]:
    return [ops.extension_error()] if ops.load_extension() is None else []


class CpuBackend(OpsBackend):
    name = "cpu"
    namespace = "protoseg_ext"

    def device_reasons(self, device):
        reasons = _extension_reasons()
        if device is not None and torch.device(device).type != "cpu":
            reasons.append(f"'cpu' runs on CPU tensors, these are on {device}")
        return reasons

    def input_reasons(self, op, inputs):
        if op != "mask_norm":
            return []
        # the fused kernel: float32/float64, weight and bias of seg's dtype, no autocast
        seg, weight, bias = inputs.get("seg"), inputs.get("weight"), inputs.get("bias")
        reasons = []
        if seg is not None and seg.dtype not in (torch.float32, torch.float64):
            reasons.append(f"'cpu' mask_norm takes float32 or float64 seg, got {seg.dtype}")
        for name, t in (("weight", weight), ("bias", bias)):
            if name in inputs and t is None:
                reasons.append(f"'cpu' mask_norm needs a {name} (an affine LayerNorm)")
            elif t is not None and seg is not None and t.dtype != seg.dtype:
                reasons.append(f"'cpu' mask_norm needs {name} of seg's dtype {seg.dtype}, got {t.dtype}")
        if torch.is_autocast_enabled("cpu"):
            reasons.append("'cpu' mask_norm does not run under CPU autocast")
        return reasons

    def mask_norm(self, seg, weight, bias, eps, batch):
        # the fused kernel: a contiguous image whose gradient needs no layout copy, and the arg-max
        # from the same pass; inputs it cannot take raise (the head routes them to nn.LayerNorm)
        reasons = self.input_reasons("mask_norm", {"seg": seg, "weight": weight, "bias": bias})
        if reasons:
            raise ValueError("; ".join(reasons))
        out, _, _, pred = self._ops.mask_norm(seg, weight, bias, float(eps), int(batch))
        return out, pred


class CudaBackend(OpsBackend):
    name = "cuda"
    namespace = "protoseg_ext"

    def device_reasons(self, device):
        reasons = _extension_reasons()
        ext = ops.load_extension()
        if ext is not None and not ext.WITH_CUDA:
            reasons.append("protoseg_ext._C was built without CUDA (set CUDA_HOME, or PROTOSEG_FORCE_CUDA=1, and rebuild)")
        if not torch.cuda.is_available():
            reasons.append("torch.cuda.is_available() is False (no GPU or driver)")
        if device is not None and torch.device(device).type != "cuda":
            reasons.append(f"'cuda' runs on CUDA tensors, these are on {device}")
        return reasons


class TritonBackend(OpsBackend):
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

    def device_reasons(self, device):
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
