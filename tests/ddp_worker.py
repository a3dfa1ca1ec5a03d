"""ARS2Neo on the data-parallel fixture: in one process, or in a DDP rank.

``tests/test_ddp_torch.py`` spawns :func:`ddp_rank` in ``WORLD_SIZE`` processes
(``torch.multiprocessing``, gloo) and runs :func:`train` on the global batch in
its own process, then compares. Each rank holds ``1/WORLD_SIZE`` of every global
batch; DDP averages the gradients in every backward pass, the adversarial pass
of a sync step included, so each rank's optimizer sees the global gradient.
"""

from __future__ import annotations

import datetime
import pathlib
from collections.abc import Callable

import torch

from ars2_torch import ARS2Neo
from tests import data_parallel_problem as problem

WORLD_SIZE = 2
# A collective that waits longer than this fails instead of hanging the test.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


class MLP(torch.nn.Module):
    """The fixture's model; ``forward`` returns the mean loss of a batch."""

    def __init__(self):
        super().__init__()
        for name, value in problem.initial_params().items():
            self.register_parameter(name, torch.nn.Parameter(torch.from_numpy(value)))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        params = {name: getattr(self, name) for name in problem.SHAPES}
        return problem.loss(params, {"x": x, "y": y}, torch)


def optimizer(mode: str, model: MLP) -> ARS2Neo:
    groups = [
        {
            "params": [getattr(model, n) for n in problem.SHAPES if problem.is_ars2(n) == ars2],
            "ns_dtype": torch.float32,
            **problem.torch_group_settings(ars2),
        }
        for ars2 in (True, False)
    ]
    return ARS2Neo(groups, **problem.sam_settings(mode))


def train(mode: str, model: MLP, forward: Callable, batches: list[dict]) -> dict:
    """Runs ``problem.STEPS`` steps; returns the final params and the diagnostics per step.

    ``forward(x, y) -> loss`` is the model itself or its DDP wrapper.
    """
    opt = optimizer(mode, model)
    diagnostics = []
    for batch in batches:
        x, y = torch.from_numpy(batch["x"]), torch.from_numpy(batch["y"])

        def closure(x=x, y=y):
            loss = forward(x, y)
            loss.backward()
            return loss

        opt.zero_grad()
        opt.step(closure)
        diagnostics.append(dict(opt.diagnostics))
    params = {n: getattr(model, n).detach().numpy().copy() for n in problem.SHAPES}
    return {"params": params, "diagnostics": diagnostics}


def one_process(mode: str) -> dict:
    """The reference: one process on the global batches."""
    model = MLP()
    return train(mode, model, model, problem.batches())


def ddp_rank(rank: int, init_file: str, out_dir: str) -> None:
    """One DDP rank: every mode on this rank's shards; the results go to ``out_dir``."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=pathlib.Path(init_file).as_uri(),
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        shards = [problem.shard(batch, rank, WORLD_SIZE) for batch in problem.batches()]
        results = {"shard_size": len(shards[0]["x"])}
        for mode in problem.MODES:
            model = MLP()
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            results[mode] = train(mode, model, ddp, shards)
        torch.save(results, pathlib.Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()
