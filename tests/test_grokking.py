"""The grokking experiment end to end on tiny.toml, in both frameworks."""

from __future__ import annotations

import itertools
import json
import pathlib

import numpy as np
import pytest

from experiments import common, grokking, grokking_compare

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "grokking" / "tiny.toml"


def _table(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_data_split_and_epoch_order():
    data = grokking.make_data(113, 0.3, split_seed=0)
    assert len(data.train_y) == 3830 and len(data.test_y) == 113 * 113 - 3830
    pairs = {tuple(x[:2]) for x in np.concatenate([data.train_x, data.test_x])}
    assert len(pairs) == 113 * 113
    np.testing.assert_array_equal(data.train_y, (data.train_x[:, 0] + data.train_x[:, 1]) % 113)
    assert (data.train_x[:, 2] == 113).all()
    import jax

    key = jax.random.key(0)
    indices, mask = jax.device_get(grokking.epoch_order(key, 0, 3830, 512))
    assert indices.shape == (8, 512) and mask.sum(axis=1).tolist() == [512] * 7 + [246]
    assert sorted(indices[mask > 0].tolist()) == list(range(3830))
    other, _ = jax.device_get(grokking.epoch_order(key, 1, 3830, 512))
    assert not np.array_equal(indices, other)


def test_tiny_config_in_both_frameworks(tmp_path):
    config = common.load_config(TINY)
    settings = grokking.RunSettings(epochs=3, quiet=True, out_dir=tmp_path, ns_dtype="float32")
    results, text = grokking_compare.compare([config], ["jax", "torch"], settings)
    rows = _table((tmp_path / "comparison.md").read_text())
    assert [row[:2] for row in rows] == [["tiny", "jax"], ["tiny", "torch"]]
    assert text == (tmp_path / "comparison.md").read_text()
    assert (tmp_path / "curves.png").stat().st_size > 0
    for framework in ("jax", "torch"):
        run_dir = tmp_path / f"tiny-{framework}"
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
        assert {"train_loss", "eval_acc", "effective_k", "wall_seconds"} <= set(
            json.loads(lines[0])
        )
        summary = (run_dir / "summary.md").read_text()
        assert len(_table(summary)[0]) == len(grokking.MILESTONES)
        assert (run_dir / "curves.png").stat().st_size > 0
    # Same split, order and initial weights: the two paths differ only in rounding.
    jax_run, torch_run = results
    for jax_row, torch_row in zip(jax_run["history"], torch_run["history"]):
        assert jax_row["train_loss"] == pytest.approx(torch_row["train_loss"], rel=1e-3)
        assert jax_row["sync_count"] == torch_row["sync_count"]


def test_muon_runs_in_both_frameworks(tmp_path):
    # JAX: optax.contrib.muon; PyTorch: the reference Muon (tests/test_muon_baseline.py
    # states where the two differ). Both fit the tiny task's training loss.
    config = common.load_config(ROOT / "configs" / "grokking" / "muon.toml")
    config["task"], config["model"] = (
        common.load_config(TINY)["task"],
        common.load_config(TINY)["model"],
    )
    settings = grokking.RunSettings(epochs=4, quiet=True, out_dir=tmp_path, early_stop=False)
    results, text = grokking_compare.compare([config], ["jax", "torch"], settings)
    assert [row[:2] for row in _table(text)] == [["muon", "jax"], ["muon", "torch"]]
    for result in results:
        losses = [row["train_loss"] for row in result["history"]]
        assert len(losses) == 4, result["label"]
        assert all(b < a for a, b in itertools.pairwise(losses)), (result["label"], losses)


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_resume_at_an_epoch_boundary_is_exact(tmp_path, framework):
    config = common.load_config(TINY)

    def run(out, epochs, resume=None):
        settings = grokking.RunSettings(
            framework=framework,
            epochs=epochs,
            quiet=True,
            out_dir=out,
            ckpt_every=1,
            keep=None,
            resume=resume,
        )
        return grokking.train_and_evaluate(config, settings)

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "interrupted", 2)
    resumed = run(None, 4, resume=tmp_path / "interrupted")
    drop_clock = lambda rows: [
        {k: v for k, v in row.items() if k not in ("epoch_seconds", "wall_seconds")} for row in rows
    ]
    assert drop_clock(resumed["history"]) == drop_clock(straight["history"])
    lines = (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    # The final checkpoints hold the same bits.
    straight_dir = tmp_path / "straight" / "checkpoints"
    resumed_dir = tmp_path / "interrupted" / "checkpoints"
    if framework == "jax":
        import jax

        from ars2_jax import checkpoint

        like = grokking.initial_train_state(config)
        a, b = (checkpoint.restore(d, like=like, step=4) for d in (straight_dir, resumed_dir))
        a["order_key"], b["order_key"] = (jax.random.key_data(x["order_key"]) for x in (a, b))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    else:
        import torch

        from ars2_torch import checkpoint

        a, b = (checkpoint.load(d, step=4) for d in (straight_dir, resumed_dir))
        for name, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][name]), name
        for index, state in a["optimizer"]["state"].items():
            for key, value in state.items():
                other = b["optimizer"]["state"][index][key]
                assert torch.equal(value, other) if torch.is_tensor(value) else value == other
        assert a["optimizer"]["ars2"] == b["optimizer"]["ars2"]


def test_plot_redraws_curves_from_finished_runs(tmp_path):
    from experiments import plot

    for name, accuracy in (("a", 0.5), ("b", 0.9)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"epoch": e, "train_acc": accuracy, "eval_acc": accuracy / e} for e in (1, 2, 3)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot.main(
        [
            str(tmp_path / "a"),
            str(tmp_path / "b" / "metrics.jsonl"),
            "--out",
            str(tmp_path / "c.png"),
        ]
    )
    assert (tmp_path / "c.png").stat().st_size > 0
    assert list(plot.load_runs([str(tmp_path / "a")])) == ["a"]
    with pytest.raises(FileNotFoundError, match=r"no metrics\.jsonl"):
        plot.load_runs([str(tmp_path / "missing")])


@pytest.mark.parametrize(
    "argv",
    [
        ["--resume", "results/grokking/somewhere"],  # which config?
        ["--config", "tiny", "--resume", "somewhere", "--seeds", "0-1"],
        ["--seeds", "0-1", "--framework", "torch"],
    ],
)
def test_command_line_refuses_what_it_cannot_do(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        grokking.main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
