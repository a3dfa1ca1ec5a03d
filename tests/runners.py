"""Runs the parity problem through the oracle and each implementation, step by step."""

from __future__ import annotations

import numpy as np

from tests import parity_problem as problem
from tests.oracle import Oracle

DIAGNOSTICS = ("phi", "phi_std", "threshold", "alpha_t", "sync_count", "effective_k")


def run_oracle(mode: str, steps: int = problem.STEPS, layout: str = "torch"):
    """Returns (final params in the PyTorch layout, per-step diagnostics)."""
    params = problem.initial_params()
    data = problem.batches(steps)
    if layout == "flax":
        params = {n: problem.to_flax(n, p) for n, p in params.items()}
    oracle = Oracle(
        params,
        problem.TRACKS,
        {"ars2": problem.ARS2_HPARAMS, "adamw": problem.ADAMW_HPARAMS},
        problem.sam_settings(mode),
        layout=layout,
    )
    history = []
    for batch in data:
        if layout == "torch":
            grad_fn = lambda p, batch=batch: problem.grad(p, batch)
        else:

            def grad_fn(p, batch=batch):
                torch_layout = {n: problem.from_flax(n, x) for n, x in p.items()}
                grads = problem.grad(torch_layout, batch)
                return {n: problem.to_flax(n, x) for n, x in grads.items()}

        history.append(oracle.step(grad_fn))
    final = oracle.params
    if layout == "flax":
        final = {n: problem.from_flax(n, p) for n, p in final.items()}
    return final, history


def torch_groups(params: dict, ns_dtype=None) -> list[dict]:
    """The problem's tensors as two ARS2Neo param groups with their track's hyperparameters."""
    groups = []
    for track, hp in (("ars2", problem.ARS2_HPARAMS), ("adamw", problem.ADAMW_HPARAMS)):
        groups.append(
            {
                "params": [params[n] for n in problem.SHAPES if problem.TRACKS[n] == track],
                "ars2": track == "ars2",
                "lr": hp["lr"],
                "betas": (hp["b1"], hp["b2"]),
                "eps": hp["eps"],
                "weight_decay": hp["weight_decay"],
                "ns_dtype": ns_dtype,
            }
        )
    return groups


def run_torch(mode: str, steps: int = problem.STEPS, dtype=None, ns_dtype=None, optimizer=None):
    """Returns (final params as float64 NumPy, per-step diagnostics with ``sync``, optimizer)."""
    import torch

    from ars2_torch import ARS2Neo

    dtype = dtype or torch.float64
    params = {
        n: torch.nn.Parameter(torch.tensor(p, dtype=dtype))
        for n, p in problem.initial_params().items()
    }
    opt = ARS2Neo(torch_groups(params, ns_dtype), **problem.sam_settings(mode))
    history = []
    for batch in problem.batches(steps):
        batch = {n: torch.tensor(x, dtype=dtype) for n, x in batch.items()}

        def closure(batch=batch):
            loss = problem.loss(params, batch)
            loss.backward()
            return loss

        before = opt.diagnostics["sync_count"]
        opt.zero_grad()
        opt.step(closure)
        diag = dict(opt.diagnostics)
        diag["sync"] = diag["sync_count"] > before
        history.append(diag)
    final = {n: p.detach().double().numpy() for n, p in params.items()}
    return final, history, opt


def assert_same_history(history, reference, atol: float) -> None:
    """Same sync pattern and diagnostics step by step."""
    assert [h["sync"] for h in history] == [r["sync"] for r in reference]
    for step, (h, r) in enumerate(zip(history, reference), start=1):
        for key in DIAGNOSTICS:
            np.testing.assert_allclose(
                float(h[key]), float(r[key]), rtol=0, atol=atol, err_msg=f"{key} at step {step}"
            )


def assert_decisions_well_posed(reference, margin: float = 1e-6) -> None:
    """SPEC §6b: no adaptive decision that rounding could flip."""
    for step, r in enumerate(reference, start=1):
        if r["decided_by_phi"]:
            assert abs(r["phi"] - r["threshold"]) > margin, f"ill-posed decision at step {step}"


def jax_optimizer(mode: str, ns_dtype=None, **overrides):
    """``ars2_neo`` with the problem's track hyperparameters and the mode's SAM settings."""
    import ars2_jax

    ars2, adamw = problem.ARS2_HPARAMS, problem.ADAMW_HPARAMS
    kwargs = dict(
        learning_rate=ars2["lr"],
        b1=ars2["b1"],
        b2=ars2["b2"],
        eps=ars2["eps"],
        weight_decay=ars2["weight_decay"],
        adamw_learning_rate=adamw["lr"],
        adamw_b1=adamw["b1"],
        adamw_b2=adamw["b2"],
        adamw_eps=adamw["eps"],
        adamw_weight_decay=adamw["weight_decay"],
        ns_dtype=ns_dtype,
        **problem.sam_settings(mode),
    )
    kwargs.update(overrides)
    return ars2_jax.ars2_neo(**kwargs)


def flax_loss(params, batch):
    """The problem's loss for Flax-layout params."""
    return problem.loss({n: problem.from_flax(n, p) for n, p in params.items()}, batch)


def run_jax(mode: str, steps: int = problem.STEPS, dtype=None, ns_dtype=None, tx=None):
    """Returns (final params as float64 NumPy in the PyTorch layout, per-step diagnostics)."""
    import jax
    import jax.numpy as jnp
    import optax

    import ars2_jax

    dtype = dtype or jnp.float64
    tx = tx or jax_optimizer(mode, ns_dtype)
    params = {
        n: jnp.asarray(problem.to_flax(n, p), dtype) for n, p in problem.initial_params().items()
    }
    state = tx.init(params)

    @jax.jit
    def step(params, state, batch):
        grad_fn = jax.grad(lambda p: flax_loss(p, batch))
        updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    history = []
    for batch in problem.batches(steps):
        before = int(ars2_jax.diagnostics(state)["sync_count"])
        params, state = step(params, state, {n: jnp.asarray(x, dtype) for n, x in batch.items()})
        diag = {n: np.asarray(v).item() for n, v in ars2_jax.diagnostics(state).items()}
        diag["sync"] = diag["sync_count"] > before
        history.append(diag)
    final = {n: problem.from_flax(n, np.asarray(p, np.float64)) for n, p in params.items()}
    return final, history
