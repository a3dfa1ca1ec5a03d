"""ARS2Neo under DistributedDataParallel equals one process on the global batch.

Two gloo processes (``torch.multiprocessing``, spawned once for all four SAM
modes) each hold half of every global batch; DDP averages the gradients in both
backward passes of a sync step, so every rank computes the same perturbation,
shear force and φ, and takes the same branch (SPEC §5.1). float32 with float32
Newton-Schulz, so SPEC §6b's 1e-5 applies.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.multiprocessing as mp

from tests import data_parallel_problem as problem
from tests import ddp_worker

# Spawning, importing torch (and torch._dynamo, which DDP imports) and 4 × 20
# steps take about 25 s on a busy 2-core machine; past this the ranks are killed
# and the test fails rather than hanging CI.
TIMEOUT_S = 300


def start_ranks(tmp_path) -> mp.ProcessContext:
    # The ranks meet through a file in tmp_path: no port that another test
    # process could take between choosing it and binding it.
    return mp.start_processes(
        ddp_worker.ddp_rank,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=ddp_worker.WORLD_SIZE,
        join=False,
        start_method="spawn",
    )


def wait_for_ranks(context: mp.ProcessContext, tmp_path, deadline: float) -> list[dict]:
    """Joins the ranks (a failing rank's exception is raised here) and loads their results."""
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the DDP ranks did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [
        torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for rank in range(ddp_worker.WORLD_SIZE)
    ]


def sync_pattern(diagnostics: list[dict]) -> list[bool]:
    return problem.sync_pattern([d["sync_count"] for d in diagnostics])


def test_ddp_equals_one_process_on_the_global_batch(tmp_path):
    deadline = time.monotonic() + TIMEOUT_S
    context = start_ranks(tmp_path)
    # The reference runs here while the ranks start up.
    torch.set_num_threads(1)
    reference = {mode: ddp_worker.one_process(mode) for mode in problem.MODES}
    ranks = wait_for_ranks(context, tmp_path, deadline)

    adaptive = reference["adaptive"]["diagnostics"]
    problem.check_adaptive_decisions(
        sync_pattern(adaptive), [d["phi"] for d in adaptive], [d["threshold"] for d in adaptive]
    )
    for rank in ranks:
        assert rank["shard_size"] == problem.GLOBAL_BATCH // ddp_worker.WORLD_SIZE
    for mode, expected in reference.items():
        moved = problem.relative_error(expected["params"], problem.initial_params())
        assert moved > 0.1, f"{mode}: the reference hardly trained ({moved:.2e})"
        for rank, result in enumerate(ranks):
            got = result[mode]
            assert sync_pattern(got["diagnostics"]) == sync_pattern(expected["diagnostics"]), (
                f"{mode}: rank {rank} synced on other steps"
            )
            error = problem.relative_error(got["params"], expected["params"])
            assert error <= problem.TOLERANCE, f"{mode}: rank {rank} relative error {error:.2e}"
        for name, value in ranks[0][mode]["params"].items():
            assert np.array_equal(value, ranks[1][mode]["params"][name]), (
                f"{mode}: the ranks' {name} differ"
            )
