"""tools/triton_meter.py: the traffic meter of the Triton interpreter, against counts computed by hand."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the meter patches the Triton interpreter (TRITON_INTERPRET=1)")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from tools.triton_meter import TritonMeter  # noqa: E402


@triton.jit
def _copy(x, y, n, stride, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y + offs, tl.load(x + offs * stride, mask=m), mask=m)


@triton.jit
def _broadcast(x, y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y + offs, tl.load(x + offs * 0, mask=m), mask=m)


@triton.jit
def _dot(a, b, c, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, IEEE: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    x = tl.load(a + rm[:, None] * K + rk[None, :])
    w = tl.load(b + rk[:, None] * N + rn[None, :])
    acc = tl.dot(x, w, input_precision="ieee") if IEEE else tl.dot(x, w)
    tl.store(c + rm[:, None] * N + rn[None, :], acc)


def test_coalesced_copy():
    """256 floats in 4 programs of 64: each load and store is 256 contiguous bytes (8 sectors, ideal 8)."""
    x, y = torch.randn(256), torch.empty(256)
    with TritonMeter() as m:
        _copy[(4,)](x, y, 256, 1, BLOCK=64)
    assert torch.equal(x, y)
    (k,) = m.events
    assert k["name"] == "_copy" and (k["bytes_loaded"], k["bytes_stored"]) == (1024, 1024)
    assert (k["instructions"], k["sectors"], k["ideal_sectors"]) == (8, 64, 64)
    assert k["unique_bytes"] == 2048 and k["flops"] == 0


def test_strided_copy():
    """y[i] = x[2 i], 128 entries in 2 programs: each load spans 512 B (16 sectors, ideal 8)."""
    x, y = torch.randn(256), torch.empty(128)
    with TritonMeter() as m:
        _copy[(2,)](x, y, 128, 2, BLOCK=64)
    assert torch.equal(x[::2], y)
    (k,) = m.events
    assert (k["bytes_loaded"], k["bytes_stored"]) == (512, 512)
    assert (k["instructions"], k["sectors"], k["ideal_sectors"]) == (4, 2 * 16 + 2 * 8, 2 * 8 + 2 * 8)
    assert k["unique_bytes"] == 1024 + 512


def test_broadcast_load_and_l2_reuse():
    """Every lane loads x[0]: 1 sector per load (ideal 1); a second launch on the same buffers hits in L2."""
    x, y = torch.randn(1), torch.empty(128)
    with TritonMeter() as m:
        _broadcast[(2,)](x, y, 128, BLOCK=64)
        _broadcast[(2,)](x, y, 128, BLOCK=64)
    a, b = m.events
    assert (a["bytes_loaded"], a["bytes_stored"]) == (512, 512)
    assert (a["sectors"], a["ideal_sectors"]) == (2 * 1 + 2 * 8, 2 * 1 + 2 * 8)
    assert a["unique_bytes"] == 32 + 512 and a["l2_hit_bytes"] == 0 and b["l2_hit_bytes"] == 32 + 512


@pytest.mark.parametrize("dtype, ieee, unit", [(torch.float16, False, "tensor cores (16-bit)"),
                                               (torch.float32, False, "tensor cores (tf32)"),
                                               (torch.float32, True, "fp32 cuda cores")])
def test_dot_flops(dtype, ieee, unit):
    """tl.dot of (16, 32) x (32, 16): 2 M N K = 16,384 flops, on the unit its dtype and precision pick."""
    a, b = torch.randn(16, 32).to(dtype), torch.randn(32, 16).to(dtype)
    c = torch.empty(16, 16)
    with TritonMeter() as m:
        _dot[(1,)](a, b, c, M=16, N=16, K=32, IEEE=ieee)
    torch.testing.assert_close(c, a.float() @ b.float(), atol=1e-2, rtol=1e-2)
    (k,) = m.events
    assert k["flops"] == 2 * 16 * 16 * 32 and k["unit"] == unit


def test_gpu_model_triton_json():
    """tools/gpu_model.py --backend triton --json: the issue's schema; the similarity kernels' tl.dot flops
    cover at least the two GEMMs of the step (2 N D CK each, forward and backward)."""
    from gpu_model_json import CITYSCAPES_GEMM_FLOPS, per_unit_launches, run_gpu_model_json

    out = run_gpu_model_json("triton", TRITON_INTERPRET="1")
    dot = [k for k in out["kernels"] if k["flops"] > 0]
    assert dot and all(k["unit"] != "memory" for k in dot)
    assert sum(k["flops"] for k in dot) >= 2 * CITYSCAPES_GEMM_FLOPS
    # per chunk: the forward, the rows of the prototype sums and their atomic sums, the backward's dS and
    # d feats kernels, and no ATen op (the sums and the LayerNorm's partials add up across the chunks)
    per = per_unit_launches(out)
    assert (per["kernels"], per["gemms"], per["aten"]) == (5, 0, 0), per
    assert out["step"]["launch_counts"]["units"] == 1  # two images of 32,768 pixels: one chunk
    # S (50 MB) within the default cache budget: kept by the forward, read by the dS kernel (no GEMM there)
    assert out["step"]["keeps_scores"] is True
    ds = next(k for k in out["kernels"] if k["name"] == "embed_ds_kernel")
    assert ds["flops"] == 0 and ds["bytes_loaded"] >= 65536 * 190 * 4, ds


def test_chunk_loops_are_tile_loops():
    """kernels/embed.py's chunk loops mark their chunks for the meter (CHUNK_OBSERVER): a forward on a
    2 x 4 x 8 x 8 map in chunks of 32 pixels runs its launches in 4 chunks of 32 pixels each (tile
    [32, 32]); a reuse of the chunk before goes to reuse_tile; after the meter the observer is unset."""
    from protoseg_ext.kernels import embed as emb

    torch.manual_seed(0)
    x, p = torch.randn(2, 4, 8, 8), torch.nn.functional.normalize(torch.randn(3, 2, 4), dim=-1)
    labels = torch.randint(0, 3, (2 * 8 * 8,))
    w, b = torch.ones(4), torch.zeros(4)
    with TritonMeter() as m:
        emb.embed_similarity_forward(x, w, b, 1e-5, p, labels, 1.0, True, True, True, chunk=32)
    assert emb.CHUNK_OBSERVER is None
    tiles = [e["tile"] for e in m.events]
    assert tiles and all(t == [32, 32] for t in tiles), tiles
    assert len(m.events) % 4 == 0  # the same launches in each of the 4 chunks
    assert any(e["reuse_tile"] for e in m.events)  # the chunk's stats, or the prototypes of the chunk before


def test_gpu_model_keeps_scores_as_the_real_size_would(monkeypatch):
    """The metered step keeps S (N x C*K float32) exactly where the head would at the size it models:
    within PROTOSEG_CACHE_MB (2048 MiB unless set), whatever the small measured maps would allow."""
    from tools import gpu_model as gm

    monkeypatch.delenv("PROTOSEG_CACHE_MB", raising=False)
    sizes = {name: (B * H * W, C) for name, (B, D, H, W, C) in gm.SIZES.items()}
    assert gm.keeps_scores(*sizes["cityscapes"], torch.bfloat16)  # 50 MB
    assert gm.keeps_scores(*sizes["ade20k"], torch.float32)  # 393 MB
    assert gm.keeps_scores(*sizes["fullres"], torch.bfloat16)  # 1,594 MB
    assert not gm.keeps_scores(*sizes["fullres-ade20k"], torch.bfloat16)  # 25,166 MB
    assert not gm.keeps_scores(2048 * 2048, 19, torch.float32)  # 3,188 MB > 2,048 MiB
    monkeypatch.setenv("PROTOSEG_CACHE_MB", "0")
    assert not gm.keeps_scores(*sizes["cityscapes"], torch.bfloat16)
