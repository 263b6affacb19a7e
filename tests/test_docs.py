"""The Python examples in the README and docs run as written, and the README's configuration
table lists every variable meshlib reads.

Blocks fenced ```python are run; ```py marks a sketch that needs a real service around it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
EXAMPLES = [
    pytest.param(code, id=f"{doc.name}-{index}")
    for doc in DOCS
    for index, code in enumerate(BLOCK.findall(doc.read_text()))
]


@pytest.mark.parametrize("code", EXAMPLES)
def test_example_runs(code: str) -> None:
    """Each ```python block runs from the repository root and prints what its `# -> ` lines say."""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for expected in re.findall(r"^\s*# -> (.*)$", code, re.M):  # "# -> output" lines
        assert expected in result.stdout


def test_the_readme_table_lists_every_meshlib_variable() -> None:
    """Each `MESHLIB_*` name meshlib's source reads has a row in the README's table."""
    source = "".join(path.read_text() for path in (ROOT / "meshlib").rglob("*.py"))
    read = set(re.findall(r'"(MESHLIB_[A-Z_]+)"', source))
    rows = set(re.findall(r"^\| `(MESHLIB_[A-Z_]+)`", (ROOT / "README.md").read_text(), re.M))
    assert read and read - rows == set()
