"""``benchmarks/accelerator.sh --smoke`` on a CPU: it runs a step, writes its figures and
records what it skipped (the whole smoke run takes minutes here; the test runs one step)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accelerator.sh"
STEPS = ("grokking", "step_time_a_float32", "step_time_a_bfloat16", "step_time_b", "sharding_time")


def run(out: pathlib.Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu", **env}
    return subprocess.run(
        ["bash", str(SCRIPT), "--smoke", "--out", str(out), *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_smoke_runs_a_step_and_writes_its_figures(tmp_path):
    completed = run(tmp_path, "--steps", "sharding_time")
    assert completed.returncode == 0, completed.stderr
    (figures,) = (tmp_path / "sharding").glob("sharding-time-cpu-tiny-*.json")
    rows = json.loads(figures.read_text())["rows"]
    assert {r["optimizer"] for r in rows} == {"adamw", "ars2_neo", "ars2_neo_sharded"}
    assert all(r["median_ms"] > 0 for r in rows)
    summary = (tmp_path / "README.md").read_text()
    assert "benchmarks.sharding --time" in summary
    assert "Devices: cpu" in summary


def test_what_does_not_fit_the_budget_is_recorded_as_skipped(tmp_path):
    completed = run(tmp_path, BUDGET_S="0")
    assert completed.returncode == 0, completed.stderr
    skipped = (tmp_path / "skipped.txt").read_text()
    for step in STEPS:
        assert f"{step}: skipped, the 0s budget is spent" in skipped
    assert "## Skipped or failed" in (tmp_path / "README.md").read_text()


def test_unknown_arguments_are_refused(tmp_path):
    completed = run(tmp_path, "--fast")
    assert completed.returncode == 2 and "unknown argument: --fast" in completed.stderr
