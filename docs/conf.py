"""Sphinx configuration of the ars2 documentation (docs/building.md explains the build)."""

from __future__ import annotations

import importlib.metadata
import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
# The checkout's packages come first, so the reference documents the code beside it.
sys.path[:0] = [str(ROOT), str(DOCS / "_ext")]

project = "ars2"
author = "the ars2 authors"
copyright = "the ars2 authors, Apache-2.0"
release = importlib.metadata.version("ars2")
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "myst_parser",
    "ars2_docs",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "inventories", "README.md"]
nitpicky = True
# Fail on a broken link inside the site, too.
myst_heading_anchors = 4
myst_enable_extensions = ["dollarmath"]
suppress_warnings: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {"show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Show optax's and jax's type aliases by name, not expanded into their unions.
autodoc_type_aliases = {
    name: name
    for name in (
        "optax.Params",
        "optax.Updates",
        "optax.OptState",
        "optax.ScalarOrSchedule",
        "jax.typing.ArrayLike",
    )
}
# Private type aliases of ars2_jax, shown by name in signatures; the Args sections
# say what they hold.
nitpick_ignore = [
    ("py:class", "SecondMomentsFn"),
    ("py:class", "WeightDimensionNumbers"),
    ("py:class", "NameMap"),
    # optax uses it in its signatures but does not document it.
    ("py:class", "optax.ScalarOrSchedule"),
]

# Offline: every inventory is committed under docs/inventories/ (docs/building.md).
INVENTORIES = DOCS / "inventories"
intersphinx_mapping = {
    "python": ("https://docs.python.org/3/", str(INVENTORIES / "python.inv")),
    "numpy": ("https://numpy.org/doc/stable/", str(INVENTORIES / "numpy.inv")),
    "jax": ("https://docs.jax.dev/en/latest/", str(INVENTORIES / "jax.inv")),
    "optax": ("https://optax.readthedocs.io/en/latest/", str(INVENTORIES / "optax.inv")),
    "flax": ("https://flax.readthedocs.io/en/latest/", str(INVENTORIES / "flax.inv")),
    "torch": ("https://docs.pytorch.org/docs/stable/", str(INVENTORIES / "torch.inv")),
}
intersphinx_disabled_reftypes: list[str] = []
intersphinx_timeout = 1

html_theme = "furo"
html_title = f"ars2 {release}"
html_static_path: list[str] = []
