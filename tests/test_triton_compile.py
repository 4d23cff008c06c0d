"""Every Triton kernel compiles to a cubin for sm_90 (H100) and sm_80 (A100), with no GPU.

``tests/compile_kernels.py`` runs in a subprocess without TRITON_INTERPRET (the
interpreter does not compile); it calls the real launchers on meta tensors,
records their launches and compiles each distinct specialisation with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``. The
two architectures compile in parallel; Triton's cache makes reruns fast.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "compile_kernels.py")
ARCHS = (90, 80)
# most dynamic shared memory one block may use (CUDA programming guide, compute capabilities table)
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


@pytest.fixture(scope="module")
def compiled():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    procs = {
        arch: subprocess.Popen([sys.executable, SCRIPT, str(arch)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, cwd=os.path.dirname(HERE))
        for arch in ARCHS
    }
    results = {}
    for arch, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        results[arch] = (proc.returncode, lines, err)
    return results


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles(compiled, arch):
    rc, lines, err = compiled[arch]
    assert rc == 0, err[-4000:]
    kernels = set(lines[0]["all_kernels"])
    records = lines[1:]
    failed = [f"{r['kernel']} [{r['variant']}]: {r['error'][:600]}" for r in records if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert {r["kernel"] for r in records} == kernels, "a kernel was never launched by the compile table"
    too_big = [f"{r['kernel']} [{r['variant']}]: {r['shared']} B" for r in records if r["shared"] > SHARED_LIMIT[arch]]
    assert not too_big, "shared memory over the sm_%d limit:\n" % arch + "\n".join(too_big)
