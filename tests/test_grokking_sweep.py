"""The tuned comparison's sweep: grid points, the choice of winners, stopping and resuming."""

import json

import pytest

from experiments import grokking_sweep

TINY = grokking_sweep.CONFIG_DIR / "sweep_tiny.toml"


def _result(epoch_90, best):
    return {
        "milestones": {"eval_90": None if epoch_90 is None else [epoch_90, 0.9]},
        "best_eval_acc": best,
    }


def test_point_config_scales_the_second_track_with_the_first():
    sweep = grokking_sweep.load_sweep(grokking_sweep.CONFIG_DIR / "sweep.toml")
    entries = {entry["label"]: entry for entry in sweep["optimizer"]}
    muon = grokking_sweep.point_config(entries["muon"], 0.04, 0.1)["optimizer"]
    # muon.toml: Muon 0.02, Adam 3e-4; doubling Muon's rate doubles Adam's.
    assert muon["learning_rate"] == 0.04 and muon["adam"]["learning_rate"] == pytest.approx(6e-4)
    assert muon["weight_decay"] == muon["adam"]["weight_decay"] == 0.1
    ars2 = grokking_sweep.point_config(entries["ars2_neo_base"], 3e-3, 0.3)["optimizer"]
    # No rate in the AdamW track's table: it follows the first track's, scaled alike.
    assert ars2["adamw_track"]["learning_rate"] == pytest.approx(3e-3)
    assert ars2["weight_decay"] == 0.3 and ars2["adamw_track"]["weight_decay"] == 0.01
    adamw = grokking_sweep.point_config(entries["adamw"], 3e-4, 3.0)["optimizer"]
    assert (adamw["learning_rate"], adamw["weight_decay"]) == (3e-4, 3.0)
    assert len(grokking_sweep.grid_runs(sweep)) == 4 * 9 * 3


def test_winner_is_fewest_median_epochs_then_best_accuracy():
    sweep = {"epochs": 300, "optimizer": [{"label": "a"}]}
    run = lambda lr, wd, seed: grokking_sweep.Run("a", lr, wd, seed, 300, "grid")
    grid = {
        # never groks, but has the best accuracy: loses to any point that groks
        run(1.0, 0.0, 0): _result(None, 0.89),
        run(1.0, 0.0, 1): _result(None, 0.89),
        # groks on one seed of two: median of (100, 301) = 200.5
        run(2.0, 0.0, 0): _result(100, 0.99),
        run(2.0, 0.0, 1): _result(None, 0.5),
        # same median as the next, lower accuracy
        run(3.0, 0.0, 0): _result(150, 0.95),
        run(3.0, 0.0, 1): _result(170, 0.95),
        run(4.0, 0.0, 0): _result(140, 0.99),
        run(4.0, 0.0, 1): _result(180, 0.99),
    }
    assert grokking_sweep.winners(grid, sweep) == {"a": (4.0, 0.0, True)}
    nothing = {r: v for r, v in grid.items() if r.learning_rate == 1.0}
    assert grokking_sweep.winners(nothing, sweep) == {"a": (1.0, 0.0, False)}


def test_a_stopped_sweep_resumes_where_it_stopped(tmp_path):
    sweep = grokking_sweep.load_sweep(TINY)
    partial = grokking_sweep.sweep_and_report(sweep, tmp_path, max_runs=2)
    assert "2 of 3 grid runs done" in partial and "## Winners" not in partial
    done = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("result.json")}
    assert len(done) == 2
    report = grokking_sweep.sweep_and_report(sweep, tmp_path)
    # The two finished runs are read, not retrained; the rest ran.
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in done.items())
    results = [json.loads(p.read_text()) for p in tmp_path.rglob("result.json")]
    phases = sorted(r["run"]["phase"] for r in results)
    # 3 grid runs, the 2 winners on 1 fresh seed, and a longer run for each optimizer
    # that never reached 90% within 3 epochs (neither does, on this task).
    assert phases == ["final"] * 2 + ["grid"] * 3 + ["longer"] * 2
    assert all(r["epochs_run"] == r["run"]["epochs"] for r in results)
    assert "## Winners on fresh seeds [100]" in report and "| adamw |" in report
    assert "Mann-Whitney U" in report and "adamw vs ars2_neo" in report
    assert "No adamw point reached 90% eval accuracy within 3 epochs." in report
    assert "7 runs" in report and "CPU minutes" in report
    assert (tmp_path / "report.md").read_text() == report
    # A third call trains nothing and writes the same tables.
    again = grokking_sweep.sweep_and_report(sweep, tmp_path)
    assert again.split("## Budget")[0] == report.split("## Budget")[0]


def test_a_grid_without_fresh_seeds_reports_its_best_points():
    sweep = {
        "seeds": [0, 1],
        "epochs": 300,
        "final_seeds": [],
        "optimizer": [
            {"label": "a", "config": "adamw", "learning_rate": [1.0, 2.0], "weight_decay": [0.0]}
        ],
    }
    run = lambda lr, seed: grokking_sweep.Run("a", lr, 0.0, seed, 300, "grid")
    cost = lambda epochs: {"epochs_run": epochs, "cpu_seconds": 6, "wall_seconds": 6}
    grid = {
        run(1.0, 0): _result(None, 0.5) | cost(300),
        run(1.0, 1): _result(None, 0.6) | cost(300),
        run(2.0, 0): _result(40, 0.99) | cost(50),
        run(2.0, 1): _result(60, 0.99) | cost(70),
    }
    chosen = grokking_sweep.winners(grid, sweep)
    assert chosen == {"a": (2.0, 0.0, True)}
    text = grokking_sweep.report(sweep, grid, chosen, {}, {}, 1.0)
    assert "## Winners" not in text and "Mann-Whitney" not in text
    assert "## Best points on the tuning seeds [0, 1] (no fresh-seed reruns)" in text
    assert "| a | 2 | 0 | 50 [45, 55] (2/2), best 0.99 |" in text
    assert "4 grid runs, 0 longer, 0 final: 4 runs, 720 epochs trained" in text


def test_the_edge_grid_starts_at_the_tuned_grid_s_corner():
    tuned = grokking_sweep.load_sweep(grokking_sweep.CONFIG_DIR / "sweep.toml")
    edge = grokking_sweep.load_sweep(grokking_sweep.CONFIG_DIR / "sweep_edge.toml")
    assert edge["final_seeds"] == [] and edge["seeds"] == tuned["seeds"]
    assert edge["epochs"] == tuned["epochs"]
    for a, b in zip(tuned["optimizer"], edge["optimizer"], strict=True):
        assert (a["label"], a["config"]) == (b["label"], b["config"])
        assert a.get("follow") == b.get("follow")
        # It starts at the tuned grid's largest learning rate and one of its weight decays
        # (the winner's), and goes one step further in each.
        assert b["learning_rate"][0] == max(a["learning_rate"]) < b["learning_rate"][1]
        assert b["weight_decay"][0] in a["weight_decay"]
        assert b["weight_decay"][1] > b["weight_decay"][0]
