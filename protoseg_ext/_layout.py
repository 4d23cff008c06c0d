"""Which copy of the package runs: the layout decides, not the order of ``sys.path``.

A source checkout holds ``protoseg_ext/`` (Python only) and, beside it, ``kernels/`` (installed as
``protoseg_ext.kernels``) and ``csrc/`` (built into ``protoseg_ext._C``). Built in place
(``pip install -e .``), the checkout is the package. Not built in place, it is only the source of
a package installed elsewhere (``pip install .``): Python run from the checkout's root (``python -m
pytest tests``) would still import the checkout's ``protoseg_ext/`` first, without ``_C`` or
``kernels``. :func:`installed_copy` finds the installed package then, and ``protoseg_ext/__init__``
takes its submodules from there, so the tests, run from the root, test what was installed.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Optional


def _is_unbuilt_checkout(here: str) -> bool:
    """``here`` is a checkout's ``protoseg_ext/`` never built in place: no ``_C`` beside it, no
    ``kernels/`` inside it, the checkout's top-level ``kernels/`` beside it."""
    if os.path.isdir(os.path.join(here, "kernels")) or glob.glob(os.path.join(here, "_C.*")):
        return False
    return os.path.isfile(os.path.join(os.path.dirname(here), "kernels", "__init__.py"))


def installed_copy(here: str, name: str = "protoseg_ext") -> Optional[str]:
    """The directory of the installed package that an unbuilt checkout's ``here`` shadows; ``None``
    when ``here`` is the installed package, an in-place build, or nothing else is installed."""
    here = os.path.realpath(here)
    if not _is_unbuilt_checkout(here):
        return None
    root = os.path.dirname(here)
    path = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            spec = find(name, path)
        except Exception:  # a finder that cannot answer for this name
            continue
        locations = list(getattr(spec, "submodule_search_locations", None) or [])
        if locations and os.path.realpath(locations[0]) != here:
            return locations[0]
    return None
