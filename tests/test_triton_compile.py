"""Every Triton kernel compiles to a cubin for sm_90 (H100) and sm_80 (A100), with no GPU, and runs well there.

``tests/compile_kernels.py`` runs in a subprocess without TRITON_INTERPRET (the
interpreter does not compile); it calls the real launchers on meta tensors,
records their launches and compiles each distinct specialisation with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, then
reads ``ptxas -v`` of the PTX. Checked per specialisation: it compiles, fits
the architecture's shared memory, and uses no local memory (no register
spill, no stack); the half-precision forward at the Cityscapes size is
software-pipelined (cp.async into a ring of 2+ shared-memory stages). The two
architectures compile in parallel; Triton's cache (and the script's cache of
ptxas results) makes reruns fast. The same records, rendered, must equal the
committed ``docs/kernels.md`` (the measured figures live there, not in the
kernels' comments).
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "compile_kernels.py")
DOC = os.path.join(os.path.dirname(HERE), "docs", "kernels.md")
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
    assert lines, err[-4000:]
    kernels = set(lines[0]["all_kernels"])
    records = lines[1:]
    failed = [f"{r['kernel']} [{r['variant']}]: {r['error'][:600]}" for r in records if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert {r["kernel"] for r in records} == kernels, "a kernel was never launched by the compile table"
    too_big = [f"{r['kernel']} [{r['variant']}]: {r['shared']} B" for r in records if r["shared"] > SHARED_LIMIT[arch]]
    assert not too_big, "shared memory over the sm_%d limit:\n" % arch + "\n".join(too_big)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_register_spills(compiled, arch):
    rc, lines, err = compiled[arch]
    records = [r for r in lines[1:] if r["ok"]]
    assert records and all("registers" in r for r in records)
    assert all(0 < r["registers"] <= 255 for r in records)
    spilled = [f"{r['kernel']} [{r['variant']}]: {r['registers']} registers, {r['stack']} B stack, "
               f"{r['spill_stores']}/{r['spill_loads']} B spill stores/loads" for r in records
               if r["stack"] or r["spill_stores"] or r["spill_loads"]]
    assert not spilled, f"local memory on sm_{arch}:\n" + "\n".join(spilled)
    assert rc == 0, err[-4000:]  # the script's own verdict agrees


@pytest.mark.parametrize("arch", ARCHS)
def test_half_forward_is_software_pipelined(compiled, arch):
    rc, lines, err = compiled[arch]
    fwd = [r for r in lines[1:] if r["ok"] and r["kernel"] == "similarity_fwd_kernel"
           and "N65536_D720" in r["variant"] and ("bfloat16" in r["variant"] or "float16" in r["variant"])]
    assert fwd, "the compile table has no half-precision Cityscapes forward"
    for r in fwd:
        assert r["num_stages"] >= 2, r
        assert r["pipelined"] and r["smem_buffers"] >= 2, f"{r['variant']}: not pipelined on sm_{arch} ({r})"


@pytest.mark.parametrize("arch", ARCHS)
def test_half_maps_multiply_16_bit_operands(compiled, arch):
    """No float32 GEMM on a 16-bit map: with fp16/bf16 feats and prototypes the S products (the forward,
    the embedded backward's dS kernel) multiply 16-bit operands on the tensor cores (fp32 accumulation),
    and the dS @ protos products fp32 dS as TF32 (dS keeps fp32's range; the interpreter alone upcasts)."""
    rc, lines, err = compiled[arch]
    half = [r for r in lines[1:] if r["ok"] and ("bfloat16" in r["variant"] or "float16" in r["variant"])
            and "_protos" not in r["variant"]]
    # (the dS kernel given the forward's kept S, "ebwd_cache", multiplies nothing)
    cached = [r for r in half if r["kernel"] == "embed_ds_kernel" and "_cache" in r["variant"]]
    assert cached and all(r["dot_operands"] == [] for r in cached), [(r["variant"], r["dot_operands"]) for r in cached]
    s_kernels = [r for r in half if r["kernel"] in ("similarity_fwd_kernel", "embed_ds_kernel") and r not in cached]
    assert {r["kernel"] for r in s_kernels} == {"similarity_fwd_kernel", "embed_ds_kernel"}
    for r in s_kernels:
        want = ["bf16"] if "bfloat16" in r["variant"] else ["f16"]
        assert r["dot_operands"] == want, (r["kernel"], r["variant"], r["dot_operands"])
    dx = [r for r in half if r["kernel"] == "embed_dx_kernel"]
    assert dx and all(r["dot_operands"] == ["f32"] for r in dx), [(r["variant"], r["dot_operands"]) for r in dx]


def _compile_kernels_module():
    """tests/compile_kernels.py as a module (its render_doc and doc_mismatch; importing compiles nothing)."""
    spec = importlib.util.spec_from_file_location("compile_kernels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernels_doc_is_current(compiled):
    """docs/kernels.md is what ``compile_kernels.py --write-doc`` makes of these compiles, byte for byte.

    The two archs' records of the default set (the ones the tests above check) are
    rendered as the script renders them; a tile, launcher or kernel change that moves a
    register count, a constexpr or the shared memory makes this fail until the file is
    regenerated with the command the message names."""
    assert tuple(compiled) == (90, 80)
    records = []
    for arch in compiled:
        rc, lines, err = compiled[arch]
        assert lines, err[-4000:]
        records += lines[1:]
    ck = _compile_kernels_module()
    assert tuple(ck.DOC_ARCHS) == tuple(compiled)
    msg = ck.doc_mismatch(records, DOC)
    assert not msg, msg
