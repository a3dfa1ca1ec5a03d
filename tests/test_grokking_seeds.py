"""Many seeds in one compiled program (`--seeds`), and the statistics across seeds."""

from __future__ import annotations

import pathlib

import jax
import pytest

from experiments import common, grokking, grokking_compare

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "grokking" / "tiny.toml"


def test_parse_seeds():
    assert common.parse_seeds("0-3") == [0, 1, 2, 3]
    assert common.parse_seeds("0,3,5") == [0, 3, 5]
    assert common.parse_seeds("0-2,8,1") == [0, 1, 2, 8]
    for bad in ["", "a", "1-x", ","]:
        with pytest.raises(ValueError, match="--seeds"):
            common.parse_seeds(bad)


def test_vmapped_seeds_equal_separate_runs(tmp_path):
    config = common.load_config(TINY)
    seeds = [0, 1, 2]

    def settings(name):
        return grokking.RunSettings(
            epochs=4, quiet=True, out_dir=tmp_path / name, ns_dtype="float32"
        )

    together = grokking_compare.train_seeds(config, seeds, settings("vmap"), seed_mode="vmap")
    apart = grokking_compare.train_seeds(
        config, seeds, settings("sequential"), seed_mode="sequential"
    )
    assert together["mode"] == "vmap" and apart["mode"] == "sequential"
    for seed, joint, alone in zip(seeds, together["runs"], apart["runs"]):
        assert len(joint["history"]) == len(alone["history"]) == 4
        for a, b in zip(joint["history"], alone["history"]):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
            assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)
            assert a["eval_acc"] == b["eval_acc"] and a["sync_count"] == b["sync_count"]
        epoch_of = lambda milestones: {k: v and v[0] for k, v in milestones.items()}
        assert epoch_of(joint["milestones"]) == epoch_of(alone["milestones"])
        assert (tmp_path / "vmap" / f"seed-{seed}" / "metrics.jsonl").exists()
    # Different seeds are different runs.
    first = [row["train_loss"] for row in together["runs"][0]["history"]]
    second = [row["train_loss"] for row in together["runs"][1]["history"]]
    assert first != second
    summary = (tmp_path / "vmap" / "summary.md").read_text()
    assert "(0/3)" in summary or "(3/3)" in summary
    assert (tmp_path / "vmap" / "curves.png").stat().st_size > 0


def test_seed_statistics_and_tests():
    reached = [(10, 1.0), (20, 2.0), None, (30, 3.0)]
    assert common.seed_statistics(reached, max_epochs=50) == "25 [18, 35] (3/4)"
    assert common.seed_statistics([None, None, (5, 0.5)], max_epochs=50) == ">50 [28, >50] (1/3)"
    assert common.epochs_to(reached, 51) == [10, 20, 51, 30]
    u, p = common.mann_whitney([1, 2, 3, 4, 5], [10, 11, 12, 13, 14])
    assert u == 0.0 and p < 0.01
    u, p = common.mann_whitney([1, 2, 3], [1, 2, 3])
    assert u == 4.5 and p == pytest.approx(1.0)


def test_milestone_tests_are_reported_between_ours_and_baselines():
    def fake(name, epochs_to_90):
        runs = [{"milestones": {"eval_90": None if e is None else (e, 0.0)}} for e in epochs_to_90]
        return {"name": name, "runs": runs, "max_epochs": 100}

    configs = [
        {"name": "agsam", "optimizer": {"name": "ars2_neo"}},
        {"name": "adamw", "optimizer": {"name": "adamw"}},
    ]
    text = grokking_compare._milestone_tests(
        [fake("agsam", [50, 60, 70, 80]), fake("adamw", [None, None, None, 90])], configs
    )
    assert "agsam vs adamw" in text and "medians 65 vs 101 (agsam earlier)" in text
    assert "Mann-Whitney U = 0.0, two-sided p = 0.027" in text and "counts as epoch 101" in text


def test_auto_seed_mode():
    config = common.load_config(TINY)
    base = {**config, "optimizer": {**config["optimizer"], "rho": 0.0, "k": 0, "adaptive": False}}
    for backend in ("gpu", "tpu"):
        assert (
            grokking_compare.choose_seed_mode(config, "auto", backend) == "sequential"
        )  # a lax.cond
        assert grokking_compare.choose_seed_mode(base, "auto", backend) == "vmap"
    for which in (config, base):  # measured: vmap is no faster on CPUs
        assert grokking_compare.choose_seed_mode(which, "auto", "cpu") == "sequential"
    here = "sequential" if jax.default_backend() == "cpu" else "vmap"
    assert grokking_compare.choose_seed_mode(base, "auto") == here
    assert grokking_compare.choose_seed_mode(base, "vmap", "cpu") == "vmap"
    with pytest.raises(ValueError, match="seed_mode"):
        grokking_compare.choose_seed_mode(config, "parallel")
