"""The README's Python examples run as written."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks():
    text = open(README).read()
    return [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "HRNet_W48_Proto" not in b]


@pytest.mark.parametrize("i", range(len(_blocks())))
def test_readme_python_block_runs(i):
    exec(compile(_blocks()[i], f"README.md block {i}", "exec"), {})
