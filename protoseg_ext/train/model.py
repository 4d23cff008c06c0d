"""The segmentation network of the training script: backbone, projection, prototype head.

``ProtoSegNet`` follows the official ``HRNet_W48_Proto`` wiring at a size a CPU
can train: a multi-resolution backbone whose branches are upsampled to 1/4 and
concatenated, a ``cls_head`` convolution, a projection head with L2
normalisation, and :class:`protoseg_ext.ProtoSegHead` (LayerNorm over D, L2
normalisation, nearest prototype per class, mask_norm, prototype learning).

Resolution of the prototype head (``head_stride``):

* 1 (default, full resolution): the projected features are upsampled
  bilinearly to the label size and the head runs on every labeled pixel;
* 4 (official): the head runs at 1/4 resolution on nearest-downsampled labels,
  and the seg logits are upsampled bilinearly (align_corners=True) for the
  cross-entropy.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..head import ProtoSegHead

__all__ = ["CompactBackbone", "ProjectionHead", "ProtoSegNet"]


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions and a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(channels, channels),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class CompactBackbone(nn.Module):
    """Three branches at 1/4, 1/8 and 1/16 resolution (``w``, ``2w``, ``4w`` channels),
    fused HRNet-style: upsampled to 1/4 and concatenated -> ``(B, 7w, H/4, W/4)``."""

    def __init__(self, width: int = 32, blocks: int = 2):
        super().__init__()
        w = width
        self.stem = nn.Sequential(conv_bn_relu(3, w, stride=2), conv_bn_relu(w, w, stride=2))
        self.stage4 = nn.Sequential(*[BasicBlock(w) for _ in range(blocks)])
        self.stage8 = nn.Sequential(conv_bn_relu(w, 2 * w, stride=2), *[BasicBlock(2 * w) for _ in range(blocks)])
        self.stage16 = nn.Sequential(conv_bn_relu(2 * w, 4 * w, stride=2), *[BasicBlock(4 * w) for _ in range(blocks)])
        self.out_channels = 7 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x4 = self.stage4(self.stem(x))
        x8 = self.stage8(x4)
        x16 = self.stage16(x8)
        size = x4.shape[-2:]
        up = dict(size=size, mode="bilinear", align_corners=True)
        return torch.cat([x4, F.interpolate(x8, **up), F.interpolate(x16, **up)], dim=1)


class ProjectionHead(nn.Module):
    """Official ``ProjectionHead(proj='convmlp')``: 1x1 conv, BN, ReLU, 1x1 conv, L2 normalise."""

    def __init__(self, dim_in: int, proj_dim: int):
        super().__init__()
        self.proj = nn.Sequential(conv_bn_relu(dim_in, dim_in, kernel=1), nn.Conv2d(dim_in, proj_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(x), p=2, dim=1)


class ProtoSegNet(nn.Module):
    """Backbone + cls_head + projection + ProtoSegHead, with the training loss.

    ``forward(images (B, 3, H, W), labels (B, H, W) or None)`` returns
    ``(seg (B, C, H, W), losses)``: logits at the image size and, with labels,
    ``{"loss", "ce", "ppc", "ppd"}`` where
    ``loss = ce + ppc_weight * ppc + ppd_weight * ppd`` (official 0.01, 0.001).
    """

    def __init__(
        self,
        num_classes: int,
        proj_dim: int = 64,
        width: int = 32,
        num_prototype: int = 10,
        head_stride: int = 1,
        ignore_index: int = 255,
        ppc_weight: float = 0.01,
        ppd_weight: float = 0.001,
        gamma: float = 0.999,
        assign: str = "gumbel",
        backend: str = "auto",
        sync: str = "official",
    ):
        super().__init__()
        if head_stride not in (1, 4):
            raise ValueError(f"head_stride must be 1 (full resolution) or 4, got {head_stride}")
        self.head_stride, self.ignore_index = head_stride, ignore_index
        self.ppc_weight, self.ppd_weight = ppc_weight, ppd_weight
        self.backbone = CompactBackbone(width)
        hidden = 4 * width
        self.cls_head = conv_bn_relu(self.backbone.out_channels, hidden, kernel=1)
        self.proj_head = ProjectionHead(hidden, proj_dim)
        self.head = ProtoSegHead(
            proj_dim, num_classes, num_prototype, gamma=gamma, ignore_index=ignore_index,
            assign=assign, backend=backend, sync=sync,
        )  # fmt: skip

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> L2-normalised embeddings ``(B, D, H/4, W/4)``."""
        return self.proj_head(self.cls_head(self.backbone(images)))

    def forward(
        self, images: torch.Tensor, labels: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
        size = images.shape[-2:] if labels is None else labels.shape[-2:]
        emb = self.embed(images)
        if self.head_stride == 1:  # full resolution: one embedding per labeled pixel
            # channels-last, so the head's (B, D, H, W) -> (N, D) is a view, not a copy
            emb = emb.contiguous(memory_format=torch.channels_last)
            emb = F.interpolate(emb, size=size, mode="bilinear", align_corners=True)
        out = self.head(emb, labels)
        seg = out.seg
        if seg.shape[-2:] != size:
            seg = F.interpolate(seg, size=size, mode="bilinear", align_corners=True)
        if labels is None:
            return seg, None
        # mean over labeled pixels; a crop with none gives 0, not NaN
        n_valid = (labels != self.ignore_index).sum().clamp(min=1)
        ce = F.cross_entropy(seg, labels, ignore_index=self.ignore_index, reduction="sum") / n_valid
        loss = ce + self.ppc_weight * out.loss_ppc + self.ppd_weight * out.loss_ppd
        return seg, {"loss": loss, "ce": ce, "ppc": out.loss_ppc, "ppd": out.loss_ppd}
