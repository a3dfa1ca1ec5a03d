"""One process of a multi-process data-parallel run of the fixture; or the whole run alone.

Started by ``tests/test_multihost_jax.py``, once per process::

    python -m tests.multihost_worker --num-processes 2 --process-id 0 \\
        --coordinator 127.0.0.1:PORT --out result.json
    python -m tests.multihost_worker --num-processes 2 --process-id 1 \\
        --coordinator 127.0.0.1:PORT

and with ``--num-processes 1`` for the reference: one process, one device, the
whole global batches. The code is the same for both (that is the point).

It takes ``problem.STEPS`` steps of the data-parallel fixture in every SAM mode
(one compiled step holding all of them, float32 with float32 Newton-Schulz),
from the same params, with the params and optimizer states replicated global
arrays. Each process reads only its own rows of each global batch
(:func:`experiments.distributed.local_rows`), which
:func:`experiments.distributed.global_batch` joins into one global array.

``--shared-directory DIR`` (repeatable) first checks whether every process sees
``DIR`` as process 0 does (:func:`experiments.distributed.check_shared_directory`)
and reports the answer. After the last step every process checks that its copy
of the params and states is the same, bit for bit, as every other's. Process 0
writes a JSON file: per mode the final params and, after every step, the loss,
sync count, φ and threshold; and where the data lived (every process's rows, the
global batch's shape, whether the params are replicated across processes).

``--die-after-steps K`` makes this process exit abruptly (``os._exit(1)``) after
its K-th step, ``--freeze-after-steps K`` stop (``SIGSTOP``: alive, sockets open,
silent), ``--raise-after-steps K`` raise: the others must then fail, not hang.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

import ars2_jax
from experiments import distributed, parallel
from tests import data_parallel_problem as problem

MODES = tuple(problem.MODES)


def modes_step(modes: tuple[str, ...]):
    """One step of several modes, and the initial params and states.

    The step maps ``({mode: params}, {mode: state}, batch)`` to the same with
    ``{mode: loss}``, as ``tests/multidevice_jax_check.py``'s, for any modes.
    """
    optimizers = {
        mode: ars2_jax.ars2_neo(**problem.ars2_neo_kwargs(mode), ns_dtype=jnp.float32)
        for mode in modes
    }
    loss_fn = lambda params, batch: problem.loss(params, batch, jnp)
    steps = {mode: parallel.train_step(loss_fn, tx) for mode, tx in optimizers.items()}

    def step(params, states, batch):
        out = {mode: steps[mode](params[mode], states[mode], batch) for mode in modes}
        return tuple({mode: out[mode][i] for mode in modes} for i in range(3))

    params = {name: np.asarray(value) for name, value in problem.initial_params().items()}
    states = {mode: tx.init(params) for mode, tx in optimizers.items()}
    return step, {mode: params for mode in modes}, states


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--coordinator", help="HOST:PORT of process 0")
    parser.add_argument("--heartbeat", type=int, default=distributed.HEARTBEAT_TIMEOUT_S)
    parser.add_argument("--initialization-timeout", type=int, default=60)
    parser.add_argument("--out", help="the result file (process 0 only)")
    parser.add_argument("--modes", default=",".join(MODES), help="SAM modes, comma-separated")
    parser.add_argument("--die-after-steps", type=int, default=0, metavar="K")
    parser.add_argument("--freeze-after-steps", type=int, default=0, metavar="K")
    parser.add_argument("--raise-after-steps", type=int, default=0, metavar="K")
    parser.add_argument(
        "--shared-directory",
        action="append",
        default=[],
        help="check whether every process sees this directory (may repeat)",
    )
    return parser.parse_args(argv)


def fail(step: int, args: argparse.Namespace) -> None:
    """Fails as the arguments ask, after printing when (the test measures from there)."""
    failure = next(
        name for name in ("die", "freeze", "raise") if getattr(args, f"{name}_after_steps") == step
    )
    print(f"process {args.process_id}: {failure} after step {step} at {time.time()}", flush=True)
    if failure == "die":
        os._exit(1)
    if failure == "freeze":  # alive, its sockets open, but silent: no heartbeats
        os.kill(os.getpid(), signal.SIGSTOP)
    raise RuntimeError(f"process {args.process_id} fails on purpose after step {step}")


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    distributed.initialize(
        args.coordinator,
        args.num_processes,
        args.process_id,
        heartbeat_timeout_seconds=args.heartbeat,
        initialization_timeout=args.initialization_timeout,
    )
    print(
        f"process {args.process_id}: initialized in {time.perf_counter() - start:.1f} s", flush=True
    )
    shared_directories = []
    for directory in args.shared_directory:
        try:
            distributed.check_shared_directory(directory)
            shared_directories.append("shared")
        except ValueError as error:
            shared_directories.append(str(error))
    mesh = parallel.make_mesh()  # every device of every process
    modes = tuple(args.modes.split(","))
    step, params, states = modes_step(modes)
    params, states = distributed.replicate((params, states), mesh)
    step = parallel.jit_sharded(step, mesh)
    rows = distributed.local_rows(problem.GLOBAL_BATCH, mesh)

    history = {mode: {"loss": [], "sync_count": [], "phi": [], "threshold": []} for mode in modes}
    for t, batch in enumerate(problem.batches(), start=1):
        local = {name: value[rows] for name, value in batch.items()}
        global_batch = distributed.global_batch(local, mesh)
        params, states, losses = step(params, states, global_batch)
        # Fully replicated: every process reads its own copy, no communication.
        diagnostics = {mode: ars2_jax.diagnostics(states[mode]) for mode in modes}
        losses, diagnostics = jax.device_get((losses, diagnostics))
        for mode in modes:
            history[mode]["loss"].append(float(losses[mode]))
            for key in ("sync_count", "phi", "threshold"):
                history[mode][key].append(np.asarray(diagnostics[mode][key]).item())
        print(
            f"process {jax.process_index()}: step {t} done at {time.perf_counter() - start:.1f} s",
            flush=True,
        )
        if t in (args.die_after_steps, args.freeze_after_steps, args.raise_after_steps):
            fail(t, args)

    distributed.check_identical((params, states), "the replicated params and optimizer states")
    all_rows = multihost_utils.process_allgather(np.asarray([rows.start, rows.stop]))
    if not distributed.is_main_process():
        return
    leaf = params[modes[0]]["hidden"]
    report = {
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "rows": np.reshape(all_rows, (-1, 2)).tolist(),
        "batch_shape": list(global_batch["x"].shape),
        "batch_local_shape": list(global_batch["x"].addressable_data(0).shape),
        "params_replicated": leaf.sharding.is_fully_replicated,
        "params_fully_addressable": leaf.is_fully_addressable,
        "shared_directories": shared_directories,
        "modes": {
            mode: {
                **history[mode],
                "params": {n: np.asarray(v).tolist() for n, v in params[mode].items()},
            }
            for mode in modes
        },
    }
    pathlib.Path(args.out).write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
