"""Triton kernels of protoseg_ext (installed as ``protoseg_ext.kernels``).

Imported lazily by the ``"triton"`` backend (``protoseg_ext.triton_ops``).
"""
