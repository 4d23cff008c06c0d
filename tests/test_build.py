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


def test_an_unbuilt_checkout_runs_its_tests_against_the_installed_package(tmp_path):
    """After a plain ``pip install .`` the checkout's own protoseg_ext/ (no _C, kernels/ beside it)
    comes first on sys.path when Python runs from its root. The layout decides: the import hands
    over to the installed copy, and ``python -m pytest tests`` from the root collects and runs."""
    import glob
    import os
    import shutil

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    site, src = tmp_path / "site", tmp_path / "src"
    # the installed package, as a wheel lays it out: the Python modules, _C, kernels/ inside
    shutil.copytree(os.path.join(root, "protoseg_ext"), site / "protoseg_ext",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(root, "kernels"), site / "protoseg_ext" / "kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    if not glob.glob(str(site / "protoseg_ext" / "_C.*")):
        import pytest

        pytest.skip("this checkout has no in-place build of _C to copy")
    # the checkout, never built in place
    shutil.copytree(os.path.join(root, "protoseg_ext"), src / "protoseg_ext",
                    ignore=shutil.ignore_patterns("__pycache__", "_C.*"))
    for d in ("kernels", "tests"):
        shutil.copytree(os.path.join(root, d), src / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(root, "pyproject.toml"), src)
    env = dict(os.environ, PYTHONPATH=str(site))
    probe = subprocess.run(
        [sys.executable, "-c", "import protoseg_ext.ops as o, protoseg_ext.kernels as k; "
                               "print(o.__file__); print(k.__file__); print(o.load_extension() is not None)"],
        cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    ops_file, kernels_file, loaded = probe.stdout.split()
    assert ops_file.startswith(str(site)) and kernels_file.startswith(str(site)) and loaded == "True", probe.stdout
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_build.py",
                        "-k", "mismatched_torch_version"], cwd=src, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_isa_variant_list_is_one_file_read_by_setup_and_cmake(tmp_path):
    """setup.py and CMakeLists.txt take the per-ISA sources and flags from
    csrc/cpu/isa_variants.txt, not from lists of their own."""
    import re
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listing = (root / "csrc/cpu/isa_variants.txt").read_text()
    sources = re.findall(r"^source (\S+)$", listing, re.M)
    flags = dict((m[0], m[1].split()) for m in re.findall(r"^flags (\S+) (.+)$", listing, re.M))
    assert sources and set(flags) == {"avx2", "avx512"}, listing
    for s in sources:
        assert (root / s).is_file(), s
    for build_file in ("setup.py", "CMakeLists.txt"):
        text = (root / build_file).read_text()
        assert "isa_variants.txt" in text, build_file
        assert "-mavx512dq" not in text and "sinkhorn_cpu.cpp" not in text, f"{build_file} keeps a list of its own"

    # setup.py's reader, run without running setup()
    setup_src = (root / "setup.py").read_text()
    start = setup_src.index("def _read_isa_variants")
    end = setup_src.index("CPU_ISA_SOURCES, CPU_ISA_FLAGS = _read_isa_variants()")
    ns = {"__file__": str(root / "setup.py")}
    exec("import os\n" + setup_src[start:end], ns)
    assert ns["_read_isa_variants"]() == (sources, flags)

    # CMakeLists.txt's reader, run as a script
    cmake = shutil.which("cmake")
    if cmake is None:
        return
    cml = (root / "CMakeLists.txt").read_text()
    block = cml[cml.index('set(PROTOSEG_CPU_ISA_SOURCES "")'):]
    block = block[:block.index("endforeach()") + len("endforeach()")]
    script = tmp_path / "isa.cmake"
    script.write_text(
        f"set(CMAKE_CURRENT_SOURCE_DIR {root.as_posix()})\n{block}\n"
        'message("S=${PROTOSEG_CPU_ISA_SOURCES}")\n'
        'foreach(isa IN LISTS PROTOSEG_CPU_ISAS)\n  message("F=${isa}:${PROTOSEG_CPU_ISA_FLAGS_${isa}}")\nendforeach()\n'
    )
    out = subprocess.run([cmake, "-P", str(script)], capture_output=True, text=True, check=True).stderr
    got_sources = re.search(r"^S=(.*)$", out, re.M).group(1).split(";")
    assert got_sources == [(root / s).as_posix() for s in sources]
    got_flags = dict((isa, fl.split(";")) for isa, fl in re.findall(r"^F=(\w+):(.*)$", out, re.M))
    assert got_flags == flags
