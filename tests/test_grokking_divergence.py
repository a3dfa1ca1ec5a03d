"""The JAX-vs-PyTorch trace of experiments.grokking_divergence on the tiny config."""

from __future__ import annotations

import json
import subprocess
import sys


def test_float64_runs_of_both_frameworks_stay_together(tmp_path):
    # A fresh process: --float64 turns on jax_enable_x64, a global switch. (The float32
    # runs part within a few steps; the parity tests bound a step's float32 error.)
    out = tmp_path / "f64"
    command = ["-m", "experiments.grokking_divergence", "--config", "tiny", "--epochs", "2"]
    result = subprocess.run(
        [sys.executable, *command, "--float64", "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    rows = [json.loads(line) for line in (out / "divergence.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))  # 265 pairs in batches of 64
    assert max(r["distance"] for r in rows if "distance" in r) < 1e-10
    for row in rows:
        assert row["jax"]["step"] == row["step"]
        assert row["jax"]["sync_count"] == row["torch"]["sync_count"]
    assert rows[-1]["jax"]["sync_count"] >= 2  # A-GSAM synced on the way
    assert "step 1 (epoch 1): distance" in result.stdout
