import os

# The Triton interpreter must be chosen before anything imports triton; it runs
# the Triton kernels on CPU tensors when there is no GPU.
_has_gpu = os.path.exists("/dev/nvidiactl")
if not _has_gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# the problem factory and the (device, backend) fixture are the package's own
# (protoseg_ext.testing), shared with the benchmarks and the selftest
from protoseg_ext.testing import device_backend, make_problem  # noqa: E402,F401


@pytest.fixture
def problem():
    return make_problem
