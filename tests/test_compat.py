"""protoseg_ext.compat against a literal transcription of the official functions."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from protoseg_ext import compat
from protoseg_ext import reference as R
from protoseg_ext.testing import make_problem
from protoseg_ext.testing.official import distributed_sinkhorn as official_sinkhorn


def test_distributed_sinkhorn_matches_official():
    out = torch.rand(200, 10) * 2 - 1
    torch.manual_seed(4)
    L, idx = compat.distributed_sinkhorn(out)
    torch.manual_seed(4)
    Lo, idxo = official_sinkhorn(out.clone())
    assert torch.equal(idx, idxo)
    assert torch.equal(L, Lo)  # same RNG draws: the same hard Gumbel sample
    assert L.shape == (200, 10) and torch.equal(L.sum(1), torch.ones(200))


def test_momentum_update_matches_official():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(compat.momentum_update(a, b, 0.99), 0.99 * a + 0.01 * b)


class OfficialLikeModel(nn.Module):
    """The attributes the official model's prototype_learning reads."""

    def __init__(self, protos):
        super().__init__()
        self.num_classes, self.num_prototype = protos.shape[0], protos.shape[1]
        self.gamma, self.update_prototype = 0.9, True
        self.prototypes = nn.Parameter(protos.clone(), requires_grad=False)

    prototype_learning = compat.prototype_learning  # the one-line switch


def test_prototype_learning_method_drop_in():
    f, p, gt, _ = make_problem(N=6 * 8, D=16, C=4, K=3)
    model = OfficialLikeModel(p)
    masks = torch.einsum("nd,kmd->nmk", f, p)
    out_seg = masks.amax(1)  # (N, C) as (B, C, H, W)
    out_seg_bchw = out_seg.view(1, 6, 8, 4).permute(0, 3, 1, 2)
    gt_seg = gt.float()
    gt_seg[gt_seg == -1] = 255.0  # official: labels outside [0, C) are skipped
    torch.manual_seed(11)
    logits, target = model.prototype_learning(f, out_seg_bchw, gt_seg, masks)
    torch.manual_seed(11)
    tr, newr = R.prototype_learning(f, p, gt, out_seg, gamma=0.9)
    assert target.dtype == torch.float32
    torch.testing.assert_close(logits, R.similarity(f, p))
    expect = torch.where(gt >= 0, tr, torch.full_like(tr, 255)).float()
    assert torch.equal(target, expect)
    assert isinstance(model.prototypes, nn.Parameter) and not model.prototypes.requires_grad
    torch.testing.assert_close(model.prototypes.data, newr, atol=1e-5, rtol=1e-5)


def test_distributed_sinkhorn_rejects_bad_shape():
    with pytest.raises(ValueError, match="out must be"):
        compat.distributed_sinkhorn(torch.rand(10))


@pytest.mark.parametrize("flag, updates", [(True, True), (False, False), (1, False), ("yes", False)])
def test_update_prototype_is_tested_with_is_true_like_the_official_code(flag, updates):
    f, p, gt, _ = make_problem(N=6 * 8, D=16, C=4, K=3)
    model = OfficialLikeModel(p)
    model.update_prototype = flag  # official: `if ... and self.update_prototype is True`
    masks = torch.einsum("nd,kmd->nmk", f, p)
    correct = 10.0 * F.one_hot(gt.clamp(min=0), 4)  # every labeled pixel predicted right: all update
    out_seg = (masks.amax(1) + correct).view(1, 6, 8, 4).permute(0, 3, 1, 2)
    gt_seg = torch.where(gt >= 0, gt, torch.full_like(gt, 255)).float()
    model.prototype_learning(f, out_seg, gt_seg, masks)
    moved = (model.prototypes.data - p).abs().max()
    assert (moved > 1e-3) if updates else (moved < 1e-6)
