"""Tile sizes of the similarity kernels, with no triton import (``roofline`` uses them too).

``similarity_tiles(pass_, kind, C, K, D, N, interpret)`` is what the
launchers pick. On a GPU the tiles come from :data:`GPU_TILES`, chosen so that
every specialisation compiles for sm_80 and sm_90 without spilling registers
(``tests/compile_kernels.py`` checks it in CI); the interpreter, whose cost is
per program, takes the largest tiles that stay within Triton's limit on the
elements of one block (:data:`MAX_NUMEL`) in every tensor the kernels build.
"""

from __future__ import annotations

__all__ = ["GPU_TILES", "EMBED_GPU_TILES", "EMBED_DX_GPU_TILES", "MAX_NUMEL", "kind_of", "similarity_tiles",
           "embed_dx_tiles", "largest_block", "pow2"]

# Triton's limit on the elements of one tensor (triton.language.core.TRITON_MAX_TENSOR_NUMEL)
MAX_NUMEL = 1 << 20

# (BLOCK_N, most columns BLOCK_C * BLOCK_K, BLOCK_D, BLOCK_DO, num_warps,
# num_stages) per pass and GEMM kind: "half" (fp16 or bf16 operands on the
# tensor cores), "fp32" (tf32x3; also mixed input dtypes), "fp64".
# Registers and shared memory of each on sm_90 / sm_80 are in the kernels'
# comment blocks (kernels/similarity.py).
GPU_TILES = {
    ("fwd", "half"): (64, 128, 64, None, 8, 3),
    ("fwd", "fp32"): (64, 128, 16, None, 8, 3),
    ("fwd", "fp64"): (32, 64, 32, None, 8, 2),
    ("bwd", "half"): (32, 64, 64, 256, 8, 3),
    ("bwd", "fp32"): (32, 64, 32, 64, 8, 2),
    ("bwd", "fp64"): (16, 16, 32, 32, 8, 2),
}

# The EMBED + LAYER_NORM variants of the similarity kernels (kernels/embed.py:
# the head's LayerNorm fused in, its normalised feats tile in registers) where
# they need other tiles than GPU_TILES (same layout; the L2-only EMBED variant
# uses the feats tile as loaded and takes GPU_TILES), and ("embed", acc):
# (BLOCK_N, BLOCK_D, num_warps)
# of the embedding's own kernels (statistics, LN + L2 backward, embedding
# rows). Registers per kernel are in kernels/similarity.py and kernels/embed.py.
EMBED_GPU_TILES = {
    # half forward: 64 px x 64 cols (4 classes x 16; GPU_TILES: 8 classes):
    # with the LayerNorm'd tile, its statistics and w, b in registers the
    # 128-column tile reached 255 registers on sm_90 and sm_80 (at BLOCK_D 64
    # or 32); 64 columns: 181-183 (sm_80: 214). C = 19 pads to 20 classes
    # (1.68x) instead of 24, for 5 passes over the feats tile instead of 3.
    ("fwd", "half"): (64, 64, 64, None, 8, 3),
    # half backward: BLOCK_D 32 (GPU_TILES: 64): at 64 ptxas held the odd tiny
    # size (D = 33, K = 1) to 128 registers and spilled 4-12 B
    ("bwd", "half"): (32, 64, 32, 256, 8, 3),
    # float32 (tf32x3) forward: 32 px x 64 cols, BLOCK_D 32 (GPU_TILES: 64 x
    # 128, BLOCK_D 16, at 255 registers on sm_80 already): 64 x 128 spilled
    # 24 B with the LayerNorm'd tile, 32 x 128 reached 255, and BLOCK_D 16
    # spilled at the tiny size; this one: 178-184 registers
    ("fwd", "fp32"): (32, 64, 32, None, 8, 3),
    # float64: BLOCK_D 16 (GPU_TILES: 32) and a D slice of 16 in the backward:
    # ptxas kept the odd tiny size (D = 33, K = 1) at 128 registers and
    # spilled 8 B at BLOCK_D 32
    ("fwd", "fp64"): (32, 64, 16, None, 8, 2),
    ("bwd", "fp64"): (16, 16, 16, 16, 8, 2),
    # the embedded backward's dS kernel (embed.embed_ds_kernel: the statistics, S recomputed once per
    # class block, dS and the per-pixel scalars out), so that each program reads the prototypes
    # once for 64 pixels (the old backward: 32, once per D slice of 256, 3 at D = 720); its S, dS
    # and epilogue tiles at 128 x 64 (and fp32 64 x 64, fp64 32 x 64) spilled
    ("bwd_ds", "half"): (64, 32, 64, None, 8, 3),
    ("bwd_ds", "fp32"): (64, 32, 16, None, 8, 3),
    ("bwd_ds", "fp64"): (32, 32, 16, None, 8, 2),
    # statistics / embedding rows, by accumulation dtype
    # (fp16, bf16 and fp32 feats accumulate in float32); 32 x 64 put the
    # backward at 168-216 registers, 32 x 32 at 120-163
    ("embed", "fp32"): (32, 32, 4),
    ("embed", "fp64"): (32, 16, 4),
}


# embed.embed_dx_kernel (g = dS @ protos over the C*K columns, the L2 + LayerNorm backward in its
# epilogue): (BLOCK_N, BLOCK_J, BLOCK_DO, num_warps, num_stages) by GEMM kind
EMBED_DX_GPU_TILES = {
    "half": (64, 32, 128, 8, 3),
    "fp32": (64, 32, 128, 8, 3),
    "fp64": (16, 16, 32, 8, 2),
}


def embed_dx_tiles(kind: str, CK: int, D: int, N: int, interpret: bool) -> dict:
    """Block sizes and launch options of ``embed_dx_kernel``: the GPU's, or the interpreter's largest
    within Triton's element limit (the float64 FMA product's (n, j, dout) block included)."""
    if interpret:
        cfg = dict(BLOCK_N=pow2(N, 16, 256), BLOCK_J=pow2(CK, 16, 1024), BLOCK_DO=pow2(D, 16, 1024),
                   num_warps=4, num_stages=1)
    else:
        n, j, do, warps, stages = EMBED_DX_GPU_TILES[kind]
        cfg = dict(BLOCK_N=n, BLOCK_J=j, BLOCK_DO=min(do, pow2(D, 16)), num_warps=warps, num_stages=stages)

    def largest(c):
        n, j, do = c["BLOCK_N"], c["BLOCK_J"], c["BLOCK_DO"]
        return max(n * j, j * do, n * do, n * j * do if kind == "fp64" else 0)

    while largest(cfg) > MAX_NUMEL:
        key = max(("BLOCK_J", "BLOCK_DO", "BLOCK_N"), key=lambda k: (cfg[k], k == "BLOCK_J"))
        if cfg[key] <= 16:
            raise ValueError(f"no embed_dx tile within Triton's element limit ({cfg})")
        cfg[key] //= 2
    return cfg


def pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """The next power of two of ``n`` (at least 1), clamped to ``[lo, hi]``."""
    p = max(lo, 1 << (max(1, int(n)) - 1).bit_length())
    return min(p, hi) if hi is not None else p


def kind_of(feats_dtype: str, protos_dtype: str) -> str:
    """GEMM kind of an input dtype pair (dtype names: "float16", "bfloat16", "float32", "float64")."""
    if feats_dtype == "float64":
        return "fp64"
    if feats_dtype == protos_dtype and feats_dtype in ("float16", "bfloat16"):
        return "half"
    return "fp32"


def largest_block(pass_: str, kind: str, cfg: dict) -> int:
    """Elements of the largest tensor the kernel of ``pass_`` builds with the tiles ``cfg``."""
    n, j, d = cfg["BLOCK_N"], cfg["BLOCK_C"] * cfg["BLOCK_K"], cfg["BLOCK_D"]
    sizes = [n * j, n * d, d * j]  # S tile (and its (n, c, k) view), feats chunk, protos chunk
    if pass_ == "bwd":
        do = cfg["BLOCK_DO"]
        sizes += [j * do, n * do]  # protos slice, d feats slice
        if kind == "fp64":
            sizes.append(n * j * do)  # the FMA second product's (n, j, dout) block
    return max(sizes)


def similarity_tiles(pass_: str, kind: str, C: int, K: int, D: int, N: int, interpret: bool,
                     layer_norm: bool = False) -> dict:
    """Block sizes and launch options of the forward (``"fwd"``) or backward (``"bwd"``) similarity kernel.

    A tile holds BLOCK_C whole classes of BLOCK_K = next_pow2(K) prototypes
    (BLOCK_C * BLOCK_K >= 16: the tensor cores' smallest dimension).
    ``layer_norm``: the EMBED + LAYER_NORM variant (its GPU tiles from
    :data:`EMBED_GPU_TILES` where given). ``pass_ = "bwd_ds"``: the embedded
    backward's dS kernel (the forward's tile shape, its own GPU tiles).
    """
    if interpret:
        BLOCK_N, max_j, BLOCK_D, BLOCK_DO, num_warps, num_stages = (
            pow2(N, 16, 256), 1024, pow2(D, 16, 256), pow2(D, 16, 1024), 4, 1)
    else:
        use_embed = (pass_, kind) in EMBED_GPU_TILES and (layer_norm or (pass_, kind) not in GPU_TILES)
        table = EMBED_GPU_TILES if use_embed else GPU_TILES
        BLOCK_N, max_j, BLOCK_D, BLOCK_DO, num_warps, num_stages = table[(pass_, kind)]
    BLOCK_K = pow2(K)
    BLOCK_C = max(1, min(pow2(C), max_j // BLOCK_K))
    while BLOCK_C * BLOCK_K < 16:
        BLOCK_C *= 2
    cfg = dict(BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D,
               num_warps=num_warps, num_stages=num_stages)
    if pass_ == "bwd":
        cfg["BLOCK_DO"] = min(BLOCK_DO, pow2(D, 16))
    # within Triton's element limit (the float64 backward's (n, j, dout) block
    # first of all): shrink the tiles, the D slice last of all (each slice
    # recomputes S), the feats chunk only if nothing else is left
    while largest_block(pass_, kind, cfg) > MAX_NUMEL:
        j = cfg["BLOCK_C"] * cfg["BLOCK_K"]
        do = cfg.get("BLOCK_DO", 0)
        if do > 256:
            cfg["BLOCK_DO"] //= 2
        elif j > 128 and cfg["BLOCK_C"] > 1:
            cfg["BLOCK_C"] //= 2
        elif cfg["BLOCK_N"] > 64:
            cfg["BLOCK_N"] //= 2
        elif do > 64:
            cfg["BLOCK_DO"] //= 2
        elif j > 16 and cfg["BLOCK_C"] > 1:
            cfg["BLOCK_C"] //= 2
        elif cfg["BLOCK_N"] > 16:
            cfg["BLOCK_N"] //= 2
        elif do > 16:
            cfg["BLOCK_DO"] //= 2
        elif cfg["BLOCK_D"] > 16:
            cfg["BLOCK_D"] //= 2
        else:
            raise ValueError(f"K = {K} is too large for one tile within Triton's element limit ({cfg})")
    return cfg


def padding(C: int, K: int, kind: str, pass_: str) -> float:
    """Columns the GEMM tiles compute per real column of S on a GPU.

    K is padded to a power of two and the last class block to BLOCK_C classes.
    """
    cfg = similarity_tiles(pass_, kind, C, K, 64, 1, interpret=False)
    bc, bk = cfg["BLOCK_C"], cfg["BLOCK_K"]
    return (-(-C // bc) * bc * bk) / (C * K)
