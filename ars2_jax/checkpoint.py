"""Checkpoints of a whole train state with Orbax: save, keep the last few, restore exactly.

Needs ``pip install orbax-checkpoint`` (part of the ``experiments`` extra); the rest of
``ars2_jax`` does not import it.

A *train state* is any pytree: typically a dict (or a ``flax.struct`` dataclass)
holding the params, the optimizer state (ARS2-Neo's shear force and adaptive
scalars included), the step, a PRNG key, the epoch and the position in the data
order. :func:`save` writes it under ``directory/<step>``; :func:`restore` reads it
back into the structure, dtypes and shardings of a template (``like``), typically
the freshly initialized state of the same configuration. Every leaf comes back
bit for bit, so a run resumed from a checkpoint continues exactly as it would
have run on.

What the files hold: Orbax's ``StandardSave`` of the leaves, one entry per leaf
named by its path (``jax.tree_util.keystr``), and a JSON manifest of the paths,
shapes, dtypes and CRC-32 checksums. Typed PRNG keys (``jax.random.key``) are
stored as their ``jax.random.key_data`` with the name of their implementation;
Python scalars (an epoch counter) as NumPy scalars, returned as the template's
Python type.

Atomicity: Orbax writes each checkpoint to a temporary directory and renames it
to ``<step>`` once complete, so a save that fails or is killed halfway leaves
the previous checkpoints as they were; the half-written directory is never
listed, and the next :func:`save` into the directory removes it.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import zlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["all_steps", "restore", "save"]

MANIFEST_FORMAT = "ars2_jax.checkpoint"
MANIFEST_VERSION = 1
# Mismatches listed in full before the error message says "and N more".
_MAX_LISTED = 12


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "ars2_jax.checkpoint needs Orbax: pip install orbax-checkpoint"
        ) from error
    return ocp


@contextlib.contextmanager
def _manager(directory: pathlib.Path, keep: int | None = None, *, writing: bool) -> Iterator:
    ocp = _orbax()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=False,
        create=writing,
        # Removes what a killed save left behind; one writer per directory.
        cleanup_tmp_directories=writing,
    )
    manager = ocp.CheckpointManager(directory, options=options)
    try:
        yield manager
    finally:
        manager.close()


def _absolute(directory: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(directory).expanduser().absolute()


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _flat(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path) or "<root>", leaf) for path, leaf in leaves], treedef


def _describe(path: str, leaf: Any) -> dict[str, Any]:
    """Shape and dtype of a leaf of a train state or of a template (arrays or ShapeDtypeStructs)."""
    if isinstance(leaf, (bool, int, float, np.generic)):
        leaf = np.asarray(leaf)
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        raise ValueError(
            f"train state leaf {path} is a {type(leaf).__name__}; a checkpoint holds arrays, "
            "typed PRNG keys and Python scalars only"
        )
    return {"shape": list(leaf.shape), "dtype": str(leaf.dtype)}


def _checksum(array: Any) -> int | None:
    if not getattr(array, "is_fully_addressable", True):
        return None  # Only the process holding every shard could sum it.
    return zlib.crc32(np.ascontiguousarray(np.asarray(array)).tobytes())


def _stored(leaf: Any) -> Any:
    """The array Orbax writes for a leaf."""
    if _is_key(leaf):
        return jax.random.key_data(leaf)
    if isinstance(leaf, (bool, int, float, np.generic)):
        return np.asarray(leaf)
    return leaf


def save(
    directory: str | os.PathLike, train_state: Any, *, step: int, keep: int | None = None
) -> None:
    """Writes ``train_state`` as checkpoint ``step`` of ``directory``, atomically.

    Args:
      directory: the run's checkpoint directory (created if needed).
      train_state: any pytree of arrays, typed PRNG keys and Python scalars.
      step: the checkpoint's number (for example the epoch); must be larger than
        every checkpoint already in ``directory``.
      keep: keep only the ``keep`` latest checkpoints (older ones are deleted once
        this one is complete); ``None`` keeps all.

    Raises:
      ValueError: ``step`` is not after the latest checkpoint, ``keep < 1``, or a
        leaf is neither an array nor a Python scalar.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> from ars2_jax import checkpoint
      >>> state = {"params": {"w": jnp.ones((2, 3))}, "rng": jax.random.key(0), "epoch": 3}
      >>> directory = tempfile.mkdtemp()
      >>> checkpoint.save(directory, state, step=3, keep=2)
      >>> restored = checkpoint.restore(directory, like=state)
      >>> restored["epoch"], checkpoint.all_steps(directory)
      (3, [3])
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step={step!r} must be a non-negative integer")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep={keep!r} must be None or an integer >= 1")
    ocp = _orbax()
    directory = _absolute(directory)
    leaves, _ = _flat(train_state)
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "leaves": []}
    arrays = {}
    for path, leaf in leaves:
        entry = {"path": path, **_describe(path, leaf)}
        entry["key_impl"] = str(jax.random.key_impl(leaf)) if _is_key(leaf) else None
        arrays[path] = _stored(leaf)
        entry["crc32"] = _checksum(arrays[path])
        manifest["leaves"].append(entry)
    with _manager(directory, keep, writing=True) as manager:
        latest = manager.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"step={step} must be after the latest checkpoint in {directory}, step {latest}"
            )
        manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(arrays), manifest=ocp.args.JsonSave(manifest)
            ),
        )
        manager.wait_until_finished()


def all_steps(directory: str | os.PathLike) -> list[int]:
    """The steps of the complete checkpoints in ``directory``, in increasing order.

    Args:
      directory: a directory written by :func:`save`.

    Returns:
      The steps, increasing.

    Raises:
      FileNotFoundError: ``directory`` does not exist.

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> from ars2_jax import checkpoint
      >>> directory = tempfile.mkdtemp()
      >>> for epoch in (1, 2, 3):
      ...     checkpoint.save(directory, {"w": jnp.ones(2) * epoch}, step=epoch, keep=2)
      >>> checkpoint.all_steps(directory)
      [2, 3]
    """
    directory = _absolute(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    with _manager(directory, writing=False) as manager:
        return sorted(manager.all_steps())


def _template_entry(path: str, leaf: Any) -> dict[str, Any]:
    return {"path": path, **_describe(path, leaf)}


def _mismatch_message(where: str, saved: list[dict], template: list[dict]) -> str | None:
    saved_by_path = {entry["path"]: entry for entry in saved}
    template_by_path = {entry["path"]: entry for entry in template}
    lines = []
    for path in template_by_path.keys() - saved_by_path.keys():
        lines.append(f"  {path}: in the template, not in the checkpoint")
    for path in saved_by_path.keys() - template_by_path.keys():
        lines.append(f"  {path}: in the checkpoint, not in the template")
    for path in saved_by_path.keys() & template_by_path.keys():
        a, b = saved_by_path[path], template_by_path[path]
        if (a["shape"], a["dtype"]) != (b["shape"], b["dtype"]):
            lines.append(
                f"  {path}: {a['dtype']}{tuple(a['shape'])} in the checkpoint, "
                f"{b['dtype']}{tuple(b['shape'])} in the template"
            )
    if not lines:
        return None
    lines.sort()
    hint = ""
    if any("shear_force" in line and "not in the" in line for line in lines):
        hint = (
            "\n(a shear_force in one state only: the SAM mode differs; the delayed and "
            "adaptive modes keep a shear force, base and sync do not)"
        )
    more = f"\n  ... and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else ""
    return (
        f"checkpoint {where} was saved from another configuration than the template `like`:\n"
        + "\n".join(lines[:_MAX_LISTED])
        + more
        + hint
    )


def _uncommitted(leaf: Any) -> bool:
    """Whether the template leaf is an array JAX may move (not placed on a device by the user)."""
    if isinstance(leaf, jax.Array):
        return not leaf.committed
    return getattr(leaf, "sharding", None) is None


def _abstract(leaf: Any) -> Any:
    """What Orbax restores a leaf into: the template's shape, dtype and sharding."""
    if isinstance(leaf, (bool, int, float, np.generic, np.ndarray)):
        array = np.asarray(leaf)
        return jax.ShapeDtypeStruct(array.shape, array.dtype)
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if _is_key(leaf):
        leaf = jax.eval_shape(jax.random.key_data, leaf)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _rebuild(leaf: Any, value: Any, entry: dict[str, Any]) -> Any:
    """The restored value in the template leaf's own kind."""
    if isinstance(leaf, (bool, int, float)):
        return type(leaf)(np.asarray(value).item())
    if isinstance(leaf, np.generic):
        return np.asarray(value)[()]
    if isinstance(leaf, np.ndarray):
        return np.asarray(value)
    if _uncommitted(leaf):
        # Orbax places what it restores; an uncommitted template gets an
        # uncommitted array, so that a step jitted for it is not compiled again.
        value = jnp.asarray(np.asarray(value))
    if _is_key(leaf):
        return jax.random.wrap_key_data(value, impl=entry["key_impl"])
    return value


def restore(directory: str | os.PathLike, like: Any, *, step: int | None = None) -> Any:
    """Reads checkpoint ``step`` (default: the latest) of ``directory`` into the form of ``like``.

    Args:
      directory: a directory written by :func:`save`.
      like: a template of the train state with the same structure, shapes and
        dtypes: the freshly initialized state of the same configuration, or its
        ``jax.eval_shape``. Restored arrays take its shardings; Python scalars
        its types.
      step: the checkpoint to read; ``None``: the latest.

    Returns:
      The train state, bit for bit as it was saved, in the structure of ``like``.

    Raises:
      FileNotFoundError: ``directory`` does not exist, holds no checkpoint, or not
        the requested ``step``.
      ValueError: the checkpoint was saved from another configuration (it names
        every path whose presence, shape or dtype differs: a leaf of another
        shape, or a ``shear_force`` of another SAM mode), or it is truncated or
        corrupt (it names the checkpoint and, for a bad checksum, the leaf).

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> import ars2_jax
      >>> from ars2_jax import checkpoint
      >>> tx = ars2_jax.ars2_neo(1e-2, rho=0.05, k=4)
      >>> fresh = lambda: {"params": {"w": jnp.zeros((3, 2))}, "epoch": 0}
      >>> state = fresh()
      >>> state["params"]["w"] = jnp.arange(6.0).reshape(3, 2)
      >>> state["epoch"] = 7
      >>> state["opt_state"] = tx.init(state["params"])
      >>> directory = tempfile.mkdtemp()
      >>> checkpoint.save(directory, state, step=7)
      >>> like = fresh()
      >>> like["opt_state"] = tx.init(like["params"])
      >>> restored = checkpoint.restore(directory, like)
      >>> restored["epoch"], restored["params"]["w"].tolist()
      (7, [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    """
    ocp = _orbax()
    directory = _absolute(directory)
    steps = all_steps(directory)
    if not steps:
        raise FileNotFoundError(f"checkpoint directory {directory} holds no checkpoint")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"{directory} holds no checkpoint {step=}; it holds {steps}")
    where = str(directory / str(step))
    leaves, treedef = _flat(like)
    with _manager(directory, writing=False) as manager:
        try:
            manifest = manager.restore(
                step, args=ocp.args.Composite(manifest=ocp.args.JsonRestore())
            ).manifest
            saved = manifest["leaves"]
            if manifest.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"unknown manifest format {manifest.get('format')!r}")
        except Exception as error:
            raise ValueError(
                f"checkpoint {where} is truncated or corrupt: its manifest cannot be read "
                f"({type(error).__name__}: {error})"
            ) from error
        message = _mismatch_message(
            where, saved, [_template_entry(path, leaf) for path, leaf in leaves]
        )
        if message:
            raise ValueError(message)
        abstract = {path: _abstract(leaf) for path, leaf in leaves}
        try:
            arrays = manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            ).state
        except Exception as error:
            raise ValueError(
                f"checkpoint {where} is truncated or corrupt: {type(error).__name__}: {error}"
            ) from error
    entries = {entry["path"]: entry for entry in saved}
    restored = []
    for path, leaf in leaves:
        entry = entries[path]
        value = arrays[path]
        checksum = _checksum(value)
        if None not in (checksum, entry["crc32"]) and checksum != entry["crc32"]:
            raise ValueError(
                f"checkpoint {where} is corrupt: the data of {path} do not match its checksum"
            )
        restored.append(_rebuild(leaf, value, entry))
    return jax.tree.unflatten(treedef, restored)
