"""The Qwen3-style decoder of the WikiText-2 experiment (SPEC §7), in Flax.

Pre-norm blocks ``x + attention(norm(x))`` then ``x + mlp(norm(x))``, with:

* RMSNorm everywhere (a learned scale, no bias), including Qwen3's per-head
  RMSNorm of the queries and keys before the rotary embedding;
* rotary position embeddings (RoPE, ``rope_theta`` 10000, the rotate-half layout);
* causal multi-head attention with optional grouped key/value heads;
* a SwiGLU MLP ``down(silu(gate(x)) · up(x))``;
* no biases, and the output projection tied to the token embedding.

Every projection is a ``Dense`` kernel ``(in, out)``: one matrix each for ARS2 and
Muon (SPEC §2). The embedding is ``(vocab, d_model)``; with the seed's vocabulary
of 40479 tokens it is on the AdamW track by the default rule (a dimension
``>= 10000``), as in the seed. Weights are drawn from N(0, 0.02²), norms start at 1.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int = 40479
    d_model: int = 512
    n_layers: int = 3
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: n_heads (no grouping)
    head_dim: int | None = None  # None: d_model // n_heads
    d_mlp: int = 2048
    max_len: int = 255
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        kv_heads = self.kv_heads
        if self.n_heads < 1 or kv_heads < 1 or self.n_heads % kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a positive multiple of n_kv_heads={kv_heads}"
            )
        if self.head_size % 2:
            raise ValueError(f"head_dim={self.head_size} must be even for RoPE")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """``cos`` and ``sin`` of shape ``(length, head_dim)`` for positions ``0..length-1``."""
    inverse_frequency = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inverse_frequency[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` of shape ``(batch, length, heads, head_dim)`` (rotate-half layout)."""
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(
        features, use_bias=False, kernel_init=nn.initializers.normal(INIT_STD), name=name
    )


class Attention(nn.Module):
    config: Qwen3Config

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        c = self.config
        batch, length, _ = x.shape
        head = c.head_size
        q = _dense(c.n_heads * head, "q_proj")(x).reshape(batch, length, c.n_heads, head)
        k = _dense(c.kv_heads * head, "k_proj")(x).reshape(batch, length, c.kv_heads, head)
        v = _dense(c.kv_heads * head, "v_proj")(x).reshape(batch, length, c.kv_heads, head)
        q = nn.RMSNorm(epsilon=c.norm_eps, name="q_norm")(q)
        k = nn.RMSNorm(epsilon=c.norm_eps, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return _dense(c.d_model, "o_proj")(out.reshape(batch, length, c.n_heads * head))


class SwiGLU(nn.Module):
    config: Qwen3Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        gate = _dense(c.d_mlp, "gate_proj")(x)
        up = _dense(c.d_mlp, "up_proj")(x)
        return _dense(c.d_model, "down_proj")(nn.silu(gate) * up)


class Block(nn.Module):
    config: Qwen3Config

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        eps = self.config.norm_eps
        x = x + Attention(self.config, name="attention")(
            nn.RMSNorm(epsilon=eps, name="attention_norm")(x), cos, sin
        )
        return x + SwiGLU(self.config, name="mlp")(nn.RMSNorm(epsilon=eps, name="mlp_norm")(x))


class Qwen3(nn.Module):
    """Token ids ``(batch, length)`` → next-token logits ``(batch, length, vocab_size)``."""

    config: Qwen3Config

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        length = tokens.shape[1]
        if length > c.max_len:
            raise ValueError(f"sequence length={length} exceeds max_len={c.max_len}")
        embed = nn.Embed(
            c.vocab_size, c.d_model, embedding_init=nn.initializers.normal(INIT_STD), name="embed"
        )
        cos, sin = rope_tables(length, c.head_size, c.rope_theta)
        x = embed(tokens)
        for layer in range(c.n_layers):
            x = Block(c, name=f"layer_{layer}")(x, cos, sin)
        x = nn.RMSNorm(epsilon=c.norm_eps, name="final_norm")(x)
        return embed.attend(x)
