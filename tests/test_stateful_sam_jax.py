"""SAM on models with state besides their parameters: BatchNorm statistics, dropout RNGs.

The rule (ars2_jax.training.nnx_grad_fn, the same in ars2_torch): the adversarial
pass draws the base pass's dropout masks and its changes to non-parameter state
are discarded, so the model's state after a step with SAM is the state after the
same step without SAM.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ars2_jax
from ars2_jax import ars2_neo
from ars2_jax.training import TrainState, nnx_grad_fn

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((16, 4)), jnp.float32)
Y = jnp.asarray(RNG.standard_normal((16, 1)), jnp.float32)
SAM = {"sync": dict(rho=0.05, k=1), "delayed": dict(rho=0.05, k=2, alpha=0.3)}


class Recorder:
    """Collects the dropout masks a model's passes draw, through jax.debug.callback.

    The model calls it on tanh activations after dropout, which are nonzero where kept.
    """

    def __init__(self):
        self.masks = []

    def __call__(self, hidden):
        jax.debug.callback(lambda h: self.masks.append(np.asarray(h) != 0), hidden)


class NNXModel(nnx.Module):
    def __init__(self, recorder, rngs, linear=nnx.Linear):
        self.hidden = linear(4, 16, rngs=rngs)
        self.norm = nnx.BatchNorm(16, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(16, 1, rngs=rngs)
        self.recorder = recorder

    def __call__(self, x):
        hidden = self.dropout(jnp.tanh(self.norm(self.hidden(x))))
        self.recorder(hidden)
        return self.out(hidden)


def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def _nnx_step(model, optimizer, x, y, wrt):
    grad_fn = nnx_grad_fn(model, loss_fn, x, y, wrt=wrt)  # before the base pass
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model, x, y)
    optimizer.update(model, grads, grad_fn=grad_fn)


def _non_param_state(model):
    return nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))


def _nnx_model(recorder, lora=False):
    linear = (lambda i, o, rngs: nnx.LoRALinear(i, o, lora_rank=2, rngs=rngs)) if lora else None
    kwargs = {} if linear is None else {"linear": linear}
    return NNXModel(recorder, nnx.Rngs(0, dropout=1), **kwargs)


@pytest.mark.parametrize(
    ("jit", "wrt"), [(True, nnx.Param), (False, nnx.Param), (True, nnx.LoRAParam)]
)
def test_nnx_sync_step_leaves_state_as_a_step_without_sam(jit, wrt):
    lora = wrt is nnx.LoRAParam
    step = nnx.jit(_nnx_step, static_argnums=4) if jit else _nnx_step
    recorder = Recorder()
    with_sam = _nnx_model(recorder, lora)
    sam_optimizer = nnx.Optimizer(with_sam, ars2_neo(1e-2, **SAM["sync"]), wrt=wrt)
    frozen_before = nnx.as_pure(nnx.state(with_sam, nnx.All(nnx.Param, nnx.Not(wrt))))
    for _ in range(2):
        # The same step without SAM, from the same model (the clone shares the recorder).
        without = nnx.clone(with_sam)
        step(without, nnx.Optimizer(without, optax.adamw(1e-2), wrt=wrt), X, Y, wrt)
        step(with_sam, sam_optimizer, X, Y, wrt)
        jax.effects_barrier()
        chex.assert_trees_all_equal(_non_param_state(with_sam), _non_param_state(without))
    assert int(ars2_jax.diagnostics(sam_optimizer.opt_state)["sync_count"]) == 2
    assert int(with_sam.dropout.rngs.count.get_value()) == 2
    # Per step: the plain pass, then SAM's base and adversarial passes: one mask,
    # with dropout on, and a new one the next step.
    assert len(recorder.masks) == 6
    for plain, base, adversarial in zip(*(recorder.masks[i::3] for i in range(3))):
        np.testing.assert_array_equal(base, plain)
        np.testing.assert_array_equal(base, adversarial)
        assert 0.2 < base.mean() < 0.8
    assert not np.array_equal(recorder.masks[0], recorder.masks[3])
    # The step moved what wrt selects, and only that.
    trained = nnx.as_pure(nnx.state(with_sam, wrt))
    initial = nnx.as_pure(nnx.state(_nnx_model(Recorder(), lora), wrt))
    assert not jax.tree.all(jax.tree.map(jnp.array_equal, trained, initial))
    frozen_after = nnx.as_pure(nnx.state(with_sam, nnx.All(nnx.Param, nnx.Not(wrt))))
    chex.assert_trees_all_equal(frozen_after, frozen_before)


def test_nnx_non_sync_step_leaves_state_as_a_step_without_sam():
    step = nnx.jit(_nnx_step, static_argnums=4)
    model = _nnx_model(Recorder())
    optimizer = nnx.Optimizer(model, ars2_neo(1e-2, **SAM["delayed"]), wrt=nnx.Param)
    step(model, optimizer, X, Y, nnx.Param)  # step 1 syncs
    twin = nnx.clone(model)
    step(model, optimizer, X, Y, nnx.Param)  # step 2 injects the shear
    step(twin, nnx.Optimizer(twin, optax.adamw(1e-2), wrt=nnx.Param), X, Y, nnx.Param)
    assert int(ars2_jax.diagnostics(optimizer.opt_state)["sync_count"]) == 1
    chex.assert_trees_all_equal(_non_param_state(model), _non_param_state(twin))


class LinenModel(nn.Module):
    recorder: Recorder

    @nn.compact
    def __call__(self, x, train):
        hidden = nn.Dense(16)(x)
        hidden = nn.BatchNorm(use_running_average=not train)(hidden)
        hidden = nn.Dropout(0.5, deterministic=not train)(jnp.tanh(hidden))
        self.recorder(hidden)
        return nn.Dense(1)(hidden)


@jax.jit
def _linen_step(state, x, y, dropout_key):
    def loss_of(params, batch_stats):
        out, mutated = state.apply_fn(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
        )
        return jnp.mean((out - y) ** 2), mutated["batch_stats"]

    (_, batch_stats), grads = jax.value_and_grad(loss_of, has_aux=True)(
        state.params, state.batch_stats
    )
    # The adversarial pass: the same key, the step's starting statistics, its
    # updated statistics dropped.
    grad_fn = lambda params: jax.grad(loss_of, has_aux=True)(params, state.batch_stats)[0]
    return state.apply_gradients(grads=grads, grad_fn=grad_fn, batch_stats=batch_stats)


def test_linen_train_state_sync_step_keeps_the_base_pass_state_and_mask():
    recorder = Recorder()
    model = LinenModel(recorder)
    variables = model.init(jax.random.key(0), X, train=False)
    recorder.masks.clear()

    def create(tx):
        return TrainState.create(
            apply_fn=model.apply,
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            tx=tx,
        )

    with_sam = create(ars2_neo(1e-2, **SAM["sync"]))
    for step in range(2):
        key = jax.random.fold_in(jax.random.key(1), step)
        without = _linen_step(
            create(optax.adamw(1e-2)).replace(
                params=with_sam.params, batch_stats=with_sam.batch_stats
            ),
            X,
            Y,
            key,
        )
        with_sam = _linen_step(with_sam, X, Y, key)
        jax.effects_barrier()
        chex.assert_trees_all_equal(with_sam.batch_stats, without.batch_stats)
    assert int(ars2_jax.diagnostics(with_sam.opt_state)["sync_count"]) == 2
    chex.assert_trees_all_equal(with_sam.step, 2)
    # Per step: the plain pass, then SAM's base and adversarial passes.
    assert len(recorder.masks) == 6
    for plain, base, adversarial in zip(*(recorder.masks[i::3] for i in range(3))):
        np.testing.assert_array_equal(base, plain)
        np.testing.assert_array_equal(base, adversarial)
        assert 0.2 < base.mean() < 0.8
    assert not np.array_equal(recorder.masks[0], recorder.masks[3])


@pytest.mark.parametrize("jit", [True, False])
def test_nnx_issue_order_grad_fn_after_the_base_pass_steps(jit):
    # Issue 14, item 1: built after the base pass (the issue's order), this raised
    # TraceContextError on BatchStat. It steps now, the state as without SAM (only
    # the adversarial pass's dropout mask is then a fresh one).
    def step(model, optimizer, x, y):
        grads = nnx.grad(loss_fn)(model, x, y)
        optimizer.update(model, grads, grad_fn=nnx_grad_fn(model, loss_fn, x, y))

    step = nnx.jit(step) if jit else step
    model = _nnx_model(Recorder())
    without = nnx.clone(model)
    step(model, nnx.Optimizer(model, ars2_neo(1e-2, **SAM["sync"]), wrt=nnx.Param), X, Y)
    step(without, nnx.Optimizer(without, optax.adamw(1e-2), wrt=nnx.Param), X, Y)
    chex.assert_trees_all_equal(_non_param_state(model), _non_param_state(without))
