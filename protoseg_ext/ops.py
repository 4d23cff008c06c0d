"""The compiled ops: loading ``protoseg_ext._C``, and what Python registers for every op family.

The schemas are defined in ``csrc/protoseg.cpp`` (``torch.ops.protoseg_ext``;
the CPU and CUDA kernels are registered there by ``csrc/cpu`` and
``csrc/cuda``) and, with the same text, by the ``torch.library.custom_op`` of
``protoseg_ext/triton_ops.py`` (``torch.ops.protoseg_triton``); the CUDA
emulator (``tools/cuda_sim``) copies the C++ ones as
``torch.ops.protoseg_cudasim``. For each op family this module adds, in one
place, what Python owns: the fake (meta) kernels, for ``torch.compile`` and
``torch.export``, and the autograd formula, whose backward calls the family's
registered ``*_backward`` op so that it is dispatched by device too.

:func:`register` is the one entry point, for every namespace: it registers
each family whose ops the namespace defines, once. :func:`load_extension`
imports ``_C`` and calls it for ``protoseg_ext``.

| family | ops | autograd |
|---|---|---|
| ``similarity`` | ``similarity``, ``similarity_backward`` | d ``feats`` |
| ``embed`` | ``embed_similarity``, ``embed_similarity_backward``, ``embed_prototype_sums`` | d ``feats``, ``ln_weight``, ``ln_bias`` |
| ``sinkhorn`` | ``sinkhorn`` | none (no gradient) |
| ``prototype_update`` | ``prototype_sums``, ``prototype_ema`` | none (no gradient) |
| ``mask_norm`` | ``mask_norm``, ``mask_norm_backward`` | d ``seg``, ``weight``, ``bias`` |
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from .checks import acc_dtype as _acc_dtype

__all__ = ["load_extension", "extension_error", "register", "FAMILIES", "cache_fits", "cpu_buffer_pool_stats",
           "release_cpu_buffers"]

# ---------------------------------------------------------------------------------------------------------
# the compiled library

_ext = None
_ext_error: Optional[str] = None
_ext_loaded = False


def _base_version(v: str) -> str:
    return v.split("+")[0]


def load_extension():
    """Import ``protoseg_ext._C`` once and register its ops' fakes and autograd; ``None`` (after a
    warning) when it does not load or was built for another torch (:func:`extension_error` says why)."""
    global _ext, _ext_error, _ext_loaded
    if _ext_loaded:
        return _ext
    _ext_loaded = True
    try:
        from . import _C  # registers torch.ops.protoseg_ext.*
    except Exception as e:  # ImportError, OSError (undefined symbol), ...
        _ext_error = (
            f"the compiled library protoseg_ext._C did not load ({type(e).__name__}: {e}); "
            "rebuild it with `pip install --no-build-isolation -e .`"
        )
        warnings.warn(_ext_error + "; the 'reference' (and 'triton') backends still work", RuntimeWarning, stacklevel=3)
        return None
    built, running = _C.BUILD_TORCH_VERSION, torch.__version__
    if _base_version(built) != _base_version(running):
        _ext_error = (
            f"protoseg_ext._C was built for torch {built} but torch {running} is installed; "
            "rebuild with `pip install --no-build-isolation -e .`"
        )
        warnings.warn(_ext_error, RuntimeWarning, stacklevel=3)
        return None
    register("protoseg_ext")
    _ext = _C
    return _ext


def extension_error() -> Optional[str]:
    """Why ``protoseg_ext._C`` is not loaded (``None`` when it is, or before :func:`load_extension`)."""
    return _ext_error


def _loaded():
    ext = load_extension()
    if ext is None:
        raise RuntimeError(f"the compiled protoseg_ext library is not loaded: {_ext_error}")
    return ext


def cpu_buffer_pool_stats() -> dict:
    """What the ``cpu`` kernels' buffer pool holds (``csrc/cpu/buffer_pool.h``), as a dict of ints.

    ``idle_bytes`` / ``idle_buffers``: freed buffers kept for a later request of
    the same size (the softmax cache, the feature gradient, the prototype sums'
    partials of the last step's shapes; at most ``cap_bytes``, from
    ``PROTOSEG_POOL_MB``, default 1024 MiB); ``live_bytes``: buffers of 16 MiB
    and more handed out and still alive; ``reused`` / ``allocated``: requests
    served from an idle buffer / with a fresh allocation; ``released``: idle
    buffers handed back to the OS; ``peak_idle_bytes``; ``released_early_bytes``:
    pages of live buffers handed back before they were freed (the softmax cache,
    released by the backward as it reads it where it is larger than the cap:
    the pool would not keep it anyway). Raises when the compiled
    library is not loaded. (Documented as ``protoseg_ext.backends.cpu_buffer_pool_stats``.)
    """
    return dict(_loaded().cpu_buffer_pool_stats())


def release_cpu_buffers() -> int:
    """Hands the ``cpu`` buffer pool's idle buffers back to the OS (say, before an evaluation at
    another size); returns the bytes released. The next training step allocates them afresh."""
    return int(_loaded().cpu_buffer_pool_release())


# ---------------------------------------------------------------------------------------------------------
# the op families: per family, its fakes and autograd together


def cache_fits(N, CK, dtype, cache_bytes) -> bool:
    """Whether ``similarity`` keeps ``probs (N, C*K)`` for the backward (CPU kernel's rule)."""
    return cache_bytes > 0 and N * CK * torch.empty((), dtype=_acc_dtype(dtype)).element_size() <= cache_bytes


def _fake_similarity(feats, protos, labels, ignore_index, temperature, compute_seg, compute_lse, compute_own,
                     cache_bytes=0, normalize=False, *, keeps_probs=True):
    N = feats.shape[0]
    C, K = protos.shape[0], protos.shape[1]
    acc = _acc_dtype(feats.dtype)
    seg = feats.new_empty((N, C) if compute_seg else (0,))
    argk = feats.new_empty((N, C) if compute_seg else (0,), dtype=torch.uint8)
    lse = feats.new_empty((N,) if compute_lse else (0,), dtype=acc)
    own = feats.new_empty((N, K) if compute_own else (0,), dtype=acc)
    # keeps_probs=False: the backend never keeps softmax(S), so the fake must not promise (N, C*K)
    cached = keeps_probs and compute_lse and cache_fits(N, C * K, feats.dtype, cache_bytes)
    probs = feats.new_empty((N, C * K) if cached else (0,), dtype=acc)
    return seg, argk, lse, own, probs


def _sums_fake(feats, num_slots):
    acc = _acc_dtype(feats.dtype)
    return feats.new_empty((num_slots, feats.shape[1]), dtype=acc), feats.new_empty((num_slots,), dtype=acc)


def _register_similarity(ns: str, keeps_probs: bool) -> None:
    """``similarity`` and its autograd through ``similarity_backward``.

    Only ``feats`` receives a gradient: prototypes are buffers (docs/design.md,
    "Losses"), and ``argk`` is an index. Gradients of unused outputs arrive as
    None, so a step that does not use ``lse`` never recomputes S in the backward.
    """
    lib = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::similarity")
    def fake(*args, **kwargs):
        return _fake_similarity(*args, **kwargs, keeps_probs=keeps_probs)

    @torch.library.register_fake(f"{ns}::similarity_backward")
    def fake_backward(grad_seg, grad_lse, grad_own, feats, protos, labels, argk, lse, ignore_index, temperature,
                      probs=None, normalize=False):
        return torch.empty_like(feats, memory_format=torch.contiguous_format)

    backward_op = lib.similarity_backward.default

    def setup_context(ctx, inputs, output):
        feats, protos, labels, ignore_index, temperature, compute_seg, compute_lse, compute_own, _, normalize = inputs
        _, argk, lse, _, probs = output  # probs: the cached softmax (N, C*K) or a (0,) placeholder
        ctx.normalize = normalize  # feats are raw rows: the gradient is w.r.t. them
        ctx.save_for_backward(feats, protos, labels, argk, lse, probs)
        ctx.mark_non_differentiable(argk, probs)
        ctx.ignore_index = ignore_index
        ctx.temperature = temperature
        ctx.computed = (compute_seg, compute_lse, compute_own)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_seg, grad_argk, grad_lse, grad_own, *grad_probs):
        feats, protos, labels, argk, lse, probs = ctx.saved_tensors
        # outputs that were not computed are (0,) placeholders: no gradient
        grads = [g if on else None for g, on in zip((grad_seg, grad_lse, grad_own), ctx.computed)]
        grad_feats = None
        if ctx.needs_input_grad[0] and any(g is not None for g in grads):
            grad_feats = backward_op(*grads, feats, protos, labels, argk, lse, ctx.ignore_index, ctx.temperature, probs,
                                     ctx.normalize)
        return (grad_feats,) + (None,) * (len(ctx.needs_input_grad) - 1)

    torch.library.register_autograd(f"{ns}::similarity", backward, setup_context=setup_context)


# Rows of embed_similarity's stats on the C++ CPU backend (csrc/cpu/similarity_cpu.h, kStatsRows):
# the 3 every backend keeps, then 3 its backward reads instead of a pass over the map.
CPU_STATS_ROWS = 6
# ... and on the CUDA backend (csrc/cuda/embed_cuda.cu, kStatRows; the emulator's ops too): the 3, then
# w . z and (w xhat) . z, which its backward reads instead of summing them over the map.
CUDA_STATS_ROWS = 5


# ... and on the Triton backend (kernels/embed.py, STATS_ROWS): the 3, then sum_d y_d w_d and
# sum_d y_d w_d xhat_d of the LayerNorm'd pixel y, which its backward reads instead of a pass over the map.
TRITON_STATS_ROWS = 5


def _stats_rows(ns: str, device) -> int:
    """Rows of embed_similarity's stats from the ops of namespace ``ns`` on ``device``."""
    if ns == "protoseg_cudasim" or (ns == "protoseg_ext" and device.type == "cuda"):
        return CUDA_STATS_ROWS
    if ns == "protoseg_triton":
        return TRITON_STATS_ROWS
    return CPU_STATS_ROWS if ns == "protoseg_ext" and device.type == "cpu" else 3


def _register_embed(ns: str, keeps_probs: bool) -> None:
    """``embed_similarity`` (the head's embedding fused into ``similarity``) and its autograd
    through ``embed_similarity_backward``; ``embed_prototype_sums``.

    Gradients reach ``feats`` and the LayerNorm's ``ln_weight`` and ``ln_bias``.
    """
    lib = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::embed_similarity")
    def fake(feats, ln_weight, ln_bias, ln_eps, protos, labels, ignore_index, temperature, compute_seg, compute_lse,
             compute_own, cache_bytes=0):
        N = feats.shape[0] if feats.dim() == 2 else feats.shape[0] * feats.shape[2] * feats.shape[3]
        rows = feats.new_empty((N, feats.shape[1]))
        out = _fake_similarity(rows, protos, labels, ignore_index, temperature, compute_seg, compute_lse, compute_own,
                               cache_bytes, keeps_probs=keeps_probs)
        any_out = compute_seg or compute_lse or compute_own
        rows = _stats_rows(ns, feats.device)
        return out + (feats.new_empty((rows, N) if any_out else (0,), dtype=_acc_dtype(feats.dtype)),)

    @torch.library.register_fake(f"{ns}::embed_similarity_backward")
    def fake_backward(grad_seg, grad_lse, grad_own, feats, ln_weight, ln_bias, ln_eps, protos, labels, argk, lse,
                      ignore_index, temperature, probs=None, stats=None):
        gw = torch.empty_like(ln_weight) if ln_weight is not None else feats.new_empty((0,))
        gb = torch.empty_like(ln_bias) if ln_bias is not None else feats.new_empty((0,))
        return torch.empty_like(feats), gw, gb

    @torch.library.register_fake(f"{ns}::embed_prototype_sums")
    def fake_sums(feats, ln_weight, ln_bias, ln_eps, slot, num_slots, stats=None):
        return _sums_fake(feats, num_slots)

    backward_op = lib.embed_similarity_backward.default

    def setup_context(ctx, inputs, output):
        feats, ln_weight, ln_bias, ln_eps, protos, labels, ignore_index, temperature, seg, lse_on, own_on, _ = inputs
        _, argk, lse, _, probs, stats = output
        ctx.save_for_backward(feats, ln_weight, ln_bias, protos, labels, argk, lse, probs, stats)
        ctx.mark_non_differentiable(argk, probs, stats)
        ctx.args = (ln_eps, ignore_index, temperature)
        ctx.computed = (seg, lse_on, own_on)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_seg, grad_argk, grad_lse, grad_own, grad_probs, grad_stats):
        feats, ln_weight, ln_bias, protos, labels, argk, lse, probs, stats = ctx.saved_tensors
        grads = [g if on else None for g, on in zip((grad_seg, grad_lse, grad_own), ctx.computed)]
        need = ctx.needs_input_grad
        if not any(g is not None for g in grads) or not (need[0] or need[1] or need[2]):
            return (None,) * 12
        ln_eps, ignore_index, temperature = ctx.args
        gf, gw, gb = backward_op(*grads, feats, ln_weight, ln_bias, ln_eps, protos, labels, argk, lse, ignore_index,
                                 temperature, probs, stats)
        return (gf if need[0] else None, gw if need[1] and ln_weight is not None else None,
                gb if need[2] and ln_bias is not None else None) + (None,) * 9

    torch.library.register_autograd(f"{ns}::embed_similarity", backward, setup_context=setup_context)


def _register_sinkhorn(ns: str, keeps_probs: bool) -> None:
    """``sinkhorn``: ``Q`` has ``own``'s shape, in the accumulation dtype; no gradient."""

    @torch.library.register_fake(f"{ns}::sinkhorn")
    def fake(own, labels, num_classes, ignore_index, iters, eps):
        return own.new_empty(own.shape, dtype=_acc_dtype(own.dtype))


def _register_prototype_update(ns: str, keeps_probs: bool) -> None:
    """``prototype_sums`` and ``prototype_ema``: the prototype update; no gradient."""

    @torch.library.register_fake(f"{ns}::prototype_sums")
    def fake_sums(feats, slot, num_slots, normalize=False):
        return _sums_fake(feats, num_slots)

    @torch.library.register_fake(f"{ns}::prototype_ema")
    def fake_ema(protos, sums, counts, gamma):
        return torch.empty_like(protos, memory_format=torch.contiguous_format)


def _register_mask_norm(ns: str, keeps_probs: bool) -> None:
    """``mask_norm`` (the head's LayerNorm over C) and its autograd through ``mask_norm_backward``.

    Gradients flow to ``seg``, ``weight`` and ``bias``; ``mean`` and ``rstd``
    are saved statistics, ``pred`` an index.
    """

    @torch.library.register_fake(f"{ns}::mask_norm")
    def fake(seg, weight, bias, eps, batch):
        N, C = seg.shape
        return (seg.new_empty((batch, C, N // batch)), seg.new_empty((N,)), seg.new_empty((N,)),
                seg.new_empty((N,), dtype=torch.long))

    @torch.library.register_fake(f"{ns}::mask_norm_backward")
    def fake_backward(grad_out, seg, weight, mean, rstd):
        return (torch.empty_like(seg, memory_format=torch.contiguous_format), torch.empty_like(weight),
                torch.empty_like(weight))

    backward_op = getattr(torch.ops, ns).mask_norm_backward.default

    def setup_context(ctx, inputs, output):
        seg, weight = inputs[0], inputs[1]
        _, mean, rstd, pred = output
        ctx.save_for_backward(seg, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd, pred)

    def backward(ctx, grad_out, grad_mean, grad_rstd, grad_pred):
        seg, weight, mean, rstd = ctx.saved_tensors
        grad_seg, grad_weight, grad_bias = backward_op(grad_out, seg, weight, mean, rstd)
        need = ctx.needs_input_grad
        return (grad_seg if need[0] else None, grad_weight if need[1] else None, grad_bias if need[2] else None,
                None, None)

    torch.library.register_autograd(f"{ns}::mask_norm", backward, setup_context=setup_context)


def _register_losses(ns: str, keeps_probs: bool) -> None:
    """``ppc_ppd`` (PPC and PPD from ``lse`` and ``own``) and its autograd through ``ppc_ppd_backward``.

    Gradients flow to ``lse`` and ``own``; ``count`` (the pixels that take
    part) is saved for the backward, which reads it on the device.
    """

    @torch.library.register_fake(f"{ns}::ppc_ppd")
    def fake(lse, own, target, ignore_index, temperature):
        return lse.new_empty(()), lse.new_empty(()), lse.new_empty(())

    @torch.library.register_fake(f"{ns}::ppc_ppd_backward")
    def fake_backward(grad_ppc, grad_ppd, own, target, count, ignore_index, temperature):
        return own.new_empty((own.shape[0],)), own.new_empty(own.shape)

    backward_op = getattr(torch.ops, ns).ppc_ppd_backward.default

    def setup_context(ctx, inputs, output):
        _, own, target, ignore_index, temperature = inputs
        count = output[2]
        ctx.save_for_backward(own, target, count)
        ctx.ignore_index, ctx.temperature = ignore_index, temperature
        ctx.mark_non_differentiable(count)
        ctx.set_materialize_grads(False)  # no zero-filled gradient of count (a launch on a GPU) in each step

    def backward(ctx, grad_ppc, grad_ppd, grad_count):
        own, target, count = ctx.saved_tensors
        if grad_ppc is None and grad_ppd is None:
            return None, None, None, None, None
        grad_ppc = torch.zeros_like(count) if grad_ppc is None else grad_ppc
        grad_ppd = torch.zeros_like(count) if grad_ppd is None else grad_ppd
        grad_lse, grad_own = backward_op(grad_ppc, grad_ppd, own, target, count, ctx.ignore_index, ctx.temperature)
        need = ctx.needs_input_grad
        return grad_lse if need[0] else None, grad_own if need[1] else None, None, None, None

    torch.library.register_autograd(f"{ns}::ppc_ppd", backward, setup_context=setup_context)


# family -> (its ops, its registration)
FAMILIES: Dict[str, Tuple[Tuple[str, ...], Callable[[str, bool], None]]] = {
    "similarity": (("similarity", "similarity_backward"), _register_similarity),
    "embed": (("embed_similarity", "embed_similarity_backward", "embed_prototype_sums"), _register_embed),
    "sinkhorn": (("sinkhorn",), _register_sinkhorn),
    "prototype_update": (("prototype_sums", "prototype_ema"), _register_prototype_update),
    "mask_norm": (("mask_norm", "mask_norm_backward"), _register_mask_norm),
    "losses": (("ppc_ppd", "ppc_ppd_backward"), _register_losses),
}

_registered: Dict[str, Tuple[str, ...]] = {}


def _defines(ns: str, op: str) -> bool:
    try:
        getattr(getattr(torch.ops, ns), op)
    except (AttributeError, RuntimeError):
        return False
    return True


def register(ns: str, *, keeps_probs: Union[bool, Tuple[str, ...]] = True) -> Tuple[str, ...]:
    """Register the fakes and autograd of every op family that namespace ``ns`` defines; returns the
    families registered. Idempotent: a second call for ``ns`` registers nothing again.

    ``keeps_probs``: whether the namespace's ``similarity`` and ``embed_similarity`` keep their cache
    ``probs (N, C*K)`` when ``cache_bytes`` fits it (the fakes promise it then), or the families
    (``"similarity"``, ``"embed"``) that do: Triton's ``embed`` keeps S, its ``similarity`` nothing
    (``probs`` always ``(0,)``). A family whose ops the namespace defines only in part is an error.
    """
    if ns in _registered:
        return _registered[ns]
    done = []
    for family, (names, reg) in FAMILIES.items():
        present = [_defines(ns, op) for op in names]
        if not any(present):
            continue
        if not all(present):
            missing = [op for op, p in zip(names, present) if not p]
            raise RuntimeError(f"torch.ops.{ns} defines the {family} family only in part: no {', '.join(missing)}")
        reg(ns, keeps_probs if isinstance(keeps_probs, bool) else family in keeps_probs)
        done.append(family)
    _registered[ns] = tuple(done)
    return _registered[ns]
