"""The documentation: an API reference entry and an example for every public name, and a
strict, offline Sphinx build (docs/building.md)."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import pkgutil
import re
import subprocess
import sys
import types
import zlib

import pytest

import ars2_jax
import ars2_torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "_ext"))
from ars2_docs import doc_comment  # noqa: E402  (the docs' own lookup of #: comments)

# Every public module; its __all__ is what the reference must document.
DOCUMENTED_MODULES = (
    "ars2_jax",
    "ars2_jax.checkpoint",
    "ars2_jax.convert",
    "ars2_jax.training",
    "ars2_torch",
    "ars2_torch.checkpoint",
)
DIRECTIVE = re.compile(r"^\.\. (currentmodule|auto\w+):: ([\w.]+)", re.M)


def documented_names(pages: list[str]) -> set[str]:
    """The full names that ``auto*`` directives document in reStructuredText ``pages``."""
    names = set()
    for text in pages:
        module = ""
        for directive, name in DIRECTIVE.findall(text):
            if directive in ("currentmodule", "automodule"):
                module = name
            else:
                full = name.startswith(("ars2_jax.", "ars2_torch."))
                names.add(name if full else f"{module}.{name}")
    return names


def missing_from_reference(modules: list[types.ModuleType], documented: set[str]) -> list[str]:
    """The ``module.name`` of each ``__all__`` entry that no directive documents."""
    return [
        f"{module.__name__}.{name}"
        for module in modules
        for name in module.__all__
        if f"{module.__name__}.{name}" not in documented
    ]


def without_example(modules: list[types.ModuleType]) -> list[str]:
    """Public functions and classes whose docstring has no ``Example:`` with a doctest, and
    constants without a ``#:`` doc comment."""
    bad = []
    for module in modules:
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                doc = inspect.getdoc(obj) or ""
                if not re.search(r"^Example:\n(.*\n)*?\s+>>> ", doc + "\n", re.M):
                    bad.append(f"{module.__name__}.{name}")
            elif doc_comment(module.__name__, name) is None:
                bad.append(f"{module.__name__}.{name} (constant without a #: comment)")
    return bad


def reference_pages() -> list[str]:
    return [page.read_text() for page in sorted((ROOT / "docs" / "api").glob("*.rst"))]


def modules() -> list[types.ModuleType]:
    return [importlib.import_module(name) for name in DOCUMENTED_MODULES]


def test_every_public_module_is_listed():
    public = {
        f"{package.__name__}.{info.name}"
        for package in (ars2_jax, ars2_torch)
        for info in pkgutil.iter_modules(package.__path__)
        if not info.name.startswith("_")
    } | {"ars2_jax", "ars2_torch"}
    # ars2_torch.newton_schulz and .optimizer are the package's own __all__, re-exported.
    public -= {"ars2_torch.newton_schulz", "ars2_torch.optimizer"}
    assert public == set(DOCUMENTED_MODULES)
    assert all(hasattr(module, "__all__") for module in modules())


def test_every_public_name_is_in_the_reference():
    assert missing_from_reference(modules(), documented_names(reference_pages())) == []


def test_every_public_name_has_an_example():
    assert without_example(modules()) == []


def test_the_checks_catch_a_missing_entry_and_a_missing_example():
    module = types.ModuleType("ars2_jax_fake")

    def documented():
        """Summary.

        Example:
          >>> 1
          1
        """

    def undocumented():
        """Summary, no example."""

    module.documented, module.undocumented = documented, undocumented
    module.__all__ = ["documented", "undocumented"]
    page = ".. currentmodule:: ars2_jax_fake\n\n.. autofunction:: documented\n"
    assert missing_from_reference([module], documented_names([page])) == [
        "ars2_jax_fake.undocumented"
    ]
    assert without_example([module]) == ["ars2_jax_fake.undocumented"]


def test_version_is_the_one_of_pyproject():
    pyproject = (ROOT / "pyproject.toml").read_text()
    (version,) = re.findall(r'^version = "([^"]+)"', pyproject, flags=re.M)
    assert ars2_jax.__version__ == ars2_torch.__version__ == version
    assert f"## {version}" in (ROOT / "CHANGELOG.md").read_text()


def test_sphinx_build_has_no_warning(tmp_path):
    # What `make docs` runs, into a fresh directory: offline (committed inventories),
    # nitpicky, every warning an error.
    command = [sys.executable, "-m", "sphinx", "-b", "html", "-E", "-W", "--keep-going", "-n"]
    result = subprocess.run(
        [*command, "-q", "docs", str(tmp_path / "html")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reference = (tmp_path / "html" / "api" / "math.html").read_text()
    assert 'id="ars2_jax.newton_schulz"' in reference


@pytest.mark.parametrize("page", ["results", "experiments/index", "scaling", "api_guide"])
def test_guides_are_pages_of_the_site(page):
    index = (ROOT / "docs" / "index.md").read_text()
    assert (ROOT / "docs" / f"{page}.md").is_file() and f"\n{page}\n" in index


def test_repo_role_refuses_a_file_that_does_not_exist(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (tmp_path / "present.txt").write_text("here\n")
    (docs / "conf.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'docs' / '_ext')!r})\n"
        "extensions = ['myst_parser', 'ars2_docs']\n"
    )
    (docs / "index.md").write_text("# Page\n\n{repo}`present.txt` and {repo}`absent.txt`\n")
    command = [sys.executable, "-m", "sphinx", "-b", "html", "-E", "-W", "-q"]
    result = subprocess.run(
        [*command, str(docs), str(tmp_path / "html")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "no file 'absent.txt'" in result.stderr and "present.txt" not in result.stderr


def test_committed_inventories_are_what_generate_writes():
    sys.path.insert(0, str(ROOT / "docs" / "inventories"))
    import generate

    for key, (_, title, objects) in generate.INVENTORIES.items():
        committed = (ROOT / "docs" / "inventories" / f"{key}.inv").read_bytes()
        _, body = committed.split(b"zlib.\n", 1)
        entries = {name: (role, page, name) for name, (role, page) in objects.items()}
        for alias, target in generate.ALIASES.get(key, {}).items():
            entries[alias] = (*objects[target], target)
        expected = generate.inventory(title, "any", entries).split(b"zlib.\n", 1)[1]
        assert zlib.decompress(body) == zlib.decompress(expected), key
