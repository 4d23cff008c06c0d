"""Triton kernels of protoseg_ext (installed as ``protoseg_ext.kernels``).

Imported lazily by the ``"triton"`` backend (``protoseg_ext.triton_ops``);
nothing here imports triton until a kernel module is imported.

* ``similarity``: the fused similarity forward (seg, arg-max k, row
  log-sum-exp, own-class scores) and its flash-attention-style backward;
* ``embed``: the head's embedding (LayerNorm over D, L2 normalisation) fused
  into the similarity kernels (their EMBED mode), from feats (N, D) or the
  (B, D, H, W) map as it lies, chunk by chunk; its backward and the
  prototype sums of the embedding;
* ``sinkhorn``: Sinkhorn-Knopp of every class, segmented by label;
* ``prototype_update``: per-prototype sums (deterministic sorted reduction or
  atomics) and the momentum update;
* ``losses``: the PPC and PPD losses from the row log-sum-exp and the
  own-class scores (a reduction forward, one kernel backward);
* ``labels``: the ops' label-range check, one kernel clearing a flag;
* ``device``: the ``@triton.jit`` device functions the kernels share
  (inlined: the S tile, the dS terms, the embedding's statistics);
  ``common``: what the launchers share (dtype maps, dummies, segments);
* ``roofline``: H100 roofline estimates of every op (no triton needed).
"""
