"""Matrix views and tracks read from Flax's own modules (ars2_jax.training.*_matrix_views).

Every expected view is written by hand from the module's documented kernel layout.
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from optax.contrib import MuonDimensionNumbers as Dims

import ars2_jax
from ars2_jax.training import linen_matrix_views, nnx_matrix_views

D_MODEL, HEADS, HEAD_DIM, LAYERS, VOCAB = 16, 4, 4, 2, 32


class Block(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(D_MODEL, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=HEADS, in_features=D_MODEL, decode=False, rngs=rngs
        )
        self.up = nnx.Linear(D_MODEL, 2 * D_MODEL, rngs=rngs)
        self.down = nnx.Linear(2 * D_MODEL, D_MODEL, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x):
        x = x + self.dropout(self.attention(self.norm(x)))
        return x + self.dropout(self.down(jax.nn.gelu(self.up(x))))


class TransformerLM(nnx.Module):
    """A pre-norm LM: Embed, LAYERS blocks stacked with nnx.vmap and run by nnx.scan."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D_MODEL, rngs=rngs)

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs):
            return Block(rngs)

        self.blocks = blocks(rngs)
        self.head = nnx.Einsum("btd,dv->btv", (D_MODEL, VOCAB), rngs=rngs)

    def __call__(self, tokens):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def run(block, x):
            return block(x)

        return self.head(run(self.blocks, self.embed(tokens)))


def _dims(views, *path):
    node = views["weight_dimension_numbers"]
    for key in path:
        node = node[key]
    return node


def _label(views, *path):
    node = views["param_labels"]
    for key in path:
        node = node[key]
    return node


def _all_views(views):
    labels = jax.tree.leaves(views["param_labels"])
    paths = [
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(views["param_labels"])
    ]
    dims = views["weight_dimension_numbers"]
    dims = jax.tree.structure(views["param_labels"]).flatten_up_to(dims)
    return {path: (label, dim) for path, label, dim in zip(paths, labels, dims)}


def _check_table(views, table):
    """Every leaf on the ARS2 track is in ``table`` with its view; all others are AdamW."""
    found = _all_views(views)
    ars2 = {path: dim for path, (label, dim) in found.items() if label == "ars2"}
    assert ars2 == table
    assert all(dim is None for label, dim in found.values() if label == "adamw")


def test_nnx_transformer_views_are_per_head_and_per_layer():
    model = TransformerLM(nnx.Rngs(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        views = nnx_matrix_views(model)
    # The stacked layer axis 0 is batched: Q/K/V (L, in, heads, head_dim), out (L, heads, hd, out).
    qkv, out = Dims(reduction_axis=(1,), output_axis=(3,)), Dims((2,), (3,))
    linear = Dims((1,), (2,))
    attention = "['blocks']['attention']"
    table = {f"{attention}['{name}']['kernel']": qkv for name in ("query", "key", "value")}
    table[f"{attention}['out']['kernel']"] = out
    table["['blocks']['up']['kernel']"] = linear
    table["['blocks']['down']['kernel']"] = linear
    table["['head']['kernel']"] = Dims((0,), (1,))
    _check_table(views, table)
    assert _label(views, "embed", "embedding") == "adamw"
    assert _label(views, "blocks", "attention", "query", "bias") == "adamw"  # (L, heads, hd)
    assert np.shape(model.blocks.attention.query.bias.get_value()) == (LAYERS, HEADS, HEAD_DIM)


def test_nnx_conv_lora_einsum_and_general_views():
    rngs = nnx.Rngs(0)
    model = nnx.Dict(
        conv=nnx.Conv(3, 8, (3, 3), rngs=rngs),
        transposed=nnx.ConvTranspose(8, 3, (2, 2), rngs=rngs),
        general=nnx.LinearGeneral((4, 3), (2, 5), axis=(-2, -1), rngs=rngs),
        batched=nnx.LinearGeneral(4, 5, batch_axis={0: 3}, axis=-1, rngs=rngs),
        qkv=nnx.Einsum("btd,sndh->sbtnh", (3, HEADS, D_MODEL, HEAD_DIM), rngs=rngs),
        projection=nnx.Einsum("btnh,nhd->btd", (HEADS, HEAD_DIM, D_MODEL), rngs=rngs),
        lora=nnx.LoRALinear(6, 7, lora_rank=2, rngs=rngs),
        norm=nnx.BatchNorm(8, rngs=rngs),
    )
    table = {
        "['conv']['kernel']": Dims((0, 1, 2), (3,)),
        "['transposed']['kernel']": Dims((0, 1, 2), (3,)),
        "['general']['kernel']": Dims((0, 1), (2, 3)),
        "['batched']['kernel']": Dims((1,), (2,)),
        "['qkv']['kernel']": Dims((2,), (3,)),  # per Q/K/V and head: d_model × head_dim
        "['projection']['kernel']": Dims((0, 1), (2,)),
        "['lora']['kernel']": Dims((0,), (1,)),
        "['lora']['lora']['lora_a']": Dims((0,), (1,)),
        "['lora']['lora']['lora_b']": Dims((0,), (1,)),
    }
    _check_table(nnx_matrix_views(model), table)
    lora_only = nnx_matrix_views(model, wrt=nnx.LoRAParam)
    assert set(_all_views(lora_only)) == {
        "['lora']['lora']['lora_a']",
        "['lora']['lora']['lora_b']",
    }


def test_a_bare_3d_leaf_keeps_the_default_view_with_a_warning():
    class Bare(nnx.Module):
        def __init__(self):
            self.weights = nnx.Param(jnp.ones((2, 3, 4)))
            self.matrix = nnx.Param(jnp.ones((3, 4)))

    with pytest.warns(UserWarning, match=r"\['weights'\] of shape \(2, 3, 4\)"):
        views = nnx_matrix_views(Bare())
    assert _label(views, "weights") == "ars2" and _dims(views, "weights") is None
    assert _label(views, "matrix") == "ars2" and _dims(views, "matrix") is None


def test_nnx_views_drive_the_optimizer_per_head():
    # The views change the update: per-head orthogonalization of a Q kernel.
    model = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0))
    views = nnx_matrix_views(model)
    optimizer = nnx.Optimizer(
        model,
        ars2_jax.ars2_neo(1.0, weight_decay=0.0, ns_dtype=jnp.float32, **views),
        wrt=nnx.Param,
    )
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    loss_fn = lambda model: jnp.mean(model(x) ** 2)
    before = model.query.kernel.get_value()
    grad = nnx.grad(loss_fn)(model).query.kernel.get_value()
    optimizer.update(model, nnx.grad(loss_fn)(model))
    # Step 1 with lr 1: u = g/(|g| + eps), the step ‖u‖·NS(u) with NS per head.
    u = grad / (jnp.abs(grad) + 1e-8)
    per_head = ars2_jax.newton_schulz(
        u, dtype=jnp.float32, dimension_numbers=Dims(reduction_axis=(0,), output_axis=(2,))
    )
    step = before - model.query.kernel.get_value()
    np.testing.assert_allclose(step, jnp.linalg.norm(u) * per_head, rtol=1e-4, atol=1e-6)
    default = ars2_jax.newton_schulz(u, dtype=jnp.float32)  # batched over input features
    assert float(jnp.max(jnp.abs(default - per_head))) > 0.1
    assert model.query.bias.get_value().shape == (2, 4)


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(nn.LayerNorm()(x))
        return x + nn.Dense(D_MODEL)(jax.nn.gelu(nn.Dense(2 * D_MODEL)(x))), None


class LinenLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, D_MODEL)(tokens)
        scan = nn.scan(
            LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS
        )
        x, _ = scan()(x, None)
        return nn.DenseGeneral(VOCAB)(x)


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.ConvTranspose(4, (2, 2))(x)
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_linen_transformer_and_cnn_views():
    views = linen_matrix_views(LinenLM(), jnp.zeros((1, 8), jnp.int32))
    attention = "['ScanLinenBlock_0']['MultiHeadDotProductAttention_0']"
    table = {f"{attention}['{n}']['kernel']": Dims((1,), (3,)) for n in ("query", "key", "value")}
    table[f"{attention}['out']['kernel']"] = Dims((2,), (3,))
    table["['ScanLinenBlock_0']['Dense_0']['kernel']"] = Dims((1,), (2,))
    table["['ScanLinenBlock_0']['Dense_1']['kernel']"] = Dims((1,), (2,))
    table["['DenseGeneral_0']['kernel']"] = Dims((0,), (1,))
    _check_table(views, table)
    assert _label(views, "Embed_0", "embedding") == "adamw"
    cnn = linen_matrix_views(LinenCNN(), jnp.zeros((1, 6, 6, 3)))
    _check_table(
        cnn,
        {
            "['Conv_0']['kernel']": Dims((0, 1, 2), (3,)),
            "['ConvTranspose_0']['kernel']": Dims((0, 1, 2), (3,)),
            "['Dense_0']['kernel']": Dims((0,), (1,)),
        },
    )


def test_linen_views_train_the_scanned_transformer():
    model = LinenLM()
    tokens = jax.random.randint(jax.random.key(0), (4, 8), 0, VOCAB)
    params = model.init(jax.random.key(1), tokens)["params"]
    tx = ars2_jax.ars2_neo(1e-2, rho=0.05, k=1, **linen_matrix_views(model, tokens))

    def loss(params):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params, grad_fn=jax.grad(loss))
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    first = loss(params)
    for _ in range(20):
        params, state = step(params, state)
    assert float(loss(params)) <= 0.5 * float(first)
