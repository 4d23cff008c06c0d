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

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import backends, functional, reference

__all__ = ["distributed_sinkhorn", "momentum_update", "prototype_learning", "l2_normalize"]

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
        dist.all_reduce(protos.div_(dist.get_world_size()))
        self.prototypes = nn.Parameter(protos, requires_grad=False)
    return proto_logits, proto_target
