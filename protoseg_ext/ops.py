"""Fake kernels and autograd of the compiled ops (``torch.ops.protoseg_ext``).

The schemas are defined once, in ``csrc/protoseg.cpp``; the CPU and CUDA
implementations are registered there by ``csrc/cpu`` and ``csrc/cuda``. This
module adds what Python owns: shape inference for ``torch.compile`` and the
autograd formula, whose backward calls another registered op so that it is
dispatched by device too. The Triton backend registers ops with the same
schemas under ``torch.ops.protoseg_triton`` and reuses everything here.
"""

from __future__ import annotations

import torch

from .checks import acc_dtype as _acc_dtype

__all__ = ["register_fakes", "register_similarity_autograd", "register_mask_norm"]


def cache_fits(N, CK, dtype, cache_bytes) -> bool:
    """Whether ``similarity`` keeps ``probs (N, C*K)`` for the backward (CPU kernel's rule)."""
    return cache_bytes > 0 and N * CK * torch.empty((), dtype=_acc_dtype(dtype)).element_size() <= cache_bytes


def _fake_similarity(feats, protos, labels, ignore_index, temperature, compute_seg, compute_lse, compute_own,
                     cache_bytes=0, normalize=False):
    N = feats.shape[0]
    C, K = protos.shape[0], protos.shape[1]
    acc = _acc_dtype(feats.dtype)
    seg = feats.new_empty((N, C) if compute_seg else (0,))
    argk = feats.new_empty((N, C) if compute_seg else (0,), dtype=torch.uint8)
    lse = feats.new_empty((N,) if compute_lse else (0,), dtype=acc)
    own = feats.new_empty((N, K) if compute_own else (0,), dtype=acc)
    cached = compute_lse and cache_fits(N, C * K, feats.dtype, cache_bytes)
    probs = feats.new_empty((N, C * K) if cached else (0,), dtype=acc)
    return seg, argk, lse, own, probs


def _fake_similarity_backward(grad_seg, grad_lse, grad_own, feats, protos, labels, argk, lse, ignore_index, temperature,
                              probs=None, normalize=False):
    return torch.empty_like(feats, memory_format=torch.contiguous_format)


def _fake_sinkhorn(own, labels, num_classes, ignore_index, iters, eps):
    return own.new_empty(own.shape, dtype=_acc_dtype(own.dtype))


def _fake_prototype_sums(feats, slot, num_slots, normalize=False):
    acc = _acc_dtype(feats.dtype)
    return feats.new_empty((num_slots, feats.shape[1]), dtype=acc), feats.new_empty((num_slots,), dtype=acc)


def _fake_prototype_ema(protos, sums, counts, gamma):
    return torch.empty_like(protos, memory_format=torch.contiguous_format)


def _no_cache(fake):
    """``fake`` for a backend that never keeps the softmax: ``probs`` is always ``(0,)``."""

    def wrapped(*args, **kwargs):
        out = fake(*args, **kwargs)
        return out[:4] + (out[4].new_empty((0,)),)

    return wrapped


def register_fakes(ns: str, keeps_probs: bool = True) -> None:
    """Register the fake (meta) kernels of the five ops of namespace ``ns`` (schemas of csrc/protoseg.cpp).

    ``keeps_probs=False``: the backend never keeps softmax(S) (its ``probs`` is always ``(0,)``), so
    the fake must not promise ``(N, C*K)`` when ``cache_bytes`` would fit it.
    """
    torch.library.register_fake(f"{ns}::similarity")(_fake_similarity if keeps_probs else _no_cache(_fake_similarity))
    torch.library.register_fake(f"{ns}::similarity_backward")(_fake_similarity_backward)
    torch.library.register_fake(f"{ns}::sinkhorn")(_fake_sinkhorn)
    torch.library.register_fake(f"{ns}::prototype_sums")(_fake_prototype_sums)
    torch.library.register_fake(f"{ns}::prototype_ema")(_fake_prototype_ema)


def register_similarity_autograd(ns: str) -> None:
    """Autograd of ``{ns}::similarity`` through ``{ns}::similarity_backward``.

    Only ``feats`` receives a gradient: prototypes are buffers (SPEC 3), and
    ``argk`` is an index. Gradients of unused outputs arrive as None, so a
    step that does not use ``lse`` never recomputes S in the backward.
    """
    backward_op = getattr(getattr(torch.ops, ns), "similarity_backward").default

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


def register_mask_norm(ns: str) -> None:
    """Fake kernels and autograd of ``{ns}::mask_norm`` (the head's LayerNorm over C).

    Gradients flow to ``seg``, ``weight`` and ``bias`` through
    ``{ns}::mask_norm_backward``; ``mean`` and ``rstd`` are saved statistics,
    ``pred`` an index.
    """

    def fake(seg, weight, bias, eps, batch):
        N, C = seg.shape
        return (seg.new_empty((batch, C, N // batch)), seg.new_empty((N,)), seg.new_empty((N,)),
                seg.new_empty((N,), dtype=torch.long))

    def fake_backward(grad_out, seg, weight, mean, rstd):
        return torch.empty_like(seg, memory_format=torch.contiguous_format), torch.empty_like(weight), torch.empty_like(weight)

    torch.library.register_fake(f"{ns}::mask_norm")(fake)
    torch.library.register_fake(f"{ns}::mask_norm_backward")(fake_backward)
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


def register_embed_similarity(ns: str, keeps_probs: bool = True) -> None:
    """Fake kernels and autograd of ``{ns}::embed_similarity`` (the head's embedding fused into ``similarity``).

    Gradients reach ``feats`` and the LayerNorm's ``ln_weight`` and ``ln_bias``
    through ``{ns}::embed_similarity_backward``. ``keeps_probs``: as for :func:`register_fakes`.
    """

    def fake(feats, ln_weight, ln_bias, ln_eps, protos, labels, ignore_index, temperature, compute_seg, compute_lse,
             compute_own, cache_bytes=0):
        N = feats.shape[0] if feats.dim() == 2 else feats.shape[0] * feats.shape[2] * feats.shape[3]
        rows = feats.new_empty((N, feats.shape[1]))
        return _fake_similarity(rows, protos, labels, ignore_index, temperature, compute_seg, compute_lse, compute_own,
                                cache_bytes)

    def fake_backward(grad_seg, grad_lse, grad_own, feats, ln_weight, ln_bias, ln_eps, protos, labels, argk, lse,
                      ignore_index, temperature, probs=None):
        gw = torch.empty_like(ln_weight) if ln_weight is not None else feats.new_empty((0,))
        gb = torch.empty_like(ln_bias) if ln_bias is not None else feats.new_empty((0,))
        return torch.empty_like(feats), gw, gb

    torch.library.register_fake(f"{ns}::embed_similarity")(fake if keeps_probs else _no_cache(fake))

    @torch.library.register_fake(f"{ns}::embed_prototype_sums")
    def fake_sums(feats, ln_weight, ln_bias, ln_eps, slot, num_slots):
        dt = _acc_dtype(feats.dtype)
        return feats.new_empty((num_slots, feats.shape[1]), dtype=dt), feats.new_empty((num_slots,), dtype=dt)
    torch.library.register_fake(f"{ns}::embed_similarity_backward")(fake_backward)
    backward_op = getattr(torch.ops, ns).embed_similarity_backward.default

    def setup_context(ctx, inputs, output):
        feats, ln_weight, ln_bias, ln_eps, protos, labels, ignore_index, temperature, seg, lse_on, own_on, _ = inputs
        _, argk, lse, _, probs = output
        ctx.save_for_backward(feats, ln_weight, ln_bias, protos, labels, argk, lse, probs)
        ctx.mark_non_differentiable(argk, probs)
        ctx.args = (ln_eps, ignore_index, temperature)
        ctx.computed = (seg, lse_on, own_on)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_seg, grad_argk, grad_lse, grad_own, grad_probs):
        feats, ln_weight, ln_bias, protos, labels, argk, lse, probs = ctx.saved_tensors
        grads = [g if on else None for g, on in zip((grad_seg, grad_lse, grad_own), ctx.computed)]
        need = ctx.needs_input_grad
        if not any(g is not None for g in grads) or not (need[0] or need[1] or need[2]):
            return (None,) * 12
        ln_eps, ignore_index, temperature = ctx.args
        gf, gw, gb = backward_op(*grads, feats, ln_weight, ln_bias, ln_eps, protos, labels, argk, lse, ignore_index,
                                 temperature, probs)
        return (gf if need[0] else None, gw if need[1] and ln_weight is not None else None,
                gb if need[2] and ln_bias is not None else None) + (None,) * 9

    torch.library.register_autograd(f"{ns}::embed_similarity", backward, setup_context=setup_context)
