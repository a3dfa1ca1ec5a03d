"""ARS2-Neo with ``ns_sharding`` on 4 and 8 devices against one device; prints what the test
compares.

Started by ``tests/test_sharded_ns.py`` in a subprocess whose ``XLA_FLAGS`` fake
``DEVICES`` CPU devices (set before JAX is imported)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.sharded_ns_check

The problem holds every kind of ARS2 leaf: a Dense kernel, a per-head 3-D kernel,
a 4-D conv kernel, a leaf no device count divides (18×6), and AdamW biases; six
matrices, fewer than 8 devices and not a multiple of 4. For meshes of 4 and of 8
devices, each layout runs ``problem.STEPS`` steps of every SAM mode (one compiled
step holds all four), float32 with float32 Newton-Schulz, from the same params on
the same batches as one device:

* ``fsdp``: ``jax.jit`` + ``NamedSharding``, each leaf split over ``'fsdp'`` along
  its first divisible dimension (the rest replicated);
* ``replicated``: ``jax.jit``, params and state replicated, the batch split;
* ``2d``: ``jax.jit`` on a ``data × fsdp`` mesh, one dimension split over both axes;
* ``shard_map_dp``: data parallel under ``shard_map`` (``axis_name`` pmeans the
  gradients; ``ns_sharding`` with ``axis_names``), on the 8-device mesh;
* ``shard_map_fsdp``: FSDP under ``shard_map``: the optimizer sees local blocks (8 devices).

It also compiles the FSDP update for 3 and for 5 Newton-Schulz steps and reads its
HLO (:mod:`benchmarks.hlo_cost`), and compares the state trees with the option on
and off.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import ars2_jax
from benchmarks import hlo_cost
from tests import data_parallel_problem as problem

DEVICES = 8
MESH_SIZES = (4, 8)
MODES = tuple(problem.MODES)
SHAPES = {
    "hidden": (8, 32),
    "hidden_bias": (32,),
    "heads": (4, 4, 8),
    "conv": (2, 2, 4, 8),
    "mid": (8, 18),
    "odd": (18, 6),
    "out": (6, 2),
    "out_bias": (2,),
}
BATCH = 32
# Smaller steps than the data-parallel fixture's: through five tanh layers a larger
# step amplifies the last-bit differences of any sharded reduction order (XLA's own
# FSDP lowering, without ns_sharding, drifted 2e-5 from one device at lr=0.02).
LEARNING_RATES = dict(learning_rate=0.005, adamw_learning_rate=0.005)


def initial_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in SHAPES.items():
        fan_in = math.prod(shape[:-1]) if name != "heads" else shape[-1]
        scale = 0.1 if name.endswith("bias") else 1 / np.sqrt(fan_in)
        params[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return params


def batches(steps: int = problem.STEPS, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((8, 2))
    out = []
    for _ in range(steps):
        x = rng.standard_normal((BATCH, 8))
        y = np.sin(x @ teacher) + 0.1 * rng.standard_normal((BATCH, 2))
        out.append({"x": x.astype(np.float32), "y": y.astype(np.float32)})
    return out


def loss_fn(params, batch):
    x, y = batch["x"], batch["y"]
    n = x.shape[0]
    h = jnp.tanh(x @ params["hidden"] + params["hidden_bias"])
    z = jnp.tanh(jnp.einsum("bhi,hoi->bho", h.reshape(n, 4, 8), params["heads"]))
    c = jnp.tanh(z.reshape(n, 16) @ params["conv"].reshape(16, 8))
    e = jnp.tanh(jnp.tanh(c @ params["mid"]) @ params["odd"])
    return jnp.mean((e @ params["out"] + params["out_bias"] - y) ** 2)


def fsdp_specs(size: int, axis: str = "fsdp") -> dict[str, P]:
    """Each leaf split over ``axis`` along its first dimension ``size`` divides."""
    specs = {}
    for name, shape in SHAPES.items():
        dim = next((d for d, n in enumerate(shape) if n % size == 0), None)
        specs[name] = P() if dim is None else P(*([None] * dim), axis)
    return specs


def two_d_specs() -> dict[str, P]:
    specs = {name: P() for name in SHAPES}
    specs.update(
        hidden=P(None, ("data", "fsdp")),
        heads=P("data", None, "fsdp"),
        conv=P(None, None, "fsdp"),
        mid=P("fsdp"),
        out=P("data"),
        hidden_bias=P("fsdp"),
    )
    return specs


def optimizers(ns_sharding=None, axis_name=None):
    return {
        mode: ars2_jax.ars2_neo(
            **{**problem.ars2_neo_kwargs(mode), **LEARNING_RATES},
            ns_dtype=jnp.float32,
            axis_name=axis_name,
            ns_sharding=ns_sharding,
        )
        for mode in MODES
    }


def all_modes(txs, grad_of):
    """One step of every mode; ``grad_of(params, batch) -> (loss, grads, grad_fn)``."""

    def step(params, states, batch):
        new_params, new_states = {}, {}
        for mode, tx in txs.items():
            _, grads, grad_fn = grad_of(params[mode], batch)
            updates, new_states[mode] = tx.update(
                grads, states[mode], params[mode], grad_fn=grad_fn
            )
            new_params[mode] = optax.apply_updates(params[mode], updates)
        return new_params, new_states

    return step


def global_grads(params, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    return loss, grads, jax.grad(lambda p: loss_fn(p, batch))


def run(step, params, states, batches_):
    history = {mode: [] for mode in MODES}
    syncs = {mode: [] for mode in MODES}
    for batch in batches_:
        params, states = step(params, states, batch)
        for mode in MODES:
            history[mode].append({n: np.asarray(v, np.float64) for n, v in params[mode].items()})
            syncs[mode].append(int(ars2_jax.diagnostics(states[mode])["sync_count"]))
    return history, syncs, states


def start(txs):
    params = {n: jnp.asarray(v) for n, v in initial_params().items()}
    return {m: params for m in MODES}, {m: tx.init(params) for m, tx in txs.items()}


def place(tree_of_modes, mesh, specs, txs=None):
    """Per mode, params (``txs`` None) or states placed by ``specs``."""
    out = {}
    for mode, tree in tree_of_modes.items():
        tree_specs = specs if txs is None else ars2_jax.state_specs(txs[mode], tree_params(), specs)
        out[mode] = jax.tree.map(
            lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, tree_specs
        )
    return out


def tree_params():
    return {n: jnp.asarray(v) for n, v in initial_params().items()}


def jit_way(mesh, specs, batch_axes):
    txs = optimizers(ars2_jax.NewtonSchulzSharding(specs, mesh=mesh))
    params, states = start(txs)
    params, states = place(params, mesh, specs), place(states, mesh, specs, txs)
    step = jax.jit(all_modes(txs, global_grads))
    data = [jax.device_put(b, NamedSharding(mesh, P(batch_axes))) for b in batches()]
    return run(step, params, states, data)


def gather_leaf(block, spec, axis):
    for dim, entry in enumerate(tuple(spec)):
        if entry is not None:
            block = jax.lax.all_gather(block, axis, axis=dim, tiled=True)
    return block


def shard_map_way(mesh, axis, specs, data_parallel):
    """``data_parallel``: replicated params, ``axis_name`` pmeans; else FSDP blocks."""
    ns = ars2_jax.NewtonSchulzSharding(specs, axis_names=(axis,))
    txs = optimizers(ns, axis_name=axis if data_parallel else None)
    size = mesh.shape[axis]

    def grad_of(local, batch):
        def local_loss(p):
            full = {n: gather_leaf(v, specs[n], axis) for n, v in p.items()}
            return loss_fn(full, batch)

        def grads_of(p):
            grads = jax.grad(local_loss)(p)
            if data_parallel:
                return grads
            # A split leaf's gradient arrives summed over the devices' batches (the
            # transpose of the all-gather); a replicated one is this device's own.
            return {
                n: g / size if specs[n] != P() else jax.lax.pmean(g, axis) for n, g in grads.items()
            }

        return None, grads_of(local), grads_of

    txs_specs = {m: ars2_jax.state_specs(tx, tree_params(), specs) for m, tx in txs.items()}
    step = jax.jit(
        jax.shard_map(
            all_modes(txs, grad_of),
            mesh=mesh,
            in_specs=(
                {m: specs for m in MODES},
                txs_specs,
                P(axis),
            ),
            out_specs=({m: specs for m in MODES}, txs_specs),
            check_vma=False,
        )
    )
    params, states = start(txs)
    params, states = place(params, mesh, specs), place(states, mesh, specs, txs)
    data = [jax.device_put(b, NamedSharding(mesh, P(axis))) for b in batches()]
    return run(step, params, states, data)


def hlo_report(mesh, specs) -> dict:
    """Collectives of the FSDP base update for 3 and 5 Newton-Schulz steps."""
    out = {}
    params = jax.tree.map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree_params(), specs
    )
    for steps in (3, 5) if mesh.size == max(MESH_SIZES) else (5,):
        tx = ars2_jax.ars2_neo(
            ns_steps=steps, ns_sharding=ars2_jax.NewtonSchulzSharding(specs, mesh=mesh)
        )
        state = place({"base": tx.init(tree_params())}, mesh, specs, {"base": tx})["base"]
        compiled = jax.jit(tx.update).lower(params, state, params).compile()
        cost = hlo_cost.compiled_cost(compiled)
        out[steps] = {
            "collectives": cost.collective_count,
            "in_loops": cost.collectives_in_loops,
            "bytes": cost.collective_bytes,
            "by_op": cost.by_op,
        }
    return out


def bfloat16_update_error(mesh, specs) -> float:
    """One base update with the default bfloat16 iteration (its blocks travel as 16-bit
    integers) against one device's: the relative error of SPEC §6b."""
    params = tree_params()
    grads = jax.grad(loss_fn)(params, {n: jnp.asarray(v) for n, v in batches(1)[0].items()})
    single = ars2_jax.ars2_neo(1e-2)
    reference, _ = jax.jit(single.update)(grads, single.init(params), params)
    tx = ars2_jax.ars2_neo(1e-2, ns_sharding=ars2_jax.NewtonSchulzSharding(specs, mesh=mesh))
    put = lambda tree: jax.tree.map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs
    )
    state = place({"base": tx.init(params)}, mesh, specs, {"base": tx})["base"]
    updates, _ = jax.jit(tx.update)(put(grads), state, put(params))
    return problem.relative_error(
        {n: np.asarray(v, np.float64) for n, v in updates.items()},
        {n: np.asarray(v, np.float64) for n, v in reference.items()},
    )


def run_guide() -> list[str]:
    """Runs every ```python block of docs/sharded_newton_schulz.md on all the devices.

    Returns what each block prints.
    """
    import contextlib
    import io
    import pathlib
    import re

    guide = pathlib.Path(__file__).resolve().parents[1] / "docs" / "sharded_newton_schulz.md"
    printed = []
    for index, code in enumerate(re.findall(r"```python\n(.*?)```", guide.read_text(), re.S)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            name = f"docs/sharded_newton_schulz.md block {index}"
            exec(compile(code, name, "exec"), {"__name__": "guide"})
        printed.append(out.getvalue())
    return printed


def stacked_flops_ratio(mesh) -> float:
    """Matmul FLOPs of the busiest device over (one device's / N) for one leaf of
    ``mesh.size`` stacked matrices (layers stacked for ``scan``), split along a matrix axis:
    1.0 when every matrix has its own owner."""
    shapes = {"stack": jax.ShapeDtypeStruct((mesh.size, 16, 32), jnp.float32)}
    specs = {"stack": P(None, None, "fsdp")}

    def flops(tx, sharding):
        state = jax.eval_shape(tx.init, shapes)
        args = (shapes, state, shapes)
        if sharding is not None:
            args = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding(x)), args
            )
        return hlo_cost.compiled_cost(jax.jit(tx.update).lower(*args).compile()).flops

    ns = ars2_jax.NewtonSchulzSharding(specs, mesh=mesh)
    split = lambda x: NamedSharding(mesh, specs["stack"] if x.ndim == 3 else P())
    return flops(ars2_jax.ars2_neo(ns_sharding=ns), split) / (
        flops(ars2_jax.ars2_neo(), None) / mesh.size
    )


def nondivisible_error(mesh) -> float:
    """One update whose specs split dimensions the mesh does not divide (18 and 6 over 4 or
    8 devices), against one device's: those leaves travel as if replicated."""
    params = tree_params()
    specs = {**fsdp_specs(mesh.size), "odd": P("fsdp"), "out": P(None, "fsdp")}
    single = ars2_jax.ars2_neo(1e-2, ns_dtype=jnp.float32)
    reference, _ = single.update(params, single.init(params), params)
    ns = ars2_jax.NewtonSchulzSharding(specs, mesh=mesh)
    tx = ars2_jax.ars2_neo(1e-2, ns_dtype=jnp.float32, ns_sharding=ns)
    updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
    return problem.relative_error(
        {n: np.asarray(v, np.float64) for n, v in updates.items()},
        {n: np.asarray(v, np.float64) for n, v in reference.items()},
    )


def state_trees_match() -> bool:
    mesh = jax.make_mesh((4,), ("fsdp",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])
    on = optimizers(ars2_jax.NewtonSchulzSharding(fsdp_specs(4), mesh=mesh))
    off = optimizers()
    params = tree_params()
    same = True
    for mode in MODES:
        a, b = on[mode].init(params), off[mode].init(params)
        same &= jax.tree.structure(a) == jax.tree.structure(b)
        same &= all(
            (x.shape, x.dtype) == (y.shape, y.dtype)
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
        )
    return bool(same)


def main() -> None:
    if jax.device_count() != DEVICES:
        raise SystemExit(f"expected {DEVICES} devices, found {jax.device_count()}: set XLA_FLAGS")
    reference_txs = optimizers()
    params, states = start(reference_txs)
    data = [{n: jnp.asarray(v) for n, v in b.items()} for b in batches()]
    reference, reference_syncs, _ = run(
        jax.jit(all_modes(reference_txs, global_grads)), params, states, data
    )
    report = {"state_trees_match": state_trees_match(), "guide": run_guide(), "meshes": {}}
    for size in MESH_SIZES:
        devices = jax.devices()[:size]
        auto = lambda shape, names, devices=devices: jax.make_mesh(
            shape, names, axis_types=(AxisType.Auto,) * len(shape), devices=devices
        )
        fsdp = auto((size,), ("fsdp",))
        data_mesh = auto((size,), ("data",))
        two_d = auto((2, size // 2), ("data", "fsdp"))
        ways = {
            "fsdp": jit_way(fsdp, fsdp_specs(size), "fsdp"),
            "replicated": jit_way(data_mesh, {n: P() for n in SHAPES}, "data"),
            "2d": jit_way(two_d, two_d_specs(), ("data", "fsdp")),
        }
        if size == max(MESH_SIZES):  # the same code as under jit, reached another way
            ways["shard_map_dp"] = shard_map_way(data_mesh, "data", {n: P() for n in SHAPES}, True)
            ways["shard_map_fsdp"] = shard_map_way(fsdp, "fsdp", fsdp_specs(size), False)
        result = {}
        for way, (history, syncs, _) in ways.items():
            result[way] = {
                mode: {
                    "error": max(
                        problem.relative_error(h, r) for h, r in zip(history[mode], reference[mode])
                    ),
                    "syncs_match": syncs[mode] == reference_syncs[mode],
                }
                for mode in MODES
            }
        result["hlo"] = hlo_report(fsdp, fsdp_specs(size))
        result["bfloat16_error"] = bfloat16_update_error(two_d, two_d_specs())
        result["nondivisible_error"] = nondivisible_error(fsdp)
        result["stacked_flops_ratio"] = stacked_flops_ratio(fsdp)
        report["meshes"][size] = result
    report["reference_sync_counts"] = {mode: reference_syncs[mode][-1] for mode in MODES}
    report["moved"] = {
        mode: problem.relative_error(reference[mode][-1], initial_params()) for mode in MODES
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
