"""Energy-preserving orthogonalization: ``u ↦ ‖u‖ · NS(u)`` per leaf (SPEC §2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import MuonDimensionNumbers

from ars2_jax._newton_schulz import (
    NS_COEFFS,
    NS_EPS,
    as_matrices,
    default_dimension_numbers,
    default_ns_dtype,
    orthogonalize_wide_matrices,
)
from ars2_jax._validation import check_float_dtype, check_static_int

# Per-leaf dimension numbers: one for every leaf, a tree of them (``None`` leaves
# take the default view), or a function of the updates returning such a tree.
WeightDimensionNumbers = MuonDimensionNumbers | Any | Callable[[Any], Any] | None


def is_dimension_numbers_leaf(x: Any) -> bool:
    """``is_leaf`` for trees of dimension numbers (they are NamedTuples themselves)."""
    return x is None or isinstance(x, MuonDimensionNumbers)


def accumulation_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Sums and norms of low-precision arrays accumulate in at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def psum_over(x: jax.Array, axes: Any) -> jax.Array:
    """``jax.lax.psum`` over ``axes`` (a collection of axis names); ``x`` itself if empty."""
    return jax.lax.psum(x, tuple(sorted(axes))) if axes else x


def frobenius_norm(x: jax.Array, axes: Any = ()) -> jax.Array:
    """``‖x‖`` of the whole array, accumulated in at least float32, as a scalar of that dtype.

    ``axes``: under ``shard_map``, the axes ``x`` is a block split over (the
    squares are summed over them).
    """
    x = x.astype(accumulation_dtype(x.dtype))
    return jnp.sqrt(psum_over(jnp.sum(x * x), axes))


def check_ns_sharding(ns_sharding: Any) -> None:
    from ars2_jax._distributed import NewtonSchulzSharding

    if ns_sharding is not None and not isinstance(ns_sharding, NewtonSchulzSharding):
        raise ValueError(f"ns_sharding={ns_sharding!r} must be None or a NewtonSchulzSharding")


def _directions(leaves, dims, steps, coeffs, ns_dtype, eps, group_same_shapes):
    """``NS(u)`` of every leaf, same-shaped matrices batched together."""
    views = []
    for update, dimension_numbers in zip(leaves, dims):
        if dimension_numbers is None:
            dimension_numbers = default_dimension_numbers(update.ndim)
        view, inverse = as_matrices(update, dimension_numbers)
        transposed = view.shape[1] > view.shape[2]
        work_dtype = default_ns_dtype(update.dtype) if ns_dtype is None else jnp.dtype(ns_dtype)
        views.append((view.mT if transposed else view, inverse, transposed, work_dtype))
    groups: dict[Any, list[int]] = {}
    for i, (view, _, _, work_dtype) in enumerate(views):
        key = (view.shape[1:], view.dtype, work_dtype) if group_same_shapes else i
        groups.setdefault(key, []).append(i)
    results: list[Any] = [None] * len(views)
    for members in groups.values():
        batch = jnp.concatenate([views[i][0] for i in members])
        ortho = orthogonalize_wide_matrices(batch, steps, coeffs, views[members[0]][3], eps)
        sizes = np.cumsum([views[i][0].shape[0] for i in members])[:-1]
        for i, part in zip(members, jnp.split(ortho, sizes)):
            results[i] = part
    directions = []
    for update, (_, inverse, transposed, _), ortho in zip(leaves, views, results):
        directions.append(inverse(ortho.mT if transposed else ortho).astype(update.dtype))
    return directions


def orthogonalize_with_energy(
    ns_steps: int = 5,
    ns_dtype: jnp.dtype | None = None,
    *,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    ns_coeffs: tuple[float, float, float] = NS_COEFFS,
    ns_eps: float = NS_EPS,
    group_same_shapes: bool | None = None,
    ns_sharding: Any = None,
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
      group_same_shapes: run the matrices of all leaves that share a matrix shape
        (after the transpose to ``rows <= cols``) and dtypes through one batched
        Newton-Schulz call, instead of one call per leaf. The same numbers, fewer
        and larger matmuls. ``None``: group, except on CPUs, where XLA's batched
        matmul runs slower than separate ones (one call per leaf took 18% less
        time on GPT-2-small's 48 matrices: ``python -m benchmarks.step_time``).

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
    check_float_dtype("ns_dtype", ns_dtype)
    check_ns_sharding(ns_sharding)

    def update_fn(updates, state, params=None):
        del params
        dims = weight_dimension_numbers
        if callable(dims):
            dims = dims(updates)
        if dims is None or isinstance(dims, MuonDimensionNumbers):
            dims = jax.tree.map(lambda _: dims, updates)
        leaves, treedef = jax.tree.flatten(updates)
        if ns_sharding is not None:
            # Imported here: _distributed builds on this module.
            from ars2_jax import _distributed

            out = _distributed.orthogonalize_sharded(
                leaves,
                treedef.flatten_up_to(dims),
                ns_sharding,
                _distributed.specs_for_leaves(ns_sharding.specs, updates),
                ns_steps,
                ns_coeffs,
                ns_dtype,
                ns_eps,
            )
            return jax.tree.unflatten(treedef, out), state
        directions = _directions(
            leaves,
            treedef.flatten_up_to(dims),
            ns_steps,
            ns_coeffs,
            ns_dtype,
            ns_eps,
            jax.default_backend() != "cpu" if group_same_shapes is None else group_same_shapes,
        )
        out = [(frobenius_norm(u) * d).astype(u.dtype) for u, d in zip(leaves, directions)]
        return jax.tree.unflatten(treedef, out), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)
