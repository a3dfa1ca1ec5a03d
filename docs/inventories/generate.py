"""Writes the intersphinx inventories of NumPy, JAX, optax, Flax and PyTorch in this folder.

The docs build runs offline, so intersphinx reads committed inventories. Python's,
``python.inv``, is the real one: ``objects.inv`` of Debian's ``python3.11-doc``
package (docs/building.md). The real ``objects.inv`` of the other five sites are not
reachable from the build machines (no network but package registries, and no package
there ships them), so this script writes small ones: the objects the docs reference,
each checked to exist in the installed package, at the page and anchor where the
project's own site documents it. The version in each inventory's header is the
installed package's.

Run after adding a reference to another project's object (docs/building.md):

    python docs/inventories/generate.py
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pathlib
import zlib

HERE = pathlib.Path(__file__).resolve().parent

# project -> (distribution, title, {name: (role, page)}); the anchor is the name, as
# autodoc writes it. Roles: "py:class", "py:function", "py:data", "py:method".
INVENTORIES = {
    "numpy": (
        "numpy",
        "NumPy",
        {
            "numpy.ndarray": ("py:class", "reference/generated/numpy.ndarray.html"),
            "numpy.dtype": ("py:class", "reference/generated/numpy.dtype.html"),
        },
    ),
    "jax": (
        "jax",
        "JAX",
        {
            "jax.Array": ("py:class", "_autosummary/jax.Array.html"),
            "jax.typing.ArrayLike": ("py:data", "jax.typing.html"),
            "jax.grad": ("py:function", "_autosummary/jax.grad.html"),
            "jax.jit": ("py:function", "_autosummary/jax.jit.html"),
            "jax.vmap": ("py:function", "_autosummary/jax.vmap.html"),
            "jax.shard_map": ("py:function", "_autosummary/jax.shard_map.html"),
            "jax.pmap": ("py:function", "_autosummary/jax.pmap.html"),
            "jax.eval_shape": ("py:function", "_autosummary/jax.eval_shape.html"),
            "jax.lax.cond": ("py:function", "_autosummary/jax.lax.cond.html"),
            "jax.lax.scan": ("py:function", "_autosummary/jax.lax.scan.html"),
            "jax.sharding.Mesh": ("py:class", "jax.sharding.html"),
            "jax.lax.pmean": ("py:function", "_autosummary/jax.lax.pmean.html"),
            "jax.random.key": ("py:function", "_autosummary/jax.random.key.html"),
        },
    ),
    "optax": (
        "optax",
        "Optax",
        {
            "optax.GradientTransformation": ("py:class", "api/transformations.html"),
            "optax.GradientTransformationExtraArgs": ("py:class", "api/transformations.html"),
            "optax.OptState": ("py:class", "api/transformations.html"),
            "optax.Params": ("py:class", "api/transformations.html"),
            "optax.Updates": ("py:class", "api/transformations.html"),
            "optax.scale_by_adam": ("py:function", "api/transformations.html"),
            "optax.add_decayed_weights": ("py:function", "api/transformations.html"),
            "optax.scale_by_learning_rate": ("py:function", "api/transformations.html"),
            "optax.clip_by_global_norm": ("py:function", "api/transformations.html"),
            "optax.chain": ("py:function", "api/combining_optimizers.html"),
            "optax.partition": ("py:function", "api/combining_optimizers.html"),
            "optax.adam": ("py:function", "api/optimizers.html"),
            "optax.adamw": ("py:function", "api/optimizers.html"),
            "optax.schedules.inject_hyperparams": (
                "py:function",
                "api/optimizer_schedules.html",
            ),
            "optax.contrib.muon": ("py:function", "api/contrib.html"),
            "optax.contrib.MuonDimensionNumbers": ("py:class", "api/contrib.html"),
        },
    ),
    "flax": (
        "flax",
        "Flax",
        {
            "flax.nnx.Module": ("py:class", "api_reference/flax.nnx/module.html"),
            "flax.linen.Module": ("py:class", "api_reference/flax.linen/module.html"),
            "flax.nnx.Optimizer": ("py:class", "api_reference/flax.nnx/training/optimizer.html"),
            "flax.nnx.Param": ("py:class", "api_reference/flax.nnx/variables.html"),
            "flax.training.train_state.TrainState": (
                "py:class",
                "api_reference/flax.training.html",
            ),
        },
    ),
    "torch": (
        "torch",
        "PyTorch",
        {
            "torch.Tensor": ("py:class", "tensors.html"),
            "torch.dtype": ("py:class", "tensor_attributes.html"),
            "torch.nn.Module": ("py:class", "generated/torch.nn.Module.html"),
            "torch.optim.Optimizer": ("py:class", "optim.html"),
            "torch.optim.AdamW": ("py:class", "generated/torch.optim.AdamW.html"),
            "torch.optim.Muon": ("py:class", "generated/torch.optim.Muon.html"),
            "torch.save": ("py:function", "generated/torch.save.html"),
            "torch.load": ("py:function", "generated/torch.load.html"),
            "torch.nn.parallel.DistributedDataParallel": (
                "py:class",
                "generated/torch.nn.parallel.DistributedDataParallel.html",
            ),
        },
    ),
}
# A name the docs use for an object the site documents under another name.
ALIASES = {
    "optax": {"optax.inject_hyperparams": "optax.schedules.inject_hyperparams"},
}


def resolve(name: str):
    """The installed object called ``name`` (so that no entry names a missing object)."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(name)


def inventory(project: str, version: str, entries: dict[str, tuple[str, str]]) -> bytes:
    """An intersphinx inventory (format version 2) of ``entries``."""
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        f"# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    lines = [
        f"{name} {role} 1 {page}#{anchor} -\n"
        for name, (role, page, anchor) in sorted(entries.items())
    ]
    return header.encode() + zlib.compress("".join(lines).encode(), 9)


def main() -> None:
    for key, (distribution, title, objects) in INVENTORIES.items():
        entries = {}
        for name, (role, page) in objects.items():
            resolve(name)
            entries[name] = (role, page, name)
        for alias, target in ALIASES.get(key, {}).items():
            resolve(alias)
            role, page = objects[target]
            entries[alias] = (role, page, target)
        version = importlib.metadata.version(distribution)
        path = HERE / f"{key}.inv"
        path.write_bytes(inventory(title, version, entries))
        print(f"{path.name}: {len(entries)} objects ({title} {version})")


if __name__ == "__main__":
    main()
