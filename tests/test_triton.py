"""The Triton-specific tests (tile overrides, schemas, opcheck, torch.compile, 64-bit offsets) live in
the package (protoseg_ext/testing/test_triton.py) so that the selftest runs them from a wheel."""

from protoseg_ext.testing.test_triton import *  # noqa: F401,F403
