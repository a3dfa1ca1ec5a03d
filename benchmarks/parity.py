"""Prints the parity errors (SPEC §6b) of each implementation against the NumPy oracle.

    python -m benchmarks.parity
"""

from __future__ import annotations

from benchmarks.machine import describe
from tests import parity_problem as problem
from tests.runners import run_oracle, run_torch


def torch_rows() -> list[tuple[str, str, float]]:
    rows = []
    for mode in problem.MODES:
        expected, _ = run_oracle(mode)
        actual, _, _ = run_torch(mode)
        rows.append((mode, "torch float64 vs oracle", problem.relative_error(actual, expected)))
    return rows


def main() -> None:
    print(f"# parity after {problem.STEPS} steps; {describe()}")
    print("| mode | comparison | relative error |")
    print("|---|---|---|")
    for mode, what, error in torch_rows():
        print(f"| {mode} | {what} | {error:.1e} |")


if __name__ == "__main__":
    main()
