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


def as_matrices(x: torch.Tensor) -> torch.Tensor:
    """Views a PyTorch-layout tensor as a batch of matrices ``(batch, rows, cols)``.

    The default views of SPEC §2: a 2-D ``(out, in)`` weight is one matrix, a 3-D
    ``(b, r, c)`` tensor is ``b`` matrices ``r×c``, and a tensor of 4 or more
    dimensions ``(out, ...)`` (a conv weight ``(out, in, kh, kw)``) is the single
    matrix ``(out, prod(rest))``.

    Args:
      x: a tensor with ``ndim >= 2``.

    Returns:
      A view of ``x`` with three dimensions.

    Example:
      >>> import torch
      >>> from ars2_torch import as_matrices
      >>> as_matrices(torch.zeros(8, 3, 3, 3)).shape
      torch.Size([1, 8, 27])
    """
    if x.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a tensor with ndim >= 2, got shape {tuple(x.shape)}")
    if x.ndim == 2:
        return x.unsqueeze(0)
    if x.ndim == 3:
        return x
    return x.reshape(1, x.shape[0], -1)


def newton_schulz(
    x: torch.Tensor,
    steps: int = 5,
    coeffs: tuple[float, float, float] = NS_COEFFS,
    dtype: torch.dtype | None = None,
    eps: float = NS_EPS,
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
    matrices = as_matrices(x).to(work_dtype)
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
    return matrices.reshape(x.shape).to(x.dtype)
