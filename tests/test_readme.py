"""The Python examples of the README and docs/ run as written, and print what the page says they print."""

import contextlib
import glob
import io
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _blocks(pages=PAGES):
    """``(page, code, expected stdout or None)`` of each Python block: a block followed by "prints" and
    a ```text block shows its output. The official repository's imports (``HRNet_W48_Proto``) do not
    run here."""
    blocks = []
    for page in pages:
        found = re.findall(r"```python\n(.*?)```(\n\nprints\n\n```text\n(.*?)```)?", open(page).read(), re.S)
        blocks += [(os.path.relpath(page, ROOT), code, out if printed else None) for code, printed, out in found
                   if "HRNet_W48_Proto" not in code]
    return blocks


def test_the_readme_shows_output():
    """At least the README's Usage block shows what it prints (so the check below checks something), and
    the runnable examples moved to docs/ are still collected."""
    assert any(out for _, _, out in _blocks([README]))
    assert {page for page, _, _ in _blocks()} >= {"README.md", os.path.join("docs", "usage.md")}


@pytest.mark.parametrize("i", range(len(_blocks())))
def test_readme_python_block_runs(i):
    page, code, expected = _blocks()[i]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"{page} block {i}", "exec"), {})
    if expected is not None:
        assert printed.getvalue() == expected, printed.getvalue()


def test_the_readme_gpu_table_is_the_packages():
    """Each row of the README's modelled GPU table is an entry of protoseg_ext.modelled, figure for figure
    (time, roofline, launches, commit)."""
    from protoseg_ext.modelled import MODELLED_H100

    text = open(README).read()
    table = text[text.index("| backend | size | dtype | modelled step |"):]
    table = table[:table.index("\n\n")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    sizes = {"Cityscapes": (65536, 720, 19, 10), "ADE20K size": (65536, 720, 150, 10),
             "full resolution": (2097152, 720, 19, 10), "full-resolution ADE20K": (4194304, 256, 150, 10)}
    found = set()
    for backend, size, dtype, step, roof, launches, commit, _ in rows:
        shape = next(v for k, v in sizes.items() if size.startswith(k))
        key = (backend.strip("`"), *shape, {"bf16": "bfloat16", "fp32": "float32"}[dtype])
        m = MODELLED_H100[key]
        assert (float(step.replace(",", "").replace(" us", "")), float(roof.replace(",", "").replace(" us", ""))) == (
            m.step_us, m.roofline_us), key
        assert commit == m.commit and int(launches.replace(",", "")) == m.launches, key
        found.add(key)
    assert found == set(MODELLED_H100)
