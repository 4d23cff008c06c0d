import os

# The Triton interpreter must be chosen before anything imports triton; it runs
# the Triton kernels on CPU tensors when there is no GPU.
_has_gpu = os.path.exists("/dev/nvidiactl")
if not _has_gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402


def _require_built_package():
    """Stop at once, in one line, when the protoseg_ext that imports is not built (an unbuilt checkout
    with nothing installed: no _C, no kernels). Which copy imports is decided by protoseg_ext/_layout.py."""
    import protoseg_ext

    missing = [m for m in ("protoseg_ext._C", "protoseg_ext.kernels") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.exit(f"protoseg_ext ({protoseg_ext.__path__[0]}) is not built or installed ({', '.join(missing)} "
                    "missing): run `pip install --no-build-isolation -e .` or `bash scripts/run.sh setup`", returncode=4)


_require_built_package()

# the problem factory and the (device, backend) fixture are the package's own
# (protoseg_ext.testing), shared with the benchmarks and the selftest
from protoseg_ext.testing import device_backend, make_problem  # noqa: E402,F401


@pytest.fixture
def problem():
    return make_problem
