"""Newton-Schulz on one owner device per matrix, inside ``shard_map`` (see ``_distributed``).

Every device holds local blocks of the ARS2 updates. Per leaf, the blocks are
normalized where they live (one small ``psum`` of partial sums of squares), moved
whole to the leaf's owner with one ``all_to_all`` over the axes the leaf is split
over, iterated there (no collective inside the loop), moved back with the
reverse ``all_to_all``, and, for axes the leaf is replicated over, shared with
one ``all_gather`` of the owners' results. Leaves split over the same axes, with
the same iteration dtype, travel in one buffer, so the number of collectives
depends on the layouts, never on ``ns_steps`` or on the number of leaves.

Devices are numbered row-major over ``axis_names``, as ``jax.lax.axis_index``
numbers them; a block of a dimension split over several axes is numbered
row-major over them in the spec's order, as ``shard_map`` places it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from optax.contrib import MuonDimensionNumbers

from ars2_jax._newton_schulz import (
    _axes,
    as_matrices,
    default_dimension_numbers,
    default_ns_dtype,
    iterate_normalized,
)
from ars2_jax._orthogonalize import accumulation_dtype

# A leaf's partitioning: for each dimension, the mesh axes it is split over.
LeafSpec = tuple[tuple[str, ...], ...]


def _view_axes(ndim: int, dimension_numbers: MuonDimensionNumbers | None):
    """The matrix rows' and columns' axes and the batch axes of a leaf's view."""
    if dimension_numbers is None:
        dimension_numbers = default_dimension_numbers(ndim)
    rows = _axes(dimension_numbers.reduction_axis, ndim)
    cols = _axes(dimension_numbers.output_axis, ndim)
    batch = tuple(a for a in range(ndim) if a not in rows + cols)
    return rows, cols, batch, dimension_numbers


def newton_schulz_flops(
    shape: Sequence[int],
    steps: int = 5,
    dimension_numbers: MuonDimensionNumbers | None = None,
) -> int:
    r"""Floating-point operations of Newton-Schulz on one tensor (multiply-adds count 2).

    Each matrix ``r×c`` of the view (transposed first so that ``r <= c``) costs, per
    iteration, ``A = X Xᵀ`` (``2r²c``), ``A²`` (``2r³``) and ``(bA + cA²) X``
    (``2r²c``):

    .. math::

      \text{flops} = \text{steps} \cdot \text{batch} \cdot (4 r^2 c + 2 r^3)

    The normalization and the elementwise terms (``O(rc)``) are left out.

    Args:
      shape: the tensor's shape (``len(shape) >= 2``).
      steps: Newton-Schulz iterations.
      dimension_numbers: the matrix view; ``None``: :func:`ars2_jax.default_dimension_numbers`.

    Returns:
      The count, a Python int.

    Example:
      >>> from ars2_jax import newton_schulz_flops
      >>> newton_schulz_flops((768, 3072), steps=5) == 5 * (4 * 768**2 * 3072 + 2 * 768**3)
      True
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) < 2:
        raise ValueError(f"shape={shape} must have at least 2 dimensions")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} must be an integer >= 0")
    rows, cols, batch, _ = _view_axes(len(shape), dimension_numbers)
    size = lambda axes: math.prod(shape[a] for a in axes)
    r, c = sorted((size(rows), size(cols)))
    return steps * size(batch) * (4 * r * r * c + 2 * r**3)


def assign_owners(
    shapes: Sequence[Sequence[int]],
    n_devices: int,
    *,
    dimension_numbers: Sequence[MuonDimensionNumbers | None] | None = None,
) -> list[int]:
    """Gives each tensor one owner device, balancing Newton-Schulz's cost.

    Greedy, largest first: tensors sorted by :func:`newton_schulz_flops` (ties by
    position), each onto the device with the least work so far (ties: the
    lowest index). The result depends only on the shapes, so every device
    computes the same assignment.

    Args:
      shapes: the tensors' shapes.
      n_devices: how many devices share the work (``>= 1``).
      dimension_numbers: each tensor's matrix view (``None``: the default views).

    Returns:
      The owner (``0 .. n_devices - 1``) of each tensor, in the order of ``shapes``.

    Example:
      >>> from ars2_jax import assign_owners
      >>> assign_owners([(8, 8), (64, 64), (32, 32), (64, 64)], 2)
      [1, 0, 0, 1]
    """
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise ValueError(f"n_devices={n_devices!r} must be an integer >= 1")
    dims = [None] * len(shapes) if dimension_numbers is None else list(dimension_numbers)
    if len(dims) != len(shapes):
        raise ValueError(f"dimension_numbers has {len(dims)} entries for {len(shapes)} shapes")
    costs = [newton_schulz_flops(s, 1, d) for s, d in zip(shapes, dims)]
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    loads = [(0, device) for device in range(n_devices)]
    owners = [0] * len(costs)
    for i in order:
        load, device = heapq.heappop(loads)
        owners[i] = device
        heapq.heappush(loads, (load + costs[i], device))
    return owners


class _Leaf(NamedTuple):
    spec: LeafSpec
    local_shape: tuple[int, ...]
    full_shape: tuple[int, ...]
    dimension_numbers: MuonDimensionNumbers
    work_dtype: Any
    owner: int


def _ravel(coords: dict[str, int], axes: Sequence[str], sizes: dict[str, int]) -> int:
    index = 0
    for name in axes:
        index = index * sizes[name] + coords[name]
    return index


def _unravel(index: int, axes: Sequence[str], sizes: dict[str, int]) -> dict[str, int]:
    coords = {}
    for name in reversed(axes):
        coords[name] = index % sizes[name]
        index //= sizes[name]
    return coords


def _block_permutation(spec: LeafSpec, split_axes: Sequence[str]) -> list[int]:
    """Axis order taking ``(*split_axes sizes, *local_shape)`` to the full tensor's blocks."""
    k = len(split_axes)
    perm = []
    for dim, names in enumerate(spec):
        perm += [split_axes.index(name) for name in names] + [k + dim]
    return perm


def _assemble(blocks: jax.Array, leaf: _Leaf, split_axes, sizes) -> jax.Array:
    """``(n_split, block size)`` blocks, from every device along ``split_axes`` -> the tensor."""
    shaped = blocks.reshape(tuple(sizes[a] for a in split_axes) + leaf.local_shape)
    return shaped.transpose(_block_permutation(leaf.spec, split_axes)).reshape(leaf.full_shape)


def _split(full: jax.Array, leaf: _Leaf, split_axes, sizes) -> jax.Array:
    """The inverse of :func:`_assemble`."""
    perm = _block_permutation(leaf.spec, split_axes)
    shaped_dims = tuple(sizes[a] for a in split_axes) + leaf.local_shape
    permuted = full.reshape(tuple(shaped_dims[p] for p in perm))
    n_split = math.prod(sizes[a] for a in split_axes)
    return permuted.transpose(np.argsort(perm)).reshape(n_split, -1)


def _iterate_whole(full: jax.Array, leaf: _Leaf, steps, coeffs) -> jax.Array:
    """Newton-Schulz of an assembled, already normalized tensor, in its own layout."""
    view, inverse = as_matrices(full, leaf.dimension_numbers)
    transposed = view.shape[1] > view.shape[2]
    view = view.mT if transposed else view
    out = iterate_normalized(view, steps, coeffs, leaf.work_dtype)
    return inverse(out.mT if transposed else out)


def _psum_grouped(terms: list[tuple[tuple[str, ...], jax.Array]]) -> list[jax.Array]:
    """``psum`` of each array over its axes: one collective per distinct (axes, dtype)."""
    groups: dict[Any, list[int]] = {}
    for i, (axes, value) in enumerate(terms):
        if axes:
            groups.setdefault((tuple(sorted(axes)), value.dtype), []).append(i)
    out = [value for _, value in terms]
    for (axes, _), members in groups.items():
        flat = jnp.concatenate([terms[i][1].reshape(-1) for i in members])
        summed = jax.lax.psum(flat, axes)
        offsets = np.cumsum([0] + [terms[i][1].size for i in members])
        for i, start, stop in zip(members, offsets[:-1], offsets[1:]):
            out[i] = summed[start:stop].reshape(terms[i][1].shape)
    return out


def orthogonalize_local_blocks(
    blocks: list[jax.Array],
    specs: list[LeafSpec],
    dims: list[MuonDimensionNumbers | None],
    axis_names: tuple[str, ...],
    sizes: dict[str, int],
    steps: int,
    coeffs: tuple[float, float, float],
    ns_dtype: Any,
    eps: float,
) -> list[jax.Array]:
    """``‖u‖ · NS(u)`` of every leaf, as local blocks; must run under ``shard_map`` over
    ``axis_names``, whose sizes are ``sizes``."""
    leaves = []
    for block, spec, dimension_numbers in zip(blocks, specs, dims):
        full_shape = tuple(
            n * math.prod(sizes[a] for a in names) for n, names in zip(block.shape, spec)
        )
        _, _, _, dimension_numbers = _view_axes(block.ndim, dimension_numbers)
        work = default_ns_dtype(block.dtype) if ns_dtype is None else jnp.dtype(ns_dtype)
        leaves.append(_Leaf(spec, block.shape, full_shape, dimension_numbers, work, 0))
    # Sums of squares: the whole tensor's (the energy) and each matrix's of the view.
    terms = []
    for block, leaf in zip(blocks, leaves):
        x = block.astype(accumulation_dtype(block.dtype))
        rows, cols, _, _ = _view_axes(block.ndim, leaf.dimension_numbers)
        matrix_axes = tuple(a for d in rows + cols for a in leaf.spec[d])
        terms.append((tuple(a for names in leaf.spec for a in names), jnp.sum(x * x)))
        terms.append((matrix_axes, jnp.sum(x * x, axis=rows + cols, keepdims=True)))
    sums = _psum_grouped(terms)
    energies = [jnp.sqrt(s) for s in sums[0::2]]
    normalized = [
        (block.astype(accumulation_dtype(block.dtype)) / (jnp.sqrt(s) + eps)).astype(
            leaf.work_dtype
        )
        for block, leaf, s in zip(blocks, leaves, sums[1::2])
    ]

    units, unit_blocks, restack = _matrix_units(leaves, normalized)
    n_devices = math.prod(sizes[a] for a in axis_names)
    owners = assign_owners(
        [unit.full_shape for unit in units],
        n_devices,
        dimension_numbers=[unit.dimension_numbers for unit in units],
    )
    units = [unit._replace(owner=owner) for unit, owner in zip(units, owners)]
    groups: dict[Any, list[int]] = {}
    for i, unit in enumerate(units):
        split = tuple(a for a in axis_names if any(a in names for names in unit.spec))
        groups.setdefault((split, unit.work_dtype), []).append(i)
    unit_directions: list[Any] = [None] * len(units)
    for (split_axes, work_dtype), members in groups.items():
        _exchange_group(
            members,
            units,
            unit_blocks,
            unit_directions,
            split_axes,
            work_dtype,
            axis_names,
            sizes,
            n_devices,
            steps,
            coeffs,
        )
    directions = restack(unit_directions)
    return [
        (energy * d.astype(block.dtype)).astype(block.dtype)
        for block, energy, d in zip(blocks, energies, directions)
    ]


def _matrix_units(leaves: list[_Leaf], blocks: list[jax.Array]):
    """Splits leaves whose view holds several matrices (per-head kernels, layers stacked for
    ``scan``) into one unit per matrix, each with its own owner, where the batch axes are
    not split over devices; other leaves are one unit. Returns the units, their blocks and
    the function that puts the units' results back into leaves."""
    units, unit_blocks, layout = [], [], []
    for leaf, block in zip(leaves, blocks):
        rows, cols, batch, _ = _view_axes(block.ndim, leaf.dimension_numbers)
        if not batch or any(leaf.spec[d] for d in batch):
            layout.append((len(units), None))
            units.append(leaf)
            unit_blocks.append(block)
            continue
        kept = tuple(d for d in range(block.ndim) if d not in batch)
        moved = jnp.moveaxis(block, batch, tuple(range(len(batch))))
        flat = moved.reshape((-1, *(block.shape[d] for d in kept)))
        unit = _Leaf(
            tuple(leaf.spec[d] for d in kept),
            tuple(block.shape[d] for d in kept),
            tuple(leaf.full_shape[d] for d in kept),
            MuonDimensionNumbers(
                reduction_axis=tuple(kept.index(d) for d in rows),
                output_axis=tuple(kept.index(d) for d in cols),
            ),
            leaf.work_dtype,
            0,
        )
        layout.append((len(units), (flat.shape[0], moved.shape, batch)))
        units += [unit] * flat.shape[0]
        unit_blocks += list(flat)

    def restack(results):
        out = []
        for start, split in layout:
            if split is None:
                out.append(results[start])
                continue
            count, moved_shape, batch = split
            stacked = jnp.stack(results[start : start + count]).reshape(moved_shape)
            out.append(jnp.moveaxis(stacked, tuple(range(len(batch))), batch))
        return out

    return units, unit_blocks, restack


def _wire(x: jax.Array) -> jax.Array:
    """16-bit floats travel as 16-bit integers: XLA may otherwise widen a bfloat16
    collective to float32 (its CPU backend does), doubling the bytes moved."""
    if jnp.dtype(x.dtype).itemsize == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16)
    return x


def _unwire(x: jax.Array, dtype: Any) -> jax.Array:
    if x.dtype == jnp.uint16 and jnp.dtype(dtype) != jnp.uint16:
        return jax.lax.bitcast_convert_type(x, dtype)
    return x


def _exchange_group(
    members,
    leaves,
    normalized,
    directions,
    split_axes,
    work_dtype,
    axis_names,
    sizes,
    n_devices,
    steps,
    coeffs,
) -> None:
    """Moves the group's leaves to their owners, iterates there, brings the results back."""
    replica_axes = tuple(a for a in axis_names if a not in split_axes)
    n_split = math.prod(sizes[a] for a in split_axes)
    n_replica = math.prod(sizes[a] for a in replica_axes)
    owned = {o: [i for i in members if leaves[i].owner == o] for o in range(n_devices)}
    block_size = {i: math.prod(leaves[i].local_shape) for i in members}
    offsets = {}
    for mine in owned.values():
        start = 0
        for i in mine:
            offsets[i] = start
            start += block_size[i]
    chunk = max(1, max(sum(block_size[i] for i in mine) for mine in owned.values()))
    coords = {o: _unravel(o, axis_names, sizes) for o in range(n_devices)}
    slot = {
        o: (_ravel(c, replica_axes, sizes), _ravel(c, split_axes, sizes)) for o, c in coords.items()
    }

    def packed(parts, rows):
        flat = jnp.concatenate([p.reshape(rows, -1) for p in parts], axis=1) if parts else None
        used = 0 if flat is None else flat.shape[1]
        pad = jnp.zeros((rows, chunk - used), work_dtype)
        return pad if flat is None else jnp.concatenate([flat, pad], axis=1)

    # send[r, s]: this device's blocks of the leaves owned by the device (r, s).
    send = [[None] * n_split for _ in range(n_replica)]
    for o, mine in owned.items():
        r, s = slot[o]
        send[r][s] = packed([normalized[i] for i in mine], 1)[0]
    send = jnp.stack([jnp.stack(row) for row in send])
    if replica_axes:
        send = send[jax.lax.axis_index(replica_axes)]
    else:
        send = send[0]
    received = send
    if split_axes:
        received = _unwire(jax.lax.all_to_all(_wire(send), split_axes, 0, 0), work_dtype)

    def branch(o):
        def run(received):
            results = []
            for i in owned[o]:
                part = received[:, offsets[i] : offsets[i] + block_size[i]]
                full = _assemble(part, leaves[i], split_axes, sizes)
                out = _iterate_whole(full, leaves[i], steps, coeffs).astype(work_dtype)
                results.append(_split(out, leaves[i], split_axes, sizes))
            return packed(results, n_split)

        return run

    if n_devices == 1:
        computed = branch(0)(received)
    else:
        computed = jax.lax.switch(
            jax.lax.axis_index(axis_names), [branch(o) for o in range(n_devices)], received
        )
    back = computed
    if split_axes:
        back = _unwire(jax.lax.all_to_all(_wire(computed), split_axes, 0, 0), work_dtype)
    gathered = back[None]
    if replica_axes:
        gathered = _unwire(jax.lax.all_gather(_wire(back), replica_axes), work_dtype)
    for i in members:
        r, s = slot[leaves[i].owner]
        part = gathered[r, s, offsets[i] : offsets[i] + block_size[i]]
        directions[i] = part.reshape(leaves[i].local_shape)
