"""ARS2-Neo's SAM modes inside optax's wrappers: partition, masked, chain, inject_hyperparams."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ars2_jax
from ars2_jax import ars2_neo, masked_grad_fn

MODES = {
    "off": dict(rho=0.0, k=0),
    "sync": dict(rho=0.05, k=1),
    "delayed": dict(rho=0.05, k=3, alpha=0.3),
    "adaptive": dict(rho=0.05, k=4, alpha=0.3, adaptive=True),
}
STEPS = 5
SGD_LR = 0.1
# "b" is ARS2-Neo's (a matrix on its ARS2 track, a vector on its AdamW track);
# "a" (a leaf) and "c" (a whole subtree, one MaskedNode) are SGD's.
LABELS = {"a": "y", "b": "x", "c": "y"}


def _params():
    rng = np.random.default_rng(0)
    shapes = {"a": (3,), "b": {"w": (8, 4), "bias": (4,)}, "c": {"u": (4,), "v": (2, 3)}}
    return jax.tree.map(
        lambda shape: jnp.asarray(rng.standard_normal(shape)),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


DATA = np.random.default_rng(1).standard_normal((16, 8))


def loss(params):
    # Every group moves the others' gradients, so a wrong fill of a masked leaf shows.
    hidden = jnp.tanh(jnp.asarray(DATA) @ params["b"]["w"] + params["b"]["bias"] + params["c"]["u"])
    scale = 1 + 0.1 * jnp.tanh(jnp.sum(params["a"] ** 2) + jnp.sum(params["c"]["v"] ** 2))
    return jnp.mean((hidden * scale - 0.5) ** 2)


def _ars2(mode, **overrides):
    return ars2_neo(1e-2, **MODES[mode], **overrides)


def _run(tx, params, steps=STEPS):
    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        grad_fn = masked_grad_fn(jax.grad(loss), params)
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def _reference(mode, params, steps=STEPS):
    """ARS2-Neo on ``params["b"]`` alone, SGD on the rest, by hand."""
    tx = _ars2(mode)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        grad_fn = lambda b: jax.grad(loss)({**params, "b": b})["b"]
        updates, state = tx.update(grads["b"], state, params["b"], grad_fn=grad_fn)
        new = jax.tree.map(lambda p, g: p - SGD_LR * g, params, grads)
        return {**new, "b": optax.apply_updates(params["b"], updates)}, state

    state = tx.init(params["b"])
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def _compositions(mode):
    mask = {"a": False, "b": True, "c": False}
    not_mask = jax.tree.map(lambda m: not m, mask)
    injected = optax.inject_hyperparams(ars2_neo, static_args=ars2_jax.STATIC_ARGS)(
        1e-2, **MODES[mode]
    )
    return {
        "partition": optax.partition({"x": _ars2(mode), "y": optax.sgd(SGD_LR)}, LABELS),
        "chain_of_masked": optax.chain(
            optax.masked(_ars2(mode), mask), optax.masked(optax.sgd(SGD_LR), not_mask)
        ),
        "partition_of_injected": optax.partition({"x": injected, "y": optax.sgd(SGD_LR)}, LABELS),
    }


@pytest.mark.parametrize("mode", list(MODES))
def test_sam_inside_wrappers_equals_ars2_neo_on_its_own_leaves(mode):
    # float64: XLA folds Python constants, not the injected hyperparameter arrays,
    # so the injected run equals the plain one up to rounding only, which the
    # Newton-Schulz iteration and the adaptive decision amplify to ~1e-10.
    with jax.enable_x64(True):
        params = _params()
        expected, expected_state = _reference(mode, params)
        for name, tx in _compositions(mode).items():
            got, state = _run(tx, params)
            rtol = 1e-9 if "injected" in name else 1e-12
            chex.assert_trees_all_close(got, expected, rtol=rtol, atol=0, custom_message=name)
            got_diagnostics = ars2_jax.diagnostics(state)
            for key, value in ars2_jax.diagnostics(expected_state).items():
                chex.assert_trees_all_close(
                    got_diagnostics[key], value, rtol=rtol, atol=1e-12, custom_message=name
                )
        sync_count = int(ars2_jax.diagnostics(expected_state)["sync_count"])
    assert sync_count == {"off": 0, "sync": STEPS, "delayed": 2}.get(mode, sync_count)
    # Adaptive: both branches are traced under lax.cond whichever runs.
    assert sync_count >= (mode != "off")


def test_the_issue_repro_steps_inside_partition():
    # Issue 14, item 2: this raised TypeError (MaskedNode / array) in perturbation.
    params = {"a": jnp.zeros(3), "b": {"w": jnp.zeros((8, 4))}}
    tx = optax.partition(
        {"x": ars2_neo(1e-2, rho=0.05, k=1), "y": optax.sgd(1e-2)}, {"a": "y", "b": "x"}
    )
    target = jnp.arange(32.0).reshape(8, 4) / 32
    toy_loss = lambda p: jnp.sum((p["b"]["w"] - target) ** 2) + jnp.sum((p["a"] - 1) ** 2)
    state = tx.init(params)
    grads = jax.grad(toy_loss)(params)
    updates, state = tx.update(
        grads, state, params, grad_fn=masked_grad_fn(jax.grad(toy_loss), params)
    )
    chex.assert_trees_all_close(updates["a"], -1e-2 * grads["a"])
    assert bool(jnp.all(jnp.isfinite(updates["b"]["w"])))
    assert float(jnp.sum(updates["b"]["w"] * grads["b"]["w"])) < 0
    assert int(ars2_jax.diagnostics(state)["sync_count"]) == 1


def test_a_full_tree_grad_fn_on_masked_params_names_masked_grad_fn():
    params = _params()
    tx = optax.partition({"x": _ars2("sync"), "y": optax.sgd(SGD_LR)}, LABELS)
    with pytest.raises(ValueError, match="masked_grad_fn"):
        tx.update(jax.grad(loss)(params), tx.init(params), params, grad_fn=jax.grad(loss))


def test_masked_grad_fn_fills_masked_leaves_and_masks_the_gradient():
    params = _params()
    masked = optax.transforms.MaskedNode()
    partial = {"a": masked, "b": jax.tree.map(lambda x: x + 1, params["b"]), "c": masked}
    grads = masked_grad_fn(jax.grad(loss), params)(partial)
    expected = jax.grad(loss)({**params, "b": partial["b"]})
    chex.assert_trees_all_equal_structs(grads, partial)
    chex.assert_trees_all_close(grads["b"], expected["b"])
    unmasked = masked_grad_fn(jax.grad(loss), params)(params)
    chex.assert_trees_all_close(unmasked, jax.grad(loss)(params))
