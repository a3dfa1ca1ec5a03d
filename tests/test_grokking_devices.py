"""`experiments/grokking.py --devices N`: a batch split over devices changes no metric."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_sharded_run_equals_single_device_run(tmp_path):
    # 3 devices do not divide tiny.toml's batch of 64: the batches are padded and
    # masked. A subprocess, because the device count is fixed when JAX starts.
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=3"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    for devices in (1, 3):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "experiments.grokking",
                "--config",
                "tiny",
                "--epochs",
                "3",
                "--ns-dtype",
                "float32",
                "--devices",
                str(devices),
                "--quiet",
                "--out",
                str(tmp_path / f"devices-{devices}"),
            ],
            check=True,
            cwd=ROOT,
            env=env,
            capture_output=True,
            timeout=600,
        )
    rows = {
        devices: [
            json.loads(line)
            for line in (tmp_path / f"devices-{devices}" / "metrics.jsonl").read_text().splitlines()
        ]
        for devices in (1, 3)
    }
    assert len(rows[1]) == len(rows[3]) == 3
    for one, three in zip(rows[1], rows[3]):
        for key in ("train_loss", "train_acc", "eval_loss", "eval_acc", "phi", "alpha_t"):
            assert three[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
        assert three["sync_count"] == one["sync_count"]
