"""Every ```python block of the README and of the guides in docs/ (subfolders too) runs.

Blocks fenced as ```py are shown, not run (a `torchrun` launch, for instance).
docs/SPEC.md is the contract, whose blocks are signatures rather than programs.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDES = sorted(p for p in (ROOT / "docs").rglob("*.md") if p.name != "SPEC.md")
PAGES = [ROOT / "README.md", *GUIDES]
BLOCKS = [
    (page.relative_to(ROOT).as_posix(), index, code)
    for page in PAGES
    for index, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]


def test_every_guide_has_runnable_examples():
    pages = {page for page, _, _ in BLOCKS}
    assert {"README.md", "docs/api_guide.md", "docs/checkpoints.md", "docs/scaling.md"} <= pages


def test_guides_in_subfolders_are_read():
    nested = sorted((ROOT / "docs").glob("*/*.md"))  # docs/experiments/ among them
    assert nested and all(page in GUIDES for page in nested)


@pytest.mark.parametrize(
    ("page", "index", "code"), BLOCKS, ids=[f"{page}:{index}" for page, index, _ in BLOCKS]
)
def test_python_block_runs(page, index, code):
    exec(compile(code, f"{page} block {index}", "exec"), {"__name__": "readme"})
