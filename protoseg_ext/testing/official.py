"""An eager transcription of the official ProtoSeg model and loss, for tests and benchmarks.

``OfficialProtoModel`` restates ``HRNet_W48_Proto`` (lib/models/nets/hrnet.py of
tfzhou/ProtoSeg) and ``OfficialProtoLoss`` restates ``PixelPrototypeCELoss``
(lib/loss/loss_proto.py) with its PPC and PPD criteria, step for step: the
``(N, K, C)`` einsum, the per-class Python loop with boolean indexing, the
Gumbel draw through ``F.gumbel_softmax``, the full ``(N, C*K)`` cross-entropy.
The configuration object is replaced by constructor arguments, the backbone by
any module returning a list of maps (the official one returns HRNet's four
branches), and the official ``ProjectionHead`` / ``cls_head`` by modules passed
in (identity by default). Two switches make runs comparable with the fused
head: ``gumbel_noise`` (an ``(N, K)`` tensor of standard Gumbel noise; the
pixels of class c take its rows ``gt == c``) and ``assign="argmax"``.

This is what :func:`protoseg_ext.compat.accelerate` is tested and measured
against; it is not part of the library's API.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import reference

__all__ = ["OfficialProtoModel", "OfficialProtoLoss", "ListBackbone", "distributed_sinkhorn"]


class ListBackbone(nn.Module):
    """Feature maps given directly: ``forward(maps)`` returns ``maps`` (a list or one tensor)."""

    def forward(self, x):
        return list(x) if isinstance(x, (list, tuple)) else [x]


def distributed_sinkhorn(out, sinkhorn_iterations=3, epsilon=0.05, noise=None, assign="gumbel"):
    """Official ``distributed_sinkhorn`` (no communication): ``(hard one-hot (n, K), argmax (n,))``.

    ``noise (n, K)``: the Gumbel noise of the draw (default: ``F.gumbel_softmax`` draws it);
    ``assign="argmax"``: the one-hot of the argmax instead of the draw."""
    iters, eps = sinkhorn_iterations, epsilon
    L = torch.exp(out / eps).t()
    B, K = L.shape[1], L.shape[0]
    L /= torch.sum(L)
    for _ in range(iters):
        L /= torch.sum(L, dim=1, keepdim=True)
        L /= K
        L /= torch.sum(L, dim=0, keepdim=True)
        L /= B
    L *= B
    L = L.t()
    indexs = torch.argmax(L, dim=1)
    if assign == "argmax":
        L = F.one_hot(indexs, K).to(L.dtype)
    elif noise is None:
        L = F.gumbel_softmax(L, tau=0.5, hard=True)
    else:  # the hard sample gumbel_softmax would give for this noise
        L = F.one_hot(torch.argmax(L + noise, dim=1), K).to(L.dtype)
    return L, indexs


class OfficialProtoModel(nn.Module):
    """``HRNet_W48_Proto`` from the backbone on (official attribute names and state_dict keys)."""

    def __init__(self, in_channels: int, num_classes: int, num_prototype: int = 10, gamma: float = 0.999,
                 backbone: Optional[nn.Module] = None, cls_head: Optional[nn.Module] = None,
                 proj_head: Optional[nn.Module] = None, update_prototype: bool = True):
        super().__init__()
        self.gamma, self.num_prototype, self.num_classes = gamma, num_prototype, num_classes
        self.use_prototype, self.update_prototype, self.pretrain_prototype = True, update_prototype, False
        self.backbone = backbone if backbone is not None else ListBackbone()
        self.cls_head = cls_head if cls_head is not None else nn.Identity()
        self.prototypes = nn.Parameter(torch.zeros(num_classes, num_prototype, in_channels), requires_grad=True)
        self.proj_head = proj_head if proj_head is not None else nn.Identity()
        self.feat_norm = nn.LayerNorm(in_channels)
        self.mask_norm = nn.LayerNorm(num_classes)
        nn.init.trunc_normal_(self.prototypes, std=0.02)
        self.gumbel_noise: Optional[torch.Tensor] = None  # (N, K) noise for the next step's draw
        self.assign = "gumbel"

    def prototype_learning(self, _c, out_seg, gt_seg, masks):
        pred_seg = torch.max(out_seg, 1)[1]
        mask = gt_seg == pred_seg.view(-1)
        cosine_similarity = torch.mm(_c, self.prototypes.view(-1, self.prototypes.shape[-1]).t())
        proto_logits = cosine_similarity
        proto_target = gt_seg.clone().float()
        protos = self.prototypes.data.clone()
        for k in range(self.num_classes):
            init_q = masks[..., k]
            init_q = init_q[gt_seg == k, ...]
            if init_q.shape[0] == 0:
                continue
            noise = None if self.gumbel_noise is None else self.gumbel_noise[gt_seg == k]
            q, indexs = distributed_sinkhorn(init_q, noise=noise, assign=self.assign)
            m_k = mask[gt_seg == k]
            c_k = _c[gt_seg == k, ...]
            m_q = q * m_k[:, None].expand(-1, self.num_prototype)
            c_q = c_k * m_k[:, None].expand(-1, c_k.shape[-1])
            f = m_q.transpose(0, 1) @ c_q
            n = torch.sum(m_q, dim=0)
            if torch.sum(n) > 0 and self.update_prototype is True:
                f = F.normalize(f, p=2, dim=-1)
                protos[k, n != 0, :] = reference.momentum_update(protos[k, n != 0, :], f[n != 0, :], self.gamma)
            proto_target[gt_seg == k] = indexs.float() + (self.num_prototype * k)
        self.prototypes = nn.Parameter(reference.l2_normalize(protos), requires_grad=False)
        if dist.is_available() and dist.is_initialized():
            protos = self.prototypes.data.clone()
            dist.all_reduce(protos.div_(dist.get_world_size()))
            self.prototypes = nn.Parameter(protos, requires_grad=False)
        return proto_logits, proto_target

    def forward(self, x_, gt_semantic_seg=None, pretrain_prototype=False):
        x = self.backbone(x_)
        h, w = x[0].shape[2:]
        feats = torch.cat([x[0]] + [F.interpolate(f, size=(h, w), mode="bilinear", align_corners=True)
                                    for f in x[1:]], 1)
        c = self.cls_head(feats)
        c = self.proj_head(c)
        _c = c.permute(0, 2, 3, 1).reshape(-1, c.shape[1])  # rearrange 'b c h w -> (b h w) c'
        _c = self.feat_norm(_c)
        _c = reference.l2_normalize(_c)
        self.prototypes.data.copy_(reference.l2_normalize(self.prototypes))
        masks = torch.einsum("nd,kmd->nmk", _c, self.prototypes)
        out_seg = torch.amax(masks, dim=1)
        out_seg = self.mask_norm(out_seg)
        out_seg = out_seg.reshape(feats.shape[0], feats.shape[2], feats.shape[3], -1).permute(0, 3, 1, 2)
        if pretrain_prototype is False and self.use_prototype is True and gt_semantic_seg is not None:
            gt_seg = F.interpolate(gt_semantic_seg.float(), size=feats.size()[2:], mode="nearest").view(-1)
            contrast_logits, contrast_target = self.prototype_learning(_c, out_seg, gt_seg, masks)
            return {"seg": out_seg, "logits": contrast_logits, "target": contrast_target}
        return out_seg


class OfficialProtoLoss(nn.Module):
    """``PixelPrototypeCELoss`` with ``FSCELoss`` as the seg criterion (``ce_weight`` optional)."""

    def __init__(self, ignore_index: int = -1, loss_ppc_weight: float = 0.01, loss_ppd_weight: float = 0.001,
                 ce_weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.ignore_label = ignore_index
        self.loss_ppc_weight, self.loss_ppd_weight = loss_ppc_weight, loss_ppd_weight
        self.seg_criterion = nn.CrossEntropyLoss(weight=ce_weight, ignore_index=ignore_index)

    def ppc_criterion(self, contrast_logits, contrast_target):
        return F.cross_entropy(contrast_logits, contrast_target.long(), ignore_index=self.ignore_label)

    def ppd_criterion(self, contrast_logits, contrast_target):
        keep = contrast_target != self.ignore_label
        contrast_logits, contrast_target = contrast_logits[keep, :], contrast_target[keep]
        logits = torch.gather(contrast_logits, 1, contrast_target[:, None].long())
        return (1 - logits).pow(2).mean()

    def forward(self, preds, target):
        h, w = target.size(1), target.size(2)
        if isinstance(preds, dict):
            seg, contrast_logits, contrast_target = preds["seg"], preds["logits"], preds["target"]
            loss_ppc = self.ppc_criterion(contrast_logits, contrast_target)
            loss_ppd = self.ppd_criterion(contrast_logits, contrast_target)
            pred = F.interpolate(input=seg, size=(h, w), mode="bilinear", align_corners=True)
            loss = self.seg_criterion(pred, target)
            return loss + self.loss_ppc_weight * loss_ppc + self.loss_ppd_weight * loss_ppd
        pred = F.interpolate(input=preds, size=(h, w), mode="bilinear", align_corners=True)
        return self.seg_criterion(pred, target)
