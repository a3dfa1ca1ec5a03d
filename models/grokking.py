"""The one-layer transformer of the modular-addition grokking task (SPEC §7), in Flax.

Parameter names, layouts and initialization follow the seed's model, so that the
same arrays drive the PyTorch twin (:mod:`models.grokking_torch`):

| name | shape | init (N(0, 1) divided by) |
|---|---|---|
| ``W_E`` token embedding | ``(d_model, vocab)`` | ``sqrt(d_model)`` |
| ``W_pos`` positional embedding | ``(n_ctx, d_model)`` | ``sqrt(d_model)`` |
| ``W_Q``, ``W_K``, ``W_V`` per head | ``(heads, d_head, d_model)`` | ``sqrt(d_model)`` |
| ``W_O`` | ``(d_model, heads·d_head)`` | ``sqrt(d_model)`` |
| ``W_in``, ``b_in`` | ``(d_mlp, d_model)``, ``(d_mlp,)`` | ``sqrt(d_model)``, zeros |
| ``W_out``, ``b_out`` | ``(d_model, d_mlp)``, ``(d_model,)`` | ``sqrt(d_model)``, zeros |
| ``W_U`` unembedding | ``(d_model, vocab)`` | ``sqrt(vocab)`` |

Attention is causal with scores divided by ``sqrt(d_head)``; the residual stream is
``x + attn(x)`` then ``x + mlp(x)`` (ReLU, no layer norm).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class GrokkingConfig:
    p: int = 113
    d_model: int = 128
    n_heads: int = 4
    d_head: int = 32
    d_mlp: int = 512
    n_ctx: int = 3

    @property
    def vocab(self) -> int:
        """The numbers ``0..p-1`` and the ``=`` token ``p``."""
        return self.p + 1


def _scaled_normal(scale: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.normal(key, shape, dtype) / scale

    return init


class Transformer(nn.Module):
    """``[a, b, =]`` token ids ``(batch, 3)`` → logits ``(batch, 3, vocab)``."""

    config: GrokkingConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        weight = _scaled_normal(math.sqrt(c.d_model))
        w_e = self.param("W_E", weight, (c.d_model, c.vocab))
        w_pos = self.param("W_pos", weight, (c.n_ctx, c.d_model))
        w_q = self.param("W_Q", weight, (c.n_heads, c.d_head, c.d_model))
        w_k = self.param("W_K", weight, (c.n_heads, c.d_head, c.d_model))
        w_v = self.param("W_V", weight, (c.n_heads, c.d_head, c.d_model))
        w_o = self.param("W_O", weight, (c.d_model, c.n_heads * c.d_head))
        w_in = self.param("W_in", weight, (c.d_mlp, c.d_model))
        b_in = self.param("b_in", nn.initializers.zeros, (c.d_mlp,))
        w_out = self.param("W_out", weight, (c.d_model, c.d_mlp))
        b_out = self.param("b_out", nn.initializers.zeros, (c.d_model,))
        w_u = self.param("W_U", _scaled_normal(math.sqrt(c.vocab)), (c.d_model, c.vocab))

        x = w_e.T[tokens] + w_pos[: tokens.shape[1]]  # (batch, pos, d_model)
        q = jnp.einsum("hkd,bpd->bhpk", w_q, x)
        k = jnp.einsum("hkd,bpd->bhpk", w_k, x)
        v = jnp.einsum("hkd,bpd->bhpk", w_v, x)
        scores = jnp.einsum("bhqk,bhpk->bhqp", q, k) / math.sqrt(c.d_head)
        causal = jnp.tril(jnp.ones((tokens.shape[1], tokens.shape[1]), bool))
        scores = jnp.where(causal, scores, -jnp.inf)
        attention = jax.nn.softmax(scores, axis=-1)
        z = jnp.einsum("bhqp,bhpk->bqhk", attention, v).reshape(*tokens.shape, -1)
        x = x + jnp.einsum("df,bqf->bqd", w_o, z)
        hidden = jax.nn.relu(jnp.einsum("md,bpd->bpm", w_in, x) + b_in)
        x = x + jnp.einsum("dm,bpm->bpd", w_out, hidden) + b_out
        return x @ w_u
