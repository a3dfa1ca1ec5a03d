"""``python -m benchmarks.sharding`` and its per-execution HLO counting (issue 16).

One subprocess with 4 faked CPU devices (``tests/hlo_cost_check.py``): a loop of
known trip count, counted by hand, and the benchmark on tiny GPT-like shapes.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import hlo_cost, sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRIPS = 7  # tests/hlo_cost_check.py


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, dict, pathlib.Path]:
    out = tmp_path_factory.mktemp("sharding")
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    )
    env["JAX_PLATFORMS"] = "cpu"
    completed = subprocess.run(
        [sys.executable, "-m", "tests.hlo_cost_check", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    (results,) = out.glob("sharding-tiny-*.json")
    return report, json.loads(results.read_text()), out


def test_a_loop_counts_its_trips(run):
    hand = run[0]["hand"]
    # Per trip an all-reduce of 16 float32 (2 × 64 bytes) and a 16×16 matvec; after
    # the loop an all-gather whose result is 4 × 16 float32.
    assert hand["by_op"] == {"all-reduce": [TRIPS, TRIPS * 128], "all-gather": [1, 256]}
    assert hand["bytes"] == TRIPS * 128 + 256
    assert hand["collectives"] == TRIPS + 1 and hand["in_loops"] == 1
    assert hand["flops"] == TRIPS * 2 * 16 * 16
    # XLA's own cost analysis counts the loop body once.
    assert hand["cost_analysis_flops"] < 2 * 2 * 16 * 16 + 100


def test_the_option_moves_little_and_spreads_the_work(run):
    _, results, out = run
    rows = {(r["layout"], r["optimizer"]): r for r in results["rows"]}
    assert {r["devices"] for r in results["rows"]} == {4}
    for layout in sharding.LAYOUTS:
        sharded = rows[(layout, "ars2_neo_sharded")]
        assert sharded["collectives_in_loops"] == 0 and sharded["unknown_trip_counts"] == 0
        assert sharded["flops_ratio"] <= 1.5, sharded
        assert sharded["argument_bytes"] > 0
    fsdp = rows[("fsdp", "ars2_neo_sharded")]
    assert fsdp["shares"] <= 3
    assert rows[("fsdp", "ars2_neo")]["collectives_in_loops"] > 0
    assert rows[("fsdp", "ars2_neo")]["shares"] > 10 * fsdp["shares"]
    replicated = rows[("replicated", "ars2_neo_sharded")]
    assert replicated["collective_bytes"] <= 1.5 * replicated["matrix_bytes"]
    assert rows[("replicated", "ars2_neo")]["flops_ratio"] == pytest.approx(4.0, rel=0.05)
    markdown = next(out.glob("sharding-tiny-*.md")).read_text()
    assert "| gpt_like | 4 | fsdp | `ars2_neo_sharded` |" in markdown
    assert results["command"].startswith("python -m benchmarks.sharding")


def test_array_bytes_reads_tuples_and_dtypes():
    assert hlo_cost.array_bytes("(bf16[4,2]{1,0}, f32[3])") == 16 + 12
    assert hlo_cost.array_bytes("pred[]") == 1


def test_scale_model_reproduces_the_measured_owner_bytes():
    from benchmarks import scale_model

    # The GPT-like shapes on 8 devices: one matrix per owner, the largest 768×3072, whose
    # bfloat16 blocks go there and back: 2 · 8 · (768·3072/8) · 2 bytes = 9 MiB, as measured.
    _, chunk = scale_model.owner_costs(scale_model.gpt_matrices(2, 768, 3072), 8)
    assert 2 * 8 * chunk * 2 == 9 * 2**20
    rows = scale_model.rows()
    assert len(rows) == len(scale_model.MODELS) * len(scale_model.DEVICE_COUNTS) * 3
    for row in rows:
        if row["way"] == "replicated":
            assert row["flops_ratio"] == row["devices"] and row["bytes"] == 0
        assert row["total_ms"] == pytest.approx(row["compute_ms"] + row["comm_ms"])
    assert "| GPT 1.3B (24 × 2048, MLP 8192) | 64 (InfiniBand) |" in scale_model.markdown(rows)
