"""The README's Python examples run as written, and print what the README says they print."""

import contextlib
import io
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks():
    """``(code, expected stdout or None)`` of each Python block: a block followed by "prints" and a
    ```text block shows its output."""
    text = open(README).read()
    found = re.findall(r"```python\n(.*?)```(\n\nprints\n\n```text\n(.*?)```)?", text, re.S)
    return [(code, out if printed else None) for code, printed, out in found if "HRNet_W48_Proto" not in code]


def test_the_readme_shows_output():
    """At least the Usage block shows what it prints (so the check below checks something)."""
    assert any(out for _, out in _blocks())


@pytest.mark.parametrize("i", range(len(_blocks())))
def test_readme_python_block_runs(i):
    code, expected = _blocks()[i]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"README.md block {i}", "exec"), {})
    if expected is not None:
        assert printed.getvalue() == expected, printed.getvalue()
