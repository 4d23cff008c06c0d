"""ProtoSegHead: the official ProtoSeg prototype head as a module.

Prototypes are a buffer ``(C, K, D)`` (saved in the state_dict, never given a
gradient). A forward with labels in training mode runs the fused step: one
pass over the similarity gives the seg logits, the row log-sum-exp and the
own-class scores; Sinkhorn, the targets, the momentum update and the PPC/PPD
losses are computed from those, so ``(N, C*K)`` is never materialised.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from os import PathLike
from typing import Dict, List, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import backends, checks, functional, reference

__all__ = ["ProtoSegHead", "ProtoSegOutput", "read_official_state_dict"]


class ProtoSegOutput(NamedTuple):
    seg: torch.Tensor  # (B, C, H, W) logits after mask_norm
    loss_ppc: Optional[torch.Tensor]  # scalar, None without gt
    loss_ppd: Optional[torch.Tensor]  # scalar, None without gt
    target: Optional[torch.Tensor]  # (B*H*W,) int64, None without gt


@contextlib.contextmanager
def _labels_named_gt():
    """The step's labels are checked once, by its first op; its error names them as the caller knows them."""
    try:
        yield
    except ValueError as e:
        if str(e).startswith("labels["):
            raise ValueError("gt" + str(e)[len("labels"):]) from None
        raise


def read_official_state_dict(state: Union[Dict[str, torch.Tensor], str, PathLike]) -> Dict[str, torch.Tensor]:
    """A state_dict from a checkpoint file (``.safetensors`` or a torch checkpoint) or dict: bare,
    or under ``state_dict`` / ``model`` / ``state_dict_ema`` (as training scripts save it), with
    DDP's ``module.`` prefixes dropped. A file that cannot be read raises ``ValueError``."""
    if isinstance(state, (str, PathLike)):
        path = os.fspath(state)
        try:
            if path.endswith(".safetensors"):
                from safetensors.torch import load_file

                state = load_file(path)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # missing, truncated, not a checkpoint, pickled code (weights_only refuses it)
            raise ValueError(f"{path}: cannot read it as weights ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("expected a state_dict (parameter name -> tensor), or a checkpoint holding one")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# The works of the last collective of _all_reduce, dropped at the next one (or at interpreter exit).
_last_works: list = []


def _all_reduce(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place, and keep the finished works until the next call.

    Kept, a work's tensors are freed on this thread. Otherwise gloo's worker thread frees them when
    it drops the work, and freeing a tensor made in Python takes the GIL: if the interpreter is
    exiting by then (a script that ends just after a step while its process group is still alive,
    as with torch 2.14, where the first activation checkpoint leaves references to the default group
    behind ``destroy_process_group``), the thread cannot take it and the process aborts with
    "terminate called without an active exception"."""
    works = [dist.all_reduce(t, async_op=True) for t in tensors]
    for w in works:
        w.wait()
    _last_works[:] = works


class ProtoSegHead(nn.Module):
    """Nearest-prototype segmentation head of ProtoSeg (official mode).

    Args:
        dim: embedding size D of the input features ``(B, D, H, W)``.
        num_classes: C. num_prototype: K prototypes per class (official 10).
        gamma: momentum of the prototype update (official 0.999).
        ignore_index: label of unlabeled pixels in ``gt``. ``out.target`` uses
            it too, unless it lies in ``[0, C*K)`` (where it would be a valid
            target): then ``out.target`` marks ignored pixels with -1.
        assign: the prototype each pixel updates, from its Sinkhorn row Q:
            ``"gumbel"`` (official) ``argmax(Q + g)``, ``"argmax"`` ``argmax(Q)``
            (deterministic) or ``"sample"`` ``argmax(log Q + g)`` (a draw with
            probabilities Q); g standard Gumbel from torch's global generator.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``.
        feat_norm: apply the official LayerNorm over D before L2 normalisation.
        sync: with torch.distributed initialised, ``"official"`` averages the
            updated prototypes across ranks, ``"exact"`` all-reduces the
            per-prototype sums and counts before the update (every rank
            applies the global mean), ``"none"`` keeps them per rank.
        temperature: PPC temperature (official 1.0: raw cosine similarities).
        sinkhorn_iters, sinkhorn_eps: Sinkhorn settings (official 3, 0.05).
        update_prototype: update the prototypes in training mode (official True).
        cache_mb: memory (MiB) a training step may spend keeping softmax(S)
            (``cpu``, ``cuda``) or S (``triton``), N x C*K float32, for the
            backward instead of recomputing S;
            None reads ``PROTOSEG_CACHE_MB`` (default 2048), 0 always recomputes.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        num_prototype: int = 10,
        gamma: float = 0.999,
        ignore_index: int = -1,
        assign: str = "gumbel",
        backend: str = "auto",
        feat_norm: bool = True,
        sync: str = "official",
        temperature: float = 1.0,
        sinkhorn_iters: int = 3,
        sinkhorn_eps: float = 0.05,
        update_prototype: bool = True,
        cache_mb: Optional[float] = None,
    ):
        super().__init__()
        if dim < 1 or num_classes < 1 or not 1 <= num_prototype <= 256:
            raise ValueError(
                f"need dim >= 1, num_classes >= 1 and 1 <= num_prototype <= 256, got {dim}, {num_classes}, {num_prototype}"
            )
        checks.assign(assign)
        if sync not in ("official", "exact", "none"):
            raise ValueError(f"sync must be 'official', 'exact' or 'none', got {sync!r}")
        if backend != "auto":
            backends.get_backend(backend)  # unknown names fail here, not at the first forward
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.dim, self.num_classes, self.num_prototype = dim, num_classes, num_prototype
        self.gamma, self.ignore_index, self.assign, self.backend = gamma, ignore_index, assign, backend
        self.sync, self.temperature, self.update_prototype = sync, temperature, update_prototype
        self.sinkhorn_iters, self.sinkhorn_eps = sinkhorn_iters, sinkhorn_eps
        self.cache_mb = cache_mb
        # ignore value of the targets: ignore_index unless it is a valid target
        CK = num_classes * num_prototype
        self.target_ignore = -1 if 0 <= ignore_index < CK else ignore_index
        protos = torch.empty(num_classes, num_prototype, dim)
        nn.init.trunc_normal_(protos, std=0.02)  # official initialisation
        self.register_buffer("prototypes", F.normalize(protos, dim=-1))
        self.feat_norm = nn.LayerNorm(dim) if feat_norm else nn.Identity()
        self._warned_feat_norm = False
        self.mask_norm = nn.LayerNorm(num_classes)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_classes={self.num_classes}, num_prototype={self.num_prototype}, "
            f"gamma={self.gamma}, ignore_index={self.ignore_index}, assign={self.assign!r}, "
            f"backend={self.backend!r}, sync={self.sync!r}"
        )

    def embed(self, feats: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``(B, D, H, W)`` -> ``(B*H*W, D)``: LayerNorm over D, then L2 normalisation.

        ``normalize=False`` stops before the L2 normalisation (the fused
        kernels normalise the rows themselves, never storing the copy).
        """
        B, D, H, W = feats.shape
        x = self.feat_norm(feats.permute(0, 2, 3, 1).reshape(B * H * W, D))
        return F.normalize(x, p=2, dim=-1) if normalize else x

    def forward(self, feats: torch.Tensor, gt: Optional[torch.Tensor] = None) -> ProtoSegOutput:
        """``feats (B, D, H, W)``; with ``gt (B, H', W')`` also the targets, PPC/PPD and, when
        training, the prototype update. One path for every backend."""
        if not isinstance(feats, torch.Tensor) or feats.dim() != 4 or feats.shape[1] != self.dim:
            raise ValueError(f"feats must be (B, {self.dim}, H, W), got {checks.shape_of(feats)}")
        B, _, H, W = feats.shape
        if torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
            if self.training or gt is not None:
                raise RuntimeError(
                    "ProtoSegHead exports for inference only: call model.eval() and export the forward without "
                    "labels (a training step updates the prototypes, which an exported graph cannot)"
                )
            if torch.onnx.is_in_onnx_export():  # standard operators, so the file needs no protoseg_ext
                return ProtoSegOutput(self._standard_ops_seg(feats), None, None, None)
        be = backends.resolve(self.backend, feats.device)
        # the map as it lies and the official LayerNorm, fused into the similarity (any other
        # feat_norm module runs as it is, on the (N, D) rows)
        x, feat_ln = ((feats, self._layer_norm()) if self._fused_feat_norm()
                      else (self.embed(feats, normalize=False), None))
        # official: re-normalised every forward; the similarity reads them in the map's dtype (as autocast
        # casts them in the official code), the momentum update runs on the buffer's float32: a 16-bit
        # copy would round away most of each step's update (gamma = 0.999 moves an entry by less than
        # half a bfloat16 ulp)
        protos_master = F.normalize(self.prototypes, p=2, dim=-1)
        protos = protos_master.to(x.dtype)
        if gt is None:
            seg = be.embed_similarity(x, feat_ln, protos).seg
            return ProtoSegOutput(self._mask_norm(seg, be, B, H, W)[0], None, None, None)

        gt = self._labels_at(gt, B, H, W)  # (N,)
        ign = self.target_ignore
        backward = torch.is_grad_enabled() and (x.requires_grad or feat_ln is not None and feat_ln[0].requires_grad)
        # one pass over S: seg logits, row log-sum-exp (PPC), own-class scores; it validates the labels
        with _labels_named_gt():
            sim = be.embed_similarity(x, feat_ln, protos, gt, ignore_index=ign, temperature=self.temperature, seg=True,
                                      lse=True, own=True, cache_bytes=self._cache_bytes() if backward else 0)
        seg, pred = self._mask_norm(sim.seg, be, B, H, W)
        with torch.no_grad():
            target, slot = functional.assign_slots(be, sim.own.detach(), gt, pred, self.num_classes, mode=self.assign,
                                                   ignore_index=ign, sinkhorn_iters=self.sinkhorn_iters,
                                                   sinkhorn_eps=self.sinkhorn_eps)
            if self.training and self.update_prototype:
                feat_ln_d = None if feat_ln is None else (feat_ln[0].detach(), feat_ln[1].detach(), feat_ln[2])
                sums, counts = be.embed_prototype_sums(x.detach(), feat_ln_d, slot, self.num_classes * self.num_prototype,
                                                       sim.stats)
                self._apply_update(protos_master, sums, counts, be.prototype_ema)
        # one reduction forward, one kernel backward (the "losses" op family)
        ppc, ppd = be.ppc_ppd(sim.lse, sim.own, target, ign, self.temperature)
        return ProtoSegOutput(seg, ppc, ppd, target)

    # the head's keys in a checkpoint of the official HRNet_W48_Proto (its state_dict, bare or under
    # "state_dict" / "model", keys with or without DDP's "module." prefix)
    OFFICIAL_KEYS = ("prototypes", "feat_norm.weight", "feat_norm.bias", "mask_norm.weight", "mask_norm.bias")

    @torch.no_grad()
    def load_official_state_dict(self, state) -> List[str]:
        """Load the head of an official ProtoSeg checkpoint: ``prototypes (C, K, D)``,
        ``feat_norm.*`` and ``mask_norm.*``; every other key (backbone, cls_head, proj_head) is
        left alone. ``state`` is a state_dict or the path of a checkpoint file.

        Returns the keys loaded. A missing head key or one whose shape does not fit raises a
        ``ValueError`` naming it (and nothing is loaded).
        """
        state = read_official_state_dict(state)
        own = {"prototypes": self.prototypes}
        for name in ("feat_norm", "mask_norm"):
            module = getattr(self, name)
            for p in ("weight", "bias"):
                if isinstance(getattr(module, p, None), torch.Tensor):
                    own[f"{name}.{p}"] = getattr(module, p)
        missing = [k for k in own if k not in state]
        wrong = [f"{k} {tuple(state[k].shape)} (head {tuple(v.shape)})" for k, v in own.items()
                 if k in state and state[k].shape != v.shape]
        if missing or wrong:
            parts = ([f"missing keys: {', '.join(missing)}"] if missing else []) + (
                [f"wrong shapes: {', '.join(wrong)}"] if wrong else [])
            raise ValueError("the official checkpoint does not fit this ProtoSegHead "
                             f"(C={self.num_classes}, K={self.num_prototype}, D={self.dim}): " + "; ".join(parts))
        for k, v in own.items():
            v.copy_(state[k])
        return list(own)

    def _standard_ops_seg(self, feats: torch.Tensor) -> torch.Tensor:
        """The inference forward in standard operators (what ONNX export traces): the official
        einsum and max over K, then ``mask_norm``; ``(B, D, H, W)`` -> ``(B, C, H, W)``."""
        B, _, H, W = feats.shape
        x = self.embed(feats)
        seg = self.mask_norm(reference.proto_seg_logits(x, F.normalize(self.prototypes, p=2, dim=-1).to(x.dtype)))
        return seg.reshape(B, H, W, self.num_classes).permute(0, 3, 1, 2)

    def _fused_feat_norm(self) -> bool:
        """Whether feat_norm is what the fused embedding implements: Identity, or a LayerNorm over D."""
        fn = self.feat_norm
        if isinstance(fn, nn.Identity):
            return True
        if type(fn) is nn.LayerNorm and tuple(fn.normalized_shape) == (self.dim,):
            return True
        if not self._warned_feat_norm:
            self._warned_feat_norm = True
            warnings.warn(
                f"feat_norm is {type(fn).__name__}, not nn.LayerNorm({self.dim}) or nn.Identity: it runs as a module "
                "on a (N, D) copy of the features (more memory, no fused embedding)", RuntimeWarning, stacklevel=3,
            )
        return False

    def _layer_norm(self):
        """feat_norm as ``(weight, bias, eps)`` for the fused embedding (None for Identity)."""
        fn = self.feat_norm
        if isinstance(fn, nn.Identity):
            return None
        ones = torch.ones(self.dim, dtype=self.prototypes.dtype, device=self.prototypes.device)
        w = fn.weight if fn.weight is not None else ones
        b = fn.bias if fn.bias is not None else torch.zeros_like(ones)
        return w, b, fn.eps

    def _cache_bytes(self) -> int:
        return backends.default_cache_bytes() if self.cache_mb is None else int(self.cache_mb * (1 << 20))

    @torch.no_grad()
    def _apply_update(self, protos, sums, counts, ema):
        """Momentum update of the buffer, synchronised across ranks as ``sync`` says."""
        distributed = _dist_on() and self.sync != "none"
        if distributed and self.sync == "exact":
            sums, counts = sums.clone(), counts.clone()
            _all_reduce(sums, counts)
        new = ema(protos, sums, counts, self.gamma)
        if distributed and self.sync == "official":
            new = new.clone()
            _all_reduce(new.div_(dist.get_world_size()))
        self.prototypes.copy_(new.to(self.prototypes.dtype))

    def _labels_at(self, gt: torch.Tensor, B: int, H: int, W: int) -> torch.Tensor:
        """``gt (B, H', W')`` -> ``(B*H*W,)`` int64, nearest-downsampled as the official code,
        ignored pixels marked ``target_ignore``."""
        if not isinstance(gt, torch.Tensor) or gt.dim() != 3 or gt.shape[0] != B:
            shape = tuple(gt.shape) if isinstance(gt, torch.Tensor) else type(gt).__name__
            raise ValueError(f"gt must be (B={B}, H, W) integer labels, got {shape}")
        if gt.dtype.is_floating_point or gt.dtype == torch.bool:
            raise ValueError(f"gt must be an integer tensor, got {gt.dtype}")
        if gt.device != self.prototypes.device:
            raise ValueError(f"gt is on {gt.device} but the head is on {self.prototypes.device}")
        if gt.shape[1:] != (H, W):
            gt = F.interpolate(gt[:, None].float(), size=(H, W), mode="nearest")[:, 0]
        gt = gt.reshape(-1).long()  # its range is checked once, by the step's first op (similarity)
        if self.target_ignore != self.ignore_index:  # ignore_index is a valid target: mark ignored pixels -1
            gt = torch.where(gt == self.ignore_index, torch.full_like(gt, self.target_ignore), gt)
        return gt

    def _mask_norm(self, seg: torch.Tensor, be, B: int, H: int, W: int):
        """``mask_norm`` of the seg logits ``(B*H*W, C)`` as ``(B, C, H, W)``, and its arg-max over C ``(B*H*W,)``.

        The stock ``LayerNorm(C)`` runs as the backend's ``mask_norm`` op (on
        ``"cpu"`` a fused kernel whose image needs no layout copy) where the backend
        takes these inputs (``be.not_supported_reasons(..., "mask_norm", ...)``, e.g. the
        ``cpu`` kernel's dtypes); any other module, the stock one on inputs the backend
        does not take, and the stock one under ``torch.export``, runs as it is.
        """
        norm, C = self.mask_norm, self.num_classes
        # (under torch.export the module itself: the op's int batch argument would fix the exported batch size)
        fused = (type(norm) is nn.LayerNorm and tuple(norm.normalized_shape) == (C,) and norm.elementwise_affine
                 and not torch.compiler.is_exporting()
                 and not be.not_supported_reasons(seg.device, "mask_norm", seg=seg, weight=norm.weight, bias=norm.bias))
        if fused:
            out, pred = be.mask_norm(seg, norm.weight, norm.bias, norm.eps, B)
            return out.view(B, C, H, W), pred
        seg = norm(seg)
        return seg.reshape(B, H, W, C).permute(0, 3, 1, 2), seg.detach().argmax(dim=1)
