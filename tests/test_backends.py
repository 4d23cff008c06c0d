"""The op x backend table lives in the package (protoseg_ext/testing/test_backends.py) so that
``python -m protoseg_ext.selftest`` can run it from an installed wheel; collected here for the suite."""

from protoseg_ext.testing.test_backends import *  # noqa: F401,F403
