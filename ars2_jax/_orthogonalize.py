"""Energy-preserving orthogonalization: ``u ↦ ‖u‖ · NS(u)`` per leaf (SPEC §2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

from ars2_jax._newton_schulz import NS_COEFFS, NS_EPS, newton_schulz
from ars2_jax._validation import check_static_int

# Per-leaf dimension numbers: one for every leaf, a tree of them (``None`` leaves
# take the default view), or a function of the updates returning such a tree.
WeightDimensionNumbers = MuonDimensionNumbers | Any | Callable[[Any], Any] | None


def is_dimension_numbers_leaf(x: Any) -> bool:
    """``is_leaf`` for trees of dimension numbers (they are NamedTuples themselves)."""
    return x is None or isinstance(x, MuonDimensionNumbers)


def accumulation_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Sums and norms of low-precision arrays accumulate in at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def frobenius_norm(x: jax.Array) -> jax.Array:
    """``‖x‖`` of the whole array, accumulated in at least float32, as a scalar of that dtype."""
    x = x.astype(accumulation_dtype(x.dtype))
    return jnp.sqrt(jnp.sum(x * x))


def orthogonalize_with_energy(
    ns_steps: int = 5,
    ns_dtype: jnp.dtype | None = None,
    *,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    ns_coeffs: tuple[float, float, float] = NS_COEFFS,
    ns_eps: float = NS_EPS,
) -> optax.GradientTransformation:
    r"""Replaces each update ``u`` by its energy times its orthogonalized direction.

    .. math::

      u \mapsto \|u\|_F \cdot \mathrm{NS}(u)

    ``‖u‖`` is the norm of the whole tensor, whatever its matrix view; ``NS`` is
    :func:`ars2_jax.newton_schulz`. Chained after :func:`optax.scale_by_adam`,
    this is the ARS2 track of ARS2-Neo: Adam decides how far to step, Newton-Schulz
    in which direction.

    Args:
      ns_steps: Newton-Schulz iterations (static).
      ns_dtype: iteration dtype; ``None``: bfloat16 for float32 updates, the
        update's own dtype otherwise (SPEC §3).
      weight_dimension_numbers: a :class:`optax.contrib.MuonDimensionNumbers` for
        every leaf, a tree of them (a ``None`` leaf takes the default), or a
        function of the updates returning such a tree. Default: the Flax views of
        :func:`ars2_jax.default_dimension_numbers`.
      ns_coeffs: the quintic's coefficients.
      ns_eps: added to each matrix's norm before normalizing.

    Returns:
      A stateless :class:`optax.GradientTransformation`; every leaf must have
      ``ndim >= 2``.

    References:
      Jordan et al., `Muon: An optimizer for hidden layers in neural networks
      <https://kellerjordan.github.io/posts/muon/>`_, 2024

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from ars2_jax import orthogonalize_with_energy
      >>> tx = optax.chain(optax.scale_by_adam(), orthogonalize_with_energy(ns_dtype=jnp.float32))
      >>> params = {"w": jnp.ones((3, 4))}
      >>> updates, _ = tx.update({"w": jnp.eye(3, 4)}, tx.init(params))
      >>> updates["w"].shape
      (3, 4)
    """
    check_static_int("ns_steps", ns_steps, 1)

    def update_fn(updates, state, params=None):
        del params
        dims = weight_dimension_numbers
        if callable(dims):
            dims = dims(updates)
        if dims is None or isinstance(dims, MuonDimensionNumbers):
            dims = jax.tree.map(lambda _: dims, updates)

        def one(update, dimension_numbers):
            energy = frobenius_norm(update)
            direction = newton_schulz(
                update,
                ns_steps,
                ns_coeffs,
                ns_dtype,
                dimension_numbers=dimension_numbers,
                eps=ns_eps,
            )
            return (energy * direction).astype(update.dtype)

        return jax.tree.map(one, updates, dims, is_leaf=is_dimension_numbers_leaf), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)
