"""What the benchmark runs: problem sizes, inputs and the named providers.

One *step* is one training step of the ProtoSeg head, the same for every
provider: ``feats (N, D)`` already L2-normalised (``requires_grad``),
prototypes ``(C, K, D)``, labels ``gt (N,)`` with 10% ignored (-1) and a
``LayerNorm(C)`` mask_norm;

    seg logits -> mask_norm -> prototype learning (Sinkhorn, targets, EMA update,
    assign="argmax") -> CE(seg, gt) + 0.01 * PPC + 0.001 * PPD -> backward to feats.

Providers:

* ``official``: :class:`protoseg_ext.ProtoSegHead` with ``backend="reference"``,
  i.e. the eager per-class path of ``protoseg_ext.reference`` (the official code);
* ``official+compile``: ``torch.compile`` of that same step;
* ``vectorized``: :class:`VectorizedHead`, the best plain-PyTorch rewrite we know
  (one GEMM ``S = feats @ P.T``, Sinkhorn of all classes at once with
  ``index_add_``, sums with ``index_add_``, losses with ``F.cross_entropy`` on S);
* ``cpu`` / ``triton`` / ``cuda``: ``ProtoSegHead`` with that backend.

The head providers get ``feats`` as a ``(1, D, 1, N)`` view, so the head's own
reshapes cost nothing; the head re-normalises feats and prototypes as the
official code does, and :class:`VectorizedHead` does the same for parity.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from protoseg_ext.functional import PPC_WEIGHT, PPD_WEIGHT, official_objective  # noqa: F401
from protoseg_ext.testing import LABELS, class_weights, make_inputs  # noqa: F401 (the shared factory)

IGNORE = -1
GAMMA = 0.999


class Size(NamedTuple):
    N: int
    D: int
    C: int
    K: int
    about: str


# N is pixels at feature resolution (1/4 of the input for HRNet).
SIZES = {
    "tiny": Size(4096, 64, 8, 10, "CI smoke size"),
    "small": Size(16384, 256, 19, 10, "quick Cityscapes-like size"),
    "cityscapes": Size(65536, 720, 19, 10, "Cityscapes, 2 x 1024x512 crops at 1/4, HRNet-W48 D=720"),
    "ade20k": Size(32768, 720, 150, 10, "ADE20K, 2 x 512x512 crops at 1/4, D=720"),
    "cocostuff": Size(32768, 720, 171, 10, "COCO-Stuff, 2 x 512x512 crops at 1/4, D=720"),
    "d256": Size(262144, 256, 19, 10, "N=262,144, D=256, C=19"),
    "fullres": Size(1024 * 2048, 720, 19, 10, "full-resolution Cityscapes: a 1 x 720 x 1024 x 2048 map, C=19"),
    "fullres-ade20k": Size(2 * 1024 * 2048, 256, 150, 10, "full resolution, a 2 x 256 x 1024 x 2048 map, C=150"),
}

MODES = ("forward", "backward", "full", "update")
# Every provider runs the head as users call it: the backbone's contiguous NCHW map
# (1, D, N / 256, 256) with the official feat_norm (LayerNorm over D), then mask_norm,
# the prototype update, CE + 0.01 PPC + 0.001 PPD and the backward. "cpu-rows" is a
# friendlier variant, named as such: an (N, D) view of the features, feat_norm off.
PROVIDERS = ("official", "official+compile", "vectorized", "cpu", "cpu-rows", "triton", "cuda")


FULL_HW = (1024, 2048)  # an image at full resolution


def map_shape(N: int, D: int):
    """The NCHW map of N pixels the providers read: B full-resolution images (B, D, 1024, 2048)
    when N is a multiple of 1024 * 2048, else (1, D, N / W, W) with W = 256 when it divides N."""
    H, W = FULL_HW
    if N % (H * W) == 0:
        return N // (H * W), D, H, W
    W = 256 if N % 256 == 0 else N
    return 1, D, N // W, W


def image_rows(x: torch.Tensor):
    """The (HW, D) pixel rows of each image of an NCHW map, as views (no copy), or ``[x]`` for (N, D)."""
    if x.dim() == 2:
        return [x]
    return [img.reshape(img.shape[0], -1).t() for img in x]


# ----------------------------------------------------------------------------- inputs


@torch.no_grad()
def official_seg(feats, protos, mask_norm, chunk: int = 1 << 13):
    """``seg (N, C)`` = mask_norm(max_k S), chunked; the input of the update-only mode."""
    C, K, D = protos.shape
    P = protos.reshape(C * K, D)
    out = feats.new_empty(feats.shape[0], C)
    for lo in range(0, feats.shape[0], chunk):
        s = feats[lo:lo + chunk] @ P.t()
        out[lo:lo + chunk] = mask_norm(s.view(-1, C, K).amax(dim=2))
    return out


# ----------------------------------------------------------------------------- vectorized baseline


def _safe(d: torch.Tensor) -> torch.Tensor:
    """A denominator with zeros replaced by 1 (empty classes, ignored rows)."""
    return torch.where(d > 0, d, torch.ones_like(d))


def sinkhorn_all_classes(own: torch.Tensor, lab: torch.Tensor, valid: torch.Tensor, num_classes: int,
                         iters: int = 3, eps: float = 0.05) -> torch.Tensor:
    """Sinkhorn of every class at once, in the official order (docs/design.md, "Prototype learning", step 1).

    ``own (N, K)`` each pixel's similarity to its own class's K prototypes,
    ``lab (N,)`` its class (any value in ``[0, C)`` where not valid),
    ``valid (N,)``. Each class's sums over its pixels are ``index_add_`` over
    ``lab`` (column sums per class), so there is no loop over classes, no
    boolean indexing and no host synchronisation. Returns ``L (N, K)``, rows of
    valid pixels sum to 1, other rows are 0.
    """
    work = torch.float64 if own.dtype == torch.float64 else torch.float32
    C = num_classes
    K = own.shape[1]
    vcol = valid[:, None]
    L = torch.where(vcol, torch.exp(own.to(work) / eps), torch.zeros((), dtype=work, device=own.device))
    tot = L.new_zeros(C).index_add_(0, lab, L.sum(dim=1))  # sum of each class's whole matrix
    L = L / _safe(tot)[lab, None]
    n_c = L.new_zeros(C).index_add_(0, lab, valid.to(work))  # pixels per class
    n_row = _safe(n_c)[lab, None]  # (N, 1)
    for _ in range(iters):
        col = L.new_zeros(C, K).index_add_(0, lab, L)  # (C, K): each prototype's column sum
        L = L / _safe(col)[lab]
        L = L / K
        L = L / _safe(L.sum(dim=1, keepdim=True))
        L = L / n_row
    return L * n_row


def vectorized_assign(S, feats, protos, gt, seg, *, assign="argmax", gumbel_noise=None, ignore_index=IGNORE,
                      iters=3, eps=0.05):
    """Targets and per-prototype sums (docs/design.md, "Prototype learning", steps 1-4) from the full ``S (N, C*K)``, no class loop.

    Returns ``target (N,)`` int64, ``sums (C*K, D)`` and ``counts (C*K,)`` over
    the correctly predicted pixels.
    """
    C, K, D = protos.shape
    N = S.shape[0]
    work = torch.float64 if feats.dtype == torch.float64 else torch.float32
    gt = gt.long()
    lab = torch.where(gt == ignore_index, torch.zeros_like(gt), gt)
    own = S.view(N, C, K).gather(1, lab[:, None, None].expand(N, 1, K))[:, 0]  # (N, K)
    valid = (gt != ignore_index) & torch.isfinite(own).all(dim=1)
    L = sinkhorn_all_classes(own, lab, valid, C, iters, eps)
    idx = L.argmax(dim=1)
    target = torch.where(valid, lab * K + idx, torch.full_like(gt, ignore_index))
    if assign == "gumbel":
        if gumbel_noise is None:
            gumbel_noise = torch.empty(N, K, device=S.device).exponential_().log_().neg_()
        hard = (L + gumbel_noise.to(L.dtype)).argmax(dim=1)
    else:
        hard = idx
    correct = seg.argmax(dim=1) == gt
    slot = torch.where(valid & correct, lab * K + hard, torch.full_like(gt, C * K))  # C*K: a bin for the rest
    sums = feats.new_zeros(C * K + 1, D, dtype=work).index_add_(0, slot, feats.to(work))[: C * K]
    counts = feats.new_zeros(C * K + 1, dtype=work).index_add_(0, slot, feats.new_ones(N, dtype=work))[: C * K]
    return target, sums, counts


def vectorized_ema(protos, sums, counts, gamma=GAMMA):
    """The momentum update (docs/design.md, "Prototype learning", steps 5-6) without boolean indexing: EMA where ``count > 0``, then L2-normalise."""
    C, K, D = protos.shape
    work = sums.dtype
    P = protos.to(work)
    f = F.normalize(sums.view(C, K, D), dim=-1)
    new = torch.where(counts.view(C, K, 1) > 0, gamma * P + (1 - gamma) * f, P)
    return F.normalize(new, dim=-1).to(protos.dtype)


def vectorized_losses(S, target, ignore_index=IGNORE):
    """PPC (CE over the ``C*K`` columns of S) and PPD, means over non-ignored pixels, 0 if none."""
    valid = target != ignore_index
    n_valid = valid.sum().clamp(min=1).to(S.dtype)
    ppc = F.cross_entropy(S, target, ignore_index=ignore_index, reduction="sum") / n_valid
    safe_t = torch.where(valid, target, torch.zeros_like(target))
    s_t = S.gather(1, safe_t[:, None])[:, 0]
    ppd = torch.where(valid, (1 - s_t) ** 2, torch.zeros_like(s_t)).sum() / n_valid
    return ppc, ppd


@torch.no_grad()
def vectorized_prototype_learning(feats, protos, gt, seg, gamma=GAMMA, assign="argmax", gumbel_noise=None,
                                  ignore_index=IGNORE, iters=3, eps=0.05):
    """Prototype learning alone (the update mode): one GEMM, then :func:`vectorized_assign`."""
    C, K, D = protos.shape
    S = feats @ protos.reshape(C * K, D).t()
    target, sums, counts = vectorized_assign(S, feats, protos, gt, seg, assign=assign, gumbel_noise=gumbel_noise,
                                             ignore_index=ignore_index, iters=iters, eps=eps)
    return target, vectorized_ema(protos, sums, counts, gamma)


class VectorizedHead(nn.Module):
    """The ProtoSeg head in plain PyTorch, as fast as we can write it without kernels.

    ``forward(feats (B, D, H, W) or (N, D), gt (N,))`` returns ``(seg (N, C), ppc, ppd, target)``
    and, in training mode, updates the prototype buffer like ProtoSegHead.
    """

    def __init__(self, dim, num_classes, num_prototype=10, gamma=GAMMA, ignore_index=IGNORE, assign="argmax",
                 feat_norm=True):
        super().__init__()
        self.feat_norm = nn.LayerNorm(dim) if feat_norm else nn.Identity()
        self.gamma, self.ignore_index, self.assign = gamma, ignore_index, assign
        protos = torch.empty(num_classes, num_prototype, dim)
        nn.init.trunc_normal_(protos, std=0.02)
        self.register_buffer("prototypes", F.normalize(protos, dim=-1))
        self.mask_norm = nn.LayerNorm(num_classes)

    def forward(self, feats, gt):
        if feats.dim() == 4:  # the map (B, D, H, W) as rows, as the official head's rearrange
            feats = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        N = feats.shape[0]
        x = F.normalize(self.feat_norm(feats), p=2, dim=-1)  # as ProtoSegHead.embed
        protos = F.normalize(self.prototypes, p=2, dim=-1).to(x.dtype)
        C, K, D = protos.shape
        S = x @ protos.reshape(C * K, D).t()  # (N, C*K): the one GEMM
        # max(dim).values, not amax: same values, and its backward is one scatter where amax's
        # compares S with the max again to split the gradient among ties (2.4x slower on CPU)
        seg = self.mask_norm(S.view(N, C, K).max(dim=2).values)  # (N, C)
        with torch.no_grad():
            target, sums, counts = vectorized_assign(S.detach(), x.detach(), protos, gt, seg.detach(),
                                                     assign=self.assign, ignore_index=self.ignore_index)
            if self.training:
                self.prototypes.copy_(vectorized_ema(protos, sums, counts, self.gamma))
        ppc, ppd = vectorized_losses(S, target, self.ignore_index)
        return seg, ppc, ppd, target


# ----------------------------------------------------------------------------- providers


def step_loss(seg, gt, ppc, ppd):
    """The official Cityscapes objective: ``CE(seg) + 0.01 PPC + 0.001 PPD``."""
    return official_objective(F.cross_entropy(seg, gt, ignore_index=IGNORE), ppc, ppd)


def provider_device(name: str) -> Optional[str]:
    """The device type a provider runs on, or None when it runs on any."""
    return {"cpu": "cpu", "cpu-rows": "cpu", "triton": "cuda", "cuda": "cuda"}.get(name)


def unavailable_reason(name: str, device: str) -> Optional[str]:
    """Why provider ``name`` cannot run on ``device`` here, or None when it can."""
    if name not in PROVIDERS:
        return f"unknown provider (known: {', '.join(PROVIDERS)})"
    want = provider_device(name)
    if want is not None and want != device:
        return f"runs on {want} tensors, this run is on {device}"
    if device == "cuda" and not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    if name in ("cpu", "cpu-rows", "triton", "cuda"):
        from protoseg_ext import backends

        reasons = backends.get_backend(name.split("-")[0]).not_supported_reasons(torch.device(device))
        if reasons:
            return "; ".join(reasons)
    return None


class Provider:
    """A named way to run the step: ``forward(feats, gt) -> loss`` and ``update(...)``."""

    def __init__(self, name: str, size: Size, device: str):
        self.name, self.size, self.device = name, size, device
        N, D, C, K, _ = size
        self.compiled = name.endswith("+compile")
        self.rows = name.endswith("-rows")  # the friendlier variant: (N, D) view, no feat_norm
        backend = name.split("+")[0].split("-")[0]
        backend = "reference" if backend == "official" else backend
        self.backend = backend
        torch.manual_seed(0)
        if backend == "vectorized":
            self.head = VectorizedHead(D, C, K, assign="argmax", feat_norm=not self.rows).to(device)
        else:
            from protoseg_ext import ProtoSegHead

            self.head = ProtoSegHead(D, C, K, gamma=GAMMA, ignore_index=IGNORE, assign="argmax", backend=backend,
                                     feat_norm=not self.rows).to(device)
        self.head.train()
        self._forward = self._loss
        self._update = self._update_eager
        if self.compiled:
            self._forward = torch.compile(self._loss)
            self._update = torch.compile(self._update_eager)

    def set_prototypes(self, protos):
        with torch.no_grad():
            self.head.prototypes.copy_(protos)

    @property
    def reads_map(self) -> bool:
        """The step reads the NCHW map (every row but the "-rows" variant's)."""
        return not self.rows

    def input(self, feats):
        """What this provider's step reads, made once before timing: the NCHW map (``feats`` when it
        is one already, else a contiguous copy of ``feats (N, D)``), or for the "-rows" variant
        ``feats (N, D)`` itself."""
        if self.rows or feats.dim() == 4:
            return feats
        return feats.t().contiguous().view(map_shape(*feats.shape))

    def _loss(self, x, gt):
        if isinstance(self.head, VectorizedHead):
            seg, ppc, ppd, _ = self.head(x, gt)
            return step_loss(seg, gt, ppc, ppd)
        if self.backend == "reference":  # the official step, loop over classes and all, from protoseg_ext.reference
            from protoseg_ext.testing import official_head_step

            g = gt.view(x.shape[0], x.shape[2], x.shape[3]) if x.dim() == 4 else gt.view(1, 1, -1)
            seg, ppc, ppd, _, new = official_head_step(self.head, x if x.dim() == 4 else x.t()[None, :, None, :], g)
            self.head.prototypes.copy_(new)
            return step_loss(seg, g, ppc, ppd)
        if self.rows:
            N = x.shape[0]
            out = self.head(x.t()[None, :, None, :], gt.view(1, 1, N))  # (1, D, 1, N): a view of feats
            return step_loss(out.seg, gt.view(1, 1, N), out.loss_ppc, out.loss_ppd)
        g = gt.view(x.shape[0], x.shape[2], x.shape[3])
        out = self.head(x, g)
        return step_loss(out.seg, g, out.loss_ppc, out.loss_ppd)

    def _update_eager(self, feats, protos, gt, seg):
        if self.backend == "vectorized":
            return vectorized_prototype_learning(feats, protos, gt, seg, GAMMA, "argmax")
        from protoseg_ext import functional

        return functional.prototype_learning(feats, protos, gt, seg, GAMMA, assign="argmax", ignore_index=IGNORE,
                                             backend=self.backend)

    def forward(self, feats, gt):
        """Loss of one training step (builds the autograd graph to feats)."""
        return self._forward(feats, gt)

    def update(self, feats, protos, gt, seg):
        """Prototype learning alone: ``(target, new_protos)``."""
        return self._update(feats, protos, gt, seg)


# ----------------------------------------------------------------------------- memory estimates

GiB = 1 << 30


def estimate_bytes(provider: str, size: Size, mode: str = "full") -> int:
    """The approximate peak memory of one training step (bytes), to skip hopeless runs.

    Counted in fp32 copies of ``feats (N, D)``, ``S (N, C*K)`` and ``seg (N, C)``,
    fitted to measured peaks on CPU (Cityscapes, ADE20K, N=262,144 and N=1M
    sizes, within 3%, before feat_norm was added: it adds two copies to the
    eager paths). The official and vectorized paths hold about 5.5 copies of
    feats (the map, its permuted rows, the LayerNorm'd and normalised copies,
    their gradients) and 3 of S (similarity, log-softmax, gradient) at their
    peak. The fused ones hold 2 of feats (the map and its gradient:
    normalisation happens inside the kernels), about 3.5 of seg (seg,
    mask_norm, cross-entropy and their gradients), and the softmax cache of S
    when it fits the head's budget (``PROTOSEG_CACHE_MB``). The worker makes
    the map in place: no (N, D) copy next to it.
    """
    N, D, C, K, _ = size
    nd, ns, nc = 4 * N * D, 4 * N * C * K, 4 * N * C
    process = 600 * (1 << 20)  # torch runtime, allocator slack
    if provider == "floor":  # feats, the GEMM output, and S / dS of at most 2**18 rows (worker.FLOOR_CHUNK)
        return process + 2 * nd + 2 * ns * min(N, 1 << 18) // N
    if provider in ("official", "official+compile", "vectorized"):
        return process + int(5.5 * nd) + 3 * ns + 6 * nc + 3 * 4 * N * K
    from protoseg_ext.backends import default_cache_bytes

    cache = ns if ns <= default_cache_bytes() else 0
    return process + 2 * nd + int(3.5 * nc) + cache + 3 * 4 * N * K


@functools.lru_cache(maxsize=None)
def total_memory_bytes(device: str = "cpu") -> int:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 1 << 62
