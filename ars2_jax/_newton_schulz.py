"""Quintic Newton-Schulz orthogonalization (SPEC §3) with the Flax layout views (SPEC §2)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from optax.contrib import MuonDimensionNumbers

#: The ``(a, b, c)`` of the quintic iteration, from Keller Jordan's Muon
#: (https://kellerjordan.github.io/posts/muon/); ``optax.contrib.muon``'s default.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
#: Added to each matrix's Frobenius norm before the first normalization (SPEC: ``ns_eps``).
NS_EPS = 1e-7


def default_ns_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype Newton-Schulz iterates in when none is asked for (SPEC §3).

    float32 inputs iterate in bfloat16; any other dtype (float64, bfloat16)
    iterates in its own dtype.

    Args:
      dtype: the parameters' dtype.

    Returns:
      The dtype of the iteration.

    Example:
      >>> import jax.numpy as jnp
      >>> from ars2_jax import default_ns_dtype
      >>> default_ns_dtype(jnp.float32), default_ns_dtype(jnp.float64)
      (dtype(bfloat16), dtype('float64'))
    """
    return jnp.dtype(jnp.bfloat16) if jnp.dtype(dtype) == jnp.float32 else jnp.dtype(dtype)


def default_dimension_numbers(ndim: int) -> MuonDimensionNumbers:
    """The default matrix view of a Flax-layout tensor (SPEC §2).

    * 2-D ``(in, out)`` Dense kernel: one matrix;
    * 3-D ``(b, r, c)``: ``b`` matrices ``r×c`` (per-head weights);
    * 4-D conv ``(kh, kw, in, out)`` and any higher rank ``(..., out)``: one
      matrix ``(prod(rest), out)``.

    A bare array cannot tell its own layout, and for some 3-D kernels this rule
    is wrong: Flax's Q/K/V attention kernels are ``(in_features, heads, head_dim)``,
    which it would batch over the input features (the output kernel
    ``(heads, head_dim, out)`` it gets right). The module owning a kernel knows:
    :func:`ars2_jax.training.nnx_matrix_views` and
    :func:`ars2_jax.training.linen_matrix_views` read the views from the model
    (per head for attention), and warn about leaves of 3 or more axes that no
    known module owns, which keep this default.

    Args:
      ndim: the tensor's number of axes, at least 2.

    Returns:
      The :class:`optax.contrib.MuonDimensionNumbers` of the view.

    Example:
      >>> from ars2_jax import default_dimension_numbers
      >>> default_dimension_numbers(4)
      MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)
    """
    if ndim < 2:
        raise ValueError(f"Newton-Schulz needs ndim >= 2, got ndim={ndim}")
    if ndim == 2:
        return MuonDimensionNumbers(reduction_axis=0, output_axis=1)
    if ndim == 3:
        return MuonDimensionNumbers(reduction_axis=1, output_axis=2)
    return MuonDimensionNumbers(reduction_axis=tuple(range(ndim - 1)), output_axis=ndim - 1)


def _axes(axes: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return tuple(a % ndim for a in ((axes,) if isinstance(axes, int) else axes))


def as_matrices(x: jax.Array, dimension_numbers: MuonDimensionNumbers):
    """Views ``x`` as a batch of matrices ``(batch, rows, cols)``.

    Rows are the ``reduction_axis`` axes, columns the ``output_axis`` axes, and
    every other axis is a batch axis. Returns the view and the function that
    maps an array of the view's shape back to ``x``'s layout.
    """
    rows = _axes(dimension_numbers.reduction_axis, x.ndim)
    cols = _axes(dimension_numbers.output_axis, x.ndim)
    if set(rows) & set(cols):
        raise ValueError(f"{dimension_numbers=} uses an axis as a row and as a column axis")
    batch = tuple(a for a in range(x.ndim) if a not in rows + cols)
    order = batch + rows + cols
    permuted = tuple(x.shape[a] for a in order)
    size = lambda axes: math.prod(x.shape[a] for a in axes)
    view = x.transpose(order).reshape(size(batch), size(rows), size(cols))
    inverse_order = tuple(sorted(range(x.ndim), key=order.__getitem__))
    return view, lambda y: y.reshape(permuted).transpose(inverse_order)


def orthogonalize_wide_matrices(
    matrices: jax.Array,
    steps: int,
    coeffs: tuple[float, float, float],
    work_dtype: jnp.dtype,
    eps: float,
) -> jax.Array:
    """The iteration of SPEC §3 on a batch ``(batch, rows, cols)`` with ``rows <= cols``.

    Matmul inputs are rounded to ``work_dtype``; products accumulate, and the
    polynomial is combined, in at least float32 (as bf16 tensor cores do), which
    keeps bf16 about twice as close to the exact result as rounding each product
    and each coefficient to bf16. The steps run in a ``fori_loop``: on CPU it
    compiles about twice as fast as the unrolled form and runs no slower.
    """
    accumulate = jnp.promote_types(work_dtype, jnp.float32)
    m = matrices.astype(accumulate)
    m = (m / (jnp.linalg.norm(m, axis=(1, 2), keepdims=True) + eps)).astype(work_dtype)
    return iterate_normalized(m, steps, coeffs, work_dtype)


def iterate_normalized(
    m: jax.Array, steps: int, coeffs: tuple[float, float, float], work_dtype: jnp.dtype
) -> jax.Array:
    """The ``steps`` quintic iterations of :func:`orthogonalize_wide_matrices` on matrices
    already divided by their norm and rounded to ``work_dtype`` (the sharded path
    normalizes each block where it lives, then moves it)."""
    accumulate = jnp.promote_types(work_dtype, jnp.float32)
    matmul = lambda p, q: jnp.matmul(p, q, preferred_element_type=accumulate)
    a, b, c = coeffs

    def step(_, m):
        gram = matmul(m, m.mT)
        gram_work = gram.astype(work_dtype)
        poly = (b * gram + c * matmul(gram_work, gram_work)).astype(work_dtype)
        return (a * m.astype(accumulate) + matmul(poly, m)).astype(work_dtype)

    return jax.lax.fori_loop(0, steps, step, m)


def newton_schulz(
    x: jax.Array,
    steps: int = 5,
    coeffs: tuple[float, float, float] = NS_COEFFS,
    dtype: jnp.dtype | None = None,
    *,
    dimension_numbers: MuonDimensionNumbers | None = None,
    eps: float = NS_EPS,
) -> jax.Array:
    r"""Approximately orthogonalizes ``x`` with the quintic Newton-Schulz iteration.

    For each matrix ``G`` of the view chosen by ``dimension_numbers`` (transposed
    first when it has more rows than columns)::

        X ← G / (‖G‖_F + eps)
        repeat `steps` times:  A = X Xᵀ;  X ← a·X + (b·A + c·A²)·X

    which maps ``G = U Σ Vᵀ`` to ``U f^steps(Σ / (‖G‖ + eps)) Vᵀ`` with
    ``f(s) = a·s + b·s³ + c·s⁵``; ``newton_schulz(0) == 0``. The iteration is the
    one of ``optax.contrib.muon`` (a test checks that they agree in float32), which
    optax does not export as a public function. Here the matrices of a batch go
    through one batched matmul per product whose inputs are in the dtype of
    SPEC §3 and whose products accumulate in at least float32 (see
    ``orthogonalize_wide_matrices``).

    Args:
      x: an array with ``ndim >= 2``.
      steps: number of iterations (static).
      coeffs: the ``(a, b, c)`` of the quintic.
      dtype: the dtype to iterate in; ``None`` picks bfloat16 for float32 inputs
        and the input's own dtype otherwise.
      dimension_numbers: which axes form the rows and the columns (the other
        axes are batch axes); ``None``: :func:`default_dimension_numbers`.
      eps: added to the Frobenius norm before normalizing.

    Returns:
      An array of ``x``'s shape and dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from ars2_jax import newton_schulz
      >>> o = newton_schulz(jax.random.normal(jax.random.key(0), (64, 32)), dtype=jnp.float32)
      >>> bool(jnp.all(jnp.abs(jnp.linalg.svd(o, compute_uv=False) - 1) < 0.33))
      True
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if dimension_numbers is None:
        dimension_numbers = default_dimension_numbers(x.ndim)
    work_dtype = default_ns_dtype(x.dtype) if dtype is None else jnp.dtype(dtype)
    view, inverse = as_matrices(x, dimension_numbers)
    transposed = view.shape[1] > view.shape[2]
    if transposed:
        view = view.mT
    out = orthogonalize_wide_matrices(view, steps, coeffs, work_dtype, eps)
    if transposed:
        out = out.mT
    return inverse(out).astype(x.dtype)
