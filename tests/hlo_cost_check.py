"""Checks :mod:`benchmarks.hlo_cost` on a hand-computed loop and runs
``benchmarks.sharding`` on tiny shapes; prints JSON for ``tests/test_sharding_benchmark.py``.

Run with 4 faked CPU devices (``XLA_FLAGS`` set before JAX is imported)::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.hlo_cost_check OUT_DIR

The hand-computed case: under ``shard_map`` on 4 devices, a ``fori_loop`` of
``TRIPS`` iterations ``psum``-s a float32 ``(16,)`` vector (an all-reduce: 2 × 64
bytes per trip) and multiplies it by a ``(16, 16)`` matrix (2 · 16 · 16 FLOPs per
trip); after the loop one ``all_gather`` of the ``(16,)`` result (4 × 64 bytes).
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from benchmarks import hlo_cost, sharding

TRIPS = 7


def hand_computed() -> dict:
    mesh = jax.make_mesh((4,), ("x",), axis_types=(AxisType.Auto,))

    def per_device(v, m):
        body = lambda _, v: jax.lax.psum(v, "x") @ m
        return jax.lax.all_gather(jax.lax.fori_loop(0, TRIPS, body, v), "x")

    fn = jax.jit(
        jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P()), out_specs=P(), check_vma=False)
    )
    compiled = fn.lower(jnp.ones(16), jnp.eye(16)).compile()
    cost = hlo_cost.compiled_cost(compiled)
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return {
        "bytes": cost.collective_bytes,
        "collectives": cost.collective_count,
        "in_loops": cost.collectives_in_loops,
        "flops": cost.flops,
        "by_op": cost.by_op,
        "cost_analysis_flops": float(analysis.get("flops", -1)),
    }


def main() -> None:
    out_dir = sys.argv[1]
    report = {"hand": hand_computed()}
    sharding.main(
        [
            "--scale", "tiny", "--devices", "4", "--models", "gpt_like",
            "--optimizers", "ars2_neo", "ars2_neo_sharded", "--out", out_dir,
        ]
    )  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    main()
