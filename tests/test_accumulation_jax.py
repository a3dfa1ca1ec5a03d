"""Gradient accumulation: accumulated_grad_fn's step is the large-batch step; MultiSteps' is not."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ars2_jax
from ars2_jax import ars2_neo
from ars2_jax.training import accumulated_grad_fn

MODES = {
    "off": dict(rho=0.0, k=0),
    "sync": dict(rho=0.05, k=1),
    "delayed": dict(rho=0.05, k=2, alpha=0.3),
    "adaptive": dict(rho=0.05, k=3, alpha=0.3, adaptive=True),
}
MICRO = 4
STEPS = 4


def _problem():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((6, 5))), "b": jnp.zeros(5)}
    batch = {"x": jnp.asarray(rng.standard_normal((16, 6))), "y": jnp.asarray(rng.random((16, 5)))}
    return params, batch


def loss(params, batch):
    return jnp.mean((jnp.tanh(batch["x"] @ params["w"] + params["b"]) - batch["y"]) ** 2)


def _micro(batch):
    return jax.tree.map(lambda a: a.reshape(MICRO, -1, *a.shape[1:]), batch)


def _train(tx, params, grad_fn, steps=STEPS):
    @jax.jit
    def step(params, state):
        updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@pytest.mark.parametrize("mode", list(MODES))
def test_accumulated_step_equals_the_large_batch_step(mode):
    with jax.enable_x64(True):
        params, batch = _problem()
        tx = ars2_neo(1e-2, **MODES[mode])
        large, large_state = _train(tx, params, lambda p: jax.grad(loss)(p, batch))
        accumulated, state = _train(tx, params, accumulated_grad_fn(jax.grad(loss), _micro(batch)))
        chex.assert_trees_all_close(accumulated, large, rtol=1e-12, atol=1e-14)
        for key, value in ars2_jax.diagnostics(large_state).items():
            chex.assert_trees_all_close(ars2_jax.diagnostics(state)[key], value, atol=1e-12)
        assert int(ars2_jax.diagnostics(state)["sync_count"]) >= (mode != "off")


def test_multisteps_calls_grad_fn_on_every_micro_step_and_misses_the_large_batch_step():
    # The documented limit: MultiSteps runs the optimizer on every micro-step, and the
    # emitting micro-step's adversarial gradient is that micro-batch's alone.
    params, batch = _problem()
    micro = _micro(batch)
    calls = []
    tx = optax.MultiSteps(ars2_neo(1e-2, rho=0.05, k=1), every_k_schedule=MICRO)

    @jax.jit
    def micro_step(params, state, micro_batch):
        def grad_fn(p):
            jax.debug.callback(lambda: calls.append(1))
            return jax.grad(loss)(p, micro_batch)

        updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    stepped = params
    for i in range(MICRO):
        stepped, state = micro_step(stepped, state, jax.tree.map(lambda a, i=i: a[i], micro))
    jax.effects_barrier()
    assert len(calls) == 2 * MICRO  # one base and one adversarial gradient per micro-step
    large, _ = _train(ars2_neo(1e-2, rho=0.05, k=1), params, lambda p: jax.grad(loss)(p, batch), 1)
    assert float(jnp.max(jnp.abs(stepped["w"] - large["w"]))) > 1e-4
