"""Prints the parity errors (SPEC §6b) between the oracle and both implementations.

    python -m benchmarks.parity

Every run optimizes the parity problem of ``tests/parity_problem.py`` for 30 steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import torch

from benchmarks.machine import describe
from tests import parity_problem as problem
from tests.runners import run_jax, run_oracle, run_torch


def rows(mode: str) -> list[tuple[str, float]]:
    oracle, _ = run_oracle(mode)
    torch64, _, _ = run_torch(mode, dtype=torch.float64)
    with jax.enable_x64(True):
        jax64, _ = run_jax(mode, dtype=jnp.float64)
    torch32, _, _ = run_torch(mode, dtype=torch.float32, ns_dtype=torch.float32)
    jax32, _ = run_jax(mode, dtype=jnp.float32, ns_dtype=jnp.float32)
    torch_bf16_ns, _, _ = run_torch(mode, dtype=torch.float32)
    jax_bf16_ns, _ = run_jax(mode, dtype=jnp.float32)
    error = problem.relative_error
    return [
        ("torch float64 vs oracle", error(torch64, oracle)),
        ("jax float64 vs oracle", error(jax64, oracle)),
        ("jax vs torch, float32, float32 NS", error(jax32, torch32)),
        ("jax vs torch, float32, bf16 NS (default)", error(jax_bf16_ns, torch_bf16_ns)),
        ("jax float32 + bf16 NS vs oracle", error(jax_bf16_ns, oracle)),
        ("torch float32 + bf16 NS vs oracle", error(torch_bf16_ns, oracle)),
    ]


def main() -> None:
    print(f"Parity after {problem.STEPS} steps (SPEC §6b relative error); {describe()}\n")
    table = {mode: rows(mode) for mode in problem.MODES}
    names = [name for name, _ in next(iter(table.values()))]
    print("| comparison | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    for i, name in enumerate(names):
        print(f"| {name} | " + " | ".join(f"{table[m][i][1]:.1e}" for m in table) + " |")


if __name__ == "__main__":
    main()
