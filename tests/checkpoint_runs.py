"""The runs that the checkpoint and conversion tests compare, and a worker for a new process.

Every run optimizes the parity problem (tests/parity_problem.py) in the adaptive
mode, in float32 with a float32 Newton-Schulz, for ``STEPS`` steps; a resumed run
stops after ``SPLIT`` steps, is checkpointed, and continues from new objects. A
random draw per step (not used by the optimizer) shows that the RNG state resumes
too, and ``position`` is the index of the next batch in the data order.

Worker: ``python -m tests.checkpoint_runs COMMAND DIRECTORY [OUTPUT]``

* ``jax-resume`` / ``torch-resume``: restores DIRECTORY's latest checkpoint into
  new objects, runs to ``STEPS`` and writes the final params and the history to
  OUTPUT (``.npz``).
* ``jax-killed-save`` / ``torch-killed-save``: saves checkpoint ``KILLED_STEP`` into
  DIRECTORY with the final rename held back; prints ``renaming`` and waits there
  to be killed.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import numpy as np

from tests import parity_problem as problem
from tests.runners import jax_optimizer, torch_groups

MODE = "adaptive"
STEPS = 20
SPLIT = 10
STEPS_PER_EPOCH = 4
KILLED_STEP = 2
HISTORY_KEYS = ("phi", "phi_std", "threshold", "alpha_t", "sync_count", "effective_k", "draw")


# JAX ------------------------------------------------------------------------------


def jax_tx():
    import jax.numpy as jnp

    return jax_optimizer(MODE, ns_dtype=jnp.float32)


@functools.cache
def jax_step():
    """The jitted step, compiled once per process."""
    import jax
    import optax

    import ars2_jax
    from tests.runners import flax_loss

    tx = jax_tx()

    @jax.jit
    def step(params, opt_state, batch):
        grad_fn = jax.grad(lambda p: flax_loss(p, batch))
        updates, opt_state = tx.update(grad_fn(params), opt_state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), opt_state, ars2_jax.diagnostics(opt_state)

    return step


@functools.cache
def jax_batches():
    import jax.numpy as jnp

    return [{n: jnp.asarray(x, jnp.float32) for n, x in b.items()} for b in problem.batches(STEPS)]


def jax_params():
    import jax.numpy as jnp

    return {
        n: jnp.asarray(problem.to_flax(n, p), jnp.float32)
        for n, p in problem.initial_params().items()
    }


def jax_train_state(tx=None):
    """A fresh train state: params, optimizer state, PRNG key, epoch, data position."""
    import jax

    params = jax_params()
    return {
        "params": params,
        "opt_state": (tx or jax_tx()).init(params),
        "rng": jax.random.key(0),
        "epoch": 0,
        "position": 0,
    }


def jax_run(state, until: int):
    """Steps ``state`` until its position reaches ``until``; returns (state, history)."""
    import jax

    step = jax_step()
    history = []
    while state["position"] < until:
        rng, draw = jax.random.split(state["rng"])
        params, opt_state, diagnostics = step(
            state["params"], state["opt_state"], jax_batches()[state["position"]]
        )
        record = {k: np.asarray(v) for k, v in diagnostics.items()}
        record["draw"] = np.asarray(jax.random.key_data(draw))
        history.append(record)
        position = state["position"] + 1
        state = {
            "params": params,
            "opt_state": opt_state,
            "rng": rng,
            "epoch": position // STEPS_PER_EPOCH,
            "position": position,
        }
    return state, history


# PyTorch --------------------------------------------------------------------------


def torch_objects():
    """Fresh params, optimizer and generator."""
    import torch

    from ars2_torch import ARS2Neo

    params = {
        n: torch.nn.Parameter(torch.tensor(p, dtype=torch.float32))
        for n, p in problem.initial_params().items()
    }
    optimizer = ARS2Neo(torch_groups(params, torch.float32), **problem.sam_settings(MODE))
    return params, optimizer, torch.Generator().manual_seed(0)


def torch_run(params, optimizer, generator, start: int, until: int) -> list[dict]:
    """Steps from batch ``start`` to ``until``; returns the history."""
    import torch

    history = []
    for batch in problem.batches(STEPS)[start:until]:
        batch = {n: torch.tensor(x, dtype=torch.float32) for n, x in batch.items()}

        def closure(batch=batch):
            loss = problem.loss(params, batch)
            loss.backward()
            return loss

        optimizer.zero_grad()
        optimizer.step(closure)
        record = {k: np.asarray(v) for k, v in optimizer.diagnostics.items()}
        record["draw"] = torch.rand((), generator=generator).numpy()
        history.append(record)
    return history


def torch_numpy(params) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in params.items()}


# Comparisons ----------------------------------------------------------------------


def assert_bitwise_same_history(history, reference) -> None:
    assert len(history) == len(reference)
    for step, (h, r) in enumerate(zip(history, reference), start=1):
        for key in HISTORY_KEYS:
            np.testing.assert_array_equal(h[key], r[key], err_msg=f"{key} at step {step}")


def save_run(output, params: dict, history: list[dict]) -> None:
    arrays = {f"param/{n}": np.asarray(p) for n, p in params.items()}
    for key in HISTORY_KEYS:
        arrays[f"history/{key}"] = np.stack([np.asarray(h[key]) for h in history])
    np.savez(output, **arrays)


def load_run(output) -> tuple[dict, list[dict]]:
    with np.load(output) as data:
        params = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("param/")}
        columns = {key: data[f"history/{key}"] for key in HISTORY_KEYS}
    history = [{key: columns[key][i] for key in HISTORY_KEYS} for i in range(len(columns["phi"]))]
    return params, history


# Worker ---------------------------------------------------------------------------


def _hold_rename(function, final_name: str):
    """``function`` (os.rename or os.replace) that stops before creating ``final_name``."""

    def held(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst)) == final_name:
            print("renaming", flush=True)
            time.sleep(600)
        return function(src, dst, *args, **kwargs)

    return held


def main(argv: list[str]) -> None:
    command, directory, *rest = argv
    if command == "jax-resume":
        from ars2_jax import checkpoint

        state = checkpoint.restore(directory, like=jax_train_state(jax_tx()))
        state, history = jax_run(state, STEPS)
        save_run(rest[0], state["params"], history)
    elif command == "torch-resume":
        from ars2_torch import checkpoint

        params, optimizer, generator = torch_objects()
        saved = checkpoint.load(directory)
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        for name, param in params.items():
            param.data.copy_(saved["params"][name])
        history = torch_run(params, optimizer, generator, saved["position"], STEPS)
        save_run(rest[0], torch_numpy(params), history)
    elif command == "jax-killed-save":
        from ars2_jax import checkpoint

        os.rename = _hold_rename(os.rename, str(KILLED_STEP))
        checkpoint.save(directory, jax_train_state(), step=KILLED_STEP)
    elif command == "torch-killed-save":
        from ars2_torch import checkpoint

        params, optimizer, generator = torch_objects()
        os.replace = _hold_rename(os.replace, f"checkpoint_{KILLED_STEP:08d}.pt")
        checkpoint.save_step(directory, KILLED_STEP, optimizer=optimizer, position=KILLED_STEP)
    else:
        raise ValueError(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
