"""Redraws accuracy curves from finished runs' ``metrics.jsonl`` files.

    python -m experiments.plot results/grokking/jax-seed0/*-jax \\
        results/grokking/jax-muon-seed0/muon-jax --out docs/grokking_curves.png

Each argument is a run directory (or its ``metrics.jsonl``); the run's label is its
directory name.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

if __package__ in (None, ""):  # `python experiments/plot.py`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import common

CURVES = (("train_acc", "train accuracy"), ("eval_acc", "eval accuracy"))


def load_runs(paths: list[str]) -> dict[str, list[dict]]:
    runs = {}
    for path in map(pathlib.Path, paths):
        metrics = path / "metrics.jsonl" if path.is_dir() else path
        if not metrics.is_file():
            raise FileNotFoundError(f"no metrics.jsonl at {path}")
        runs[metrics.parent.name] = [
            json.loads(line) for line in metrics.read_text().splitlines() if line.strip()
        ]
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories or metrics.jsonl files")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=[key for key, _ in CURVES],
        help="metric keys, one panel each (default: train_acc eval_acc)",
    )
    args = parser.parse_args(argv)
    curves = [(key, key.replace("_", " ")) for key in args.metrics]
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    common.plot_curves(args.out, load_runs(args.runs), curves)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
