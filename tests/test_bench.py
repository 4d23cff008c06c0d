"""The benchmark harness: its plain-PyTorch baseline is honest and a tiny run writes its outputs."""

import csv
import os
import subprocess
import sys

import pytest
import torch

import protoseg_ext
from protoseg_ext import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import plot as bench_plot  # noqa: E402
from bench.opcount import OpCounter  # noqa: E402
from bench.providers import (  # noqa: E402
    IGNORE,
    SIZES,
    Provider,
    Size,
    estimate_bytes,
    make_inputs,
    official_seg,
    vectorized_losses,
    vectorized_prototype_learning,
)

SMALL = Size(3000, 32, 6, 5, "test")


@pytest.mark.parametrize("labels", ["uniform", "skewed"])
def test_vectorized_update_matches_reference(labels):
    feats, protos, gt = make_inputs(SMALL, labels, seed=1)
    seg = official_seg(feats, protos, torch.nn.LayerNorm(SMALL.C))
    t_ref, p_ref = reference.prototype_learning(feats, protos, gt, seg, assign="argmax")
    t_vec, p_vec = vectorized_prototype_learning(feats, protos, gt, seg)
    assert torch.equal(t_vec, t_ref)  # argmax mode: the targets agree exactly
    torch.testing.assert_close(p_vec, p_ref, atol=1e-6, rtol=1e-5)
    assert not torch.equal(p_ref, protos)  # the update did move prototypes

    ppc_ref, ppd_ref = reference.proto_losses(feats, protos, t_ref)
    S = feats @ protos.reshape(-1, SMALL.D).t()
    ppc, ppd = vectorized_losses(S, t_ref)
    torch.testing.assert_close(ppc, ppc_ref)
    torch.testing.assert_close(ppd, ppd_ref)


@pytest.mark.parametrize("labels", ["uniform", "skewed"])
@pytest.mark.parametrize("images", [1, 2])
def test_vectorized_step_matches_official_step(labels, images):
    """The whole step: same loss, same gradient to feats, same prototypes afterwards; on a map
    of one or two images (made in place by make_inputs, as the full-resolution rows are)."""
    shape = (images, SMALL.D, 30 // images, 100) if images > 1 else None
    feats, protos, gt = make_inputs(SMALL, labels, seed=2, map_shape=shape)
    names = ("official", "vectorized") + (("cpu",) if "cpu" in protoseg_ext.available_backends() else ())
    out = {}
    for name in names:
        prov = Provider(name, SMALL, "cpu")
        prov.set_prototypes(protos)
        x = prov.input(feats).clone().requires_grad_(True)  # the NCHW map users pass
        loss = prov.forward(x, gt)
        loss.backward()
        out[name] = (loss.detach(), x.grad, prov.head.prototypes.clone())
    l0, g0, p0 = out["official"]
    for name in names[1:]:
        l1, g1, p1 = out[name]
        torch.testing.assert_close(l1, l0)
        torch.testing.assert_close(g1, g0, atol=1e-7, rtol=1e-4)
        torch.testing.assert_close(p1, p0, atol=1e-6, rtol=1e-5)


def test_vectorized_edge_cases():
    feats, protos, gt = make_inputs(SMALL, "uniform", seed=3)
    seg = official_seg(feats, protos, torch.nn.LayerNorm(SMALL.C))
    # classes 0 and 1 absent, one class with a single pixel
    gt = torch.where(gt < 2, torch.full_like(gt, IGNORE), gt)
    gt[gt == 2] = 3
    gt[0] = 2
    t_ref, p_ref = reference.prototype_learning(feats, protos, gt, seg, assign="argmax")
    t_vec, p_vec = vectorized_prototype_learning(feats, protos, gt, seg)
    assert torch.equal(t_vec, t_ref)
    torch.testing.assert_close(p_vec, p_ref, atol=1e-6, rtol=1e-5)
    # only ignored pixels: nothing moves, losses are 0 and finite
    none = torch.full_like(gt, IGNORE)
    t, p = vectorized_prototype_learning(feats, protos, none, seg)
    assert (t == IGNORE).all()
    torch.testing.assert_close(p, protos)
    S = (feats @ protos.reshape(-1, SMALL.D).t()).requires_grad_(True)
    ppc, ppd = vectorized_losses(S, t)
    (ppc + ppd).backward()
    assert ppc.item() == 0 and ppd.item() == 0 and torch.isfinite(S.grad).all()


def test_op_counter_sees_host_syncs():
    feats, protos, gt = make_inputs(SMALL, "uniform", seed=4)
    counts = {}
    for name in ("official", "vectorized"):
        prov = Provider(name, SMALL, "cpu")
        prov.set_prototypes(protos)
        x = prov.input(feats).clone().requires_grad_(True)
        with OpCounter() as c:
            prov.forward(x, gt).backward()
        counts[name] = c
    # the per-class loop: a bool(any), boolean gathers and scatters for each class present
    assert counts["official"].syncs >= 3 * SMALL.C
    assert counts["vectorized"].syncs == 0
    assert counts["vectorized"].ops < counts["official"].ops


def test_memory_estimate_skips_the_hopeless():
    full = SIZES["fullres-ade20k"]
    assert estimate_bytes("official", full) > 90 * 2**30  # S alone is 25 GB there
    assert estimate_bytes("cpu", full) < estimate_bytes("official", full) / 3
    assert estimate_bytes("floor", full) < 20 * 2**30  # the floor runs in row chunks
    assert estimate_bytes("official", SIZES["tiny"]) < 2**30


def test_harness_tiny_run(tmp_path):
    """`bench/run.py` at the CI size writes CSV rows, a markdown table and a PNG; plot.py redraws them."""
    providers = ["official", "vectorized"] + (["cpu"] if "cpu" in protoseg_ext.available_backends() else [])
    cmd = [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--sizes", "tiny", "--labels", "uniform",
           "--providers", ",".join(providers + ["cuda"]), "--modes", "full,update", "--repeats", "1",
           "--rounds", "2", "--out-dir", str(tmp_path), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by = {(r["provider"], r["mode"]): r for r in rows}
    for prov in providers:
        for mode in ("full", "update"):
            r = by[(prov, mode)]
            assert r["status"] == "ok", r
            assert float(r["median_ms"]) > 0 and float(r["peak_mem_mb"]) > 0
            assert int(r["ops"]) > 0 and r["torch"] == torch.__version__ and r["machine"]
    assert int(by[("official", "full")]["syncs"]) > 0
    assert int(by[("vectorized", "full")]["syncs"]) == 0
    assert float(by[("vectorized", "full")]["x_floor"]) > 0  # the floor was timed in the same run
    for prov in providers + ["floor"]:
        r = by[(prov, "full")]
        assert r["rounds"] == "2" and len(r["round_ms"].split(";")) == 2, r  # interleaved rounds, each reported
        # every step's peak is kept (warm-up + 1 repeat); the peak is the highest of them
        peaks = [float(v) for v in r["step_peaks_mb"].split(";")]
        assert len(peaks) == 2 and float(r["first_peak_mem_mb"]) > 0, r
        assert float(r["peak_mem_mb"]) >= max(peaks) - 1 and float(r["peak_mem_mb"]) >= float(r["first_peak_mem_mb"])
    r = by[("vectorized", "full")]  # both floors: its own process and the provider's
    assert float(r["floor_inproc_ms"]) > 0 and float(r["x_floor_strict"]) == max(float(r["x_floor"]),
                                                                                 float(r["x_floor_inproc"]))
    if not torch.cuda.is_available():
        assert by[("cuda", "full")]["status"].startswith("unavailable")
    md = (tmp_path / "bench.md").read_text()
    assert "| full | official |" in md and "GEMM floor" in md
    assert (tmp_path / "bench.png").stat().st_size > 1000
    os.remove(tmp_path / "bench.png")
    bench_plot.main(["--csv", str(tmp_path / "bench.csv")])
    assert (tmp_path / "bench.png").exists()


def test_roofline_report_covers_every_op():
    from bench.roofline import table
    from protoseg_ext.kernels.roofline import OPS, h100_roofline

    md = table(["cityscapes"], "bfloat16")
    for op in OPS:
        assert f"| cityscapes | {op} |" in md
    r = h100_roofline("similarity", 65536, 720, 19, 10, "bfloat16")
    assert r["flops"] >= 2 * 65536 * 720 * 190 and r["bound"] in ("memory", "compute")


def test_rounds_are_combined_as_documented():
    """The best round's time, every round's median, the highest peak over all steps, the lowest in-process floor."""
    from bench.run import add_ratios, combine_rounds

    a = dict(status="ok", median_ms=12.0, p20_ms=11.0, p80_ms=13.0, peak_mem_mb=900.0, first_peak_mem_mb=800.0,
             extra_mem_mb=100.0, step_peaks_mb=[800, 900], step_start_mb=[500, 600], floor_inproc_ms=10.0)
    b = dict(a, median_ms=10.0, peak_mem_mb=850.0, first_peak_mem_mb=840.0, step_peaks_mb=[840, 850],
             floor_inproc_ms=9.0)
    r = combine_rounds([a, {"status": "OOM (killed)"}, b])
    assert r["median_ms"] == 10.0 and r["round_ms"] == "12.0;10.0" and r["rounds"] == 2
    assert r["peak_mem_mb"] == 900.0 and r["step_peaks_mb"] == "800;900" and r["first_peak_mem_mb"] == 840.0
    assert r["floor_inproc_ms"] == 9.0 and r["failed_rounds"] == "OOM (killed)"
    add_ratios(r, 8.0, 30.0)
    assert r["x_floor"] == 10.0 / 8.0 and r["x_floor_inproc"] == 10.0 / 9.0 and r["x_floor_strict"] == 10.0 / 8.0
    assert r["vs_official"] == 3.0
    assert combine_rounds([{"status": "OOM"}]) == {"status": "OOM"}


def test_gpu_model_step_roofline_is_the_faster_strategy():
    """tools/gpu_model.py's step roofline: the three-GEMM step (S recomputed) or the two-GEMM one keeping
    softmax(S), whichever is faster: memory-bound in bf16 at Cityscapes size (the compulsory bytes), bound by
    two fp32 GEMMs at ADE20K size in fp32 (below the three-GEMM figure)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_model", os.path.join(ROOT, "tools", "gpu_model.py"))
    gm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gm)
    B, D, H, W, C = gm.SIZES["cityscapes"]
    cb, cf, us = gm.step_roofline(B, D, H, W, C, "bf16")
    assert us == pytest.approx(cb / gm.HBM_BYTES_PER_S * 1e6)
    B, D, H, W, C = gm.SIZES["ade20k"]
    cb, cf, us = gm.step_roofline(B, D, H, W, C, "fp32")
    gemm = 2.0 * B * H * W * D * C * gm.K
    assert cf > 3 * gemm
    assert us == pytest.approx((cf - gemm) / gm.PEAKS["fp32 cuda cores"] * 1e6)
    assert us < cf / gm.PEAKS["fp32 cuda cores"] * 1e6
    # Triton's fp32 GEMMs are tf32x3 tensor-core products: a faster unit, a lower roofline
    assert gm.step_roofline(B, D, H, W, C, "fp32", "triton")[2] < us


def test_gpu_model_scales_tile_reuse_with_the_tile():
    """tools/gpu_model.py's extrapolate: a reuse within a tile (the meter's reuse_tile) scales with the tile's
    pixels at the real size, the rest with N: 256 KiB apart in a 10-row tile of a 1,000-row loop is 256 MiB
    apart at the real size when scaled with N (1,000x: no L2 hit) but 25 MiB with the tile (100x: a hit); and
    tile_at gives the cuda tile (at most an image) and the Triton chunk (whole images where they fit)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_model", os.path.join(ROOT, "tools", "gpu_model.py"))
    gm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gm)
    base = {m: 0 for m in gm.METRICS}
    runs = [{"k": dict(base, name="k", unit="memory", unique_bytes=n * 2**20, reuse={}, reuse_tile={}, launches=1)}
            for n in (1, 2, 3)]
    Ns, N = [10, 20, 30], 30_000
    last = runs[-1]["k"]
    last["reuse_tile"] = {(1000, 10, 2**18): 2**20}
    tile = gm.extrapolate(runs, Ns, N, lambda loop_rows, rows: gm.tile_at("cuda", 1, 30_000, loop_rows) / rows)
    by_n = gm.extrapolate(runs, Ns, N)  # no tile scale: N / Ns[-1] for every reuse
    grow = N / Ns[-1]  # unique bytes grow as N here
    assert tile[0]["l2_hit_bytes"] == pytest.approx(2**20 * grow) and by_n[0]["l2_hit_bytes"] == 0
    last["reuse_tile"], last["reuse"] = {}, {2**18: 2**20}
    assert gm.extrapolate(runs, Ns, N, lambda *_: 1.0)[0]["l2_hit_bytes"] == 0
    assert gm.tile_at("cuda", 2, 32_768, 21_888) == 21_888 and gm.tile_at("cuda", 2, 32_768, 0) == 32_768
    assert gm.tile_at("cuda", 1, 5_000, 21_888) == 5_000
    assert gm.tile_at("triton", 2, 32_768, 65_536) == 65_536 and gm.tile_at("triton", 1, 2**21, 65_536) == 65_536


def test_gpu_model_takes_the_ema_at_a_full_update():
    """tools/gpu_model.py: a kernel of the prototype update's EMA is taken at its metered full update (per
    launch), whatever the extrapolation from the small maps said; the other kernels are left as they were."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_model", os.path.join(ROOT, "tools", "gpu_model.py"))
    gm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gm)
    grown = dict(name="prototype_ema_kernel<float>", unit="memory", scaling="not linear (sectors: proportional)",
                 launches=1, bytes_loaded=0.0, bytes_stored=5e8, sectors=4e8, ideal_sectors=4e8, unique_bytes=5e8,
                 flops=0.0, l2_hit_bytes=1e6)
    other = dict(grown, name="embed_stats_kernel<float>", scaling="linear")
    kept = dict(other)
    full = {"prototype_ema_kernel<float>": dict(launches=1, bytes_loaded=2e6, bytes_stored=1e6, sectors=9.4e4,
                                                ideal_sectors=9.4e4, unique_bytes=1.6e6, flops=0.0)}
    rows = gm.bound_by_full_update([grown, other], full)
    assert rows[0]["bytes_loaded"] == 2e6 and rows[0]["sectors"] == 9.4e4 and rows[0]["unique_bytes"] == 1.6e6
    assert rows[0]["launches"] == 1 and rows[0]["l2_hit_bytes"] == 0.0 and "every prototype" in rows[0]["scaling"]
    assert rows[1] == kept
    modelled = gm.model(rows)[0]["modelled_us"]
    assert modelled == pytest.approx(max(1.6e6 / gm.HBM_BYTES_PER_S, 9.4e4 * 32 / gm.L2_BYTES_PER_S) * 1e6)
