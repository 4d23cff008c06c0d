"""The segmentation network of the training script: backbone, projection, prototype head.

``ProtoSegNet`` follows the official ``HRNet_W48_Proto`` wiring: a
multi-resolution backbone whose branches are upsampled to 1/4 and concatenated,
a ``cls_head`` convolution, a projection head with L2 normalisation, and
:class:`protoseg_ext.ProtoSegHead` (LayerNorm over D, L2 normalisation, nearest
prototype per class, mask_norm, prototype learning).

Backbones (``backbone=``):

* ``"compact"``: :class:`CompactBackbone`, a small HRNet-style network a CPU can train;
* any timm model with ``features_only`` (:class:`TimmBackbone`, needs
  ``pip install 'protoseg_ext[timm]'``): its feature maps at strides 4 and
  coarser, upsampled to the finest of them and concatenated. For HRNet the
  raw branches are used (``feature_location=''``): hrnet_w48 gives
  48 + 96 + 192 + 384 = 720 channels, the official HRNet-W48 head's input.
  Weights come from a local file only (``pretrained=PATH``); nothing is downloaded.

Resolution of the prototype head (``head_stride``):

* 1 (default, full resolution): the projected features are upsampled
  bilinearly to the label size and the head runs on every labeled pixel;
* 4 (official): the head runs at 1/4 resolution on nearest-downsampled labels,
  and the seg logits are upsampled bilinearly (align_corners=True) for the
  cross-entropy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends
from ..functional import PPC_WEIGHT, PPD_WEIGHT, official_objective
from ..head import ProtoSegHead, read_official_state_dict

__all__ = [
    "CompactBackbone", "TimmBackbone", "ProjectionHead", "ProtoSegNet", "BackboneError", "build_backbone",
    "prototype_cosine",
]  # fmt: skip


class BackboneError(Exception):
    """A backbone that cannot be built as asked (timm missing, unknown name, weights that do not fit)."""


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


def _import_timm():
    try:
        import timm
    except ImportError:
        raise BackboneError(
            "timm backbones need timm, which is not installed: pip install 'protoseg_ext[timm]' (or pip install timm)"
        ) from None
    return timm


def _read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """The state_dict of a ``--pretrained`` file (:func:`protoseg_ext.head.read_official_state_dict`)."""
    if not path.is_file():
        raise BackboneError(f"--pretrained {path}: no such file")
    try:
        return read_official_state_dict(path)
    except ValueError as e:
        raise BackboneError(f"--pretrained {str(e) if str(e).startswith(str(path)) else f'{path}: {e}'}") from None


def _source_key(key: str, available) -> Optional[str]:
    """The name of ``key`` (a parameter of a timm features model) in the full model's state_dict.

    timm's feature wrappers flatten top-level sequentials (``stages.0`` -> ``stages_0``);
    try each way of turning one ``_`` of the first component back into a ``.``."""
    if key in available:
        return key
    head, _, rest = key.partition(".")
    for i, ch in enumerate(head):
        if ch == "_":
            cand = f"{head[:i]}.{head[i + 1:]}.{rest}" if rest else f"{head[:i]}.{head[i + 1:]}"
            if cand in available:
                return cand
    return None


class TimmBackbone(nn.Module):
    """A timm model's multi-scale features, HRNet-style: every feature map of stride 4 or
    coarser, upsampled (bilinear, align_corners=True) to the finest and concatenated.

    ``(B, 3, H, W)`` -> ``(B, sum of channels, H/4, W/4)`` (for the usual stride-4 finest map).
    """

    def __init__(self, name: str, pretrained: Optional[str] = None, state: Optional[Dict[str, torch.Tensor]] = None):
        super().__init__()
        timm = _import_timm()
        kwargs = {"feature_location": ""} if name.startswith("hrnet") else {}  # raw branches, not 'incre'
        try:
            probe = timm.create_model(name, pretrained=False, features_only=True, **kwargs)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise BackboneError(
                    f"--backbone {name}: timm {timm.__version__} does not know this model "
                    f"(timm.list_models('{name[:5]}*') lists similar names)"
                ) from None
            raise BackboneError(f"--backbone {name}: timm cannot build it with features_only ({e})") from None
        except (TypeError, ValueError, NotImplementedError, AssertionError) as e:
            raise BackboneError(f"--backbone {name}: timm cannot build it with features_only ({e})") from None
        info = probe.feature_info
        self.indices = [i for i, r in enumerate(info.reduction()) if r >= 4]
        if not self.indices:
            raise BackboneError(f"--backbone {name}: no feature map of stride 4 or coarser")
        self.body = probe
        self.name = name
        self.out_channels = sum(info.channels()[i] for i in self.indices)
        self.stride = info.reduction()[self.indices[0]]
        if pretrained:
            self.load_pretrained(Path(pretrained), timm, state)

    def load_pretrained(self, path: Path, timm, state: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Load the weights of ``path`` (the whole classification model's, or the features
        model's own; ``state``: its state_dict, already read); raises :class:`BackboneError`
        naming the keys that do not fit."""
        state = _read_state_dict(path) if state is None else state
        full = set(timm.create_model(self.name, pretrained=False).state_dict())  # the classification model
        own = self.body.state_dict()
        mine, missing, wrong = {}, [], []
        for key, value in own.items():
            src = _source_key(key, state)
            if src is None:
                if not key.endswith("num_batches_tracked"):  # old checkpoints lack BN counters
                    missing.append(key)
                continue
            if state[src].shape != value.shape:
                wrong.append(f"{src} {tuple(state[src].shape)} (model {tuple(value.shape)})")
            mine[key] = state[src]
        used = {_source_key(k, state) for k in own}
        # keys of the classification model the features model does not use (classifier, incre) are fine
        unexpected = sorted(k for k in state if k not in used and k not in full)
        if missing or unexpected or wrong:
            parts = []
            for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
                if keys:
                    more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
                    parts.append(f"{what} ({len(keys)}): {', '.join(keys[:8])}{more}")
            raise BackboneError(f"--pretrained {path} does not fit --backbone {self.name}: " + "; ".join(parts))
        self.body.load_state_dict(mine, strict=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.body(x)
        feats = [feats[i] for i in self.indices]
        size = feats[0].shape[-2:]
        up = dict(size=size, mode="bilinear", align_corners=True)
        return torch.cat([feats[0]] + [F.interpolate(f, **up) for f in feats[1:]], dim=1)


def build_backbone(name: str = "compact", width: int = 32, pretrained: Optional[str] = None,
                   state: Optional[Dict[str, torch.Tensor]] = None) -> nn.Module:
    """``"compact"`` (:class:`CompactBackbone` of ``width``) or a timm model name; ``pretrained``
    the weights' file (``state``: its state_dict, already read)."""
    if name == "compact":
        if pretrained:
            raise BackboneError(f"--pretrained {pretrained}: --backbone compact starts from random weights; the file "
                                "loads into timm backbones, and into the head when it is an official ProtoSeg checkpoint")
        return CompactBackbone(width)
    return TimmBackbone(name, pretrained, state)


def split_official_checkpoint(state: Dict[str, torch.Tensor]):
    """``(head keys, backbone keys, keys left out)`` of a ``--pretrained`` state_dict.

    An official ProtoSeg checkpoint (it has ``prototypes``) holds the head's keys
    (:attr:`ProtoSegHead.OFFICIAL_KEYS`), the backbone under ``backbone.`` and the official
    ``cls_head`` / ``proj_head``, whose layout is not this network's (left out). Any other
    file is the backbone's alone."""
    if "prototypes" not in state:
        return {}, state, []
    head = {k: v for k, v in state.items() if k in ProtoSegHead.OFFICIAL_KEYS}
    skipped = sorted(k for k in state if k.startswith(("cls_head.", "proj_head.")))
    rest = {k: v for k, v in state.items() if k not in head and k not in skipped}
    backbone = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in rest.items()}
    return head, backbone, skipped


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
    ``ce_weight`` (C values): per-class weights of the cross-entropy, as the
    official configs' ``loss.params.ce_weight`` (None: unweighted).
    """

    def __init__(
        self,
        num_classes: int,
        proj_dim: int = 64,
        width: int = 32,
        num_prototype: int = 10,
        head_stride: int = 1,
        ignore_index: int = 255,
        ppc_weight: float = PPC_WEIGHT,
        ppd_weight: float = PPD_WEIGHT,
        gamma: float = 0.999,
        assign: str = "gumbel",
        backend: str = "auto",
        sync: str = "official",
        backbone: str = "compact",
        pretrained: Optional[str] = None,
        ce_weight: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        if ce_weight is not None and len(ce_weight) != num_classes:
            raise ValueError(f"ce_weight has {len(ce_weight)} values for {num_classes} classes")
        # the official loss's per-class CE weights (config loss.params.ce_weight); not part of the state_dict
        weight = None if ce_weight is None else torch.tensor([float(w) for w in ce_weight])
        self.register_buffer("ce_weight", weight, persistent=False)
        if head_stride not in (1, 4):
            raise ValueError(f"head_stride must be 1 (full resolution) or 4, got {head_stride}")
        self.head_stride, self.ignore_index = head_stride, ignore_index
        self.ppc_weight, self.ppd_weight = ppc_weight, ppd_weight
        head_state, state, self.pretrained_skipped = {}, None, []
        if pretrained:  # an official ProtoSeg checkpoint also gives the head its prototypes and LayerNorms
            head_state, state, self.pretrained_skipped = split_official_checkpoint(_read_state_dict(Path(pretrained)))
        backbone_file = pretrained
        if head_state and (backbone == "compact" or not state):  # the file's backbone part does not apply
            backbone_file = None
            self.pretrained_skipped += sorted(f"backbone.{k}" for k in state or {})
        self.backbone = build_backbone(backbone, width, backbone_file, state)
        if backbone == "compact":
            hidden = 4 * width
            self.cls_head = conv_bn_relu(self.backbone.out_channels, hidden, kernel=1)
        else:  # official: 3x3 conv keeping the width (720 for HRNet-W48), BN, ReLU, dropout 0.1
            hidden = self.backbone.out_channels
            self.cls_head = nn.Sequential(conv_bn_relu(hidden, hidden), nn.Dropout2d(0.1))
        self.proj_head = ProjectionHead(hidden, proj_dim)
        self.head = ProtoSegHead(
            proj_dim, num_classes, num_prototype, gamma=gamma, ignore_index=ignore_index,
            assign=assign, backend=backend, sync=sync,
        )  # fmt: skip
        self.pretrained_head = bool(head_state)
        if head_state:
            try:
                self.head.load_official_state_dict(head_state)
            except ValueError as e:
                raise BackboneError(f"--pretrained {pretrained}: {e}") from None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> L2-normalised embeddings ``(B, D, H/4, W/4)``."""
        return self.proj_head(self.cls_head(self.backbone(images)))

    def _head_input(self, images: torch.Tensor, size) -> torch.Tensor:
        """The embeddings the prototype head sees: at 1/4, or upsampled to ``size`` (head_stride 1)."""
        emb = self.embed(images)
        if self.head_stride == 1:  # full resolution: one embedding per labeled pixel
            # channels-last, so the head's (B, D, H, W) -> (N, D) is a view, not a copy
            emb = emb.contiguous(memory_format=torch.channels_last)
            emb = F.interpolate(emb, size=size, mode="bilinear", align_corners=True)
        return emb

    def forward(
        self, images: torch.Tensor, labels: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
        size = images.shape[-2:] if labels is None else labels.shape[-2:]
        emb = self._head_input(images, size)
        out = self.head(emb, labels)
        seg = out.seg
        if seg.shape[-2:] != size:
            seg = F.interpolate(seg, size=size, mode="bilinear", align_corners=True)
        if labels is None:
            return seg, None
        # mean over labeled pixels (weighted: sum of w[y] * loss / sum of w[y], as nn.CrossEntropyLoss's
        # mean); a crop with none gives 0, not NaN
        valid = labels != self.ignore_index
        if self.ce_weight is None:
            n_valid = valid.sum().clamp(min=1)
        else:
            n_valid = self.ce_weight.to(seg.dtype)[labels[valid]].sum().clamp(min=1e-12)
        ce = F.cross_entropy(seg, labels, weight=None if self.ce_weight is None else self.ce_weight.to(seg.dtype),
                             ignore_index=self.ignore_index, reduction="sum") / n_valid  # fmt: skip
        loss = official_objective(ce, out.loss_ppc, out.loss_ppd, self.ppc_weight, self.ppd_weight)
        return seg, {"loss": loss, "ce": ce, "ppc": out.loss_ppc, "ppd": out.loss_ppd}


    @torch.no_grad()
    def predict(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None, chunk: int = 1 << 16):
        """Inference: ``(seg (B, C, H, W) logits at the image size, usage)``.

        With ``labels (B, H, W)``, ``usage`` is the ``(C, K)`` int64 count of
        prototype use: each labeled pixel at the head's resolution (labels
        nearest-downsampled as in training) counted once, for the prototype of
        its ground-truth class nearest to its embedding (``argmax_k`` of the
        cosine, as the head's seg logits take it). Without labels it is None.
        ``chunk`` pixels at a time, so the ``(N, D)`` embedding is never copied whole.
        """
        size = images.shape[-2:] if labels is None else labels.shape[-2:]
        emb = self._head_input(images, size)
        seg = self.head(emb).seg
        if seg.shape[-2:] != size:
            seg = F.interpolate(seg, size=size, mode="bilinear", align_corners=True)
        if labels is None:
            return seg, None
        head = self.head
        B, D, h, w = emb.shape
        C, K = head.num_classes, head.num_prototype
        gt = head._labels_at(labels, B, h, w)  # (N,), ignored pixels marked head.target_ignore
        rows = emb.permute(0, 2, 3, 1).reshape(-1, D)
        protos = F.normalize(head.prototypes, dim=-1)
        be = backends.resolve(head.backend, emb.device)
        usage = torch.zeros(C * K, dtype=torch.int64, device=emb.device)
        for i in range(0, rows.shape[0], chunk):
            g = gt[i:i + chunk]
            keep = g != head.target_ignore
            if not bool(keep.any()):
                continue
            x = F.normalize(head.feat_norm(rows[i:i + chunk][keep]), dim=-1).to(protos.dtype)
            g = g[keep]
            own = be.similarity(x, protos, g, ignore_index=head.target_ignore, seg=False, own=True).own
            usage += torch.bincount(g * K + own.argmax(dim=1), minlength=C * K)
        return seg, usage.view(C, K)


def prototype_usage(counts: torch.Tensor, min_share: float = 0.01) -> dict:
    """Summary of ``(C, K)`` pixel counts per prototype (:meth:`ProtoSegNet.predict`).

    A prototype is *in use* when it is the nearest of its class for at least
    ``min_share`` of the class's pixels. Returns ``pixels (C,)``, ``in_use (C,)``
    (0 for a class with no pixel) and ``share (C, K)`` (each row sums to 1, or 0).
    """
    counts = counts.double()
    pixels = counts.sum(1)
    share = counts / pixels.clamp(min=1)[:, None]
    in_use = ((share >= min_share) & (counts > 0)).sum(1)
    return {"pixels": pixels.long(), "in_use": in_use, "share": share}


@torch.no_grad()
def prototype_cosine(protos: torch.Tensor) -> torch.Tensor:
    """``(C, K, D)`` prototypes -> ``(C,)``: the mean cosine similarity over the ``K (K - 1)``
    pairs of distinct prototypes of each class. 1: the K prototypes of the class have
    collapsed into one; about 0: they point in unrelated directions (as at initialisation)."""
    C, K, _ = protos.shape
    if K < 2:
        return protos.new_ones(C, dtype=torch.float64)
    p = F.normalize(protos.double(), dim=-1)
    gram = p @ p.transpose(1, 2)  # (C, K, K)
    return (gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(1)) / (K * (K - 1))
