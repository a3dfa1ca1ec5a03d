"""ars2_jax under bad input, odd shapes and long runs.

Convergence to known optima in every mode, degenerate tensors, non-finite
gradients, property-based checks of the pure functions, a 20 000-step run and
misuse. ``python -m tests.test_hardening_jax`` prints the convergence table the
tolerances of ``tests/convergence_problems.py`` come from.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

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
from tests import convergence_problems as cp
from tests import parity_problem as problem
from tests.oracle import NS_COEFFS, newton_schulz_closed_form
from tests.runners import jax_optimizer

MODES = list(problem.MODES)
NAN, INF = float("nan"), float("inf")
# Eager jnp ops compile one by one on first use: one compiled call per shape is cheaper.
jitted_newton_schulz = jax.jit(newton_schulz)


def assert_trees_bitwise_equal(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        assert np.asarray(a).dtype == np.asarray(b).dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# --- convergence to known optima ----------------------------------------------------------


def convergence_optimizer(name: str, problem_name: str) -> optax.GradientTransformation:
    """Configuration ``name`` of :data:`cp.OPTIMIZERS` with the cosine schedule of the problem."""
    schedule = optax.cosine_decay_schedule(cp.PEAK_LEARNING_RATE, cp.STEPS[problem_name])
    hp = cp.HYPERPARAMETERS
    adam = optax.adam(schedule, b1=hp["b1"], b2=hp["b2"], eps=hp["eps"])
    if name == "tracks_only":
        ars2_track = optax.chain(
            optax.scale_by_adam(b1=hp["b1"], b2=hp["b2"], eps=hp["eps"]),
            orthogonalize_with_energy(),
            optax.scale_by_learning_rate(schedule),
        )
        tracks = {"ars2": ars2_track, "adamw": adam}
        return optax.partition(tracks, ars2_jax.default_param_labels)
    if name == "sam_only":
        moments = adam_second_moments(hp["b2"], hp["eps"])
        return sharpness_aware(adam, moments, **cp.SAM_SETTINGS[name])
    return ars2_neo(schedule, **hp, **cp.SAM_SETTINGS[name])


def run_convergence(name: str, dtype) -> tuple[dict, dict]:
    """Every problem of ``cp.PROBLEMS`` under configuration ``name``, in one compiled call.

    Returns (final params per problem, max |θ − θ*| per problem). The params are
    kept in ``dtype``; the losses are computed in float32 from them.
    """

    @jax.jit
    def run(initial):
        finals = {}
        for problem_name in cp.PROBLEMS:
            tx = convergence_optimizer(name, problem_name)
            batch = {k: jnp.asarray(v, jnp.float32) for k, v in cp.data(problem_name).items()}

            def loss(params, problem_name=problem_name, batch=batch):
                upcast = jax.tree.map(lambda p: p.astype(jnp.float32), params)
                return cp.loss(problem_name, upcast, batch)

            def step(carry, _, tx=tx, loss=loss):
                params, state = carry
                grad_fn = jax.grad(loss)
                updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
                return (optax.apply_updates(params, updates), state), None

            start = initial[problem_name]
            (finals[problem_name], _), _ = jax.lax.scan(
                step, (start, tx.init(start)), length=cp.STEPS[problem_name]
            )
        return finals

    initial = {
        p: {k: jnp.asarray(v, dtype) for k, v in cp.initial_params(p).items()} for p in cp.PROBLEMS
    }
    finals = run(initial)
    return finals, {p: cp.max_error(finals[p], p) for p in cp.PROBLEMS}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", cp.OPTIMIZERS)
def test_converges_to_known_optimum(name, dtype):
    finals, errors = run_convergence(name, jnp.dtype(dtype))
    assert all(x.dtype == jnp.dtype(dtype) for x in jax.tree.leaves(finals))
    assert all_finite(finals)
    assert not cp.check_convergence(errors, dtype), cp.check_convergence(errors, dtype)


# --- non-finite gradients -----------------------------------------------------------------

# (which gradient, leaf, value, when): "later" is a step after the first whose kind
# (sync or not) the scenario needs, found from a clean run.
NON_FINITE = {
    "base_nan_in_matrix": ("base", "w", NAN, "later"),
    "base_inf_in_vector": ("base", "b", INF, "later"),
    "base_nan_on_first_step": ("base", "w", NAN, "first"),
    "adversarial_nan_in_matrix": ("adversarial", "w", NAN, "later"),
    "adversarial_inf_in_vector": ("adversarial", "b", -INF, "later"),
    "adversarial_nan_on_first_step": ("adversarial", "b", NAN, "first"),
}
CLEAN_STEPS = 8


@functools.cache
def poisonable_step(mode: str):
    """A jitted step of the regression problem that adds ``poison`` trees to the gradients.

    ``base_poison`` is added to the gradient at ``θ``, ``adversarial_poison`` to
    every gradient ``grad_fn`` returns: zeros leave a step as it was.
    """
    tx = ars2_neo(**cp.NON_FINITE_HYPERPARAMETERS, **problem.sam_settings(mode))

    @jax.jit
    def step(params, state, batch, base_poison, adversarial_poison):
        grad = jax.grad(lambda p: cp.loss("regression", p, batch))
        grads = jax.tree.map(jnp.add, grad(params), base_poison)
        grad_fn = lambda p: jax.tree.map(jnp.add, grad(p), adversarial_poison)
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state, updates

    return tx, step


def regression_params_and_batches():
    params = {k: jnp.asarray(v, jnp.float32) for k, v in cp.initial_params("regression").items()}
    batches = [
        {n: jnp.asarray(x, jnp.float32) for n, x in b.items()}
        for b in cp.regression_minibatches(CLEAN_STEPS)
    ]
    return params, batches


@functools.cache
def clean_run(mode: str):
    """(final params, final state, sync flag per step) of ``CLEAN_STEPS`` clean steps."""
    tx, step = poisonable_step(mode)
    params, batches = regression_params_and_batches()
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    syncs = []
    for batch in batches:
        before = int(state.sync_count)
        params, state, _ = step(params, state, batch, zeros, zeros)
        syncs.append(int(state.sync_count) > before)
    return params, state, syncs


def poisoned_step_number(syncs: list[bool], gradient: str, when: str) -> int:
    if when == "first":
        return 1
    # The adversarial gradient exists on sync steps only; a NaN in the base gradient
    # is checked on a step that would not sync where the mode has one.
    wanted = gradient == "adversarial"
    later = [t for t, sync in enumerate(syncs, start=1) if t > 1 and sync == wanted]
    return later[0] if later else 3


@pytest.mark.parametrize(
    "mode, scenario",
    [
        (mode, scenario)
        for mode in MODES
        for scenario in NON_FINITE
        if mode != "base" or NON_FINITE[scenario][0] == "base"
    ],
)
def test_non_finite_gradient_skips_the_step_and_leaves_everything_untouched(mode, scenario):
    gradient, leaf, value, when = NON_FINITE[scenario]
    tx, step = poisonable_step(mode)
    expected_params, expected_state, syncs = clean_run(mode)
    bad_step = poisoned_step_number(syncs, gradient, when)
    assert gradient == "base" or syncs[bad_step - 1]

    params, batches = regression_params_and_batches()
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    poisoned = dict(zeros)
    poisoned[leaf] = zeros[leaf].reshape(-1).at[1].set(value).reshape(zeros[leaf].shape)
    base_poison, adversarial_poison = (poisoned, zeros) if gradient == "base" else (zeros, poisoned)
    for t, batch in enumerate(batches, start=1):
        if t == bad_step:
            after, after_state, updates = step(
                params, state, batch, base_poison, adversarial_poison
            )
            assert_trees_bitwise_equal(after, params)
            assert all(not jnp.any(u) for u in jax.tree.leaves(updates))
            assert int(ars2_jax.diagnostics(after_state)["skipped_steps"]) == 1
            assert_trees_bitwise_equal(
                after_state._replace(skipped_steps=state.skipped_steps), state
            )
            params, state = after, after_state
        params, state, _ = step(params, state, batch, zeros, zeros)
    # The skipped step left no trace: the run continues exactly as the clean one.
    assert_trees_bitwise_equal(params, expected_params)
    assert_trees_bitwise_equal(
        state._replace(skipped_steps=expected_state.skipped_steps), expected_state
    )
    assert int(ars2_jax.diagnostics(state)["skipped_steps"]) == 1


def test_apply_if_finite_alone_misses_a_non_finite_adversarial_gradient():
    # Why the skip lives inside the SAM wrapper: optax.apply_if_finite sees only g.
    params, batches = regression_params_and_batches()
    sync = ars2_neo(**cp.NON_FINITE_HYPERPARAMETERS, **problem.sam_settings("sync"))
    tx = optax.apply_if_finite(sync, max_consecutive_errors=10)
    state = tx.init(params)
    grad = jax.grad(lambda p: cp.loss("regression", p, batches[0]))
    nan_grad_fn = lambda p: jax.tree.map(lambda g: g * NAN, grad(p))
    update = jax.jit(lambda state: tx.update(grad(params), state, params, grad_fn=nan_grad_fn))
    updates, state = update(state)
    assert int(state.notfinite_count) == 0
    assert int(ars2_jax.diagnostics(state.inner_state)["skipped_steps"]) == 1
    assert all(not jnp.any(u) for u in jax.tree.leaves(updates))


# --- degenerate tensors -------------------------------------------------------------------

# Flax layouts. The gradient of every leaf is fixed by its kind (see degenerate_loss).
DEGENERATE_SHAPES = {
    "row": (1, 4096),
    "column": (4096, 1),
    "rank_one": (6, 4),
    "all_equal": (5, 3),
    "zero_gradient": (3, 4),
    "five_d": (2, 3, 2, 2, 4),
    "scalar": (),
    "vector": (5,),
}
# float32 Newton-Schulz, so that the closed forms below hold to float32 rounding
# (test_newton_schulz_of_rows_columns_and_five_d_follow_the_closed_form covers the
# default bfloat16 iteration on the same shapes).
DEGENERATE_HPARAMS = dict(learning_rate=0.01, b2=0.99, weight_decay=0.1, ns_dtype=jnp.float32)
DEGENERATE_STEPS = 6
# SAM off, and the adaptive mode, whose steps take every branch of the wrapper
# (step-1 sync, φ-triggered and fallback syncs, shear injection).
DEGENERATE_MODES = ["base", "adaptive"]


def degenerate_setup():
    rng = np.random.default_rng(0)
    params, linear = {}, {}
    for name, shape in DEGENERATE_SHAPES.items():
        params[name] = (
            jnp.zeros(shape)
            if name in ("rank_one", "all_equal")
            else jnp.asarray(rng.standard_normal(shape), jnp.float32)
        )
        linear[name] = rng.standard_normal(shape)
    linear["rank_one"] = np.outer(rng.standard_normal(6), rng.standard_normal(4))
    linear["all_equal"] = np.full((5, 3), 0.7)
    linear["zero_gradient"] = np.zeros((3, 4))
    return params, {n: jnp.asarray(x, jnp.float32) for n, x in linear.items()}


def degenerate_loss(params, linear):
    """``Σ ⟨G, θ⟩ + ¼ θ⁴`` per leaf, and a constant in ``zero_gradient``.

    From ``θ = 0`` the first gradient of ``rank_one`` is the rank-1 ``G`` and the
    gradient of ``all_equal`` stays all-equal at every step (every entry of it sees
    the same history).
    """
    total = 0.0
    for name, p in params.items():
        if name == "zero_gradient":
            continue
        total = total + jnp.sum(linear[name] * p + 0.25 * p**4)
    return total


@functools.cache
def degenerate_run(mode: str):
    """``DEGENERATE_STEPS`` steps: (the updates of every step, final params, final state)."""
    tx = ars2_neo(**DEGENERATE_HPARAMS, **problem.sam_settings(mode))
    params, linear = degenerate_setup()
    grad_fn = jax.grad(lambda p: degenerate_loss(p, linear))

    @jax.jit
    def run(params):
        def step(carry, _):
            params, state = carry
            updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
            return (optax.apply_updates(params, updates), state), updates

        (params, state), updates = jax.lax.scan(
            step, (params, tx.init(params)), length=DEGENERATE_STEPS
        )
        return updates, params, state

    return run(params)


@functools.cache
def degenerate_reference_steps():
    """The first step of ``optax.adam`` on every leaf and of ``optax.adamw`` (the
    AdamW track's settings), computed in one jitted call."""
    lr, b2 = DEGENERATE_HPARAMS["learning_rate"], DEGENERATE_HPARAMS["b2"]
    adam = optax.adam(lr, b2=b2)
    adamw = optax.adamw(lr, b2=b2, weight_decay=DEGENERATE_HPARAMS["weight_decay"])
    params, linear = degenerate_setup()

    @jax.jit
    def steps(params):
        grads = jax.grad(lambda p: degenerate_loss(p, linear))(params)
        return (
            adam.update(grads, adam.init(params))[0],
            adamw.update(grads, adamw.init(params), params)[0],
        )

    return steps(params)


def quintic_iterate(x: float = 1.0, steps: int = 5) -> float:
    a, b, c = NS_COEFFS
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


@pytest.mark.parametrize("mode", DEGENERATE_MODES)
def test_degenerate_tensors_stay_finite_and_behave_as_documented(mode):
    updates, final, state = degenerate_run(mode)
    params, linear = degenerate_setup()
    assert all_finite((final, state))
    assert all(final[n].shape == params[n].shape for n in params)

    # Zero gradient: weight decay alone, at every step and in every mode.
    decay = (1 - DEGENERATE_HPARAMS["learning_rate"] * DEGENERATE_HPARAMS["weight_decay"]) ** (
        DEGENERATE_STEPS
    )
    np.testing.assert_allclose(final["zero_gradient"], params["zero_gradient"] * decay, rtol=1e-5)

    # All-equal gradients: the matrix stays all-equal (up to the order in which a
    # matmul sums equal terms).
    assert float(jnp.ptp(final["all_equal"])) <= 1e-6 * float(jnp.max(jnp.abs(final["all_equal"])))

    # Step 1 (Adam's u is sign(g) up to eps): the rank-1 ``G`` and the all-equal
    # matrix are rank 1, and NS of a rank-1 matrix is f⁵(1)·u/‖u‖ (SPEC §3 with one
    # singular value ‖u‖), so the step is -lr · f⁵(1) · sign(g) entrywise; weight
    # decay does not move a zero matrix. Tolerance: float32 rounding in the null
    # space of a rank-1 matrix is amplified by f⁵'(0) = a⁵ ≈ 490 (measured 2e-4).
    lr = DEGENERATE_HPARAMS["learning_rate"]
    for name in ("rank_one", "all_equal"):
        expected = -lr * quintic_iterate() * np.sign(np.asarray(linear[name]))
        np.testing.assert_allclose(updates[name][0], expected, rtol=1e-3, err_msg=name)

    if mode == "base":
        # 1×N and N×1 are rank 1 at every step: the ARS2 track is Adam scaled by
        # f⁵(1) ≈ 0.70, weight decay aside. Scalars and vectors are on AdamW.
        adam_steps, adamw_steps = degenerate_reference_steps()
        for name in ("row", "column"):
            decay_step = -lr * DEGENERATE_HPARAMS["weight_decay"] * params[name]
            np.testing.assert_allclose(
                updates[name][0] - decay_step,
                quintic_iterate() * adam_steps[name],
                rtol=1e-5,
                atol=1e-9,
                err_msg=name,
            )
        for name in ("scalar", "vector"):
            np.testing.assert_allclose(updates[name][0], adamw_steps[name], rtol=1e-6, err_msg=name)


def test_newton_schulz_of_rows_columns_and_five_d_follow_the_closed_form():
    # A 1×N or N×1 matrix has one singular value, ‖x‖: NS(x) = f⁵(‖x‖/(‖x‖ + ns_eps))·x/‖x‖.
    rng = np.random.default_rng(5)
    for shape in [(1, 4096), (4096, 1), (1, 7), (1, 1), (3, 1)]:
        x = rng.standard_normal(shape)
        expected = quintic_iterate(np.linalg.norm(x) / (np.linalg.norm(x) + 1e-7))
        expected = expected * x / np.linalg.norm(x)
        with jax.enable_x64(True):
            actual = jitted_newton_schulz(jnp.asarray(x))
        np.testing.assert_allclose(actual, expected, atol=1e-12)
        # The default bfloat16 iteration on float32 input rounds the scalar f⁵ chain
        # at each step: measured up to 5.4% off (1×7), the direction exact.
        default = np.asarray(jitted_newton_schulz(jnp.asarray(x, jnp.float32)), np.float64)
        np.testing.assert_allclose(default, expected, rtol=0.08, atol=0)
        cosine = np.sum(default * x) / (np.linalg.norm(default) * np.linalg.norm(x))
        assert cosine > 1 - 1e-4
    with jax.enable_x64(True):
        # 5-D (…, out) -> the matrix (rest, out).
        five_d = rng.standard_normal((2, 3, 2, 2, 4))
        expected = newton_schulz_closed_form(five_d.reshape(-1, 4)).reshape(five_d.shape)
        np.testing.assert_allclose(jitted_newton_schulz(jnp.asarray(five_d)), expected, atol=1e-10)
    assert not np.any(np.asarray(jitted_newton_schulz(jnp.zeros((1, 4096)))))


@pytest.mark.parametrize("mode", MODES)
def test_empty_parameter_tree_is_a_counted_no_op(mode):
    tx = jax_optimizer(mode)
    state = tx.init({})
    updates, state = tx.update({}, state, {}, grad_fn=lambda p: {})
    assert updates == {}
    diag = ars2_jax.diagnostics(state)
    assert int(diag["step"]) == 1 and int(diag["skipped_steps"]) == 0
    assert all_finite(diag)


@pytest.mark.parametrize("b2, decays", [(0.999, False), (0.99, True)])
def test_bfloat16_second_moment_stops_decaying_when_b2_is_too_close_to_one(b2, decays):
    # Documented limitation: bfloat16 params keep bfloat16 moments. A Python b2
    # meets a bf16 moment as a bf16 number, and bf16(0.999) == 1.0 (bf16(0.99) is
    # 0.988); an injected float32 b2 fares no better, as ν·b2 then rounds back to
    # ν. After 100 gradients of 1 and 200 of 0, exact arithmetic leaves ν at 0.82x
    # (b2 0.999) or 0.13x (b2 0.99) of its value at step 100.
    tx = ars2_neo(1e-3, b2=b2, weight_decay=0.0)
    params = {"w": jnp.ones((2, 2), jnp.bfloat16)}

    @jax.jit
    def second_moments(state):
        def step(state, gradient):
            grads = {"w": jnp.full((2, 2), gradient, jnp.bfloat16)}
            state = tx.update(grads, state, params)[1]
            ars2_track = state.inner_state.inner_states["ars2"]
            return state, optax.tree_utils.tree_get(ars2_track, "nu")["w"]

        gradients = jnp.concatenate([jnp.ones(100), jnp.zeros(200)])
        return jax.lax.scan(step, state, gradients)[1]

    nu = np.asarray(second_moments(tx.init(params)), np.float64)
    ratio = np.max(nu[-1] / nu[99])
    assert ratio < 0.5 if decays else ratio == 1.0


# --- properties (hypothesis) --------------------------------------------------------------

SCALES = st.floats(min_value=-4, max_value=4).map(lambda e: 10.0**e)
SIDES = st.sampled_from([1, 2, 3, 5, 8])


@settings(max_examples=20, deadline=None)
@given(
    matrix=st.tuples(st.sampled_from([1, 2]), SIDES, SIDES).flatmap(
        lambda shape: hnp.arrays(
            np.float64, shape, elements=st.floats(-1, 1, allow_subnormal=False)
        )
    ),
    scale=SCALES,
)
def test_property_newton_schulz_equals_svd_closed_form(matrix, scale):
    matrix = matrix * scale
    with jax.enable_x64(True):
        actual = np.asarray(jitted_newton_schulz(jnp.asarray(matrix)))
    for index, slice_ in enumerate(matrix):
        expected = newton_schulz_closed_form(slice_)
        # float64 iteration vs float64 SVD: both ~1e-15; the closed form's polynomial
        # amplifies a rounding of tiny singular values by at most f⁵'(0) = a⁵ ≈ 490.
        np.testing.assert_allclose(actual[index], expected, rtol=0, atol=1e-10)


VECTOR_SHAPES = st.sampled_from([(3,), (2, 3), (4, 1), (2, 2, 3)])
VALUES = st.floats(-10, 10, allow_subnormal=False, width=32)


@functools.cache
def perturbation_norm_fn():
    return jax.jit(
        lambda p, g, v, b2, rho, t: jnp.linalg.norm(perturbation(p, g, v, b2, 1e-8, rho, t))
    )


@settings(max_examples=25, deadline=None)
@given(
    arrays=VECTOR_SHAPES.flatmap(
        lambda shape: st.tuples(*(hnp.arrays(np.float32, shape, elements=VALUES),) * 3)
    ),
    rho=st.floats(1e-3, 10),
    b2=st.floats(0.5, 0.999),
    step=st.integers(1, 1000),
)
def test_property_perturbation_has_norm_rho_per_tensor(arrays, rho, b2, step):
    param, grad, nu = arrays
    nu = np.abs(nu) * (step > 1)  # the second moment is 0 before the first step
    # A zero direction (g·θ = 0 entrywise) gives e = 0, documented; here it is not.
    assume(np.linalg.norm(param.astype(np.float64) * grad) > 1e-2)
    norm = float(perturbation_norm_fn()(param, grad, nu, b2, rho, step))
    # float32 norms: a relative error of a few 1e-7.
    assert norm == pytest.approx(rho, rel=1e-5)


@functools.cache
def shear_fn():
    return jax.jit(lambda adversarial, grad: jnp.vdot(shear_force(adversarial, grad), grad))


@settings(max_examples=25, deadline=None)
@given(
    arrays=VECTOR_SHAPES.flatmap(
        lambda shape: st.tuples(*(hnp.arrays(np.float32, shape, elements=VALUES),) * 2)
    ),
)
def test_property_shear_force_is_orthogonal_to_the_gradient(arrays):
    grad, adversarial = arrays
    grad64, delta64 = grad.astype(np.float64), adversarial.astype(np.float64) - grad
    assume(np.linalg.norm(grad64) > 1e-3)
    inner = abs(float(shear_fn()(adversarial, grad)))
    # ⟨v, g⟩ = ⟨Δ, g⟩·tiny/(‖g‖² + tiny) exactly, plus float32 rounding of a few
    # ulps of ‖Δ‖‖g‖ (Δ = g_adv − g, the vector the shear is computed from).
    scale = np.linalg.norm(delta64) * np.linalg.norm(grad64)
    assert inner <= 1e-5 * scale + ars2_jax.TINY / np.linalg.norm(grad64) ** 2 * scale + 1e-30


ZERO_GRADIENT_SHAPES = {"w": (3, 4), "b": (4,), "heads": (2, 3, 2)}
# XLA on CPU flushes subnormal results to zero: keep lr·wd·θ out of that range.
NORMAL_VALUES = VALUES.filter(lambda x: x == 0 or abs(x) > 1e-30)


@functools.cache
def zero_gradient_step(mode: str):
    """One jitted first step with zero gradients, learning rate and weight decay as inputs."""
    injected = optax.inject_hyperparams(ars2_neo, static_args=ars2_jax.STATIC_ARGS)
    # learning_rate and weight_decay must be passed to become injected hyperparameters.
    tx = injected(learning_rate=0.0, weight_decay=0.0, **problem.sam_settings(mode))
    zero_grad_fn = lambda p: jax.tree.map(jnp.zeros_like, p)

    @jax.jit
    def step(params, learning_rate, weight_decay):
        state = tx.init(params)
        state.hyperparams["learning_rate"] = learning_rate
        state.hyperparams["weight_decay"] = weight_decay
        updates, state = tx.update(zero_grad_fn(params), state, params, grad_fn=zero_grad_fn)
        return optax.apply_updates(params, updates), state

    return step


@settings(max_examples=20, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    params=st.fixed_dictionaries(
        {
            name: hnp.arrays(np.float32, shape, elements=NORMAL_VALUES)
            for name, shape in ZERO_GRADIENT_SHAPES.items()
        }
    ),
    learning_rate=st.floats(0, 1, width=32, allow_subnormal=False),
    weight_decay=st.floats(0, 1, width=32, allow_subnormal=False),
)
def test_property_zero_gradient_step_from_fresh_state_is_weight_decay_alone(
    mode, params, learning_rate, weight_decay
):
    after, state = zero_gradient_step(mode)(
        params, np.float32(learning_rate), np.float32(weight_decay)
    )
    factor = 1 - float(learning_rate) * float(weight_decay)
    for name, value in params.items():
        value = value.astype(np.float64)
        # optax computes θ − lr·(wd·θ) in float32: a few ulps of |θ|·(1 + lr·wd).
        tolerance = 4 * np.finfo(np.float32).eps * np.abs(value) * (2 - factor)
        assert np.all(np.abs(np.asarray(after[name], np.float64) - value * factor) <= tolerance)
    assert all_finite(ars2_jax.diagnostics(state))


# --- a long run ---------------------------------------------------------------------------

LONG_RUN_SETTINGS = dict(
    learning_rate=3e-3, b2=0.999, weight_decay=0.0, rho=0.05, k=10, alpha=0.1, adaptive=True
)
# Measured: 0.64 at the start, 1.7e-4 after 20 000 steps; a run that diverged or
# stalled would stay far above the bound.
LONG_RUN_LOSS_BOUND = 2e-3


def test_twenty_thousand_adaptive_steps_stay_finite_bounded_and_converge():
    tx = ars2_neo(**LONG_RUN_SETTINGS)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in cp.mlp_params().items()}
    batch = {k: jnp.asarray(v, jnp.float32) for k, v in cp.mlp_data().items()}
    loss = lambda p: cp.mlp_loss(p, batch, jnp.tanh)
    grad_fn = jax.grad(loss)
    initial_state = tx.init(params)

    def run(params, state):
        def step(carry, _):
            params, state = carry
            value, grads = jax.value_and_grad(loss)(params)
            updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
            diag = ars2_jax.diagnostics(state)
            return (optax.apply_updates(params, updates), state), (value, diag)

        return jax.lax.scan(step, (params, state), length=cp.LONG_RUN_STEPS)

    # conftest.py lowers XLA's optimization level to compile short tests fast; this
    # loop is bound by its run time (about 3x slower at level 0), so it asks for more.
    compiled = (
        jax.jit(run).lower(params, initial_state).compile({"xla_backend_optimization_level": 2})
    )
    (final, state), (losses, diags) = compiled(params, initial_state)
    losses = np.asarray(losses)
    assert np.all(np.isfinite(losses)) and all_finite((final, state, diags))
    final_loss = float(loss(final))
    assert final_loss < LONG_RUN_LOSS_BOUND, f"final loss {final_loss:.2e}, first {losses[0]:.2e}"
    # No state that grows: the same leaves, shapes and dtypes as at init, and the
    # adaptive scalars within their analytic bounds at every step (|φ| <= 1 by
    # Cauchy-Schwarz, so its EMA of φ² <= 1 and α_t <= α·2^γ).
    assert jax.tree.structure(state) == jax.tree.structure(initial_state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(initial_state)):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert np.max(np.abs(diags["phi"])) <= 1 + 1e-6
    assert np.max(diags["phi_std"]) <= 1 + 1e-6
    assert np.max(diags["alpha_t"]) <= LONG_RUN_SETTINGS["alpha"] * 2**2 * (1 + 1e-6)
    assert int(state.step) == cp.LONG_RUN_STEPS and int(state.skipped_steps) == 0
    assert 1 < int(state.sync_count) < cp.LONG_RUN_STEPS


# --- misuse -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(learning_rate="0.1"), "learning_rate='0.1' must be a finite real number"),
        (dict(b1=(0.9,)), "b1=\\(0.9,\\) must be a finite real number"),
        (dict(b2="0.999"), "b2='0.999'"),
        (dict(eps=None), "eps=None"),
        (dict(weight_decay=True), "weight_decay=True"),
        (dict(learning_rate=INF), "learning_rate=inf must be a finite real number"),
        (dict(learning_rate=jnp.ones(2)), "learning_rate=Array"),
        (dict(rho=None), "rho=None"),
        (dict(rho="0.1", k=1), "rho='0.1'"),
        (dict(rho=NAN, k=1), "rho=nan"),
        (dict(rho=0.1, k=2.0), "k=2.0 must be a static integer"),
        (dict(rho=0.1, k=1, adaptive=1), "adaptive=1 must be a bool"),
        (dict(rho=0.1, k=1, alpha="x"), "alpha='x'"),
        (dict(rho=0.1, adaptive=True, adaptive_beta=None), "adaptive_beta=None"),
        (dict(rho=0.1, adaptive=True, adaptive_gamma=[2.0]), "adaptive_gamma=\\[2.0\\]"),
        (dict(adamw_learning_rate="1e-3"), "adamw_learning_rate='1e-3'"),
        (dict(ns_steps=5.0), "ns_steps=5.0"),
        (dict(ns_dtype="float33"), "ns_dtype='float33'"),
    ],
)
def test_wrong_types_raise_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ars2_neo(**kwargs)


def test_building_blocks_reject_wrong_types():
    with pytest.raises(ValueError, match=re.escape("rho='0.05'")):
        sharpness_aware(optax.adam(1e-3), adam_second_moments(0.999, 1e-8), rho="0.05", k=1)
    with pytest.raises(ValueError, match=re.escape("ns_dtype='float33'")):
        orthogonalize_with_energy(ns_dtype="float33")
    with pytest.raises(ValueError, match=re.escape("ns_dtype=<class 'jax.numpy.int32'>")):
        orthogonalize_with_energy(ns_dtype=jnp.int32)


def test_schedules_and_injected_hyperparameters_still_pass_validation():
    ars2_neo(learning_rate=optax.linear_schedule(1e-3, 0.0, 10), rho=0.1, k=1)
    ars2_neo(learning_rate=np.float32(1e-3), b2=jnp.asarray(0.99))
    injected = optax.inject_hyperparams(ars2_neo, static_args=ars2_jax.STATIC_ARGS)
    params = {"w": jnp.ones((3, 2))}
    tx = injected(learning_rate=1e-3, rho=0.1, k=1)
    step = jax.jit(lambda s: tx.update(params, s, params, grad_fn=lambda p: p))
    _, state = step(tx.init(params))
    assert int(ars2_jax.diagnostics(state)["sync_count"]) == 1


def _small_params():
    return {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}


@pytest.mark.parametrize(
    "grad_fn, message",
    [
        (lambda p: None, "grad_fn's output has the tree structure PyTreeDef\\(None\\)"),
        # jax.value_and_grad where jax.grad was meant.
        (lambda p: (1.0, p), "grad_fn's output has the tree structure PyTreeDef\\(\\(\\*,"),
        (lambda p: {"w": p["w"].T, "b": p["b"]}, "leaf \\['w'\\] of shape \\(2, 3\\)"),
    ],
)
def test_grad_fn_of_the_wrong_kind_raises(grad_fn, message):
    params = _small_params()
    tx = ars2_neo(rho=0.1, k=1)
    with pytest.raises(ValueError, match=message):
        tx.update(params, tx.init(params), params, grad_fn=grad_fn)


@pytest.mark.parametrize(
    "grads, message",
    [
        ({"w": jnp.ones((3, 2))}, "the gradient has the tree structure"),
        ({"w": jnp.ones((2, 3)), "b": jnp.zeros(2)}, "the gradient has a leaf \\['w'\\]"),
    ],
)
def test_gradients_shaped_unlike_the_params_raise(grads, message):
    params = _small_params()
    tx = ars2_neo()
    with pytest.raises(ValueError, match=message):
        tx.update(grads, tx.init(params), params)


def test_labels_that_do_not_fit_the_params_raise():
    params = _small_params()
    with pytest.raises(ValueError, match="param_labels must be a tree"):
        ars2_neo(param_labels={"w": "ars2"}).init(params)
    with pytest.raises(ValueError, match="param_labels must be a tree"):
        ars2_neo(param_labels=lambda p: {"w": "ars2", "b": None}).init(params)


if __name__ == "__main__":
    for dtype in ("float32", "bfloat16"):
        for name in cp.OPTIMIZERS:
            _, errors = run_convergence(name, jnp.dtype(dtype))
            print(dtype, name, " ".join(f"{p}={e:.1e}" for p, e in errors.items()), flush=True)
