"""protoseg_ext: fused kernels for ProtoSeg's prototype machinery.

Public API (see README.md):

* :func:`available_backends` - the backends this build can run here;
* :mod:`protoseg_ext.functional` - ``proto_seg_logits``, ``prototype_learning``,
  ``proto_losses``;
* :class:`ProtoSegHead` - the prototype head as a module;
* :mod:`protoseg_ext.compat` - drop-ins for the official repository's functions;
* :mod:`protoseg_ext.reference` - the eager oracle (official semantics).
"""

from ._layout import installed_copy as _installed_copy

_installed = _installed_copy(__path__[0])
if _installed is not None:  # an unbuilt checkout shadowing the installed package (protoseg_ext/_layout.py):
    __path__[:] = [_installed]  # its modules, _C and kernels come from the installed copy

from . import ops as _ops  # noqa: E402

_ops.load_extension()  # a missing or mismatched library only warns

from . import compat, functional, reference  # noqa: E402
from .backends import available_backends  # noqa: E402
from .head import ProtoSegHead, ProtoSegOutput  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "functional",
    "reference",
    "compat",
    "ProtoSegHead",
    "ProtoSegOutput",
    "__version__",
]
