"""Data-parallel ARS2-Neo on 4 devices equals one device on the global batch (SPEC §5.1).

The devices are CPU devices that XLA fakes, so the checks run in a subprocess
(``tests/multidevice_jax_check.py``) whose ``XLA_FLAGS`` are set before JAX is
imported. For every SAM mode, 20 steps on batches sharded over the devices
(global arrays under ``jax.jit``; per-device gradients pmeaned by
``ars2_neo(axis_name=...)`` under ``jax.shard_map`` and under ``jax.pmap``)
must sync on the same steps as one device on the whole batches and end within
SPEC §6b's 1e-5 (float32, float32 Newton-Schulz).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from tests import data_parallel_problem as problem

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICES = 4
WAYS = ("sharded", "shard_map", "pmap")
# LLVM's optimizations triple XLA's CPU compile time here and do not change what
# is compared: both sides of every comparison are compiled alike.
XLA_FLAGS = f"--xla_force_host_platform_device_count={DEVICES} --xla_backend_optimization_level=0"
TIMEOUT_S = 300


def run_check() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {XLA_FLAGS}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_ENABLE_X64", None)
    completed = subprocess.run(
        [sys.executable, "-m", "tests.multidevice_jax_check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout)


def test_data_parallel_equals_one_device_in_every_mode():
    report = run_check()
    assert report["devices"] == DEVICES

    # The sharded way really spreads the batch and keeps one copy of the rest per device.
    where = report["placement"]
    assert where["params_replicated"] and where["state_replicated"]
    assert where["batch_specs"] == ["P('data',)"] * 2
    assert not any(where["batch_fully_replicated"])
    assert where["batch_shard_devices"] == [DEVICES, DEVICES]
    local = problem.GLOBAL_BATCH // DEVICES
    assert where["batch_shard_shapes"] == [[[local, 8]], [[local, 2]]]
    assert report["pmap_replicas_equal"]
    assert "num_devices=5" in report["refusals"]["make_mesh"]
    assert "divisible by the 4 devices" in report["refusals"]["shard_batch"]

    for mode, result in report["modes"].items():
        assert result["moved"] > 0.1, f"{mode}: the reference hardly trained"
        expected = result["single"]["sync_count"]
        for way in WAYS:
            assert result[way]["sync_count"] == expected, f"{mode}/{way}: other sync steps"
            error = result[way]["error"]
            assert error <= problem.TOLERANCE, f"{mode}/{way}: relative error {error:.2e}"

    adaptive = report["modes"]["adaptive"]
    problem.check_adaptive_decisions(
        problem.sync_pattern(adaptive["single"]["sync_count"]),
        adaptive["phi"],
        adaptive["threshold"],
    )
