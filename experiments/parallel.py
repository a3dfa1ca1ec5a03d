"""Data-parallel training steps for ARS2-Neo, with JAX's own machinery.

Two ways to spread a batch over devices; both equal one device on the global
batch, because every gradient the optimizer sees is the global mean (SPEC §5.1),
so the SAM perturbation, the shear force, φ and the sync decision are the same
on every device:

* **Global arrays** (:func:`jit_sharded`): one ``jax.jit`` step whose params and
  optimizer state are replicated over a mesh axis and whose batch is sharded
  along its leading dimension. The loss is a mean over the global batch, so XLA
  adds the all-reduce and ``grad_fn`` returns global means too; the optimizer is
  a plain ``ars2_neo`` (no ``axis_name``).
* **Collectives** (:func:`jit_shard_map`, or ``jax.pmap``): the step runs per
  device; each device differentiates the loss of its own shard, and
  ``ars2_neo(..., axis_name=DATA_AXIS)`` pmeans the gradients and ``grad_fn``'s
  outputs.

Losses are ``loss_fn(params, batch) -> scalar``, a mean over the examples of
``batch`` (a pytree whose leaves share their leading, batch, dimension).
Nothing here communicates by itself: the all-reduces are XLA's and
``jax.lax.pmean``'s.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import ars2_jax
  >>> from experiments import parallel
  >>> mesh = parallel.make_mesh()  # every local device
  >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
  >>> tx = ars2_jax.ars2_neo(1e-2, rho=0.05, k=1)
  >>> params = parallel.replicate({"w": jnp.ones((3, 2))}, mesh)
  >>> state = parallel.replicate(tx.init(params), mesh)
  >>> batch = {"x": jnp.ones((8 * mesh.size, 3)), "y": jnp.zeros((8 * mesh.size, 2))}
  >>> step = parallel.jit_sharded(parallel.train_step(loss_fn, tx), mesh)
  >>> params, state, loss = step(params, state, parallel.shard_batch(batch, mesh))
  >>> params["w"].sharding.is_fully_replicated
  True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# The mesh axis the batch is split over (and the collective axis name).
DATA_AXIS = "data"

LossFn = Callable[[optax.Params, Any], jax.Array]
TrainStep = Callable[[optax.Params, optax.OptState, Any], tuple[optax.Params, optax.OptState, Any]]


def make_mesh(num_devices: int | None = None, axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (``None``: all of them).

    The axis is ``Auto``: XLA propagates the batch sharding through the model, so
    model code needs no sharding annotations.
    """
    devices = jax.devices()
    num_devices = len(devices) if num_devices is None else num_devices
    if not 1 <= num_devices <= len(devices):
        raise ValueError(f"num_devices={num_devices} must be between 1 and {len(devices)}")
    return jax.make_mesh(
        (num_devices,), (axis_name,), axis_types=(AxisType.Auto,), devices=devices[:num_devices]
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a full copy of every leaf of ``tree`` on every device of ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: Any, mesh: Mesh, axis_name: str = DATA_AXIS) -> Any:
    """Splits every leaf of ``batch`` along its leading dimension over ``axis_name``.

    ``batch`` is the global batch, held by this process (one host). On several
    hosts, build it from each process's part with
    ``jax.make_array_from_process_local_data(NamedSharding(mesh, P(axis_name)), part)``.
    """
    size = mesh.shape[axis_name]
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        if leaf.ndim == 0 or leaf.shape[0] % size:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} of shape {leaf.shape} must have a "
                f"leading dimension divisible by the {size} devices of axis {axis_name!r}"
            )
    return jax.device_put(batch, NamedSharding(mesh, P(axis_name)))


def train_step(
    loss_fn: LossFn, tx: optax.GradientTransformationExtraArgs, axis_name: str | None = None
) -> TrainStep:
    """The un-jitted step ``(params, opt_state, batch) -> (params, opt_state, loss)``.

    ``grad_fn`` differentiates the same loss on the same batch; the optimizer
    calls it only on SAM sync steps.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, a mean over the batch.
      tx: the optimizer.
      axis_name: ``None`` for a step on the whole (global) batch, as
        :func:`jit_sharded` wants; the collective axis for a per-device step
        under :func:`jit_shard_map` or ``jax.pmap``, where the returned loss is
        pmeaned and ``tx`` must be built with the same ``axis_name``.

    Returns:
      The step function.
    """

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        grad_fn = jax.grad(lambda p: loss_fn(p, batch))
        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        if axis_name is not None:
            loss = jax.lax.pmean(loss, axis_name)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def jit_sharded(step: TrainStep, mesh: Mesh, axis_name: str = DATA_AXIS) -> TrainStep:
    """Jits ``step`` for replicated params and state and a batch sharded over ``axis_name``.

    ``step`` sees global arrays (``train_step(loss_fn, tx)``, ``tx`` without
    ``axis_name``): XLA splits the work over the devices and adds the
    all-reduces, so the gradients are global means, as on one device.

    Args:
      step: ``step(params, opt_state, batch) -> (params, opt_state, aux)``.
      mesh: the devices; see :func:`make_mesh`.
      axis_name: the mesh axis the batch's leading dimension is split over.

    Returns:
      The jitted step; every output is replicated. Inputs placed otherwise are
      moved (place them with :func:`replicate` and :func:`shard_batch` to avoid
      the copies).
    """
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        step,
        in_shardings=(replicated, replicated, NamedSharding(mesh, P(axis_name))),
        out_shardings=replicated,
    )


def jit_shard_map(step: TrainStep, mesh: Mesh, axis_name: str = DATA_AXIS) -> TrainStep:
    """Jits ``step`` run per device under ``jax.shard_map``, the batch split over ``axis_name``.

    Each device runs ``step`` on its own shard of the batch with a full copy of
    the params and state: ``train_step(loss_fn, tx, axis_name)`` with ``tx`` built
    with the same ``axis_name`` (``ars2_neo``'s option), which pmeans the
    gradient and every output of ``grad_fn`` into global means. That keeps the
    copies identical; nothing checks it, so a ``tx`` without ``axis_name`` lets
    them drift apart silently.

    ``check_vma`` is off, as ``jax.pmap`` has it: with it on, ``jax.grad`` of a
    loss on a device's shard with respect to replicated params would return the
    sum of the devices' gradients, which the optimizer's ``pmean`` would leave
    as it is (``len(devices)`` times the mean).

    Args:
      step: ``step(params, opt_state, batch) -> (params, opt_state, aux)`` whose
        outputs are the same on every device.
      mesh: the devices; see :func:`make_mesh`.
      axis_name: the mesh axis the batch's leading dimension is split over.

    Returns:
      The jitted step; outputs are replicated.
    """
    return jax.jit(
        jax.shard_map(
            step, mesh=mesh, in_specs=(P(), P(), P(axis_name)), out_specs=P(), check_vma=False
        )
    )
