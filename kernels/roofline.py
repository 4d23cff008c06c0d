"""Roofline estimates of the protoseg_ext ops on an H100 SXM, from the shapes alone.

``h100_roofline(op, N, D, C, K, dtype)`` returns the FLOPs and the compulsory
HBM bytes of one call (every input read once, every output written once: what
a perfectly fused kernel must move), the time each would take at the H100's
published peak, and which bound applies. A measured time can be judged as a
fraction of ``max(t_compute_s, t_memory_s)``. Extra keys: ``t_roofline_s``,
``bytes_impl`` (the traffic of the kernels as written here, e.g. Sinkhorn's
2 + iters passes) and, for the GEMM ops, ``flops_impl`` (the tensor-core work
as tiled here: K padded to a power of two, the last class block padded, and
S recomputed once per D slice in the backward).

Peaks (NVIDIA H100 datasheet, H100 SXM column; the tensor-core figures there
are quoted "with sparsity", the dense rate is half):
  FP64 67 TFLOPS (tensor core) / 34 TFLOPS (CUDA cores)
  FP32 67 TFLOPS (CUDA cores)
  TF32 tensor core 989 TFLOPS sparse -> 494.5 dense
  BF16 / FP16 tensor core 1979 TFLOPS sparse -> 989.5 dense
  HBM3 bandwidth 3.35 TB/s
float32 GEMMs run as tf32x3 (three TF32 products, about fp32-accurate), so
their compute peak is 494.5 / 3 TFLOPS.
"""

from __future__ import annotations

from typing import NamedTuple

from . import tiles

__all__ = ["h100_roofline", "H100_PEAKS", "OPS"]

H100_PEAKS = {
    "fp64_tensor": 67e12,
    "fp64": 34e12,
    "fp32": 67e12,
    "tf32_tensor": 494.5e12,
    "half_tensor": 989.5e12,
    "hbm_bytes_per_s": 3.35e12,
}

OPS = (
    "similarity",  # forward with seg, lse and own (the head's training step)
    "seg_logits",  # forward with seg (and argk) only: inference
    "own_scores",  # own-class scores only (gathered, no full S)
    "proto_losses",  # forward with lse and own: PPC / PPD
    "similarity_backward",  # d feats from the seg, lse and own gradients
    "embed_similarity",  # the head's forward from the raw map: LayerNorm over D + L2 fused into `similarity`
    "embed_similarity_backward",  # d map, d LayerNorm weight and bias through the fused embedding
    "sinkhorn",
    "prototype_sums",
    "prototype_ema",
    "prototype_learning",  # own_scores + sinkhorn + prototype_sums + prototype_ema
)


def _dtype_name(dtype) -> str:
    s = str(dtype).replace("torch.", "").lower()
    aliases = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
               "fp64": "float64", "double": "float64"}
    s = aliases.get(s, s)
    if s not in ("float32", "float16", "bfloat16", "float64"):
        raise ValueError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype!r}")
    return s


def _peaks(dtype: str):
    """(GEMM peak, element-wise peak) in FLOP/s for inputs of ``dtype``."""
    if dtype == "float64":
        return H100_PEAKS["fp64_tensor"], H100_PEAKS["fp64"]
    if dtype == "float32":
        return H100_PEAKS["tf32_tensor"] / 3, H100_PEAKS["fp32"]
    return H100_PEAKS["half_tensor"], H100_PEAKS["fp32"]


def _kind(dtype: str) -> str:
    return {"float64": "fp64", "float32": "fp32"}.get(dtype, "half")


def _padding(C: int, K: int, dtype: str, pass_: str) -> float:
    """Columns the GEMM tiles compute per real column of S (the GPU tiles of similarity.tile_config)."""
    return tiles.padding(C, K, _kind(dtype), pass_)


def _result(flops_gemm, flops_elem, nbytes, bytes_impl, dtype):
    gemm_peak, elem_peak = _peaks(dtype)
    t_compute = flops_gemm / gemm_peak + flops_elem / elem_peak
    t_memory = nbytes / H100_PEAKS["hbm_bytes_per_s"]
    return {
        "flops": float(flops_gemm + flops_elem),
        "bytes": float(nbytes),
        "t_compute_s": t_compute,
        "t_memory_s": t_memory,
        "bound": "compute" if t_compute >= t_memory else "memory",
        "bytes_impl": float(bytes_impl),
        "t_roofline_s": max(t_compute, t_memory),
    }


class _Problem(NamedTuple):
    """One call's shape and dtype, with the compulsory bytes of its operands and the FLOPs of S."""

    N: int
    D: int
    C: int
    K: int
    dt: str  # the dtype's name
    iters: int  # Sinkhorn iterations
    e: int  # bytes per input element
    a: int  # bytes per accumulation element (lse, own, Q, sums)
    CK: int
    feats: int  # bytes of feats (N, D)
    protos: int  # bytes of protos (C, K, D)
    labels: int  # bytes of the int64 labels (N,)
    gemm: float  # FLOPs of S = feats @ protos^T


def _problem(N: int, D: int, C: int, K: int, dtype, iters: int) -> _Problem:
    """The call's :class:`_Problem`; a dtype other than float32, float16, bfloat16, float64 raises."""
    dt = _dtype_name(dtype)
    e = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}[dt]  # input element
    a = 8 if dt == "float64" else 4  # accumulation dtype (lse, own, Q, sums)
    CK = C * K
    return _Problem(N, D, C, K, dt, iters, e, a, CK, N * D * e, CK * D * e, N * 8, 2.0 * N * D * CK)


def _similarity_forward(op: str, p: _Problem) -> dict:
    """similarity, seg_logits, proto_losses: S and its epilogue, each output written once."""
    N, C, K, CK, e, a = p.N, p.C, p.K, p.CK, p.e, p.a
    seg = op in ("similarity", "seg_logits")
    lse = op in ("similarity", "proto_losses")
    out = (N * C * (e + 1) if seg else 0) + (N * a if lse else 0) + (N * K * a if lse else 0)
    # epilogue per S element: max/compare (seg), scale + exp + add (lse), select (own)
    elem = N * CK * ((2 if seg else 0) + (4 if lse else 0))
    nbytes = p.feats + p.protos + (p.labels if lse else 0) + out
    res = _result(p.gemm, elem, nbytes, nbytes, p.dt)
    res["flops_impl"] = p.gemm * _padding(C, K, p.dt, "fwd")
    return res


def _own_scores(op: str, p: _Problem) -> dict:
    """The own-class scores, gathered: no full S."""
    nbytes = p.feats + p.protos + p.labels + p.N * p.K * p.a
    return _result(0.0, 2.0 * p.N * p.K * p.D, nbytes, nbytes, p.dt)


def _similarity_backward(op: str, p: _Problem) -> dict:
    """d feats: S recomputed, then dS @ protos (two GEMMs); softmax weights per S element."""
    N, D, C, K, e, a, dt = p.N, p.D, p.C, p.K, p.e, p.a, p.dt
    nbytes = p.feats + p.protos + p.labels + N * C * (e + 1) + 2 * N * a + N * K * a + N * D * e
    # as written: S is recomputed (and feats re-read) once per BLOCK_DO slice of D
    slices = -(-D // tiles.similarity_tiles("bwd", _kind(dt), C, K, D, N, interpret=False)["BLOCK_DO"])
    res = _result(2 * p.gemm, 4.0 * N * p.CK, nbytes, nbytes + (slices - 1) * p.feats, dt)
    res["flops_impl"] = p.gemm * _padding(C, K, dt, "bwd") * (slices + 1)
    return res


def _embed_similarity(op: str, p: _Problem) -> dict:
    """embed_similarity(_backward): the similarity op with the LayerNorm over D and the L2 norm fused in."""
    N, D, CK, a, feats, gemm = p.N, p.D, p.CK, p.a, p.feats, p.gemm
    # the raw map in, the LayerNorm's weight and bias (D,) beside it; per map element the
    # statistics (two passes: 3 + 4 FLOPs) and the LayerNorm of each loaded tile (3 FLOPs)
    stats = N * 3 * a  # (mu, rstd, inv) per pixel: the forward's sixth output, read by the backward
    ln = 2 * D * a
    if op == "embed_similarity":
        res = _similarity_forward("similarity", p)
        elem = 10.0 * N * D
        nbytes = res["bytes"] + ln
        # as written (kernels/embed.py): each program computes its pixels' statistics from the map
        # tile it then multiplies (that second read hits L2) and writes them once
        out = _result(gemm, res["flops"] - gemm + elem, nbytes, res["bytes_impl"] + ln + stats, p.dt)
        out["flops_impl"] = res["flops_impl"]
        return out
    res = _similarity_backward("similarity_backward", p)
    # the L2 + LayerNorm backward: two passes over d z and the map, ~20 FLOPs per element
    elem = 10.0 * N * D + 20.0 * N * D
    nbytes = res["bytes"] + 2 * ln  # + d weight, d bias out
    # as written: embed_ds_kernel reads the map and the forward's statistics, recomputes S once and
    # writes dS (N, C*K) and six per-pixel scalars in the accumulation dtype; embed_dx_kernel reads
    # them back with the map (the LayerNorm backward) and writes d map; the per-block weight and
    # bias partials are small
    bytes_impl = nbytes + stats + 2 * N * CK * a + 2 * N * 6 * a + feats
    out = _result(2 * gemm, 4.0 * N * CK + elem, nbytes, bytes_impl, p.dt)
    out["flops_impl"] = gemm * _padding(p.C, p.K, p.dt, "bwd_ds") + gemm
    return out


def _sinkhorn(op: str, p: _Problem) -> dict:
    """The balanced assignment of each class's pixels to its K prototypes, ``iters`` iterations."""
    N, K, iters = p.N, p.K, p.iters
    own = N * K * p.a
    nbytes = own + p.labels + own  # read own, write Q
    # as written: sort (read labels, write key/perm ~3 N*8), pass 0 reads own,
    # pass 1 reads own and writes the work buffer, each iteration reads and writes it
    bytes_impl = 4 * p.labels + 2 * own + own + iters * 2 * own + N * 8
    return _result(0.0, (2 + 4 * iters) * N * K, nbytes, bytes_impl, p.dt)


def _prototype_sums(op: str, p: _Problem) -> dict:
    """Each prototype's sum of its assigned pixels' features, and their count."""
    nbytes = p.feats + p.labels + p.CK * p.D * p.a + p.CK * p.a
    bytes_impl = nbytes + p.feats + 4 * p.labels  # finiteness check, then the sorted sum
    return _result(0.0, 2.0 * p.N * p.D, nbytes, bytes_impl, p.dt)


def _prototype_ema(op: str, p: _Problem) -> dict:
    """The prototypes' moving-average update from the sums."""
    nbytes = p.protos + p.CK * p.D * p.a + p.CK * p.a + p.protos
    return _result(0.0, 10.0 * p.CK * p.D, nbytes, nbytes, p.dt)


def _prototype_learning(op: str, p: _Problem) -> dict:
    """own_scores + sinkhorn + prototype_sums + prototype_ema, each op's times summed."""
    parts = [_OP_MODELS[q](q, p) for q in ("own_scores", "sinkhorn", "prototype_sums", "prototype_ema")]
    tc = sum(q["t_compute_s"] for q in parts)
    tm = sum(q["t_memory_s"] for q in parts)
    return {
        "flops": sum(q["flops"] for q in parts),
        "bytes": sum(q["bytes"] for q in parts),
        "t_compute_s": tc,
        "t_memory_s": tm,
        "bound": "compute" if tc >= tm else "memory",
        "bytes_impl": sum(q["bytes_impl"] for q in parts),
        "t_roofline_s": sum(q["t_roofline_s"] for q in parts),
    }


_OP_MODELS = {
    "similarity": _similarity_forward,
    "seg_logits": _similarity_forward,
    "proto_losses": _similarity_forward,
    "own_scores": _own_scores,
    "similarity_backward": _similarity_backward,
    "embed_similarity": _embed_similarity,
    "embed_similarity_backward": _embed_similarity,
    "sinkhorn": _sinkhorn,
    "prototype_sums": _prototype_sums,
    "prototype_ema": _prototype_ema,
    "prototype_learning": _prototype_learning,
}
assert set(_OP_MODELS) == set(OPS)


def h100_roofline(op: str, N: int, D: int, C: int, K: int, dtype="float32", iters: int = 3) -> dict:
    """Roofline of ``op`` for ``feats (N, D)``, ``protos (C, K, D)`` of ``dtype`` on an H100 SXM.

    Returns ``dict(flops, bytes, t_compute_s, t_memory_s, bound, bytes_impl,
    t_roofline_s)``. ``op`` is one of :data:`OPS`; ``iters`` is the number of
    Sinkhorn iterations.
    """
    p = _problem(N, D, C, K, dtype, iters)
    if op not in _OP_MODELS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return _OP_MODELS[op](op, p)
