"""A small NNX transformer language model built from Flax's own modules only.

``nnx.Embed`` (tokens and positions), pre-norm blocks of ``nnx.LayerNorm``, causal
``nnx.MultiHeadAttention``, ``nnx.Dropout`` and an ``nnx.Linear`` GELU MLP, a final
``nnx.LayerNorm`` and an ``nnx.Linear`` unembedding. The model of the NNX workload of
``python -m benchmarks.step_time`` and of the tests' model zoo.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class LMConfig:
    vocab: int = 256
    d_model: int = 128
    heads: int = 4
    layers: int = 2
    d_mlp: int = 512
    max_len: int = 64
    dropout: float = 0.1


class Block(nnx.Module):
    def __init__(self, config: LMConfig, rngs: nnx.Rngs):
        self.attention_norm = nnx.LayerNorm(config.d_model, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=config.heads, in_features=config.d_model, decode=False, rngs=rngs
        )
        self.mlp_norm = nnx.LayerNorm(config.d_model, rngs=rngs)
        self.up = nnx.Linear(config.d_model, config.d_mlp, rngs=rngs)
        self.down = nnx.Linear(config.d_mlp, config.d_model, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.dropout(self.attention(self.attention_norm(x), mask=mask))
        return x + self.dropout(self.down(jax.nn.gelu(self.up(self.mlp_norm(x)))))


class TransformerLM(nnx.Module):
    """``tokens (batch, length) -> logits (batch, length, vocab)``, causal."""

    def __init__(self, config: LMConfig, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab, config.d_model, rngs=rngs)
        self.positions = nnx.Embed(config.max_len, config.d_model, rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs) for _ in range(config.layers)])
        self.norm = nnx.LayerNorm(config.d_model, rngs=rngs)
        self.unembed = nnx.Linear(config.d_model, config.vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens) + self.positions(jnp.arange(tokens.shape[-1]))
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.unembed(self.norm(x))


def next_token_loss(model: TransformerLM, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``tokens[:, :-1]``."""
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
