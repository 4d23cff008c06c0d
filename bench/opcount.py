"""Count the ops a step dispatches, and the ones that synchronise a GPU with the host.

On a GPU every dispatched op is (at least) one kernel launch of a few
microseconds, and every op whose output shape depends on the data (boolean
indexing, ``nonzero``, ``unique``, ``.item()``, ``bool(tensor)``) stops the host
until the device has caught up. Both can be counted exactly on CPU with a
``TorchDispatchMode``, which sees every aten (and custom) op below autograd,
including those of the backward pass.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose output shape (or a host value) depends on tensor data: the host must wait.
_DATA_DEPENDENT = {
    "nonzero",
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "unique_dim_consecutive",
    "_local_scalar_dense",  # .item(), bool(t), int(t), .tolist()
    "is_nonzero",
    "equal",
    "bincount",
    "histc",
    "repeat_interleave",  # with a tensor of repeats
    "masked_scatter",
    "masked_scatter_",
}
# Indexing ops that turn a boolean mask into indices (an implicit nonzero).
_MASK_INDEXED = {"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"}


def _has_mask_index(args) -> bool:
    idx = args[1] if len(args) > 1 else None
    if not isinstance(idx, (list, tuple)):
        return False
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in idx)


def is_host_sync(func, args) -> bool:
    """True when ``func(*args)`` has a data-dependent output shape or returns a host value."""
    name = func.overloadpacket.__name__
    if name in _DATA_DEPENDENT:
        if name == "repeat_interleave":
            return any(isinstance(a, torch.Tensor) for a in args)
        return True
    return name in _MASK_INDEXED and _has_mask_index(args)


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as c: step()``; then ``c.ops``, ``c.syncs``, ``c.sync_detail()``.

    ``ops``: every op dispatched (aten and custom; views included, since on a GPU
    they still cost a dispatch). ``views``: the view ops among them (no kernel).
    ``syncs``: the host-synchronising ones, by name in ``sync_names``.
    """

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.views = 0
        self.syncs = 0
        self.names = Counter()
        self.sync_names = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        name = f"{func.namespace}.{func.overloadpacket.__name__}"
        self.names[name] += 1
        if getattr(func, "is_view", False):
            self.views += 1
        if is_host_sync(func, args):
            self.syncs += 1
            self.sync_names[name] += 1
        return func(*args, **kwargs)

    def sync_detail(self, top: int = 4) -> str:
        """``'aten._local_scalar_dense x20, aten.index x19'``: the most frequent host syncs."""
        return ", ".join(f"{n} x{c}" for n, c in self.sync_names.most_common(top))

