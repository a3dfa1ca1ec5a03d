"""Local Sphinx extension of the ars2 docs.

* The ``repo`` role links a file of the checkout outside ``docs/`` (a benchmark table, a
  test, a config): ``{repo}`tests/test_readme.py``` in a guide. The build fails if the file
  does not exist; the page links a copy of it, served with the site.
* A constant is documented by a ``#:`` comment above its assignment, in the module that
  defines it; ``autodata`` of its re-export (``ars2_jax.NS_COEFFS``) shows that comment,
  not the docstring of the value's type.
* Type annotations name the modules where objects are defined (``optax._src.base``,
  ``jax._src.typing``); the inventories list them under their public names. A
  ``missing-reference`` handler retries such a reference under the public name.
"""

from __future__ import annotations

import importlib
import pathlib
import pkgutil
import re

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.ext import intersphinx
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging

logger = logging.getLogger(__name__)

# Where an annotation's module path differs from the name the project documents.
PUBLIC_NAMES = {
    "optax._src.base.": "optax.",
    "optax._src.transform.": "optax.",
    "optax.contrib._muon.": "optax.contrib.",
    "jax._src.typing.": "jax.typing.",
    "jax._src.basearray.": "jax.",
    "jax.jaxlib._jax.": "jax.",
    "jaxlib._jax.": "jax.",
    "jax._src.core.": "jax.",
    "jax._src.mesh.": "jax.sharding.",
    "flax.linen.module.": "flax.linen.",
    "numpy.typing.": "numpy.typing.",
    "flax.training.train_state.": "flax.training.train_state.",
    "flax.nnx.module.": "flax.nnx.",
    "flax.nnx.training.optimizer.": "flax.nnx.",
    "torch.nn.parameter.": "torch.nn.",
    "torch.nn.modules.module.": "torch.nn.",
    "torch.optim.optimizer.": "torch.optim.",
}
# Short names that annotations use without a module.
ALIASES = {
    "Array": "jax.Array",
    "ArrayLike": "jax.typing.ArrayLike",
    "Tensor": "torch.Tensor",
}


def doc_comment(module_name: str, name: str) -> list[str] | None:
    """The ``#:`` comment of constant ``name`` of ``module_name``, or ``None``.

    Looked up in the module itself, then in the modules of its package that hold the
    same object (where a re-exported constant is defined).
    """
    module = importlib.import_module(module_name)
    value = getattr(module, name)
    candidates = [module_name]
    if hasattr(module, "__path__"):
        submodules = pkgutil.iter_modules(module.__path__)
        candidates += [f"{module_name}.{info.name}" for info in submodules]
    for candidate in candidates:
        if getattr(importlib.import_module(candidate), name, None) is not value:
            continue
        docs = ModuleAnalyzer.for_module(candidate).find_attr_docs()
        if ("", name) in docs:
            return [line for line in docs[("", name)]]
    return None


def constant_docstring(app, what, name, obj, options, lines):
    """Documents a constant by its ``#:`` comment."""
    if what != "data":
        return
    module_name, _, attribute = name.rpartition(".")
    comment = doc_comment(module_name, attribute)
    if comment is None:
        raise ValueError(f"constant {name} has no #: doc comment above its assignment")
    lines[:] = comment


def repo_role(name, rawtext, text, lineno, inliner, options=None, content=None):
    """``{repo}`path```: a file of the checkout, linked as a download of the site."""
    env = inliner.document.settings.env
    root = pathlib.Path(env.srcdir).parent
    path = text.strip()
    if not (root / path).is_file():
        message = inliner.reporter.error(f"repo: no file {path!r} in the checkout", line=lineno)
        return [inliner.problematic(rawtext, rawtext, message)], [message]
    node = addnodes.download_reference(
        rawtext,
        "",
        nodes.literal(path, path),
        reftarget="/../" + path,
        refdoc=env.docname,
        refexplicit=True,
    )
    return [node], []


def public_reference(app: Sphinx, env, node, contnode):
    """Retry a reference to a private module path under the object's public name."""
    target = node.get("reftarget", "")
    candidates = [ALIASES[target]] if target in ALIASES else []
    for private, public in PUBLIC_NAMES.items():
        if target.startswith(private):
            candidates.append(public + target[len(private) :])
    for candidate in candidates:
        node["reftarget"] = candidate
        resolved = intersphinx.missing_reference(app, env, node, contnode)
        if resolved is None and node.get("refdomain") == "py":
            domain = env.get_domain("py")
            resolved = domain.resolve_xref(
                env, node["refdoc"], app.builder, node["reftype"], candidate, node, contnode
            )
        if resolved is not None:
            return resolved
    node["reftarget"] = target
    return None


# Sphinx 9 prints an alias of autodoc_type_aliases inside a union (``Alias | None``)
# as ``TypeAliasForwardRef('Alias')``.
_FORWARD_REF = re.compile(r"TypeAliasForwardRef\('([\w.]+)'\)")


def plain_aliases(app, what, name, obj, options, signature, return_annotation):
    """Shows ``TypeAliasForwardRef('optax.ScalarOrSchedule')`` as the alias's name."""
    if signature:
        signature = _FORWARD_REF.sub(r"\1", signature)
    if return_annotation:
        return_annotation = _FORWARD_REF.sub(r"\1", return_annotation)
    return signature, return_annotation


def setup(app: Sphinx) -> dict:
    app.setup_extension("sphinx.ext.autodoc")
    app.setup_extension("sphinx.ext.intersphinx")
    app.add_role("repo", repo_role)
    app.connect("autodoc-process-signature", plain_aliases)
    app.connect("autodoc-process-docstring", constant_docstring)
    app.connect("missing-reference", public_reference, priority=400)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
