#!/usr/bin/env bash
# Set up everything protoseg_ext needs on a fresh machine, then run one job.
#
#   bash scripts/run.sh train    # train on the built-in synthetic dataset, print the mIoU table
#   bash scripts/run.sh test     # the test suite
#   bash scripts/run.sh bench    # the quick benchmark (python bench/run.py --quick)
#   bash scripts/run.sh setup    # only install and build
#
# It makes a virtual environment in .venv (or $PROTOSEG_VENV), installs torch
# 2.14.1 (a CUDA 13.0 build; it runs on CPU too) and the tools, and builds the
# extension with `pip install --no-build-isolation -e .`: CUDA kernels too when
# a CUDA toolkit is found (CUDA_HOME, default /usr/local/cuda), CPU-only otherwise.
set -euo pipefail

job="${1:-test}"
shift || true
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${PROTOSEG_VENV:-$root/.venv}"
python_bin="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$python_bin" -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.protoseg-deps-3"  # bump when the list below changes, so existing venvs install it
if [ ! -f "$stamp" ]; then
  echo "[setup] installing torch 2.14.1 and tools (a few minutes the first time)"
  "$py" -m pip install -q --upgrade "pip>=24" "setuptools>=70" wheel
  "$py" -m pip install -q "torch==2.14.1" numpy pytest tqdm pillow matplotlib psutil timm onnx onnxscript onnxruntime
  touch "$stamp"
fi

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS="${MAX_JOBS:-2}"
if [ -n "${CUDA_HOME:-}" ]; then
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    # build for the GPUs of this machine; without one, the release list of
    # setup.py (PTX for its newest architecture, so newer GPUs can JIT it)
    gpu_archs="$("$py" -c 'import torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(n)})))' 2>/dev/null || true)"
    export TORCH_CUDA_ARCH_LIST="${gpu_archs:-8.0;9.0+PTX}"
  fi
else
  export PROTOSEG_ONLY_CPU=1
fi
# rebuild only when the sources or the build settings changed
key="$( (find csrc kernels -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.py' \) \
          ! -name build_info.h -print0 | sort -z | xargs -0 sha1sum; sha1sum setup.py pyproject.toml;
        echo "${CUDA_HOME:-} ${TORCH_CUDA_ARCH_LIST:-} ${PROTOSEG_ONLY_CPU:-}") | sha1sum | cut -c1-16)"
if [ "$(cat "$venv/.protoseg-build" 2>/dev/null)" != "$key" ] || ! "$py" -c "import protoseg_ext._C" 2>/dev/null; then
  echo "[setup] building protoseg_ext (CUDA_HOME=${CUDA_HOME:-none}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-})"
  "$py" -m pip install -q --no-build-isolation -e .
  echo "$key" > "$venv/.protoseg-build"
fi

case "$job" in
  setup) "$py" -m protoseg_ext.info ;;
  test) exec "$py" -m pytest -q tests "$@" ;;
  train) exec "$py" -m protoseg_ext.train "$@" ;;
  bench) exec "$py" bench/run.py --quick "$@" ;;
  *) echo "unknown job '$job' (train, test, bench or setup)" >&2; exit 2 ;;
esac
