"""What one optimizer update moves and computes per device, compiled for many devices.

    python -m benchmarks.sharding                       # GPT-like and GPT-2-small, 4 and 8 devices
    python -m benchmarks.sharding --devices 8 --models gpt_like
    python -m benchmarks.sharding --scale tiny --devices 4 --out /tmp/sharding
    python -m benchmarks.sharding --time --models gpt2   # run and time on the devices present

The update (``tx.update`` on gradients, state and params laid out as the layout says;
no forward or backward pass) is compiled, not run, on ``--devices`` CPU devices that XLA
fakes (``--xla_force_host_platform_device_count``, set here before JAX is imported), and
read from the optimized HLO **per execution** (:mod:`benchmarks.hlo_cost`: a while body
counts times its known trip count). Per device: the collective bytes received (an
all-gather's or all-to-all's result, twice an all-reduce's, a reduce-scatter's input),
also in *shares* (one device's ``1/N`` of the Newton-Schulz matrices' bytes); the number
of collectives executed; the matmul FLOPs against the same update compiled for one
device (``1.00`` = the total divided by ``N``; the busiest device's, where devices run
different branches); ``memory_analysis()``'s argument, output and temporary bytes.

Models: ``gpt_like``, the kernels of 2 GPT blocks of d_model 768 (qkv 768×2304, out
768×768, MLP 768×3072 and 3072×768: 14.2M parameters); ``gpt2``, GPT-2-small's 124M
(:mod:`benchmarks.workloads`, its embedding on AdamW). Layouts: ``fsdp`` (every tensor
split over one axis along its first divisible dimension), ``replicated`` (data
parallel), ``2d`` (a ``data × fsdp`` mesh of 2 × N/2, tensors split over ``fsdp``).
Optimizers: ``optax.adamw``, ``optax.contrib.muon`` (matrices only, the rest on Adam),
``ars2_neo`` (base mode, default bfloat16 Newton-Schulz) as XLA lowers it, and
``ars2_neo`` with ``ns_sharding``.

``--time`` instead runs the update on the devices present (a GPU node, say; no forced
devices) and reports the median wall time of ``--repeats`` calls after a warm-up call,
each blocked until its results are ready.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import sys

if __package__ in (None, ""):  # `python benchmarks/sharding.py`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

MODELS = ("gpt_like", "gpt2")
LAYOUTS = ("fsdp", "replicated", "2d")
OPTIMIZERS = ("adamw", "muon", "ars2_neo", "ars2_neo_sharded")
MIB = 2**20


def model_shapes(model: str, scale: str) -> dict[str, tuple[int, ...]]:
    from benchmarks import workloads

    d_model = 768 if scale == "full" else 64
    if model == "gpt_like":
        shapes = workloads.gpt2_shapes(workloads.GPT2Shape(2, d_model, 10))
        return {n: s for n, s in shapes.items() if workloads.is_gpt2_matrix(n)}
    return workloads.gpt2_shapes(workloads.GPT2_SHAPES[scale])


def is_matrix(name: str) -> bool:
    from benchmarks import workloads

    return workloads.is_gpt2_matrix(name)


def make_mesh(layout: str, n: int):
    import jax
    from jax.sharding import AxisType

    devices = jax.devices()[:n]
    if layout == "2d":
        if n % 2:
            raise ValueError(f"--devices {n}: the 2-D layout needs an even device count")
        shape, names = (2, n // 2), ("data", "fsdp")
    else:
        shape, names = (n,), ("data" if layout == "replicated" else "fsdp",)
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def param_specs(shapes, layout: str, mesh):
    from jax.sharding import PartitionSpec as P

    if layout == "replicated":
        return {n: P() for n in shapes}
    size = mesh.shape["fsdp"]
    specs = {}
    for name, shape in shapes.items():
        dim = next((d for d, k in enumerate(shape) if k % size == 0), None)
        specs[name] = P() if dim is None else P(*([None] * dim), "fsdp")
    return specs


def optimizer(name: str, shapes, specs=None, mesh=None):
    import optax
    from optax.contrib import MuonDimensionNumbers

    import ars2_jax

    if name == "adamw":
        return optax.adamw(1e-3)
    if name == "muon":
        dims = {n: MuonDimensionNumbers(0, 1) if is_matrix(n) else None for n in shapes}
        return optax.contrib.muon(1e-3, muon_weight_dimension_numbers=dims)
    ns = None
    if name == "ars2_neo_sharded":
        ns = ars2_jax.NewtonSchulzSharding(specs, mesh=mesh)
    return ars2_jax.ars2_neo(1e-3, ns_sharding=ns)


def compile_update(tx, shapes, specs, mesh):
    """The compiled ``tx.update(grads, state, params)``; ``mesh`` None: one device."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    import ars2_jax

    abstract = {n: jax.ShapeDtypeStruct(s, jnp.float32) for n, s in shapes.items()}
    if mesh is None:
        state = jax.eval_shape(tx.init, abstract)
        return jax.jit(tx.update).lower(abstract, state, abstract).compile()
    place = lambda tree, tree_specs: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
        tree,
        tree_specs,
    )
    params = place(abstract, specs)
    state_specs = ars2_jax.state_specs(tx, abstract, specs)
    state = place(jax.eval_shape(tx.init, abstract), state_specs)
    out_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), (specs, state_specs))
    return jax.jit(tx.update, out_shardings=out_shardings).lower(params, state, params).compile()


def measure(compiled) -> dict:
    from benchmarks import hlo_cost

    cost = hlo_cost.compiled_cost(compiled)
    memory = compiled.memory_analysis()
    return {
        "collective_bytes": cost.collective_bytes,
        "collectives": cost.collective_count,
        "collectives_in_loops": cost.collectives_in_loops,
        "unknown_trip_counts": cost.unknown_trip_counts,
        "flops": cost.flops,
        "by_op": cost.by_op,
        "argument_bytes": getattr(memory, "argument_size_in_bytes", None),
        "output_bytes": getattr(memory, "output_size_in_bytes", None),
        "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
    }


def run(models, device_counts, layouts, optimizers, scale) -> dict:
    import jax

    results = []
    for model in models:
        shapes = model_shapes(model, scale)
        matrix_bytes = 4 * sum(math.prod(s) for n, s in shapes.items() if is_matrix(n))
        single = {
            name: measure(compile_update(optimizer(name, shapes), shapes, None, None))
            for name in optimizers
            if name != "ars2_neo_sharded"
        }
        if "ars2_neo_sharded" in optimizers:
            single["ars2_neo_sharded"] = single.get("ars2_neo") or measure(
                compile_update(optimizer("ars2_neo", shapes), shapes, None, None)
            )
        for n in device_counts:
            for layout in layouts:
                mesh = make_mesh(layout, n)
                specs = param_specs(shapes, layout, mesh)
                for name in optimizers:
                    tx = optimizer(name, shapes, specs, mesh)
                    row = measure(compile_update(tx, shapes, specs, mesh))
                    total = single[name]["flops"]
                    row.update(
                        model=model,
                        devices=n,
                        layout=layout,
                        optimizer=name,
                        share_bytes=matrix_bytes / n,
                        shares=row["collective_bytes"] / (matrix_bytes / n),
                        matrix_bytes=matrix_bytes,
                        flops_single=total,
                        flops_ratio=row["flops"] / (total / n) if total else None,
                    )
                    results.append(row)
                    print(_line(row), flush=True)
    return {
        "command": "python -m benchmarks.sharding " + " ".join(sys.argv[1:]),
        "machine": _machine(),
        "jax": jax.__version__,
        "scale": scale,
        "date": datetime.date.today().isoformat(),
        "rows": results,
    }


def time_present(models, layouts, optimizers, scale, repeats) -> dict:
    """Median wall time of the update on every device present, per layout and optimizer."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding

    import ars2_jax

    n = jax.device_count()
    rows = []
    for model in models:
        shapes = model_shapes(model, scale)
        for layout in layouts:
            if layout == "2d" and n % 2:
                continue
            mesh = make_mesh(layout, n)
            specs = param_specs(shapes, layout, mesh)
            shardings = {k: NamedSharding(mesh, v) for k, v in specs.items()}
            key = jax.random.key(0)
            params = {
                name: jax.device_put(
                    jax.random.normal(jax.random.fold_in(key, i), shape) * 0.02, shardings[name]
                )
                for i, (name, shape) in enumerate(shapes.items())
            }
            grads = jax.tree.map(lambda x: x * 0.1 + 1e-3, params)
            for name in optimizers:
                tx = optimizer(name, shapes, specs, mesh)
                state_shardings = jax.tree.map(
                    lambda s, mesh=mesh: NamedSharding(mesh, s),
                    ars2_jax.state_specs(tx, params, specs),
                )
                state = jax.jit(tx.init, out_shardings=state_shardings)(params)
                update = jax.jit(tx.update, out_shardings=(shardings, state_shardings))
                jax.block_until_ready(update(grads, state, params))
                samples = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    jax.block_until_ready(update(grads, state, params))
                    samples.append(time.perf_counter() - start)
                row = dict(
                    model=model,
                    devices=n,
                    layout=layout,
                    optimizer=name,
                    median_ms=1e3 * float(np.median(samples)),
                    samples_ms=[1e3 * t for t in samples],
                    dtype=str(jnp.float32.dtype),
                )
                rows.append(row)
                print(
                    f"{model:8s} {n}  {layout:10s} {name:16s} {row['median_ms']:9.2f} ms",
                    flush=True,
                )
    return {
        "command": "python -m benchmarks.sharding " + " ".join(sys.argv[1:]),
        "machine": _machine(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "scale": scale,
        "date": datetime.date.today().isoformat(),
        "rows": rows,
    }


def time_markdown(report: dict) -> str:
    lines = [
        "# Optimizer update on the devices present: median wall time",
        "",
        f"`{report['command']}` on {report['machine']}, backend {report['backend']} "
        f"({len(report['devices'])} devices), JAX {report['jax']}, {report['date']}.",
        "",
        "| model | devices | layout | update | median ms |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['model']} | {row['devices']} | {row['layout']} | `{row['optimizer']}` | "
            f"{row['median_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _machine() -> str:
    from benchmarks import machine

    return machine.describe()


def _line(row) -> str:
    ratio = "–" if row["flops_ratio"] is None else f"{row['flops_ratio']:.2f}"
    return (
        f"{row['model']:8s} {row['devices']}  {row['layout']:10s} {row['optimizer']:16s} "
        f"{row['collective_bytes'] / MIB:8.2f} MiB = {row['shares']:6.2f} shares, "
        f"{row['collectives']:4d} collectives ({row['collectives_in_loops']} in loops), "
        f"FLOPs {ratio}, temp {(row['temp_bytes'] or 0) / MIB:.1f} MiB"
    )


def markdown(report: dict) -> str:
    lines = [
        "# Optimizer update on many devices: collectives and FLOPs per device",
        "",
        f"`{report['command']}` on {report['machine']}, JAX {report['jax']}, "
        f"{report['date']}; compiled, not run, on forced CPU devices; counted per execution "
        "from the optimized HLO (a while body times its trip count). A share is one "
        "device's 1/N of the Newton-Schulz matrices' float32 bytes. FLOPs: matmul FLOPs of "
        "the busiest device over (one device's total / N).",
        "",
        "| model | devices | layout | update | collective bytes per device | shares | "
        "collectives (in loops) | FLOPs / (total/N) | argument / output / temp MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        ratio = (
            "–"
            if row["flops_ratio"] is None or not row["flops_single"]
            else (f"{row['flops_ratio']:.2f}")
        )
        memory = " / ".join(
            f"{(row[k] or 0) / MIB:.1f}" for k in ("argument_bytes", "output_bytes", "temp_bytes")
        )
        lines.append(
            f"| {row['model']} | {row['devices']} | {row['layout']} | `{row['optimizer']}` | "
            f"{row['collective_bytes'] / MIB:.2f} MiB | {row['shares']:.2f} | "
            f"{row['collectives']} ({row['collectives_in_loops']}) | {ratio} | {memory} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--devices", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results"
    )
    parser.add_argument("--time", action="store_true", help="run and time on the devices present")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per row (--time)")
    args = parser.parse_args(argv)
    if args.time:
        report = time_present(args.models, args.layouts, args.optimizers, args.scale, args.repeats)
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"sharding-time-{report['backend']}-{args.scale}-{report['date']}"
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
        (args.out / f"{stem}.md").write_text(time_markdown(report))
        print(f"wrote {args.out / stem}.json and .md")
        return
    if "jax" not in sys.modules:
        flag = f"--xla_force_host_platform_device_count={max(args.devices)}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if jax.device_count() < max(args.devices):
        raise SystemExit(
            f"--devices {max(args.devices)} but JAX has {jax.device_count()} devices: it was "
            "imported before this module could set XLA_FLAGS"
        )
    report = run(args.models, args.devices, args.layouts, args.optimizers, args.scale)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"sharding-{args.scale}-{report['date']}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
