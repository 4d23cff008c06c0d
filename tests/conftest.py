import os

# The Triton interpreter must be chosen before anything imports triton; it runs
# the Triton kernels on CPU tensors when there is no GPU.
_has_gpu = os.path.exists("/dev/nvidiactl")
if not _has_gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import protoseg_ext  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _device_backends(device):
    """The fused backends to test on ``device`` (the reference is the oracle)."""
    if device == "cpu":
        return ["cpu"]
    return [b for b in ("cuda", "triton") if b in protoseg_ext.available_backends()]


def pytest_generate_tests(metafunc):
    # every op test runs on every device x fused backend present
    if "device_backend" in metafunc.fixturenames:
        params = [(d, b) for d in DEVICES for b in _device_backends(d)]
        metafunc.parametrize("device_backend", params, ids=[f"{d}-{b}" for d, b in params])


def make_problem(N=300, D=16, C=5, K=4, *, seed=0, ignore_frac=0.1, ignore_index=-1, dtype=torch.float32,
                 device="cpu", skew=False):
    """Random L2-normalised feats (N, D), protos (C, K, D), labels gt (N,) and seg (N, C).

    seg is the official head's logits (per-class max), so most pixels are
    mispredicted but not all; a few are forced correct.
    """
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    protos = F.normalize(torch.randn(C, K, D, generator=g, dtype=torch.float64), dim=-1)
    if skew:
        gt = torch.where(torch.rand(N, generator=g) < 0.35, 0, torch.randint(0, C, (N,), generator=g))
    else:
        gt = torch.randint(0, C, (N,), generator=g)
    gt = torch.where(torch.rand(N, generator=g) < ignore_frac, torch.full_like(gt, ignore_index), gt)
    seg = torch.einsum("nd,ckd->nkc", feats, protos).amax(1) + 0.05 * torch.randn(N, C, generator=g, dtype=torch.float64)
    # make a third of the labeled pixels correct
    fix = (torch.rand(N, generator=g) < 0.33) & (gt != ignore_index)
    seg[fix, gt[fix].clamp(min=0)] += 10.0
    return (feats.to(dtype).to(device), protos.to(dtype).to(device), gt.to(device), seg.to(dtype).to(device))


@pytest.fixture
def problem():
    return make_problem
