"""compat.accelerate: the official model and loss on the fused head, against their transcription."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from protoseg_ext import compat, reference
from protoseg_ext.testing.official import OfficialProtoLoss, OfficialProtoModel

B, C, K, H, W = 2, 4, 3, 8, 8
CHANNELS = (10, 6)  # two backbone branches, the second at half resolution: D = 16
D = sum(CHANNELS)


class AccelModel(OfficialProtoModel):
    pass


class AccelLoss(OfficialProtoLoss):
    pass


@pytest.fixture(params=["cpu", "reference"])
def accelerated(request):
    compat.accelerate(AccelModel, AccelLoss, backend=request.param, cache_mb=0)
    yield request.param
    compat.restore(AccelModel, AccelLoss)


def _inputs(seed=0, ignore=-1):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(B, CHANNELS[0], H, W, generator=g) + 0.3,
            torch.randn(B, CHANNELS[1], H // 2, W // 2, generator=g)]
    gt = torch.randint(0, C, (B, 2 * H, 2 * W), generator=g)
    gt[:, :3] = ignore  # ignored rows
    return maps, gt


def _pair(update_prototype=True, gamma=0.9):
    torch.manual_seed(3)
    official = OfficialProtoModel(D, C, K, gamma=gamma, update_prototype=update_prototype)
    accel = AccelModel(D, C, K, gamma=gamma, update_prototype=update_prototype)
    accel.load_state_dict(official.state_dict())
    with torch.no_grad():  # LayerNorms away from their identity start, so their gradients mean something
        for m in (official, accel):
            torch.manual_seed(5)
            for p in (m.feat_norm.weight, m.feat_norm.bias, m.mask_norm.weight, m.mask_norm.bias):
                p.add_(0.3 * torch.randn_like(p))
    return official, accel


def _step(model, loss_fn, maps, gt, seed, noise_for=None):
    maps = [m.clone().requires_grad_() for m in maps]
    torch.manual_seed(seed)
    if noise_for is not None:  # the transcription takes the noise the fused head draws after the same seed
        noise_for.gumbel_noise = reference.sample_gumbel((B * H * W, K))
    preds = model(maps, gt_semantic_seg=gt[:, None])
    loss = loss_fn(preds, gt)
    loss.backward()
    grads = [m.grad for m in maps] + [p.grad.clone() for p in (model.feat_norm.weight, model.feat_norm.bias,
                                                                 model.mask_norm.weight, model.mask_norm.bias)]
    return preds, loss, grads


@pytest.mark.parametrize("assign", ["gumbel", "argmax"])
def test_accelerated_step_matches_the_official_step(accelerated, assign):
    compat.accelerate(AccelModel, AccelLoss, backend=accelerated, assign=assign, cache_mb=0)
    official, accel = _pair()
    official.assign = assign
    maps, gt = _inputs()
    po, lo, go = _step(official, OfficialProtoLoss(), maps, gt, seed=7, noise_for=official if assign == "gumbel" else None)
    pa, la, ga = _step(accel, AccelLoss(), maps, gt, seed=7)
    assert isinstance(pa["logits"], compat.FusedProtoLogits) and pa["logits"].shape == po["logits"].shape
    torch.testing.assert_close(pa["seg"], po["seg"])
    assert pa["target"].dtype == torch.float32 and torch.equal(pa["target"], po["target"])
    torch.testing.assert_close(la, lo)
    for a, o in zip(ga, go):  # the two maps, feat_norm weight and bias, mask_norm weight and bias
        torch.testing.assert_close(a, o)
    assert isinstance(accel.prototypes, nn.Parameter) and not accel.prototypes.requires_grad
    torch.testing.assert_close(accel.prototypes.data, official.prototypes.data, atol=1e-5, rtol=1e-5)
    moved = (accel.prototypes.data - F.normalize(_pair()[1].prototypes.data, dim=-1)).abs().max()
    assert moved > 1e-3  # the update took place (gamma 0.9)


def test_second_step_and_checkpoints_load_both_ways(accelerated):
    official, accel = _pair()
    official.assign = "argmax"
    compat.accelerate(AccelModel, AccelLoss, backend=accelerated, assign="argmax", cache_mb=0)
    maps, gt = _inputs(1)
    for seed in (1, 2):  # two steps: the second starts from the first's prototypes
        _step(official, OfficialProtoLoss(), maps, gt, seed)
        _step(accel, AccelLoss(), maps, gt, seed)
    sa, so = accel.state_dict(), official.state_dict()
    assert list(sa) == list(so)  # the official keys, in the official order: the fused head is not a submodule
    assert all(sa[k].shape == so[k].shape for k in so)
    torch.testing.assert_close(sa["prototypes"], so["prototypes"], atol=1e-5, rtol=1e-5)
    fresh_official, fresh_accel = OfficialProtoModel(D, C, K), AccelModel(D, C, K)
    fresh_official.load_state_dict(sa)
    fresh_accel.load_state_dict(so)
    for m in (fresh_official, fresh_accel, official, accel):
        m.eval()
    with torch.no_grad():
        seg_o, seg_a = official(maps), fresh_accel(maps)
    assert seg_o.shape == (B, C, H, W)
    torch.testing.assert_close(seg_a, seg_o)
    torch.testing.assert_close(fresh_official(maps), accel(maps))


def test_inference_and_pretrain_prototype_do_not_learn(accelerated):
    official, accel = _pair()
    maps, gt = _inputs(2)
    before = F.normalize(accel.prototypes.data.clone(), dim=-1)
    torch.testing.assert_close(accel(maps), official(maps))
    out = accel(maps, gt_semantic_seg=gt[:, None], pretrain_prototype=True)
    assert isinstance(out, torch.Tensor) and out.shape == (B, C, H, W)
    torch.testing.assert_close(accel.prototypes.data, before)
    assert accel.prototypes.requires_grad  # untouched, as the official forward leaves it


def test_update_prototype_false_keeps_the_prototypes(accelerated):
    official, accel = _pair(update_prototype=False)
    official.assign = "argmax"
    compat.accelerate(AccelModel, AccelLoss, backend=accelerated, assign="argmax", cache_mb=0)
    maps, gt = _inputs(3)
    before = F.normalize(accel.prototypes.data.clone(), dim=-1)
    pa, _, _ = _step(accel, AccelLoss(), maps, gt, 0)
    po, _, _ = _step(official, OfficialProtoLoss(), maps, gt, 0)
    torch.testing.assert_close(accel.prototypes.data, before)
    assert torch.equal(pa["target"], po["target"])


def test_labels_outside_the_classes_are_their_own_target(accelerated):
    official, accel = _pair()
    official.assign = "argmax"
    compat.accelerate(AccelModel, AccelLoss, backend=accelerated, assign="argmax", cache_mb=0)
    maps, gt = _inputs(4, ignore=255)  # the official loop skips any label outside [0, C)
    pa, la, _ = _step(accel, AccelLoss(ignore_index=255), maps, gt, 0)
    po, lo, _ = _step(official, OfficialProtoLoss(ignore_index=255), maps, gt, 0)
    assert (pa["target"] == 255).any() and torch.equal(pa["target"], po["target"])
    torch.testing.assert_close(la, lo)


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numels.append((str(func), t.numel()))
        return out


def test_the_accelerated_step_never_builds_n_by_ck():
    C2, K2 = 8, 10  # C*K = 80 columns: more than any other per-pixel tensor of the step (D = 16, 4C upsampled)
    compat.accelerate(AccelModel, AccelLoss, backend="cpu", cache_mb=0)
    try:
        maps, _ = _inputs(5)
        gt = torch.randint(0, C2, (B, 2 * H, 2 * W), generator=torch.Generator().manual_seed(5))
        N = B * H * W
        spies = []
        for model, loss in ((AccelModel(D, C2, K2), AccelLoss()), (OfficialProtoModel(D, C2, K2), OfficialProtoLoss())):
            with _Shapes() as spy:
                model(maps, gt_semantic_seg=gt[:, None])["seg"].sum()
                preds = model([m.requires_grad_() for m in maps], gt_semantic_seg=gt[:, None])
                loss(preds, gt).backward()
            spies.append([(f, n) for f, n in spy.numels if n >= N * C2 * K2])
        assert not spies[0], spies[0]
        assert spies[1]  # the spy sees the official step build it
    finally:
        compat.restore(AccelModel, AccelLoss)


def test_restore_brings_back_the_official_methods():
    compat.accelerate(AccelModel, AccelLoss)
    assert AccelModel.forward is not OfficialProtoModel.forward
    compat.restore(AccelModel, AccelLoss)
    assert AccelModel.forward is OfficialProtoModel.forward and "forward" not in AccelModel.__dict__
    assert AccelLoss.forward is OfficialProtoLoss.forward
    assert AccelModel.prototype_learning is OfficialProtoModel.prototype_learning


def test_an_official_loss_given_dense_logits_still_works():
    compat.accelerate(AccelModel, AccelLoss)
    try:
        _, gt = _inputs(6)
        seg = torch.randn(B, C, H, W)
        torch.testing.assert_close(AccelLoss()(seg, gt), OfficialProtoLoss()(seg, gt))  # the original forward
    finally:
        compat.restore(AccelModel, AccelLoss)


def test_bad_classes_and_instances_are_named():
    class NotAModel:
        def forward(self, x):
            return x

    with pytest.raises(AttributeError, match="NotAModel.*prototype_learning"):
        compat.accelerate(NotAModel, AccelLoss)
    with pytest.raises(TypeError, match="model class"):
        compat.accelerate(AccelModel(D, C, K), AccelLoss)
    with pytest.raises(ValueError, match="assign"):
        compat.accelerate(AccelModel, AccelLoss, assign="softmax")
    with pytest.raises(ValueError, match="backend"):
        compat.accelerate(AccelModel, AccelLoss, backend="tpu")
    assert "forward" not in AccelModel.__dict__  # a refused call changes nothing

    class Partial(OfficialProtoModel):
        pass

    compat.accelerate(Partial, AccelLoss)
    try:
        m = Partial(D, C, K)
        del m.mask_norm
        maps, gt = _inputs(7)
        with pytest.raises(AttributeError, match="no mask_norm"):
            m(maps, gt_semantic_seg=gt[:, None])
    finally:
        compat.restore(Partial, AccelLoss)


# ---------------------------------------------------------------- official checkpoints into ProtoSegHead


def _official_checkpoint(tmp_path, prefix="module.", C=C, K=K, D=D):
    torch.manual_seed(9)
    official = OfficialProtoModel(D, C, K, backbone=nn.Conv2d(3, D, 1))  # a backbone with weights of its own
    with torch.no_grad():
        for p in (official.feat_norm.weight, official.feat_norm.bias, official.mask_norm.weight,
                  official.mask_norm.bias):
            p.add_(torch.randn_like(p))
    path = tmp_path / "official.pth"  # as the official trainer saves it: under state_dict, DDP prefixes
    torch.save({"state_dict": {prefix + k: v for k, v in official.state_dict().items()}, "iter": 80000}, path)
    return official, path


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_official_checkpoint_loads_into_protoseghead(tmp_path, prefix):
    from protoseg_ext import ProtoSegHead

    official, path = _official_checkpoint(tmp_path, prefix)
    head = ProtoSegHead(D, C, K)
    assert head.load_official_state_dict(str(path)) == list(ProtoSegHead.OFFICIAL_KEYS)
    torch.testing.assert_close(head.prototypes, official.prototypes.data, rtol=0, atol=0)
    for name in ("feat_norm", "mask_norm"):
        for p in ("weight", "bias"):
            assert torch.equal(getattr(getattr(head, name), p), getattr(getattr(official, name), p))
    maps, gt = _inputs(8)
    feats = torch.cat([maps[0], F.interpolate(maps[1], size=(H, W), mode="bilinear", align_corners=True)], 1)
    official.backbone = nn.Identity()
    with torch.no_grad():  # the loaded head predicts what the official model does
        torch.testing.assert_close(head.eval()(feats).seg, official.eval()(maps))


def test_official_checkpoint_that_does_not_fit_is_named(tmp_path):
    from protoseg_ext import ProtoSegHead

    _, path = _official_checkpoint(tmp_path)
    head = ProtoSegHead(D, C + 1, K)
    before = head.prototypes.clone()
    with pytest.raises(ValueError, match=r"wrong shapes: prototypes \(4, 3, 16\) \(head \(5, 3, 16\)\), "
                                         r"mask_norm.weight \(4,\) \(head \(5,\)\)"):
        head.load_official_state_dict(path)
    assert torch.equal(head.prototypes, before)  # nothing loaded
    with pytest.raises(ValueError, match="missing keys: feat_norm.weight, feat_norm.bias"):
        ProtoSegHead(D, C, K).load_official_state_dict({"prototypes": torch.zeros(C, K, D),
                                                        "mask_norm.weight": torch.ones(C),
                                                        "mask_norm.bias": torch.zeros(C)})
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pth: cannot read it as weights"):
        ProtoSegHead(D, C, K).load_official_state_dict(tmp_path / "junk.pth")


def test_training_script_pretrained_takes_an_official_checkpoints_head(tmp_path):
    from protoseg_ext.train.model import BackboneError, ProtoSegNet

    official, path = _official_checkpoint(tmp_path, C=5, K=10, D=16)
    net = ProtoSegNet(5, proj_dim=16, width=8, pretrained=str(path))  # compact backbone: the head alone
    assert torch.equal(net.head.prototypes, official.prototypes.data)
    assert torch.equal(net.head.mask_norm.weight, official.mask_norm.weight)
    assert "backbone.weight" in net.pretrained_skipped  # the official backbone does not apply to compact
    with pytest.raises(BackboneError, match=f"--pretrained {path}: the official checkpoint does not fit"):
        ProtoSegNet(5, proj_dim=32, width=8, pretrained=str(path))
    plain = tmp_path / "plain.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, plain)  # no head in it: a compact backbone has no use for it
    with pytest.raises(BackboneError, match="--backbone compact starts from random weights"):
        ProtoSegNet(5, proj_dim=16, width=8, pretrained=str(plain))


def test_training_run_from_an_official_checkpoint_says_what_it_loaded(tmp_path, capsys):
    from protoseg_ext.train.loop import main

    from protoseg_ext.train.data import build_dataset

    C_synthetic = build_dataset("synthetic", "val", synthetic_size=(32, 64), synthetic_count=(2, 2)).num_classes
    _, path = _official_checkpoint(tmp_path, C=C_synthetic, K=10, D=16)
    main(["--out", str(tmp_path / "run"), "--iters", "1", "--eval-every", "1", "--synthetic-size", "32", "64",
          "--synthetic-count", "2", "2", "--width", "8", "--proj-dim", "16", "--num-pictures", "0",
          "--num-preds", "0", "--no-progress", "--workers", "0", "--pretrained", str(path)])
    text = capsys.readouterr().out
    assert f"--pretrained {path}: the head's prototypes, feat_norm and mask_norm loaded" in text
    assert "not loaded (another layout or backbone): 2 keys (backbone.bias, backbone.weight)" in text


def test_proto_head_forward_from_a_models_own_forward():
    """A model whose features are not HRNet's branches: its forward calls proto_head_forward on its projection."""

    class OwnFeatures(OfficialProtoModel):
        def forward(self, x_, gt_semantic_seg=None, pretrain_prototype=False):
            return compat.proto_head_forward(self, self.proj_head(x_), gt_semantic_seg, pretrain_prototype)

    official, _ = _pair()
    official.assign = "argmax"
    own = OwnFeatures(D, C, K, gamma=0.9)
    own.load_state_dict(official.state_dict())
    own.feat_norm, own.mask_norm = official.feat_norm, official.mask_norm
    del own.backbone, own.cls_head  # not needed by the head
    compat.accelerate(OwnFeatures, AccelLoss, assign="argmax", replace_forward=False)
    try:
        assert "forward" in OwnFeatures.__dict__ and OwnFeatures.forward.__qualname__.endswith("OwnFeatures.forward")
        maps, gt = _inputs(9)
        feats = torch.cat([maps[0], F.interpolate(maps[1], size=(H, W), mode="bilinear", align_corners=True)], 1)
        pa = own(feats, gt_semantic_seg=gt[:, None])
        po = official(maps, gt_semantic_seg=gt[:, None])
        assert isinstance(pa["logits"], compat.FusedProtoLogits) and torch.equal(pa["target"], po["target"])
        torch.testing.assert_close(pa["seg"], po["seg"])
        torch.testing.assert_close(AccelLoss()(pa, gt), OfficialProtoLoss()(po, gt))
        torch.testing.assert_close(own.prototypes.data, official.prototypes.data, atol=1e-5, rtol=1e-5)
    finally:
        compat.restore(OwnFeatures, AccelLoss)
    assert OwnFeatures.forward.__qualname__.endswith("OwnFeatures.forward")
