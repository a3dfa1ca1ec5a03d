"""A tuned comparison on the grokking task: every optimizer gets the same tuning budget.

    python -m experiments.grokking_sweep --estimate        # the cost, before running it
    python -m experiments.grokking_sweep                   # configs/grokking/sweep.toml
    python -m experiments.grokking_sweep --sweep configs/grokking/sweep_tiny.toml --out /tmp/s

The sweep config (``configs/grokking/sweep.toml``) names, per optimizer, a base config
and a grid of learning rate × weight decay. Each grid point trains on the tuning seeds
for at most ``epochs`` epochs; an optimizer's best point is the one with the fewest
median epochs to 90% eval accuracy (a seed that never gets there counts as the budget
plus one, so a point where no seed groks never wins on that count), ties broken by the
median best eval accuracy. If no point of an optimizer groks, one longer run at its best
point shows where it does (``longer_epochs``). The winners are then rerun on fresh seeds
(``final_seeds``), and ``report.md`` gives their medians, interquartile ranges and
Mann-Whitney U tests, the whole grid, and the budget (runs, epochs, CPU and wall minutes).

Every run writes ``result.json`` into its own directory when it ends; a stopped sweep,
started again with the same command, skips the runs that have one and goes on.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import multiprocessing
import pathlib
import re
import sys
import time
from typing import Any

if __package__ in (None, ""):  # `python experiments/grokking_sweep.py`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np

from experiments import common

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "grokking"
MILESTONE = "eval_90"


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the sweep: an optimizer's grid point on one seed."""

    optimizer: str  # the [[optimizer]] entry's label
    learning_rate: float
    weight_decay: float
    seed: int
    epochs: int
    phase: str  # "grid", "longer" or "final"

    @property
    def point(self) -> str:
        return f"lr{self.learning_rate:g}_wd{self.weight_decay:g}"

    def directory(self, out: pathlib.Path) -> pathlib.Path:
        return out / self.phase / self.optimizer / self.point / f"seed-{self.seed}"


def load_sweep(path: str | pathlib.Path) -> dict[str, Any]:
    """Reads and checks a sweep config (see ``configs/grokking/sweep.toml``)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sweep config {path}")
    with path.open("rb") as f:
        sweep = common.tomllib.load(f)
    for key in ("seeds", "epochs", "final_seeds", "optimizer"):
        if key not in sweep:
            raise ValueError(f"{path}: the sweep config has no {key!r}")
    labels = [entry.get("label") for entry in sweep["optimizer"]]
    if None in labels or len(set(labels)) != len(labels):
        raise ValueError(f"{path}: every [[optimizer]] needs its own label, got {labels}")
    for entry in sweep["optimizer"]:
        for key in ("config", "learning_rate", "weight_decay"):
            if key not in entry:
                raise ValueError(f"{path}: [[optimizer]] {entry['label']!r} has no {key!r}")
    return sweep


def point_config(entry: dict[str, Any], learning_rate: float, weight_decay: float):
    """The base config with the grid point's values.

    The tables named in ``follow`` (a two-track optimizer's second track: Muon's
    ``adam``, ARS2-Neo's ``adamw_track``) keep their ratio of learning rates to the first
    track; ``follow_weight_decay`` also gives them the point's weight decay.
    """
    config = common.load_config(common.config_path(entry["config"], CONFIG_DIR))
    config = common.with_overrides(config)
    optimizer = config["optimizer"]
    ratio = learning_rate / optimizer["learning_rate"]
    optimizer.update(learning_rate=learning_rate, weight_decay=weight_decay)
    for table in entry.get("follow", []):
        track = dict(optimizer.get(table, {}))
        track["learning_rate"] = track.get("learning_rate", learning_rate / ratio) * ratio
        if entry.get("follow_weight_decay", False):
            track["weight_decay"] = weight_decay
        optimizer[table] = track
    config["name"] = f"{entry['label']}-lr{learning_rate:g}-wd{weight_decay:g}"
    return config


def grid_runs(sweep: dict[str, Any]) -> list[Run]:
    """Every grid point of every optimizer on every tuning seed."""
    return [
        Run(entry["label"], lr, wd, seed, sweep["epochs"], "grid")
        for entry in sweep["optimizer"]
        for lr, wd, seed in itertools.product(
            entry["learning_rate"], entry["weight_decay"], sweep["seeds"]
        )
    ]


def train_run(run: Run, entry: dict[str, Any], out: pathlib.Path) -> dict[str, Any]:
    """Trains one run (JAX) and writes its ``result.json``; returns the result."""
    from experiments import grokking

    directory = run.directory(out)
    settings = grokking.RunSettings(seed=run.seed, epochs=run.epochs, out_dir=directory, quiet=True)
    wall, cpu = time.perf_counter(), time.process_time()
    trained = grokking.train_and_evaluate(
        point_config(entry, run.learning_rate, run.weight_decay), settings
    )
    history = trained["history"]
    result = {
        "run": dataclasses.asdict(run),
        "milestones": trained["milestones"],
        "best_eval_acc": max(row["eval_acc"] for row in history),
        "epochs_run": len(history),
        "wall_seconds": time.perf_counter() - wall,
        "cpu_seconds": time.process_time() - cpu,
    }
    (directory / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _read(run: Run, out: pathlib.Path) -> dict[str, Any] | None:
    path = run.directory(out) / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_all(
    runs: list[Run], sweep: dict[str, Any], out: pathlib.Path, workers: int, budget: list[int]
) -> dict[Run, dict[str, Any]]:
    """The results of ``runs``: read where a run finished before, trained otherwise.

    ``budget`` holds the runs this invocation may still train (a one-element list, so
    that ``--max-runs`` spans the phases); runs beyond it are left for the next call.
    """
    entries = {entry["label"]: entry for entry in sweep["optimizer"]}
    results = {run: r for run in runs if (r := _read(run, out)) is not None}
    todo = [run for run in runs if run not in results][: budget[0]]
    budget[0] -= len(todo)
    if not todo:
        return results
    print(f"{len(results)} of {len(runs)} runs done before; training {len(todo)}", flush=True)
    if workers == 1:
        for i, run in enumerate(todo, 1):
            results[run] = train_run(run, entries[run.optimizer], out)
            _log(i, len(todo), run, results[run])
        return results
    # A fresh process per worker (spawn): each JAX runtime has its own threads.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {pool.submit(train_run, run, entries[run.optimizer], out): run for run in todo}
        for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
            run = futures[future]
            results[run] = future.result()
            _log(i, len(todo), run, results[run])
    return results


def _log(i: int, n: int, run: Run, result: dict[str, Any]) -> None:
    reached = result["milestones"][MILESTONE]
    print(
        f"[{i}/{n}] {run.phase} {run.optimizer} {run.point} seed {run.seed}: "
        f"90% at {reached[0] if reached else '-'}, best {result['best_eval_acc']:.3f}, "
        f"{result['wall_seconds']:.0f} s",
        flush=True,
    )


# --- choosing and reporting -------------------------------------------------------------


def epochs_to_90(results: list[dict[str, Any]], budget: int) -> list[int]:
    return common.epochs_to([r["milestones"][MILESTONE] for r in results], budget + 1)


def point_score(results: list[dict[str, Any]], budget: int) -> tuple[float, float]:
    """Sort key of a grid point: median epochs to 90% (never = budget + 1), then the
    median best eval accuracy, higher first."""
    best = float(np.median([r["best_eval_acc"] for r in results]))
    return float(np.median(epochs_to_90(results, budget))), -best


def winners(grid: dict[Run, dict[str, Any]], sweep: dict[str, Any]) -> dict[str, tuple]:
    """Each optimizer's best grid point: ``label -> (learning_rate, weight_decay, grokked)``."""
    chosen = {}
    for entry in sweep["optimizer"]:
        points = {}
        for run, result in grid.items():
            if run.optimizer == entry["label"]:
                points.setdefault((run.learning_rate, run.weight_decay), []).append(result)
        (lr, wd), results = min(points.items(), key=lambda kv: point_score(kv[1], sweep["epochs"]))
        grokked = any(r["milestones"][MILESTONE] for r in results)
        chosen[entry["label"]] = (lr, wd, grokked)
    return chosen


def _point_results(grid: dict[Run, dict[str, Any]], label: str, lr: float, wd: float) -> list:
    """The results of one optimizer's grid point, seed by seed."""
    return [
        r
        for run, r in grid.items()
        if (run.optimizer, run.learning_rate, run.weight_decay) == (label, lr, wd)
    ]


def _cell(results: list[dict[str, Any]], budget: int) -> str:
    return (
        common.seed_statistics([r["milestones"][MILESTONE] for r in results], budget)
        + f", best {np.median([r['best_eval_acc'] for r in results]):.2f}"
    )


def report(
    sweep: dict[str, Any],
    grid: dict[Run, dict[str, Any]],
    chosen: dict[str, tuple],
    longer: dict[Run, dict[str, Any]],
    final: dict[Run, dict[str, Any]],
    wall_minutes: float,
) -> str:
    """``report.md``: the winners on fresh seeds, the tests, the grid and the budget."""
    budget, final_seeds = sweep["epochs"], sweep["final_seeds"]
    lines = [
        "# Grokking: a tuned comparison",
        "",
        f"Grid: learning rate × weight decay, seeds {sweep['seeds']}, at most {budget} epochs "
        "per run (early stop at 99% eval accuracy). Best point: fewest median epochs to 90% "
        "eval accuracy, ties broken by median best eval accuracy. Cells: epochs to 90% eval "
        "accuracy, median [25%, 75%] (seeds that reached it / seeds), and median best eval "
        "accuracy.",
        "",
    ]
    if not final_seeds:  # a grid alone (e.g. a check beyond another grid's edge)
        lines += [
            f"## Best points on the tuning seeds {sweep['seeds']} (no fresh-seed reruns)",
            "",
            "| optimizer | learning rate | weight decay | grid cell |",
            "|---|---|---|---|",
        ]
        for label, (lr, wd, _) in chosen.items():
            results = _point_results(grid, label, lr, wd)
            lines.append(f"| {label} | {lr:g} | {wd:g} | {_cell(results, budget)} |")
    else:
        lines += [
            f"## Winners on fresh seeds {final_seeds}",
            "",
            "| optimizer | learning rate | weight decay | epochs to 90% eval | best eval acc |",
            "|---|---|---|---|---|",
        ]
    by_label = {}
    for label, (lr, wd, _) in chosen.items() if final_seeds else ():
        results = [r for run, r in final.items() if run.optimizer == label]
        by_label[label] = results
        if len(results) < len(final_seeds):
            cell = f"{len(results)} of {len(final_seeds)} seeds run so far"
            if results:
                cell += ": " + _cell(results, budget)
            lines.append(f"| {label} | {lr:g} | {wd:g} | {cell} | |")
            continue
        stats = common.seed_statistics([r["milestones"][MILESTONE] for r in results], budget)
        best = np.median([r["best_eval_acc"] for r in results])
        lines.append(f"| {label} | {lr:g} | {wd:g} | {stats} | {best:.3f} |")
    complete = {k: v for k, v in by_label.items() if len(v) == len(final_seeds)}
    if len(complete) > 1:
        lines += [
            "",
            "Mann-Whitney U, epochs to 90% (a seed that never got there counts as "
            f"epoch {budget + 1}), two-sided:",
            "",
        ]
        for a, b in itertools.combinations(complete, 2):
            u, p = common.mann_whitney(
                epochs_to_90(complete[a], budget), epochs_to_90(complete[b], budget)
            )
            lines.append(f"- {a} vs {b}: U = {u:.1f}, p = {p:.2g}")
    for label, (lr, wd, grokked) in chosen.items():
        if grokked:
            continue
        lines += ["", f"No {label} point reached 90% eval accuracy within {budget} epochs."]
        for run, result in longer.items():
            if run.optimizer == label:
                reached = result["milestones"][MILESTONE]
                where = f"epoch {reached[0]}" if reached else "never"
                lines.append(
                    f"One longer run at its best point (lr {lr:g}, weight decay {wd:g}, seed "
                    f"{run.seed}, {run.epochs} epochs): 90% eval accuracy at {where}, best "
                    f"{result['best_eval_acc']:.3f}."
                )
    lines += ["", "## The grid", ""]
    for entry in sweep["optimizer"]:
        label = entry["label"]
        lines += [
            f"### {label} (from `{entry['config']}`; rows: learning rate, columns: weight decay)",
            "",
            "| lr \\ wd | " + " | ".join(f"{wd:g}" for wd in entry["weight_decay"]) + " |",
            "|---|" + "---|" * len(entry["weight_decay"]),
        ]
        for lr in entry["learning_rate"]:
            cells = []
            for wd in entry["weight_decay"]:
                results = _point_results(grid, label, lr, wd)
                cells.append(_cell(results, budget) if results else "not run")
            lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
        lines.append("")
    every = [*grid.values(), *longer.values(), *final.values()]
    lines += [
        "## Budget",
        "",
        f"- {len(grid)} grid runs, {len(longer)} longer, {len(final)} final: {len(every)} runs, "
        f"{sum(r['epochs_run'] for r in every)} epochs trained",
        f"- {sum(r['cpu_seconds'] for r in every) / 60:.0f} CPU minutes (process time of the "
        f"runs), {sum(r['wall_seconds'] for r in every) / 60:.0f} wall minutes of runs; this "
        f"invocation {wall_minutes:.1f} wall minutes",
        "",
    ]
    return "\n".join(lines)


def estimate(sweep: dict[str, Any], seconds_per_epoch: float) -> str:
    n_grid = len(grid_runs(sweep))
    n_final = len(sweep["optimizer"]) * len(sweep["final_seeds"])
    longer = sweep.get("longer_epochs", 0)
    epochs = (n_grid + n_final) * sweep["epochs"] + len(sweep["optimizer"]) * longer
    hours = epochs * seconds_per_epoch / 3600
    extra = (
        f" (+ at most {len(sweep['optimizer'])} longer runs of {longer} epochs)" if longer else ""
    )
    return (
        f"{n_grid} grid runs + {n_final} final runs{extra}: at most {epochs} epochs, {hours:.1f} h "
        f"at {seconds_per_epoch} s per epoch on one worker (runs that reach 99% stop early)"
    )


def sweep_and_report(
    sweep: dict[str, Any], out: pathlib.Path, workers: int = 1, max_runs: int | None = None
) -> str:
    """Runs (or continues) the whole sweep; writes and returns ``report.md``."""
    start = time.perf_counter()
    budget = [sys.maxsize if max_runs is None else max_runs]
    grid = run_all(grid_runs(sweep), sweep, out, workers, budget)
    longer, final, chosen = {}, {}, {}
    if len(grid) == len(grid_runs(sweep)):
        chosen = winners(grid, sweep)
        extra = [
            Run(label, lr, wd, sweep["seeds"][0], sweep["longer_epochs"], "longer")
            for label, (lr, wd, grokked) in chosen.items()
            if not grokked and sweep.get("longer_epochs")
        ]
        finals = [
            Run(label, lr, wd, seed, sweep["epochs"], "final")
            for label, (lr, wd, _) in chosen.items()
            for seed in sweep["final_seeds"]
        ]
        final = run_all(finals, sweep, out, workers, budget)
        longer = run_all(extra, sweep, out, workers, budget)
    text = report(sweep, grid, chosen, longer, final, (time.perf_counter() - start) / 60)
    if not chosen:
        total = len(grid_runs(sweep))
        done = f"{len(grid)} of {total} grid runs done: the winners come when all are."
        heading = r"## (Winners|Best points).*?## The grid"
        text = re.sub(heading, done + "\n\n## The grid", text, flags=re.S)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", default=str(CONFIG_DIR / "sweep.toml"), help="sweep config")
    parser.add_argument("--out", default=str(ROOT / "results" / "grokking" / "sweep"))
    parser.add_argument("--workers", type=int, default=1, help="runs trained at once")
    parser.add_argument("--max-runs", type=int, help="train at most N runs, then report")
    parser.add_argument(
        "--estimate",
        type=float,
        nargs="?",
        const=0.25,
        metavar="SECONDS_PER_EPOCH",
        help="print the sweep's cost and stop (default 0.25 s per epoch)",
    )
    args = parser.parse_args(argv)
    sweep = load_sweep(args.sweep)
    if args.estimate is not None:
        print(estimate(sweep, args.estimate))
        return
    if args.workers < 1:
        parser.error(f"--workers {args.workers} must be >= 1")
    print(sweep_and_report(sweep, pathlib.Path(args.out), args.workers, args.max_runs))


if __name__ == "__main__":
    main()
