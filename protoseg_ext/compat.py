"""Drop-in replacements for code written against the official ProtoSeg repository.

Same names, signatures and return values as the official functions, computed
by the fused kernels:

* ``distributed_sinkhorn(out, sinkhorn_iterations=3, epsilon=0.05) -> (L, indexs)``
* ``momentum_update(old_value, new_value, momentum, debug=False)``
* ``prototype_learning(self, _c, out_seg, gt_seg, masks) -> (proto_logits, proto_target)``,
  the method of the official model; switch a model to it with one line::

      HRNet_W48_Proto.prototype_learning = protoseg_ext.compat.prototype_learning

  It reads ``self.prototypes``, ``self.num_classes``, ``self.num_prototype``,
  ``self.gamma`` and ``self.update_prototype`` and replaces
  ``self.prototypes`` as the official method does (averaged across ranks when
  torch.distributed is initialised).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import backends, checks, functional, reference
from .head import ProtoSegHead, _all_reduce

__all__ = ["distributed_sinkhorn", "momentum_update", "prototype_learning", "l2_normalize", "accelerate", "restore",
           "proto_head_forward", "FusedProtoLogits"]

l2_normalize = reference.l2_normalize


def distributed_sinkhorn(out: torch.Tensor, sinkhorn_iterations: int = 3, epsilon: float = 0.05):
    """Official ``distributed_sinkhorn``: ``out (n, K)`` -> (hard Gumbel one-hot ``(n, K)``, argmax ``(n,)``).

    As in the official code, no communication takes place.
    """
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"out must be a (n, K) tensor, got {getattr(out, 'shape', type(out).__name__)}")
    labels = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)
    be = backends.resolve("auto", out.device)
    with torch.no_grad():
        L = be.sinkhorn(out.detach(), labels, 1, -1, sinkhorn_iterations, epsilon)
    indexs = torch.argmax(L, dim=1)
    L = F.gumbel_softmax(L, tau=0.5, hard=True)
    return L, indexs


def momentum_update(old_value, new_value, momentum, debug=False):
    """Official ``momentum_update``: ``momentum * old + (1 - momentum) * new``."""
    update = reference.momentum_update(old_value, new_value, momentum)
    if debug:
        print(
            "old prot: {:.3f} x |{:.3f}|, new val: {:.3f} x |{:.3f}|, result= |{:.3f}|".format(
                momentum, torch.norm(old_value, p=2), (1 - momentum), torch.norm(new_value, p=2), torch.norm(update, p=2)
            )
        )
    return update


def prototype_learning(self, _c, out_seg, gt_seg, masks):
    """The official model's ``prototype_learning`` method, fused.

    ``_c (N, D)`` normalised embeddings, ``out_seg (B, C, H, W)`` logits,
    ``gt_seg (N,)`` labels (any value outside ``[0, C)`` is ignored and kept
    as its own target, as in the official loop), ``masks (N, K, C)``.
    Returns ``proto_logits (N, C*K)`` (the similarity matrix the official PPC
    and PPD criteria expect; taken from ``masks``, not recomputed) and
    ``proto_target (N,)`` float.
    """
    C, K = self.num_classes, self.num_prototype
    seg = out_seg.permute(0, 2, 3, 1).reshape(-1, C) if out_seg.dim() == 4 else out_seg
    gt = gt_seg.reshape(-1)
    labels = gt.long()
    in_range = (labels >= 0) & (labels < C) & (gt == labels)  # also drops fractional float labels
    labels = torch.where(in_range, labels, torch.full_like(labels, -1))
    protos = self.prototypes.data
    update = getattr(self, "update_prototype", True) is True  # official: `self.update_prototype is True`
    target, new = functional.prototype_learning(
        _c.detach(), protos, labels, seg.detach(), gamma=self.gamma, assign="gumbel", ignore_index=-1,
        update=update,
    )
    proto_target = torch.where(in_range, target.float(), gt.float())  # official: gt_seg.clone().float()
    proto_logits = masks.permute(0, 2, 1).reshape(masks.shape[0], C * K)
    self.prototypes = nn.Parameter(new, requires_grad=False)
    if dist.is_available() and dist.is_initialized():
        protos = self.prototypes.data.clone()
        _all_reduce(protos.div_(dist.get_world_size()))
        self.prototypes = nn.Parameter(protos, requires_grad=False)
    return proto_logits, proto_target


# --------------------------------------------------------------------------
# accelerate: the official model and loss on the fused head
# --------------------------------------------------------------------------

# what the accelerated forward and loss read of an official instance
_HEAD_ATTRS = ("feat_norm", "mask_norm", "prototypes", "num_classes", "num_prototype", "gamma", "use_prototype",
               "update_prototype")
_FEATURE_ATTRS = ("backbone", "cls_head", "proj_head")
_LOSS_ATTRS = ("seg_criterion", "loss_ppc_weight", "loss_ppd_weight")
_DEFAULTS = {"backend": "auto", "assign": "gumbel", "cache_mb": None}  # of a class never passed to accelerate


class FusedProtoLogits:
    """``preds['logits']`` of an accelerated model: the PPC and PPD losses the official
    ``(N, C*K)`` similarity matrix would give, computed by the fused kernels instead of it.

    The accelerated ``PixelPrototypeCELoss`` reads ``ppc`` and ``ppd``; ``shape`` is the
    shape the official tensor would have had.
    """

    __slots__ = ("ppc", "ppd", "shape")

    def __init__(self, ppc: torch.Tensor, ppd: torch.Tensor, shape):
        self.ppc, self.ppd, self.shape = ppc, ppd, torch.Size(shape)

    def __repr__(self) -> str:
        return f"FusedProtoLogits(shape={tuple(self.shape)}, ppc={self.ppc.item():.4g}, ppd={self.ppd.item():.4g})"


def _missing(obj, names) -> List[str]:
    return [n for n in names if not hasattr(obj, n)]


def _require(obj, names, what: str) -> None:
    missing = _missing(obj, names)
    if missing:
        raise AttributeError(
            f"{type(obj).__name__} is not an official ProtoSeg {what}: it has no {', '.join(missing)} "
            f"(protoseg_ext.compat.accelerate reads {', '.join(names)})"
        )


def _fused_head(model) -> ProtoSegHead:
    """The :class:`ProtoSegHead` that runs ``model``'s head: it shares the model's ``feat_norm``
    and ``mask_norm`` modules and its prototypes' storage, and is not a submodule of the model
    (so the model's state_dict keeps the official keys)."""
    settings = getattr(type(model), "_protoseg_accelerated", _DEFAULTS)
    head = model.__dict__.get("_protoseg_head")
    C, K, D = model.prototypes.shape
    if head is None or (head.num_classes, head.num_prototype, head.dim) != (C, K, D):
        # ignore_index -1 and sync="official" (average the updated prototypes) are the official code's;
        # its initial prototypes are never used, so their draw must not move the caller's random stream
        with torch.random.fork_rng(devices=[]):
            head = ProtoSegHead(D, C, K, gamma=model.gamma, ignore_index=-1, sync="official", **settings)
        model.__dict__["_protoseg_head"] = head
    head.assign, head.backend, head.cache_mb = settings["assign"], settings["backend"], settings["cache_mb"]
    head.feat_norm, head.mask_norm = model.feat_norm, model.mask_norm
    head.gamma = model.gamma
    head.update_prototype = model.update_prototype is True  # official: `self.update_prototype is True`
    head._buffers["prototypes"] = model.prototypes.data  # the update writes into the model's prototypes
    return head


def proto_head_forward(self, c: torch.Tensor, gt_semantic_seg: Optional[torch.Tensor] = None,
                       pretrain_prototype: bool = False):
    """The official ``HRNet_W48_Proto.forward`` from the projection output ``c (B, D, H, W)`` on, fused.

    Returns what the official forward returns: ``out_seg (B, C, H, W)`` without labels, else
    ``{'seg', 'logits', 'target'}`` where ``'logits'`` is a :class:`FusedProtoLogits` (never the
    ``(N, C*K)`` matrix) and ``'target'`` the float ``(N,)`` targets. ``gt_semantic_seg`` is
    ``(B, 1, H', W')`` (or ``(B, H', W')``); labels outside ``[0, C)`` are ignored and kept as
    their own target, as in the official loop.
    """
    _require(self, _HEAD_ATTRS, "model")
    with torch.no_grad():  # official: the prototypes are re-normalised in place every forward
        self.prototypes.data.copy_(reference.l2_normalize(self.prototypes.data))
    head = _fused_head(self)
    learn = pretrain_prototype is False and self.use_prototype is True and gt_semantic_seg is not None
    if not learn:
        head.training = False  # no prototype update without labels (set on the head alone, not its modules)
        return head(c).seg
    B, _, H, W = c.shape
    gt = gt_semantic_seg if gt_semantic_seg.dim() == 4 else gt_semantic_seg[:, None]
    gt = F.interpolate(gt.float(), size=(H, W), mode="nearest").view(-1)  # official nearest downsampling
    labels = gt.long()
    in_range = (labels >= 0) & (labels < self.num_classes) & (gt == labels)
    labels = torch.where(in_range, labels, torch.full_like(labels, -1))
    head.training = True  # official: labels given means the prototypes are updated (if update_prototype)
    out = head(c, labels.view(B, H, W))
    proto_target = torch.where(in_range, out.target.float(), gt)  # official: gt_seg.clone().float()
    if self.prototypes.requires_grad:  # official: replaced by a Parameter without gradient after learning
        self.prototypes = nn.Parameter(self.prototypes.data, requires_grad=False)
    CK = self.num_classes * self.num_prototype
    return {"seg": out.seg, "logits": FusedProtoLogits(out.loss_ppc, out.loss_ppd, (gt.numel(), CK)),
            "target": proto_target}


def _official_features(self, x_: torch.Tensor) -> torch.Tensor:
    """The official forward up to the projection: backbone branches upsampled to the finest
    (bilinear, align_corners=True), concatenated, ``cls_head``, ``proj_head``."""
    _require(self, _FEATURE_ATTRS, "model")
    x = self.backbone(x_)
    size = x[0].shape[2:]
    up = [F.interpolate(f, size=size, mode="bilinear", align_corners=True) for f in x[1:]]
    feats = torch.cat([x[0]] + up, 1) if up else x[0]  # one map: no copy
    return self.proj_head(self.cls_head(feats))


def _accelerated_forward(self, x_, gt_semantic_seg=None, pretrain_prototype=False):
    return proto_head_forward(self, _official_features(self, x_), gt_semantic_seg, pretrain_prototype)


def _accelerated_loss_forward(self, preds, target):
    fused = preds.get("logits") if isinstance(preds, dict) else None
    if not isinstance(fused, FusedProtoLogits):
        return _original_method(self, "forward")(preds, target)
    _require(self, _LOSS_ATTRS, "loss")
    h, w = target.size(1), target.size(2)
    pred = F.interpolate(preds["seg"], size=(h, w), mode="bilinear", align_corners=True)
    loss = self.seg_criterion(pred, target)
    return loss + self.loss_ppc_weight * fused.ppc + self.loss_ppd_weight * fused.ppd


def accelerate(model_class: type, loss_class: type, *, backend: str = "auto", assign: str = "gumbel",
               cache_mb: Optional[float] = None, replace_forward: bool = True) -> None:
    """Make code written against the official repository train through the fused head.

    ``model_class`` is the official ``HRNet_W48_Proto`` (or a class with its attributes),
    ``loss_class`` the official ``PixelPrototypeCELoss``. After the call, the model's forward
    runs from its projection output on (feat_norm, the prototypes, mask_norm, prototype
    learning, PPC and PPD) as :class:`~protoseg_ext.ProtoSegHead` does, never building the
    ``(N, C*K)`` similarity; the loss takes PPC and PPD from it. Trainer, configs and the
    state_dict (keys, shapes) stay the official ones, so checkpoints load both ways.
    ``backend``, ``assign`` and ``cache_mb`` are :class:`~protoseg_ext.ProtoSegHead`'s (official:
    the Gumbel draw; ``cache_mb`` the memory the backward may keep softmax(S) in). A model whose
    features are not HRNet's four branches calls :func:`proto_head_forward` from its own forward
    and is accelerated with ``replace_forward=False`` (its forward stays; the settings apply).
    Calling it again changes the settings; :func:`restore` undoes it.
    """
    for cls, names, what in ((model_class, ("forward", "prototype_learning"), "model"),
                             (loss_class, ("forward",), "loss")):
        if not isinstance(cls, type):
            raise TypeError(f"accelerate takes the official {what} class, got {type(cls).__name__}")
        missing = _missing(cls, names)
        if missing:
            raise AttributeError(f"{cls.__name__} is not an official ProtoSeg {what} class: it has no "
                                 f"{', '.join(missing)}")
    checks.assign(assign)
    if backend != "auto":
        backends.get_backend(backend)  # an unknown name fails here
    if cache_mb is not None and not cache_mb >= 0:
        raise ValueError(f"cache_mb must be >= 0 or None, got {cache_mb}")
    replaced = [(loss_class, _accelerated_loss_forward)] + [(model_class, _accelerated_forward)] * replace_forward
    for cls, forward in replaced:
        if "_protoseg_original_forward" not in cls.__dict__:
            cls._protoseg_original_forward = cls.__dict__.get("forward", _INHERITED)
        cls.forward = forward
    if "_protoseg_original_prototype_learning" not in model_class.__dict__:
        model_class._protoseg_original_prototype_learning = model_class.__dict__.get("prototype_learning", _INHERITED)
    model_class.prototype_learning = prototype_learning  # the method too, for code that calls it directly
    model_class._protoseg_accelerated = {"backend": backend, "assign": assign, "cache_mb": cache_mb}


_INHERITED = object()  # marks a method the class inherited (restore deletes its override)


def _original_method(obj, name: str):
    """``obj``'s method ``name`` as its class had it before :func:`accelerate`."""
    for cls in type(obj).__mro__:
        saved = cls.__dict__.get(f"_protoseg_original_{name}")
        if saved is not None:
            return getattr(super(cls, obj), name) if saved is _INHERITED else saved.__get__(obj)
    raise AttributeError(f"{type(obj).__name__}.{name} was not replaced by protoseg_ext.compat.accelerate")


def restore(model_class: type, loss_class: type) -> None:
    """Undo :func:`accelerate`: the classes' own methods again."""
    for cls, names in ((model_class, ("forward", "prototype_learning")), (loss_class, ("forward",))):
        for name in names:
            saved = cls.__dict__.get(f"_protoseg_original_{name}")
            if saved is None:
                continue
            if saved is _INHERITED:
                delattr(cls, name)
            else:
                setattr(cls, name, saved)
            delattr(cls, f"_protoseg_original_{name}")
    if "_protoseg_accelerated" in model_class.__dict__:
        del model_class._protoseg_accelerated
