"""The speed benchmark (``python -m benchmarks.step_time``) on tiny workloads."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ars2_jax
from benchmarks import candidates, step_time, workloads

# Every kind of row: the baselines, a plain ARS2-Neo mode and a conditional one.
OPTIMIZERS = ("adamw", "muon", "ars2_base", "ars2_adaptive")


def _rows(result):
    return {(r["section"], r["framework"], r["optimizer"]): r for r in result["rows"]}


def test_quick_run_writes_every_row_ratio_flop_and_memory_figure(tmp_path):
    step_time.main(
        [
            "--quick",
            "--scale",
            "tiny",
            "--workload",
            "a",
            "--optimizers",
            ",".join(OPTIMIZERS),
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    (path,) = tmp_path.glob("*.json")
    report = json.loads(path.read_text())
    markdown = path.with_suffix(".md").read_text()
    result = report["results"]["a"]
    rows = _rows(result)

    expected = set()
    for name in OPTIMIZERS:
        for section in ("update", "step"):
            expected.add((section, "jax", name))
            if name != "muon":
                expected.add((section, "torch", name))
    for section in ("update", "step"):
        for framework in ("jax", "torch"):
            expected |= {(section, framework, f"ars2_adaptive:{b}") for b in ("sync", "other")}
    expected |= {("update_2d", "torch", "muon"), ("update_2d", "torch", "ars2_2d")}
    assert set(rows) == expected
    for key, row in rows.items():
        assert row["rounds"] == 3, key
        assert math.isfinite(row["median_s"]) and row["median_s"] > 0, key
        assert len(result["samples"].get("/".join(("a", *key)), [0] * 3)) == 3, key

    ratios = [
        (key, name, row[name])
        for key, row in rows.items()
        for name in ("vs_adamw", "vs_muon", "jax_vs_torch")
        if name in row
    ]
    for key, name, value in ratios:
        assert math.isfinite(value) and value > 0, (key, name)
    for section in ("update", "step"):
        for name in ("muon", "ars2_base", "ars2_adaptive"):
            assert "vs_adamw" in rows[(section, "jax", name)]
        assert "vs_muon" in rows[(section, "jax", "ars2_base")]
        assert "jax_vs_torch" in rows[(section, "jax", "ars2_adaptive")]
    assert "vs_muon" in rows[("update_2d", "torch", "ars2_2d")]

    # The adaptive row mixes its two branches at the measured effective_k.
    k = result["effective_k"]["ars2_adaptive"]
    assert k >= 1
    for section in ("update", "step"):
        sync = rows[(section, "jax", "ars2_adaptive:sync")]["median_s"]
        other = rows[(section, "jax", "ars2_adaptive:other")]["median_s"]
        mixed = rows[(section, "jax", "ars2_adaptive")]
        assert mixed["mixed_at_k"] == k
        assert mixed["median_s"] == pytest.approx((sync + (k - 1) * other) / k)

    targets = {t["target"].split(":")[0]: t for t in report["targets"]}
    assert {"(a) full step, JAX"} == set(targets)
    assert len(report["targets"]) == 2
    for target in report["targets"]:
        assert math.isfinite(target["measured"]) and target["measured"] > 0
        assert target["met"] == (target["measured"] <= target["bound"])

    flops = result["flops"]
    assert flops["forward_backward"] > 0 and flops["newton_schulz"] > 0
    assert flops["floor_ratio"] == pytest.approx(
        (flops["forward_backward"] + flops["newton_schulz"]) / flops["forward_backward"]
    )

    # Optimizer state: m and v (8 bytes per float32 parameter), the shear force in the
    # adaptive mode (4 more), and nothing else but scalars (ARS2Neo's per-tensor step
    # counts are float32 tensors, as torch.optim.AdamW's).
    memory = {(m["framework"], m["optimizer"]): m["bytes_per_param"] for m in result["memory"]}
    assert memory[("jax", "adamw")] == pytest.approx(8, abs=0.01)
    assert memory[("jax", "ars2_base")] == pytest.approx(8, abs=0.01)
    assert memory[("jax", "ars2_adaptive")] == pytest.approx(12, abs=0.01)
    assert memory[("torch", "ars2_base")] == pytest.approx(8, abs=0.01)
    assert memory[("torch", "ars2_adaptive")] == pytest.approx(12, abs=0.01)
    assert memory[("torch", "muon")] == 4
    assert 4 < memory[("jax", "muon")] < 8  # momentum on Muon's leaves, m and v on Adam's

    for text in ("## (a)", "## Targets", "## FLOPs", "## Optimizer state per parameter"):
        assert text in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| update alone")]
    assert len(table) == len([k for k in rows if k[0] in ("update", "update_2d")])


def test_forced_branches_take_the_branch_they_name():
    params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
    grads = {"w": jnp.full((3, 4), 0.1), "b": jnp.full(4, 0.1)}
    adversarial = jax.tree.map(lambda g: 2 * g, grads)
    for name in candidates.CONDITIONAL:
        config = candidates.optimizer_configs("float32")[name]
        tx = candidates.jax_optimizer(name, {name: config}, None, "float32")
        update = candidates.jax_update_fn(tx)
        state = tx.init(params)
        for step in range(3):
            for branch, syncs in (("sync", 1), ("other", 0)):
                before = int(state.sync_count)
                code = jnp.asarray(candidates.BRANCH_CODES[branch], jnp.int32)
                _, state = update(jax.tree.map(jnp.copy, params), state, grads, adversarial, code)
                assert int(state.sync_count) - before == syncs, (name, step, branch)


def test_gpt2_workload_is_gpt2_small_shaped():
    shape = workloads.GPT2_SHAPES["full"]
    shapes = workloads.gpt2_shapes(shape)
    assert workloads.gpt2_n_params(shape) == 123_653_376  # GPT-2 small without wpe
    params = {name: jax.ShapeDtypeStruct(s, jnp.float32) for name, s in shapes.items()}
    labels = ars2_jax.default_param_labels(params)
    matrices = sorted(shapes[name] for name, label in labels.items() if label == "ars2")
    # SPEC §1 routes exactly the block kernels to ARS2, and Muon's routing takes the same.
    assert len(matrices) == 48
    assert set(matrices) == {(768, 2304), (768, 768), (768, 3072), (3072, 768)}
    muon = workloads.gpt2_muon_dimension_numbers(params)
    assert {n for n, d in muon.items() if d is not None} == {
        n for n, label in labels.items() if label == "ars2"
    }
    assert labels["wte.embedding"] == "adamw"


def test_grouping_same_shapes_changes_no_number():
    # On a CPU the default runs one Newton-Schulz call per leaf; the grouped path (the
    # default elsewhere) must give the same directions.
    keys = jax.random.split(jax.random.key(0), 4)
    updates = {
        "a": jax.random.normal(keys[0], (8, 24)),
        "b": jax.random.normal(keys[1], (24, 8)),  # transposed to 8×24: grouped with "a"
        "c": jax.random.normal(keys[2], (3, 8, 24)),  # three more 8×24 matrices
        "d": jax.random.normal(keys[3], (5, 7)),
    }
    outputs = {}
    for group in (True, False, None):
        tx = ars2_jax.orthogonalize_with_energy(ns_dtype=jnp.float32, group_same_shapes=group)
        outputs[group] = jax.jit(lambda u, tx=tx: tx.update(u, tx.init(u))[0])(updates)
    # Different matmul blockings round differently: compare whole tensors (SPEC §6b).
    for group in (False, None):
        for name in updates:
            difference = np.linalg.norm(outputs[group][name] - outputs[True][name])
            assert difference <= 1e-5 * np.linalg.norm(outputs[True][name]), (group, name)


def test_nnx_workload_times_adamw_base_and_sync_with_flop_ratios(tmp_path):
    step_time.main(
        ["--quick", "--scale", "tiny", "--workload", "c", "--out", str(tmp_path), "--quiet"]
    )
    (path,) = tmp_path.glob("*.json")
    report = json.loads(path.read_text())
    result = report["results"]["c"]
    rows = _rows(result)
    assert set(rows) == {("step", "jax", name) for name in step_time.NNX_ROWS}
    for name in ("ars2_base", "ars2_sync"):
        assert math.isfinite(rows[("step", "jax", name)]["vs_adamw"])
        assert result["flop_ratio"][name] > 1
    # Sync adds a forward-backward pass to base.
    assert result["flop_ratio"]["ars2_sync"] > result["flop_ratio"]["ars2_base"]
    targets = {t["target"].split(" (FLOP")[0]: t for t in report["targets"]}
    assert targets["(c) NNX LM full step, JAX: ARS2-Neo base / AdamW"]["bound"] == 1.4
    assert targets["(c) NNX LM full step, JAX: ARS2-Neo sync (k=1) / AdamW"]["bound"] == 2.4
    assert "(c) NNX transformer LM" in path.with_suffix(".md").read_text()
