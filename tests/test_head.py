"""ProtoSegHead: fused vs reference, buffer handling, train/eval, torch.compile."""

import io
import os

import pytest
import torch
import torch.nn.functional as F

import protoseg_ext
from protoseg_ext import ProtoSegHead

# aot_eager checks tracing and the fake kernels in seconds; "inductor" also generates code
COMPILE_BACKEND = os.environ.get("PROTOSEG_TEST_COMPILE_BACKEND", "aot_eager")


def _data(B=2, D=16, H=6, W=7, C=5, ignore_index=-1, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, H, W, generator=g)
    gt = torch.randint(0, C, (B, H, W), generator=g)
    gt[torch.rand(B, H, W, generator=g) < 0.1] = ignore_index
    return x, gt


def test_head_collision_ignore_index_marks_targets_with_minus_one():
    head = ProtoSegHead(8, 30, num_prototype=10, ignore_index=255, assign="argmax")  # C*K = 300 > 255
    x = torch.randn(1, 8, 4, 4)
    gt = torch.randint(0, 30, (1, 4, 4))
    gt[0, 0, 0] = 255
    out = head(x, gt)
    assert out.target[0] == -1 and (out.target[1:] >= 0).all()


def test_train_updates_eval_does_not():
    head = ProtoSegHead(16, 5, num_prototype=3, assign="argmax", gamma=0.5)
    x, gt = _data()
    p0 = head.prototypes.clone()
    head.eval()
    out = head(x, gt)
    assert torch.equal(head.prototypes, p0) and out.loss_ppc is not None
    head.train()
    head(x, gt)
    assert not torch.equal(head.prototypes, p0)
    torch.testing.assert_close(head.prototypes.norm(dim=-1), torch.ones(5, 3))
    out = head(x)  # no labels: logits only
    assert out.seg.shape == (2, 5, 6, 7) and out.loss_ppc is None and out.target is None


def test_prototypes_are_a_saved_buffer_without_gradient():
    head = ProtoSegHead(16, 5, num_prototype=3)
    assert "prototypes" in head.state_dict() and not head.prototypes.requires_grad
    assert "prototypes" not in dict(head.named_parameters())
    buf = io.BytesIO()
    head(*_data())
    torch.save(head.state_dict(), buf)
    buf.seek(0)
    other = ProtoSegHead(16, 5, num_prototype=3)
    other.load_state_dict(torch.load(buf))
    assert torch.equal(other.prototypes, head.prototypes)


def test_labels_at_lower_resolution_are_nearest_downsampled():
    head = ProtoSegHead(16, 5, num_prototype=3, assign="argmax").eval()
    x, _ = _data(H=4, W=4)
    gt_full = torch.randint(0, 5, (2, 16, 16))
    out = head(x, gt_full)
    expect = F.interpolate(gt_full[:, None].float(), size=(4, 4), mode="nearest").long().view(-1)
    assert torch.equal(out.target // 3, expect)


def test_head_rejects_bad_input():
    head = ProtoSegHead(16, 5, num_prototype=3)
    with pytest.raises(ValueError, match="feats must be"):
        head(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="gt must be"):
        head(torch.randn(2, 16, 4, 4), torch.zeros(3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="gt must be an integer"):
        head(torch.randn(2, 16, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match=r"gt\[\d+\] = 7"):
        head(torch.randn(2, 16, 4, 4), torch.full((2, 4, 4), 7))
    with pytest.raises(ValueError, match="sync"):
        ProtoSegHead(16, 5, sync="sometimes")
    with pytest.raises(ValueError, match="backend"):
        ProtoSegHead(16, 5, backend="tpu")
    with pytest.raises(ValueError, match="assign must be 'gumbel', 'argmax' or 'sample'"):
        ProtoSegHead(16, 5, assign="soft")


def test_sample_assignment_is_seeded_and_differs_from_the_official_draw():
    """assign="sample" in the head: the same global seed, the same prototypes; not the official draw's."""
    x, gt = _data()
    new = {}
    for assign in ("sample", "sample", "gumbel"):
        torch.manual_seed(0)
        head = ProtoSegHead(16, 5, num_prototype=3, assign=assign, gamma=0.5, backend="reference")
        torch.manual_seed(1)
        head(x, gt)
        new.setdefault(assign, []).append(head.prototypes.clone())
    assert torch.equal(new["sample"][0], new["sample"][1])
    assert not torch.allclose(new["sample"][0], new["gumbel"][0])


def test_nan_pixels_do_not_corrupt_the_buffer():
    head = ProtoSegHead(16, 5, num_prototype=3, assign="argmax", gamma=0.5)
    x, gt = _data()
    x[0, :, 1, 1] = float("nan")
    x[1, 3] = float("inf")
    head(x, gt)
    assert torch.isfinite(head.prototypes).all()


def test_compile_fullgraph_training_step():
    torch._dynamo.reset()
    head = ProtoSegHead(16, 5, num_prototype=3, assign="argmax", gamma=0.9, backend="cpu")
    ref = ProtoSegHead(16, 5, num_prototype=3, assign="argmax", gamma=0.9, backend="cpu")
    ref.load_state_dict(head.state_dict())
    x, gt = _data()

    def step(h, x, gt):  # forward with prototype learning and the loss, in one graph
        out = h(x, gt)
        loss = F.cross_entropy(out.seg, gt, ignore_index=-1) + 0.01 * out.loss_ppc + 0.001 * out.loss_ppd
        return loss, out.target

    compiled = torch.compile(step, fullgraph=True, backend=COMPILE_BACKEND)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la, ta = compiled(head, xa, gt)
    lb, tb = step(ref, xb, gt)
    la.backward(), lb.backward()
    torch.testing.assert_close(la, lb)
    assert torch.equal(ta, tb)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(head.prototypes, ref.prototypes)


def test_available_backends_lists_cpu_and_reference():
    names = protoseg_ext.available_backends()
    assert "cpu" in names and "reference" in names


def test_cached_and_recomputed_backward_agree():
    """cache_mb=0 recomputes S in the backward; the default keeps softmax(S): same gradients."""
    x, gt = _data()
    grads = []
    for cache_mb in (0, 64):
        torch.manual_seed(0)
        head = ProtoSegHead(16, 5, num_prototype=3, assign="argmax", backend="cpu", cache_mb=cache_mb, temperature=0.3)
        xi = x.clone().requires_grad_()
        out = head(xi, gt)
        (F.cross_entropy(out.seg, gt, ignore_index=-1) + 0.5 * out.loss_ppc + 0.2 * out.loss_ppd).backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
