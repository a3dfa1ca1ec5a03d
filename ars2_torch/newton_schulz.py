"""Quintic Newton-Schulz orthogonalization (SPEC §3), PyTorch layouts (SPEC §2)."""

from __future__ import annotations

import torch

#: The ``(a, b, c)`` of the quintic iteration, from Keller Jordan's Muon
#: (https://kellerjordan.github.io/posts/muon/), the same as ``torch.optim.Muon``'s.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
#: Added to the Frobenius norm before the first normalization (SPEC: ``ns_eps``).
NS_EPS = 1e-7


def default_ns_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype Newton-Schulz iterates in when none is asked for (SPEC §3).

    float32 inputs iterate in bfloat16; any other dtype (float64, bfloat16,
    float16) iterates in its own dtype.

    Args:
      dtype: the parameter's dtype.

    Returns:
      The dtype of the iteration.

    Example:
      >>> import torch
      >>> from ars2_torch import default_ns_dtype
      >>> default_ns_dtype(torch.float32), default_ns_dtype(torch.float64)
      (torch.bfloat16, torch.float64)
    """
    return torch.bfloat16 if dtype == torch.float32 else dtype


def as_matrices(x: torch.Tensor, row_blocks: int = 1, column_blocks: int = 1) -> torch.Tensor:
    """Views a PyTorch-layout tensor as a batch of matrices ``(batch, rows, cols)``.

    The default views of SPEC §2: a 2-D ``(out, in)`` weight is one matrix, a 3-D
    ``(b, r, c)`` tensor is ``b`` matrices ``r×c``, and a tensor of 4 or more
    dimensions ``(out, ...)`` (a conv weight ``(out, in, kh, kw)``) is the single
    matrix ``(out, prod(rest))``. With ``row_blocks`` or ``column_blocks`` above 1 a
    2-D weight is cut into ``row_blocks × column_blocks`` equal blocks, each a
    matrix of its own, in row-major block order: the per-head views of packed
    attention weights (``nn.MultiheadAttention``'s ``in_proj_weight`` ``(3·E, E)``
    with ``row_blocks = 3·heads``, its ``out_proj.weight`` with ``column_blocks =
    heads``).

    Args:
      x: a tensor with ``ndim >= 2``.
      row_blocks: how many equal blocks the rows of a 2-D ``x`` are cut into.
      column_blocks: how many equal blocks its columns are cut into.

    Returns:
      A 3-D view (or copy) of ``x``; :func:`newton_schulz` undoes it.

    Example:
      >>> import torch
      >>> as_matrices(torch.zeros(8, 4, 3, 3)).shape
      torch.Size([1, 8, 36])
      >>> as_matrices(torch.zeros(3 * 16, 16), row_blocks=3 * 2).shape
      torch.Size([6, 8, 16])
    """
    if x.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a tensor with ndim >= 2, got shape {tuple(x.shape)}")
    if row_blocks != 1 or column_blocks != 1:
        _check_blocks(tuple(x.shape), row_blocks, column_blocks)
        rows, cols = x.shape[0] // row_blocks, x.shape[1] // column_blocks
        blocks = x.reshape(row_blocks, rows, column_blocks, cols).permute(0, 2, 1, 3)
        return blocks.reshape(row_blocks * column_blocks, rows, cols)
    if x.ndim == 2:
        return x.unsqueeze(0)
    if x.ndim == 3:
        return x
    return x.reshape(1, x.shape[0], -1)


def _from_matrices(
    matrices: torch.Tensor, shape: torch.Size, row_blocks: int, column_blocks: int
) -> torch.Tensor:
    """The inverse of :func:`as_matrices`."""
    if row_blocks != 1 or column_blocks != 1:
        rows, cols = matrices.shape[-2:]
        blocks = matrices.reshape(row_blocks, column_blocks, rows, cols).permute(0, 2, 1, 3)
        return blocks.reshape(shape)
    return matrices.reshape(shape)


def _check_block_counts(row_blocks: int, column_blocks: int) -> None:
    for name, blocks in (("row_blocks", row_blocks), ("column_blocks", column_blocks)):
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"{name}={blocks!r} must be an integer >= 1")


def _check_blocks(shape: tuple[int, ...], row_blocks: int, column_blocks: int) -> None:
    _check_block_counts(row_blocks, column_blocks)
    if row_blocks == column_blocks == 1:
        return
    if len(shape) != 2 or shape[0] % row_blocks or shape[1] % column_blocks:
        raise ValueError(
            f"row_blocks={row_blocks}, column_blocks={column_blocks} need a 2-D tensor whose "
            f"rows and columns they divide, got shape {shape}"
        )


def newton_schulz(
    x: torch.Tensor,
    steps: int = 5,
    coeffs: tuple[float, float, float] = NS_COEFFS,
    dtype: torch.dtype | None = None,
    eps: float = NS_EPS,
    row_blocks: int = 1,
    column_blocks: int = 1,
) -> torch.Tensor:
    r"""Approximately orthogonalizes ``x`` with the quintic Newton-Schulz iteration.

    For each matrix ``G`` of the view :func:`as_matrices` gives (``X`` transposed
    first when it has more rows than columns)::

        X ← G / (‖G‖_F + eps)
        repeat `steps` times:  A = X Xᵀ;  X ← a·X + (b·A + c·A²)·X

    which maps ``G = U Σ Vᵀ`` to ``U f⁵(Σ / (‖G‖ + eps)) Vᵀ`` with
    ``f(s) = a·s + b·s³ + c·s⁵``. ``newton_schulz(0) == 0``.

    Args:
      x: a tensor with ``ndim >= 2`` in PyTorch layout.
      steps: number of iterations.
      coeffs: the ``(a, b, c)`` of the quintic.
      dtype: the dtype to iterate in; ``None`` picks bfloat16 for float32 inputs
        and the input's own dtype otherwise.
      eps: added to the Frobenius norm before normalizing.
      row_blocks: cut the rows of a 2-D ``x`` into this many blocks, each
        orthogonalized apart (:func:`as_matrices`).
      column_blocks: the same for its columns.

    Returns:
      A tensor of ``x``'s shape and dtype.

    Example:
      >>> import torch
      >>> from ars2_torch import newton_schulz
      >>> o = newton_schulz(torch.randn(32, 64, generator=torch.Generator().manual_seed(0)),
      ...                   dtype=torch.float32)
      >>> bool(torch.all((torch.linalg.svdvals(o) - 1).abs() < 0.33))
      True
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    a, b, c = coeffs
    work_dtype = default_ns_dtype(x.dtype) if dtype is None else dtype
    matrices = as_matrices(x, row_blocks, column_blocks).to(work_dtype)
    transposed = matrices.shape[-2] > matrices.shape[-1]
    if transposed:
        matrices = matrices.mT
    norm = torch.linalg.matrix_norm(matrices, keepdim=True)
    matrices = matrices / (norm + eps)
    for _ in range(steps):
        gram = matrices @ matrices.mT
        poly = b * gram + c * (gram @ gram)
        matrices = a * matrices + poly @ matrices
    if transposed:
        matrices = matrices.mT
    return _from_matrices(matrices, x.shape, row_blocks, column_blocks).to(x.dtype)
