"""ars2_jax.convert: a run moved between PyTorch and JAX continues as if it had not moved."""

from __future__ import annotations

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ars2_jax import convert
from tests import checkpoint_runs as runs
from tests import parity_problem as problem
from tests.runners import DIAGNOSTICS, jax_optimizer

# The parity fixture's tensors in the two layouts: Linear and conv are transposed.
LAYOUTS = {"linear": "linear", "conv": "conv"}
NAME_MAP = {name: ((name,), LAYOUTS.get(name, "same")) for name in problem.SHAPES}
# SPEC §6b, float32 with a float32 Newton-Schulz (as tests/test_jax_parity.py).
TOLERANCE = 1e-5


def jax_state(position: int):
    """The JAX run after ``position`` steps."""
    state, history = runs.jax_run(runs.jax_train_state(), position)
    return state["params"], state["opt_state"], history


@functools.cache
def jax_reference():
    return jax_state(runs.STEPS)


@functools.cache
def torch_reference():
    params, optimizer, generator = runs.torch_objects()
    history = runs.torch_run(params, optimizer, generator, 0, runs.STEPS)
    return runs.torch_numpy(params), history


def continue_in_jax(params, opt_state):
    state = {"params": params, "opt_state": opt_state, "rng": jax.random.key(0), "epoch": 0}
    state, history = runs.jax_run({**state, "position": runs.SPLIT}, runs.STEPS)
    return state["params"], history


def torch_layout(params) -> dict[str, np.ndarray]:
    return {n: problem.from_flax(n, np.asarray(p, np.float64)) for n, p in params.items()}


def assert_same_course(history, reference) -> None:
    """Same sync pattern; diagnostics within the float32 parity tolerance."""
    assert [int(h["sync_count"]) for h in history] == [int(r["sync_count"]) for r in reference]
    for step, (h, r) in enumerate(zip(history, reference), start=1):
        for key in DIAGNOSTICS:
            np.testing.assert_allclose(
                float(h[key]), float(r[key]), rtol=0, atol=TOLERANCE, err_msg=f"{key}, {step}"
            )


def test_layouts_are_inverse_and_transpose_as_spec_says():
    linear, conv = np.zeros((6, 5)), np.zeros((4, 3, 3, 2))  # (out, in), (out, in, kh, kw)
    assert convert.to_jax_layout(linear, "linear").shape == (5, 6)
    assert convert.to_jax_layout(conv, "conv").shape == (3, 2, 3, 4)  # (kh, kw, in, out)
    rng = np.random.default_rng(0)
    for layout, shape in [("linear", (6, 5)), ("conv", (4, 3, 3, 2)), ("conv", (4, 3, 5))]:
        array = rng.standard_normal(shape)
        back = convert.to_torch_layout(convert.to_jax_layout(array, layout), layout)
        np.testing.assert_array_equal(back, array)
    # The parity fixture's own mapping agrees.
    for name in ("linear", "conv"):
        array = rng.standard_normal(problem.SHAPES[name])
        np.testing.assert_array_equal(
            convert.to_jax_layout(array, LAYOUTS[name]), problem.to_flax(name, array)
        )


def test_torch_then_jax_matches_jax_throughout():
    expected, _, reference = jax_reference()
    params, optimizer, generator = runs.torch_objects()
    history = runs.torch_run(params, optimizer, generator, 0, runs.SPLIT)
    jax_params, opt_state = convert.torch_to_jax(
        params,
        optimizer,
        params_like=runs.jax_params(),
        opt_state_like=runs.jax_tx().init(runs.jax_params()),
        name_map=NAME_MAP,
    )
    final, rest = continue_in_jax(jax_params, opt_state)
    assert problem.relative_error(torch_layout(final), torch_layout(expected)) <= TOLERANCE
    assert_same_course(history + rest, reference)
    # The moved half has syncs and shear injections both.
    syncs = np.diff([int(r["sync_count"]) for r in reference[runs.SPLIT - 1 :]])
    assert 0 < syncs.sum() < len(syncs)


def test_jax_then_torch_matches_torch_throughout():
    expected, reference = torch_reference()
    jax_params, opt_state, history = jax_state(runs.SPLIT)
    params, optimizer, generator = runs.torch_objects()
    convert.jax_to_torch(jax_params, opt_state, params, optimizer, name_map=NAME_MAP)
    rest = runs.torch_run(params, optimizer, generator, runs.SPLIT, runs.STEPS)
    final = {n: p.astype(np.float64) for n, p in runs.torch_numpy(params).items()}
    assert problem.relative_error(final, expected) <= TOLERANCE
    assert_same_course(history + rest, reference)


def test_round_trips_are_exact():
    jax_params, opt_state, _ = jax_state(3)
    params, optimizer, _ = runs.torch_objects()
    convert.jax_to_torch(jax_params, opt_state, params, optimizer, name_map=NAME_MAP)
    assert {int(optimizer.state[p]["step"]) for p in params.values()} == {3}
    assert all("shear_force" in optimizer.state[p] for p in params.values())
    back_params, back_state = convert.torch_to_jax(
        params,
        optimizer,
        params_like=runs.jax_params(),
        opt_state_like=runs.jax_tx().init(runs.jax_params()),
        name_map=NAME_MAP,
    )
    # float32 -> torch (float32 tensors, float64 scalars) -> float32: every bit back.
    for a, b in zip(
        jax.tree.leaves((back_params, back_state)), jax.tree.leaves((jax_params, opt_state))
    ):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(back_state) == jax.tree.structure(opt_state)


def test_fresh_states_convert_both_ways():
    params, optimizer, _ = runs.torch_objects()
    jax_params, opt_state = convert.torch_to_jax(
        params,
        optimizer,
        params_like=runs.jax_params(),
        opt_state_like=runs.jax_tx().init(runs.jax_params()),
        name_map=NAME_MAP,
    )
    fresh = runs.jax_tx().init(runs.jax_params())
    for a, b in zip(jax.tree.leaves(opt_state), jax.tree.leaves(fresh)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    convert.jax_to_torch(jax_params, opt_state, params, optimizer, name_map=NAME_MAP)
    assert not optimizer.state and optimizer.sam_state["step"] == 0


def torch_after(steps: int):
    params, optimizer, generator = runs.torch_objects()
    runs.torch_run(params, optimizer, generator, 0, steps)
    return params, optimizer


def to_jax(params, optimizer, tx=None, name_map=NAME_MAP):
    return convert.torch_to_jax(
        params,
        optimizer,
        params_like=runs.jax_params(),
        opt_state_like=(tx or runs.jax_tx()).init(runs.jax_params()),
        name_map=name_map,
    )


def test_unequal_per_tensor_steps_are_listed():
    params, optimizer = torch_after(2)
    optimizer.state[params["bias"]]["step"] = 1
    optimizer.state[params["conv"]]["step"] = 3
    with pytest.raises(ValueError, match=r"optax keeps one step count.*\{'conv': 3, 'bias': 1\}"):
        to_jax(params, optimizer)


def test_other_sam_mode_is_refused():
    params, optimizer = torch_after(1)
    with pytest.raises(ValueError, match=r"the SAM modes differ.*keeps shear force.*has none"):
        to_jax(params, optimizer, tx=jax_optimizer("sync", ns_dtype=jnp.float32))
    jax_params = runs.jax_params()
    opt_state = jax_optimizer("sync").init(jax_params)
    with pytest.raises(ValueError, match="the SAM modes differ"):
        convert.jax_to_torch(jax_params, opt_state, params, optimizer, name_map=NAME_MAP)


def test_name_map_errors_name_the_parameter():
    params, optimizer = torch_after(0)
    with pytest.raises(ValueError, match="no JAX path for the torch parameter 'heads'"):
        to_jax(params, optimizer, name_map={n: v for n, v in NAME_MAP.items() if n != "heads"})
    wrong_layout = {**NAME_MAP, "linear": (("linear",), "same")}
    with pytest.raises(ValueError, match=r"'linear' of shape \(6, 5\) is \(6, 5\) in the 'same'"):
        to_jax(params, optimizer, name_map=wrong_layout)
    with pytest.raises(ValueError, match=r"sends 'bias' to \('nope',\)"):
        to_jax(params, optimizer, name_map={**NAME_MAP, "bias": ("nope", "same")})
    with pytest.raises(ValueError, match=r"sends both 'linear' and 'heads' to \('linear',\)"):
        to_jax(params, optimizer, name_map={**NAME_MAP, "heads": (("linear",), "same")})
    with pytest.raises(ValueError, match=r"layout='dense' must be one of"):
        to_jax(params, optimizer, name_map={**NAME_MAP, "bias": (("bias",), "dense")})


def test_ars2_jax_imports_without_torch_or_orbax():
    # The converter uses torch only inside its functions; orbax is loaded by a
    # checkpoint call, not by an import.
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import ars2_jax, ars2_jax.convert, ars2_jax.checkpoint\n"
        "assert 'orbax.checkpoint' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
