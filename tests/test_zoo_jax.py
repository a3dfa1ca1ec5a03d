"""The model zoo: ARS2-Neo on models built only from Flax's own modules (NNX and Linen).

Each model trains 20 jitted steps on one fixed batch, with the views of
``nnx_matrix_views`` / ``linen_matrix_views`` and the stateful-SAM rule, in base and
sync mode, next to AdamW as a control. (The scanned Linen transformer trains in
tests/test_model_views_jax.py.)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import ars2_jax
from ars2_jax.training import TrainState, linen_matrix_views, nnx_grad_fn, nnx_matrix_views
from models.nnx_transformer import LMConfig, TransformerLM, next_token_loss

STEPS = 20
LM = LMConfig(vocab=32, d_model=32, heads=2, layers=2, d_mlp=64, max_len=16)
TOKENS = jax.random.randint(jax.random.key(0), (8, LM.max_len + 1), 0, LM.vocab)


class ResNet(nnx.Module):
    """Two residual blocks of nnx.Conv and nnx.BatchNorm, pooled, then nnx.Linear."""

    def __init__(self, rngs, width=16, classes=4):
        self.stem = nnx.Conv(3, width, (3, 3), rngs=rngs)
        self.convs = nnx.List([nnx.Conv(width, width, (3, 3), rngs=rngs) for _ in range(4)])
        self.norms = nnx.List([nnx.BatchNorm(width, rngs=rngs) for _ in range(4)])
        self.head = nnx.Linear(width, classes, rngs=rngs)

    def __call__(self, x):
        x = self.stem(x)
        for i in range(0, 4, 2):
            y = jax.nn.relu(self.norms[i](self.convs[i](x)))
            x = jax.nn.relu(x + self.norms[i + 1](self.convs[i + 1](y)))
        return self.head(x.mean(axis=(1, 2)))


IMAGES = jax.random.normal(jax.random.key(1), (16, 8, 8, 3))
LABELS = jax.random.randint(jax.random.key(2), (16,), 0, 4)


def resnet_loss(model, images, labels):
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


MODELS = {
    "transformer": (
        lambda: TransformerLM(LM, nnx.Rngs(0, dropout=1)),
        next_token_loss,
        (TOKENS,),
    ),
    "resnet": (lambda: ResNet(nnx.Rngs(0)), resnet_loss, (IMAGES, LABELS)),
}
OPTIMIZERS = {
    "adamw": lambda model: optax.adamw(3e-3),
    "base": lambda model: ars2_jax.ars2_neo(3e-3, **nnx_matrix_views(model)),
    "sync": lambda model: ars2_jax.ars2_neo(3e-3, rho=0.05, k=1, **nnx_matrix_views(model)),
    "delayed": lambda model: ars2_jax.ars2_neo(
        3e-3, rho=0.05, k=3, alpha=0.3, **nnx_matrix_views(model)
    ),
    "adaptive": lambda model: ars2_jax.ars2_neo(
        3e-3, rho=0.05, k=4, alpha=0.3, adaptive=True, **nnx_matrix_views(model)
    ),
}
SAM_MODES = ("sync", "delayed", "adaptive")
# Every model with AdamW, base and sync; all four modes on the smallest, the ResNet.
CASES = [(m, o) for m in MODELS for o in ("adamw", "base", "sync")]
CASES += [("resnet", "delayed"), ("resnet", "adaptive")]


@nnx.jit(static_argnums=(2, 3))
def _step(model, optimizer, loss_fn, sam, *batch):
    grad_fn = nnx_grad_fn(model, loss_fn, *batch)
    loss, grads = nnx.value_and_grad(loss_fn)(model, *batch)
    optimizer.update(model, grads, **({"grad_fn": grad_fn} if sam else {}))
    return loss


@pytest.mark.parametrize(("model_name", "optimizer_name"), CASES)
def test_zoo_model_trains(model_name, optimizer_name):
    build, loss_fn, batch = MODELS[model_name]
    model = build()
    optimizer = nnx.Optimizer(model, OPTIMIZERS[optimizer_name](model), wrt=nnx.Param)
    losses = [
        float(_step(model, optimizer, loss_fn, optimizer_name in SAM_MODES, *batch))
        for _ in range(STEPS)
    ]
    final = float(loss_fn(model, *batch))
    assert all(jnp.isfinite(jnp.asarray(losses))) and jnp.isfinite(final)
    assert jax.tree.all(jax.tree.map(lambda x: bool(jnp.all(jnp.isfinite(x))), nnx.state(model)))
    assert final <= 0.5 * losses[0], (losses[0], final)
    if optimizer_name in SAM_MODES:
        sync_count = int(ars2_jax.diagnostics(optimizer.opt_state)["sync_count"])
        assert sync_count == {"sync": STEPS, "delayed": 7}.get(optimizer_name, sync_count) >= 1


def test_zoo_checkpoint_round_trip_continues_bit_for_bit(tmp_path):
    from ars2_jax import checkpoint

    build, loss_fn, batch = MODELS["transformer"]

    tx = OPTIMIZERS["delayed"](build())  # one tx: both pairs share one compiled step

    def fresh():
        model = build()
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    model, optimizer = fresh()
    for _ in range(4):
        _step(model, optimizer, loss_fn, True, *batch)
    checkpoint.save(tmp_path, nnx.as_pure(nnx.state((model, optimizer))), step=4)
    restored_model, restored_optimizer = fresh()
    like = nnx.as_pure(nnx.state((restored_model, restored_optimizer)))
    nnx.update((restored_model, restored_optimizer), checkpoint.restore(tmp_path, like=like))
    for _ in range(10):
        expected = _step(model, optimizer, loss_fn, True, *batch)
        got = _step(restored_model, restored_optimizer, loss_fn, True, *batch)
        assert float(got) == float(expected)
    both = [
        nnx.as_pure(nnx.state(pair))
        for pair in ((model, optimizer), (restored_model, restored_optimizer))
    ]
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), *both))


def test_zoo_views_match_the_hand_written_tables():
    from optax.contrib import MuonDimensionNumbers as Dims

    def ars2_views(model):
        views = nnx_matrix_views(model)
        labels = jax.tree_util.tree_leaves_with_path(views["param_labels"])
        dims = jax.tree.structure(views["param_labels"]).flatten_up_to(
            views["weight_dimension_numbers"]
        )
        return {
            jax.tree_util.keystr(path): dim
            for (path, label), dim in zip(labels, dims)
            if label == "ars2"
        }

    matrix, qkv, out = Dims((0,), (1,)), Dims((0,), (2,)), Dims((1,), (2,))
    lm = {"['unembed']['kernel']": matrix}
    for i in range(LM.layers):
        block = f"['blocks'][{i}]"
        lm |= {f"{block}['attention']['{n}']['kernel']": qkv for n in ("query", "key", "value")}
        lm |= {f"{block}['attention']['out']['kernel']": out}
        lm |= {f"{block}['up']['kernel']": matrix, f"{block}['down']['kernel']": matrix}
    assert ars2_views(MODELS["transformer"][0]()) == lm
    conv = Dims((0, 1, 2), (3,))
    resnet = {"['stem']['kernel']": conv, "['head']['kernel']": matrix}
    resnet |= {f"['convs'][{i}]['kernel']": conv for i in range(4)}
    assert ars2_views(MODELS["resnet"][0]()) == resnet


class LinenCNN(nn.Module):
    """nn.Conv, nn.BatchNorm, nn.Dropout and nn.Dense."""

    @nn.compact
    def __call__(self, x, train):
        for _ in range(2):
            x = nn.Conv(16, (3, 3))(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.Dropout(0.1, deterministic=not train)(x.mean(axis=(1, 2)))
        return nn.Dense(4)(x)


@pytest.mark.parametrize("optimizer_name", ["adamw", "base", "sync"])
def test_zoo_linen_cnn_trains(optimizer_name):
    model = LinenCNN()
    variables = model.init(jax.random.key(0), IMAGES, train=False)
    views = linen_matrix_views(model, IMAGES, train=False)
    tx = {
        "adamw": optax.adamw(1e-2),
        "base": ars2_jax.ars2_neo(1e-2, **views),
        "sync": ars2_jax.ars2_neo(1e-2, rho=0.05, k=1, **views),
    }[optimizer_name]
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=tx,
    )

    def loss_fn(params, batch_stats, key):
        logits, mutated = model.apply(
            {"params": params, "batch_stats": batch_stats},
            IMAGES,
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()
        return loss, mutated["batch_stats"]

    @jax.jit
    def step(state, key):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, key
        )
        grad_fn = lambda p: jax.grad(loss_fn, has_aux=True)(p, state.batch_stats, key)[0]
        extra = {"grad_fn": grad_fn} if optimizer_name == "sync" else {}
        return state.apply_gradients(grads=grads, batch_stats=batch_stats, **extra), loss

    losses = []
    for i in range(STEPS):
        state, loss = step(state, jax.random.fold_in(jax.random.key(1), i))
        losses.append(float(loss))
    assert all(jnp.isfinite(jnp.asarray(losses)))
    assert losses[-1] <= 0.5 * losses[0], losses
