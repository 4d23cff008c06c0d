"""Triton kernels at realistic shapes and the numerics of their launch choices.

* the tiles every launcher picks stay within Triton's element limit for every
  dtype (the float64 backward builds an (n, j, dout) block);
* float64 PPC/PPD forward and backward at the Cityscapes head's D, C and K;
* the backward keeps dS in fp32 for fp16/bf16 inputs: the PPC/PPD gradient
  (weights 0.01 and 0.001 over n_valid pixels) against the float64 reference;
* prototype sums judge a float64 row's finiteness in float64.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1,
set before triton is imported), which rounds GEMM operands as a GPU does
(``kernels.common.dot_config``).
"""

import os

if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

triton = pytest.importorskip("triton")

import protoseg_ext.functional as PF  # noqa: E402
from protoseg_ext import reference as R  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_GPU = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if HAS_GPU else "cpu"
if not INTERPRET and not HAS_GPU:
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

import protoseg_ext.triton_ops  # noqa: E402,F401  (registers the "triton" backend's ops)
from protoseg_ext.kernels import prototype_update as KU  # noqa: E402
from protoseg_ext.kernels import similarity as KS  # noqa: E402
from protoseg_ext.kernels import tiles as KT  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# (N, D, C, K): Cityscapes HRNet-W48, ADE20K, COCO-Stuff, full resolution, small D and K, one prototype
SHAPES = [(65536, 720, 19, 10), (32768, 720, 150, 10), (32768, 720, 171, 10), (4194304, 256, 19, 10),
          (300, 16, 5, 4), (1000, 33, 3, 1), (4096, 2048, 19, 64)]


def problem(N, D, C, K, dtype, seed=0, ignore_frac=0.1):
    """L2-normalised ``feats (N, D)`` and ``protos (C, K, D)`` of ``dtype``, PPC/PPD ``target (N,)`` (-1 = ignored)."""
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    protos = F.normalize(torch.randn(C, K, D, generator=g, dtype=torch.float64), dim=-1)
    target = torch.randint(0, C * K, (N,), generator=g)
    target = torch.where(torch.rand(N, generator=g) < ignore_frac, torch.full_like(target, -1), target)
    return feats.to(dtype).to(DEVICE), protos.to(dtype).to(DEVICE), target.to(DEVICE)


def rel_err(a, b):
    """``max |a - b| / max |b|``, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-300)).item()


# ---------------------------------------------------------------- tile sizes


def test_element_limit_is_triton_s():
    assert KT.MAX_NUMEL == triton.language.core.TRITON_MAX_TENSOR_NUMEL


@pytest.mark.parametrize("interpret", [True, False], ids=["interpreter", "gpu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_tiles_within_triton_element_limit(interpret, dtype):
    for N, D, C, K in SHAPES:
        for pass_ in ("fwd", "bwd"):
            cfg = KS.tile_config(pass_, dtype, dtype, N, C, K, D, interpret=interpret)
            kind = KT.kind_of(str(dtype).split(".")[-1], str(dtype).split(".")[-1])
            assert KT.largest_block(pass_, kind, cfg) <= KT.MAX_NUMEL, (pass_, (N, D, C, K), cfg)
            assert cfg["BLOCK_C"] * cfg["BLOCK_K"] >= 16 and cfg["BLOCK_K"] >= K, cfg
            if pass_ == "bwd" and kind == "fp64":  # the FMA second product, the block that used to overflow
                assert cfg["BLOCK_N"] * cfg["BLOCK_C"] * cfg["BLOCK_K"] * cfg["BLOCK_DO"] <= KT.MAX_NUMEL


def test_largest_block_counts_the_float64_backward_product():
    cfg = dict(BLOCK_N=256, BLOCK_C=32, BLOCK_K=16, BLOCK_D=256, BLOCK_DO=64)  # the old interpreter tile at D = 64
    assert KT.largest_block("bwd", "fp64", cfg) == 256 * 512 * 64 > KT.MAX_NUMEL
    assert KT.largest_block("bwd", "fp32", cfg) == 256 * 512


# ---------------------------------------------------------------- float64 at a realistic shape


def test_float64_losses_and_gradient_at_cityscapes_d_c_k():
    """PPC/PPD and d feats in float64 at D = 720, C = 19, K = 10 (several row blocks, class blocks, D slices)."""
    N, D, C, K = 200, 720, 19, 10
    f, p, target = problem(N, D, C, K, torch.float64)
    a, b = f.clone().requires_grad_(), f.clone().requires_grad_()
    ppc_a, ppd_a = PF.proto_losses(a, p, target, backend="triton")
    ppc_b, ppd_b = R.proto_losses(b, p, target)
    torch.testing.assert_close(torch.stack([ppc_a, ppd_a]), torch.stack([ppc_b, ppd_b]), atol=1e-12, rtol=1e-10)
    (ppc_a + 0.5 * ppd_a).backward()
    (ppc_b + 0.5 * ppd_b).backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-13, rtol=1e-9)


def test_float64_seg_logits_gradient_at_ade20k_c():
    N, D, C, K = 300, 256, 150, 10
    f, p, _ = problem(N, D, C, K, torch.float64)
    a, b = f.clone().requires_grad_(), f.clone().requires_grad_()
    sa, sb = PF.proto_seg_logits(a, p, backend="triton"), R.proto_seg_logits(b, p)
    torch.testing.assert_close(sa, sb, atol=1e-12, rtol=1e-10)
    w = torch.randn(N, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    (sa * w).sum().backward()
    (sb * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------- half inputs: dS kept in fp32


def ulps(a, ref):
    """Largest ``|a - ref|`` in units of the last place of ``a.dtype`` at ``ref`` (float64)."""
    r = ref.to(a.dtype)
    up = torch.nextafter(r, torch.full_like(r, float("inf")))
    return ((a.double() - ref).abs() / (up.double() - r.double())).max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_ppc_ppd_gradient_against_float64(dtype):
    """The gradient of the official 0.01 PPC + 0.001 PPD alone, half inputs, vs float64 on the same values.

    With ~2,000 valid pixels, each softmax entry of dS is about
    0.01 / 2000 / 190 = 2.6e-8, under fp16's smallest subnormal (6e-8): a
    backward that rounds dS to fp16 loses the softmax half of the PPC
    gradient, while d feats, its sum over 190 prototypes, is still
    representable (measured: 13% error against 0.6% with dS in fp32, 11 ulps
    against 0.5). bf16 keeps dS's range but three digits: 640-770 ulps on
    near-zero entries of d feats against 1.
    """
    N, D, C, K = 2200, 16, 19, 10
    f, p, target = problem(N, D, C, K, dtype, seed=3)
    a = f.clone().requires_grad_()
    ppc, ppd = PF.proto_losses(a, p, target, backend="triton")
    (0.01 * ppc + 0.001 * ppd).backward()
    b = f.double().requires_grad_()
    ppc_r, ppd_r = R.proto_losses(b, p.double(), target)
    (0.01 * ppc_r + 0.001 * ppd_r).backward()
    assert a.grad.dtype == dtype
    assert rel_err(a.grad, b.grad) <= 0.02
    if INTERPRET:  # fp32 products of the GPU's rounded operands, exactly (no TF32): the output rounding alone
        assert ulps(a.grad, b.grad) <= 1.0


def test_dot_config_keeps_ds_in_the_accumulation_dtype():
    from protoseg_ext.kernels.common import TL_DTYPE, dot_config

    for dt in DTYPES:
        for interpret in (True, False):
            cfg = dot_config(dt, dt, interpret=interpret)
            acc = torch.float64 if dt == torch.float64 else torch.float32
            assert cfg["DS_DTYPE"] == TL_DTYPE[acc], (dt, interpret)
            if dt in (torch.float16, torch.bfloat16):
                assert cfg["DOT_DTYPE"] == TL_DTYPE[dt]  # S itself: half operands on the tensor cores
                assert cfg["DS_PRECISION"] == ("ieee" if interpret else "tf32")


# ---------------------------------------------------------------- prototype sums: finiteness in the input dtype


@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
def test_float64_rows_beyond_float32_range_take_part(deterministic):
    """A finite float64 row beyond float32's range (1e300) is summed; a row with inf is not."""
    N, D, S = 40, 6, 5
    g = torch.Generator().manual_seed(0)
    f = torch.randn(N, D, generator=g, dtype=torch.float64)
    slot = torch.randint(0, S, (N,), generator=g)
    f[3] = 1e300 * F.normalize(f[3], dim=0)
    f[7, 2] = float("inf")
    f[11, 0] = float("nan")
    f, slot = f.to(DEVICE), slot.to(DEVICE)
    sums, counts = KU.prototype_sums(f, slot, S, deterministic=deterministic)
    ok = torch.isfinite(f).all(dim=1)
    assert bool(ok[3]) and not bool(ok[7]) and not bool(ok[11])
    ref_counts = torch.zeros(S, dtype=torch.float64, device=f.device).index_add_(0, slot[ok], torch.ones_like(f[ok, 0]))
    ref_sums = torch.zeros(S, D, dtype=torch.float64, device=f.device).index_add_(0, slot[ok], f[ok])
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-12, atol=1e-12)
