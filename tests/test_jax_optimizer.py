"""ars2_jax's building blocks, compilation behaviour and usability."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ars2_jax
from ars2_jax import (
    adam_second_moments,
    ars2_neo,
    newton_schulz,
    orthogonalize_with_energy,
    perturbation,
    sharpness_aware,
    shear_force,
)
from ars2_jax.training import TrainState, nnx_grad_fn
from tests import parity_problem as problem
from tests.oracle import newton_schulz_closed_form
from tests.runners import flax_loss, jax_optimizer, run_jax

MODES = list(problem.MODES)
# Eager jnp ops compile one by one on first use: the tests differentiate under jit.
loss_grad = jax.jit(jax.grad(flax_loss))


def _params_and_batch(dtype=jnp.float32):
    params = {
        n: jnp.asarray(problem.to_flax(n, p), dtype) for n, p in problem.initial_params().items()
    }
    batch = {n: jnp.asarray(x, dtype) for n, x in problem.batches(1)[0].items()}
    return params, batch


# --- Newton-Schulz and orthogonalization ------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 8), (13, 5), (4, 11)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_newton_schulz_equals_svd_closed_form_in_float64(shape, scale):
    x = scale * np.random.default_rng(0).standard_normal(shape)
    with jax.enable_x64(True):
        actual = np.asarray(newton_schulz(jnp.asarray(x)))
    expected = newton_schulz_closed_form(x)
    assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) <= 1e-10


def test_newton_schulz_default_views_follow_flax_layouts():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        heads = rng.standard_normal((3, 4, 6))
        out = np.asarray(newton_schulz(jnp.asarray(heads)))
        for h in range(3):
            np.testing.assert_allclose(out[h], newton_schulz_closed_form(heads[h]), atol=1e-10)
        conv = rng.standard_normal((3, 3, 2, 5))  # (kh, kw, in, out) -> (kh*kw*in, out)
        out = np.asarray(newton_schulz(jnp.asarray(conv)))
        expected = newton_schulz_closed_form(conv.reshape(-1, 5)).reshape(conv.shape)
        np.testing.assert_allclose(out, expected, atol=1e-10)
        custom = optax.contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=2)
        out = np.asarray(newton_schulz(jnp.asarray(heads), dimension_numbers=custom))
        for r in range(4):
            np.testing.assert_allclose(
                out[:, r, :], newton_schulz_closed_form(heads[:, r, :]), atol=1e-10
            )


def test_newton_schulz_agrees_with_optax_muon_iteration():
    from optax.contrib._muon import orthogonalize_via_newton_schulz

    x = jax.random.normal(jax.random.key(0), (2, 24, 40))
    dims = optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=2)
    theirs = orthogonalize_via_newton_schulz(
        x, jnp.asarray(ars2_jax.NS_COEFFS), 5, eps=ars2_jax.NS_EPS, dimension_numbers=dims
    )
    ours = newton_schulz(x, dtype=jnp.float32)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_newton_schulz_of_zero_is_zero_and_keeps_dtype():
    for shape in [(4, 3), (2, 3, 5), (3, 3, 2, 4)]:
        for dtype in [jnp.float32, jnp.bfloat16]:
            out = newton_schulz(jnp.zeros(shape, dtype))
            assert out.dtype == dtype and not jnp.any(out)


def test_newton_schulz_dtype_rule():
    x = jax.random.normal(jax.random.key(1), (6, 4))
    assert ars2_jax.default_ns_dtype(jnp.float32) == jnp.bfloat16
    assert ars2_jax.default_ns_dtype(jnp.bfloat16) == jnp.bfloat16
    np.testing.assert_array_equal(newton_schulz(x), newton_schulz(x, dtype=jnp.bfloat16))
    exact = newton_schulz_closed_form(np.asarray(x, np.float64))
    rel = lambda y: np.linalg.norm(np.asarray(y, np.float64) - exact) / np.linalg.norm(exact)
    assert rel(newton_schulz(x)) < 0.05
    assert rel(newton_schulz(x, dtype=jnp.float32)) < 1e-5
    with jax.enable_x64(True):
        assert ars2_jax.default_ns_dtype(jnp.float64) == jnp.float64


def test_orthogonalize_with_energy_preserves_the_norm_and_orthogonalizes():
    u = {"w": jax.random.normal(jax.random.key(2), (32, 16))}
    tx = orthogonalize_with_energy(ns_dtype=jnp.float32)
    out, _ = tx.update(u, tx.init(u))
    direction = out["w"] / jnp.linalg.norm(u["w"])
    np.testing.assert_allclose(direction, newton_schulz(u["w"], dtype=jnp.float32), rtol=1e-6)
    singular_values = jnp.linalg.svd(direction, compute_uv=False)
    assert singular_values.min() >= 0.68 and singular_values.max() <= 1.21


# --- SAM pieces -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5,), (4, 3), (2, 3, 4)])
def test_perturbation_has_norm_rho(shape):
    rng = np.random.default_rng(0)
    p, g, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
    norm_of_e = jax.jit(
        lambda v, step: jnp.linalg.norm(perturbation(p, g, v, 0.99, 1e-8, 0.3, step))
    )
    for step in [1, 2, 7]:
        nu = jnp.abs(v) * (step > 1)  # the second moment is 0 before the first step
        assert float(norm_of_e(nu, jnp.asarray(step))) == pytest.approx(0.3, rel=1e-5)


def test_shear_force_is_orthogonal_to_gradient():
    g, noise = jax.random.normal(jax.random.key(3), (2, 7, 5))
    v = shear_force(g + noise, g)
    assert abs(float(jnp.vdot(v, g))) <= 1e-5 * float(jnp.linalg.norm(v) * jnp.linalg.norm(g))


# --- compiled behaviour -----------------------------------------------------------------


def _counting_train_step(tx, counter):
    def grad_fn_for(batch):
        def grad_fn(params):
            jax.debug.callback(counter.append, 1)
            return jax.grad(flax_loss)(params, batch)

        return grad_fn

    @jax.jit
    def step(params, state, batch):
        grads = jax.grad(flax_loss)(params, batch)
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn_for(batch))
        return optax.apply_updates(params, updates), state

    return step


@pytest.mark.parametrize("mode", ["sync", "delayed", "adaptive"])
def test_grad_fn_runs_only_on_sync_steps(mode):
    tx = jax_optimizer(mode)
    calls = []
    step = _counting_train_step(tx, calls)
    params, _ = _params_and_batch()
    state = tx.init(params)
    syncs = 0
    for batch in problem.batches(12):
        batch = {n: jnp.asarray(x) for n, x in batch.items()}
        params, state = step(params, state, batch)
        jax.effects_barrier()
        syncs = int(ars2_jax.diagnostics(state)["sync_count"])
        assert len(calls) == syncs
    assert 1 < syncs <= 12
    if mode != "sync":
        assert syncs < 12


def test_second_call_does_not_recompile():
    tx = jax_optimizer("adaptive")
    params, batch = _params_and_batch()
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(params, state, batch):
        traces.append(1)
        grad_fn = jax.grad(lambda p: flax_loss(p, batch))
        updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    params, state = step(params, state, batch)
    params, state = step(params, state, batch)
    assert len(traces) == 1
    assert step._cache_size() == 1


@pytest.mark.parametrize("mode", ["sync", "adaptive"])
def test_jit_equals_no_jit(mode):
    # Small params: eager mode compiles every primitive for every new shape.
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(3), jnp.float32),
    }
    data = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
    loss = lambda p: jnp.sum(jnp.tanh(data @ p["w"] + p["b"]) ** 2)
    tx = ars2_neo(0.05, ns_dtype=jnp.float32, **problem.sam_settings(mode))

    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params, grad_fn=jax.grad(loss))
        return optax.apply_updates(params, updates), state

    eager = jitted = (params, tx.init(params))
    for _ in range(2):  # a sync step, then (adaptive) a shear-injection step
        eager = step(*eager)
        jitted = jax.jit(step)(*jitted)
    assert problem.relative_error(jitted[0], eager[0]) <= 1e-5
    if mode == "adaptive":
        assert problem.relative_error(jitted[1].shear_force, eager[1].shear_force) <= 1e-5
    chex.assert_trees_all_equal(ars2_jax.diagnostics(jitted[1])["sync_count"], 2)


def test_inject_hyperparams_with_constant_schedule_equals_plain_call():
    injected = optax.inject_hyperparams(ars2_neo, static_args=ars2_jax.STATIC_ARGS)
    settings = dict(problem.sam_settings("adaptive"))
    common = dict(b1=0.9, b2=0.98, weight_decay=0.1, **settings)
    plain = ars2_neo(learning_rate=0.02, **common)
    scheduled = injected(learning_rate=optax.constant_schedule(0.02), **common)
    with jax.enable_x64(True):
        expected, expected_history = run_jax("adaptive", steps=8, tx=plain)
        actual, history = run_jax("adaptive", steps=8, tx=scheduled)
    # Equal up to rounding: XLA folds Python constants, not the injected arrays.
    assert problem.relative_error(actual, expected) <= 1e-12
    assert [h["sync"] for h in history] == [h["sync"] for h in expected_history]


def test_inject_hyperparams_schedule_changes_learning_rate_and_keeps_bfloat16():
    injected = optax.inject_hyperparams(
        ars2_neo, static_args=ars2_jax.STATIC_ARGS, hyperparam_dtype=jnp.float32
    )
    tx = injected(learning_rate=optax.linear_schedule(1e-2, 0.0, 4), b2=0.999, rho=0.05, k=2)
    params = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.zeros(3, jnp.bfloat16)}
    loss = lambda p: jnp.sum((jnp.arange(4.0, dtype=jnp.bfloat16) @ p["w"] + p["b"]) ** 2)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params, grad_fn=jax.grad(loss))
        return optax.apply_updates(params, updates), state

    for _ in range(5):
        params, state = step(params, state)
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    assert float(state.hyperparams["learning_rate"]) == 0.0
    assert state.hyperparams["b2"].dtype == jnp.float32 and float(state.hyperparams["b2"]) < 1
    assert int(ars2_jax.diagnostics(state)["sync_count"]) == 3


def test_vmap_over_independent_states_equals_a_loop():
    tx = jax_optimizer("adaptive", ns_dtype=jnp.float32)
    params, _ = _params_and_batch()
    batches = problem.batches(4)
    seeds = 3
    # Three independent problems: the same params scaled differently.
    stacked = jax.tree.map(lambda x: jnp.stack([x * (1 + 0.3 * s) for s in range(seeds)]), params)

    def step(params, state, batch):
        grad_fn = jax.grad(lambda p: flax_loss(p, batch))
        updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    vstate = jax.vmap(tx.init)(stacked)
    vparams = stacked
    batches = [{n: jnp.asarray(x) for n, x in batch.items()} for batch in batches]
    vstep = jax.jit(jax.vmap(step, in_axes=(0, 0, None)))
    for batch in batches:
        vparams, vstate = vstep(vparams, vstate, batch)
    step = jax.jit(step)
    for s in range(seeds):
        p = jax.tree.map(lambda x, s=s: x[s], stacked)
        state = tx.init(p)
        for batch in batches:
            p, state = step(p, state, batch)
        # vmap batches the matmuls differently: the same up to float32 rounding.
        assert problem.relative_error(p, jax.tree.map(lambda x, s=s: x[s], vparams)) <= 1e-5
        assert int(ars2_jax.diagnostics(state)["sync_count"]) == int(
            ars2_jax.diagnostics(vstate)["sync_count"][s]
        )


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_params_keep_their_dtype(mode):
    params, batch = _params_and_batch(jnp.bfloat16)
    tx = jax_optimizer(mode)
    state = tx.init(params)
    grad_fn = jax.grad(lambda p: flax_loss(p, batch))

    @jax.jit
    def step(params, state):
        updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state, updates

    for _ in range(3):
        params, state, updates = step(params, state)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((params, updates)))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


def test_axis_name_pmeans_gradients_and_grad_fn_outputs():
    # Two per-device halves of a batch under vmap with an axis name equal one
    # optimizer on the full batch (the loss is linear in the data, so the mean of
    # the halves' gradients is the full batch's gradient). float64, so that the
    # comparison sees the semantics and not the rounding.
    halves = problem.batches(2)
    full = {n: (halves[0][n] + halves[1][n]) / 2 for n in halves[0]}

    def step(tx, params, state, batch):
        grad_fn = jax.grad(lambda p: flax_loss(p, batch))
        updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    with jax.enable_x64(True):
        params, _ = _params_and_batch(jnp.float64)
        tx_dp = jax_optimizer("delayed", axis_name="data")
        tx = jax_optimizer("delayed")
        per_device = {n: jnp.stack([jnp.asarray(h[n]) for h in halves]) for n in full}
        replicated = jax.tree.map(lambda x: jnp.stack([x, x]), (params, tx_dp.init(params)))
        dp = jax.jit(jax.vmap(lambda p, s, b: step(tx_dp, p, s, b), axis_name="data"))
        single_step = jax.jit(lambda p, s: step(tx, p, s, full))
        single = (params, tx.init(params))
        for _ in range(4):
            replicated = dp(*replicated, per_device)
            single = single_step(*single)
        for device in range(2):
            on_device = jax.tree.map(lambda x, d=device: np.asarray(x[d]), replicated[0])
            assert problem.relative_error(on_device, single[0]) <= 1e-12


# --- usability --------------------------------------------------------------------------


def test_sam_on_without_grad_fn_raises():
    params, batch = _params_and_batch()
    tx = jax_optimizer("sync")
    with pytest.raises(ValueError, match="grad_fn"):
        tx.update(loss_grad(params, batch), tx.init(params), params)


def test_sam_off_needs_no_grad_fn():
    params, batch = _params_and_batch()
    tx = jax_optimizer("base")
    updates, _ = tx.update(loss_grad(params, batch), tx.init(params), params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(learning_rate=-1.0), "learning_rate=-1.0"),
        (dict(b1=1.0), "b1=1.0"),
        (dict(b2=-0.1), "b2=-0.1"),
        (dict(eps=0.0), "eps=0.0"),
        (dict(weight_decay=-1.0), "weight_decay=-1.0"),
        (dict(adamw_b2=1.5), "adamw_b2=1.5"),
        (dict(ns_steps=0), "ns_steps=0"),
        (dict(ns_dtype=jnp.int32), "ns_dtype"),
        (dict(rho=-0.1), "rho=-0.1"),
        (dict(rho=0.1, k=-1), "k=-1"),
        (dict(rho=0.1, k=1, alpha=-0.5), "alpha=-0.5"),
        (dict(rho=0.1, adaptive=True, adaptive_beta=1.0), "adaptive_beta=1.0"),
        (dict(rho=0.1, adaptive=True, adaptive_lambda=-1.0), "adaptive_lambda=-1.0"),
        (dict(rho=0.1), "rho=0.1 turns SAM on"),
        (dict(k=3), "rho=0 turns SAM off"),
        (dict(adaptive=True), "rho=0 turns SAM off"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ars2_neo(**kwargs)


def test_unknown_label_and_vector_on_ars2_track_raise():
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    with pytest.raises(ValueError, match="'muon' to \\['w'\\]"):
        ars2_neo(param_labels={"w": "muon", "b": "adamw"}).init(params)
    with pytest.raises(ValueError, match="\\['b'\\] of shape \\(2,\\) on the 'ars2' track"):
        ars2_neo(param_labels=lambda p: jax.tree.map(lambda _: "ars2", p)).init(params)


def test_explicit_labels_and_prefix_labels():
    params = {"enc": {"w": jnp.ones((3, 2))}, "emb": jnp.ones((4, 2))}
    tx = ars2_neo(param_labels={"enc": "ars2", "emb": "adamw"})
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    adamw_only = optax.adamw(1e-3, weight_decay=0.01)
    expected, _ = adamw_only.update(grads["emb"], adamw_only.init(params["emb"]), params["emb"])
    np.testing.assert_allclose(updates["emb"], expected, rtol=1e-6)


def test_grad_fn_returning_another_structure_raises():
    params, batch = _params_and_batch()
    tx = jax_optimizer("sync")
    bad_grad_fn = lambda p: {"linear": p["linear"]}
    grads = loss_grad(params, batch)
    with pytest.raises(ValueError, match="grad_fn's output has the tree structure"):
        jax.jit(lambda s: tx.update(grads, s, params, grad_fn=bad_grad_fn))(tx.init(params))


def test_diagnostics_before_the_first_step():
    params, _ = _params_and_batch()
    diag = ars2_jax.diagnostics(jax_optimizer("delayed").init(params))
    assert {k: float(v) for k, v in diag.items()} == {
        "phi": 0.0,
        "phi_std": 0.0,
        "threshold": 0.0,
        "alpha_t": float(np.float32(problem.MODES["delayed"]["alpha"])),
        "sync_count": 0.0,
        "effective_k": 0.0,
        "step": 0.0,
        "skipped_steps": 0.0,
    }


def test_building_blocks_compose_with_plain_adam():
    # sharpness_aware around a plain Adam with the accessor for one Adam state.
    params = {"w": jnp.ones((4, 3))}
    target = jnp.arange(12.0).reshape(4, 3) / 12
    loss = lambda p: jnp.sum((p["w"] - target) ** 2)
    tx = sharpness_aware(
        optax.chain(
            optax.scale_by_adam(b2=0.99),
            orthogonalize_with_energy(ns_dtype=jnp.float32),
            optax.scale_by_learning_rate(0.05),
        ),
        adam_second_moments(0.99, 1e-8),
        rho=0.01,
        k=2,
        alpha=0.1,
    )

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params, grad_fn=jax.grad(loss))
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(200):
        params, state = step(params, state)
    assert float(loss(params)) < 1e-2


def test_flax_nnx_optimizer_with_sam():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(4, 16, rngs=rngs)
            self.out = nnx.Linear(16, 1, rngs=rngs)

        def __call__(self, x):
            return self.out(jax.nn.tanh(self.hidden(x)))

    model = Model(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (64, 4))
    y = jnp.sin(x[:, :1])
    loss_fn = lambda model, x, y: jnp.mean((model(x) - y) ** 2)
    optimizer = nnx.Optimizer(model, ars2_neo(1e-2, weight_decay=0.0, rho=0.05, k=3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads, grad_fn=nnx_grad_fn(model, loss_fn, x, y))
        return loss

    first = train_step(model, optimizer, x, y)
    for _ in range(60):
        last = train_step(model, optimizer, x, y)
    assert float(last) < 0.5 * float(first)
    assert int(ars2_jax.diagnostics(optimizer.opt_state)["sync_count"]) == 21


def test_nnx_grad_fn_is_the_gradient_at_the_given_params():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    loss_fn = lambda model, x: jnp.sum(model(x) ** 2)
    x = jnp.ones((2, 3))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    shifted = jax.tree.map(lambda p: p + 0.5, params)
    grad_fn = nnx_grad_fn(model, loss_fn, x)
    moved = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    nnx.update(moved, shifted)
    expected = nnx.as_pure(nnx.grad(loss_fn)(moved, x))
    chex.assert_trees_all_close(grad_fn(shifted), expected)


def test_train_state_forwards_grad_fn():
    params, batch = _params_and_batch()
    tx = jax_optimizer("delayed", ns_dtype=jnp.float32)
    state = TrainState.create(apply_fn=None, params=params, tx=tx)
    grad_fn = jax.grad(lambda p: flax_loss(p, batch))
    step = jax.jit(lambda s: s.apply_gradients(grads=grad_fn(s.params), grad_fn=grad_fn))
    for _ in range(4):
        state = step(state)
    assert int(state.step) == 4
    assert int(ars2_jax.diagnostics(state.opt_state)["sync_count"]) == 2


@pytest.mark.parametrize("rho, k", [(0.0, 0), (0.1, 1)])
def test_gradient_transform_clips_base_and_adversarial_gradients(rho, k):
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    loss = lambda p: jnp.sum((jnp.arange(4.0) @ p["w"] + p["b"]) ** 2)
    seen = []
    record = optax.GradientTransformation(
        optax.init_empty_state, lambda u, s, p=None: (seen.append(u) or u, s)
    )
    tx = sharpness_aware(
        optax.chain(record, optax.scale_by_adam()),
        adam_second_moments(0.999, 1e-8),
        rho=rho,
        k=k,
        gradient_transform=optax.clip_by_global_norm(1.0),
    )
    grads = jax.grad(loss)(params)  # norm ~ 100
    adversarial = lambda p: jax.tree.map(lambda g: 10.0 * g, jax.grad(loss)(p))
    tx.update(grads, tx.init(params), params, grad_fn=adversarial)
    assert float(optax.tree.norm(grads)) > 10
    assert float(optax.tree.norm(seen[-1])) == pytest.approx(1.0, rel=1e-5)


def test_run_jax_history_counts_steps():
    _, history = run_jax("delayed", steps=4, dtype=jnp.float32, ns_dtype=jnp.float32)
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert [h["sync"] for h in history] == [True, False, False, True]


def test_perturbation_norm_does_not_overflow_in_float32():
    # Step 1: n = g / eps * |θ| ~ 1e8 * 1e12; ‖n‖² would overflow float32.
    param = grad = jnp.full((4, 3), 1e6, jnp.float32)
    e = perturbation(param, grad, jnp.zeros_like(param), 0.99, 1e-8, 0.3, jnp.asarray(1))
    assert bool(jnp.all(jnp.isfinite(e)))
    assert float(jnp.linalg.norm(e)) == pytest.approx(0.3, rel=1e-5)
