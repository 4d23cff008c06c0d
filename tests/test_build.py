"""Import behaviour of the compiled library: a missing or mismatched build only warns."""

import subprocess
import sys
import textwrap


def _run(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_missing_library_warns_and_reference_still_works():
    r = _run(
        """
        import sys, warnings
        sys.modules["protoseg_ext._C"] = None  # as if the library were not built
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import protoseg_ext, protoseg_ext.functional as PF
        assert any("did not load" in str(x.message) for x in w), [str(x.message) for x in w]
        names = protoseg_ext.available_backends()
        assert "cpu" not in names and "cuda" not in names and "reference" in names, names
        import torch
        f = torch.nn.functional.normalize(torch.randn(10, 4), dim=1)
        p = torch.nn.functional.normalize(torch.randn(3, 2, 4), dim=-1)
        assert PF.proto_seg_logits(f, p).shape == (10, 3)  # auto falls back to the reference
        try:
            PF.proto_seg_logits(f, p, backend="cpu")
        except RuntimeError as e:
            assert "did not load" in str(e) and "pip install --no-build-isolation" in str(e), e
        else:
            raise AssertionError("backend='cpu' should raise")
        print("OK")
        """
    )
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr


def test_mismatched_torch_version_warns():
    r = _run(
        """
        import sys, types, warnings
        fake = types.ModuleType("protoseg_ext._C")
        fake.BUILD_TORCH_VERSION, fake.BUILD_CUDA_VERSION, fake.BUILD_CUDA_ARCH_LIST, fake.WITH_CUDA = "1.0.0", "", "", 0
        sys.modules["protoseg_ext._C"] = fake
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import protoseg_ext
        msgs = [str(x.message) for x in w]
        assert any("built for torch 1.0.0" in m for m in msgs), msgs
        assert "cpu" not in protoseg_ext.available_backends()
        print("OK")
        """
    )
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr


def test_info_reports_build_and_backends():
    r = subprocess.run([sys.executable, "-m", "protoseg_ext.info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "torch (built against)" in out and "compiled backends" in out
    for name in ("cpu", "cuda", "triton", "reference"):
        assert f"\n  {name}" in out
    assert "cpu        available on cpu" in out
