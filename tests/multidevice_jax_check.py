"""Runs ARS2-Neo data-parallel on several devices and on one; prints what the test compares.

Started by ``tests/test_multidevice_jax.py`` in a subprocess whose ``XLA_FLAGS``
fake ``DEVICES`` CPU devices (the flag must be set before JAX is imported)::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.multidevice_jax_check

It takes ``problem.STEPS`` steps of the data-parallel fixture in every SAM mode,
from the same params on the same global batches, float32 with float32
Newton-Schulz, four ways:

* ``single``: one device, the whole global batch (the reference);
* ``sharded``: global arrays (:func:`experiments.parallel.jit_sharded`), the
  batch sharded over a mesh of ``DEVICES`` devices, params and state replicated,
  ``ars2_neo`` without ``axis_name``;
* ``shard_map``: per device under :func:`experiments.parallel.jit_shard_map`,
  ``ars2_neo(axis_name=...)`` pmeaning the per-device gradients;
* ``pmap``: the same per-device step under ``jax.pmap``.

Each way compiles one step holding all four modes: XLA compiles it in about half
the time of four separate steps, and compilation is most of this check's cost.

It prints one JSON object: per mode the reference's sync counts, φ and
thresholds, and per way the sync count after every step and the largest SPEC §6b
relative error to the reference over the steps; where the sharded arrays live;
whether the ``pmap`` replicas agree bit for bit.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ars2_jax
from experiments import parallel
from tests import data_parallel_problem as problem

DEVICES = 4
MODES = tuple(problem.MODES)


def loss_fn(params, batch):
    return problem.loss(params, batch, jnp)


def all_modes_step(axis_name: str | None = None):
    """One step of every mode: ``({mode: params}, {mode: state}, batch) -> (.., .., {mode: loss})``,
    and the initial params and states."""
    optimizers = {
        mode: ars2_jax.ars2_neo(
            **problem.ars2_neo_kwargs(mode), ns_dtype=jnp.float32, axis_name=axis_name
        )
        for mode in MODES
    }
    steps = {mode: parallel.train_step(loss_fn, tx, axis_name) for mode, tx in optimizers.items()}

    def step(params, states, batch):
        out = {mode: steps[mode](params[mode], states[mode], batch) for mode in MODES}
        return tuple({mode: out[mode][i] for mode in MODES} for i in range(3))

    params = {n: jnp.asarray(p) for n, p in problem.initial_params().items()}
    states = {mode: tx.init(params) for mode, tx in optimizers.items()}
    return step, {mode: params for mode in MODES}, states


def run(step, params, states, batches, replica=lambda x: x):
    """Per mode: the params (float64 NumPy) and the diagnostics after every step."""
    params_history = {mode: [] for mode in MODES}
    diagnostics = {mode: [] for mode in MODES}
    for batch in batches:
        params, states, _ = step(params, states, batch)
        for mode in MODES:
            here = jax.tree.map(replica, (params[mode], states[mode]))
            params_history[mode].append({n: np.asarray(v, np.float64) for n, v in here[0].items()})
            diagnostics[mode].append(
                {n: np.asarray(v).item() for n, v in ars2_jax.diagnostics(here[1]).items()}
            )
    return params_history, diagnostics, (params, states)


def placement(params, states, batch, mesh) -> dict:
    """Where the sharded way's arrays live."""
    everywhere = set(mesh.devices.flat)

    def replicated(tree):
        return all(
            leaf.sharding.is_fully_replicated and leaf.sharding.device_set == everywhere
            for leaf in jax.tree.leaves(tree)
        )

    leaves = jax.tree.leaves(batch)
    return {
        "params_replicated": replicated(params),
        "state_replicated": replicated(states),
        "batch_specs": [str(leaf.sharding.spec) for leaf in leaves],
        "batch_fully_replicated": [leaf.sharding.is_fully_replicated for leaf in leaves],
        "batch_shard_devices": [
            len({shard.device for shard in leaf.addressable_shards}) for leaf in leaves
        ],
        "batch_shard_shapes": [
            sorted({tuple(shard.data.shape) for shard in leaf.addressable_shards})
            for leaf in leaves
        ],
    }


def single_device(data):
    step, params, states = all_modes_step()
    batches = [{n: jnp.asarray(v) for n, v in batch.items()} for batch in data]
    history, diagnostics, _ = run(jax.jit(step), params, states, batches)
    return history, diagnostics


def sharded(data, mesh):
    step, params, states = all_modes_step()
    params, states = parallel.replicate((params, states), mesh)
    batches = [parallel.shard_batch(batch, mesh) for batch in data]
    history, diagnostics, (params, states) = run(
        parallel.jit_sharded(step, mesh), params, states, batches
    )
    return history, diagnostics, placement(params, states, batches[0], mesh)


def shard_mapped(data, mesh):
    step, params, states = all_modes_step(parallel.DATA_AXIS)
    params, states = parallel.replicate((params, states), mesh)
    batches = [parallel.shard_batch(batch, mesh) for batch in data]
    history, diagnostics, _ = run(parallel.jit_shard_map(step, mesh), params, states, batches)
    return history, diagnostics


def pmapped(data, mesh):
    step, params, states = all_modes_step(parallel.DATA_AXIS)
    # Placed as pmap places its outputs: otherwise the second call compiles again.
    stacked = NamedSharding(mesh, P(parallel.DATA_AXIS))
    params, states = jax.device_put(
        jax.tree.map(lambda x: np.stack([np.asarray(x)] * DEVICES), (params, states)), stacked
    )
    batches = [
        jax.device_put(
            {n: v.reshape(DEVICES, v.shape[0] // DEVICES, *v.shape[1:]) for n, v in batch.items()},
            stacked,
        )
        for batch in data
    ]
    history, diagnostics, final = run(
        jax.pmap(step, axis_name=parallel.DATA_AXIS),
        params,
        states,
        batches,
        replica=lambda x: np.asarray(x)[0],
    )
    replicas_equal = all(
        np.array_equal(leaf[0], leaf[d])
        for leaf in map(np.asarray, jax.tree.leaves(final))
        for d in range(1, DEVICES)
    )
    return history, diagnostics, replicas_equal


def refusals(mesh) -> dict[str, str]:
    """The ``ValueError`` messages of the helpers' argument checks ('' if none was raised)."""
    messages = {}
    for name, call in {
        "make_mesh": lambda: parallel.make_mesh(DEVICES + 1),
        "shard_batch": lambda: parallel.shard_batch({"x": np.zeros((DEVICES + 2, 3))}, mesh),
    }.items():
        try:
            call()
            messages[name] = ""
        except ValueError as error:
            messages[name] = str(error)
    return messages


def main() -> None:
    if jax.device_count() != DEVICES:
        raise SystemExit(f"expected {DEVICES} devices, found {jax.device_count()}: set XLA_FLAGS")
    mesh = parallel.make_mesh(DEVICES)
    data = problem.batches()
    reference, reference_diagnostics = single_device(data)
    sharded_history, sharded_diagnostics, where = sharded(data, mesh)
    pmap_history, pmap_diagnostics, replicas_equal = pmapped(data, mesh)
    ways = {
        "single": (reference, reference_diagnostics),
        "sharded": (sharded_history, sharded_diagnostics),
        "shard_map": shard_mapped(data, mesh),
        "pmap": (pmap_history, pmap_diagnostics),
    }
    report = {
        "devices": jax.device_count(),
        "placement": where,
        "pmap_replicas_equal": bool(replicas_equal),
        "refusals": refusals(mesh),
        "modes": {},
    }
    for mode in MODES:
        result = {
            "moved": problem.relative_error(reference[mode][-1], problem.initial_params()),
            "phi": [d["phi"] for d in reference_diagnostics[mode]],
            "threshold": [d["threshold"] for d in reference_diagnostics[mode]],
        }
        for way, (history, diagnostics) in ways.items():
            errors = [problem.relative_error(h, r) for h, r in zip(history[mode], reference[mode])]
            result[way] = {
                "sync_count": [d["sync_count"] for d in diagnostics[mode]],
                "error": max(errors),
            }
        report["modes"][mode] = result
    print(json.dumps(report))


if __name__ == "__main__":
    main()
