"""Where Newton-Schulz runs on many devices: :class:`NewtonSchulzSharding` and its helpers."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import optax
from jax.sharding import Mesh, PartitionSpec
from optax.transforms import MaskedNode

from ars2_jax._owner_exchange import LeafSpec, orthogonalize_local_blocks


def _is_spec(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec)


@dataclasses.dataclass(frozen=True, eq=False)
class NewtonSchulzSharding:
    """How ARS2's updates are laid out over devices, so that Newton-Schulz runs whole on one
    owner device per matrix.

    Pass it as ``ns_sharding=`` to :func:`ars2_jax.ars2_neo` or
    :func:`ars2_jax.orthogonalize_with_energy`. Each matrix gets one owner
    (:func:`ars2_jax.assign_owners`; the matrices of a 3-D leaf one each, unless the
    leaf is split along its batch axis); its blocks go to the owner with one
    ``all_to_all`` for all leaves split alike, the iteration runs there with no
    collective inside, the result comes back with the reverse ``all_to_all``, and
    leaves replicated over an axis are shared with one ``all_gather`` over it. The
    energy ``‖u‖`` and the normalization are small ``psum``\\ s of partial sums.
    See ``docs/sharded_newton_schulz.md``.

    Two ways to use it:

    * under ``jax.jit`` with ``NamedSharding``\\ s: ``specs`` and ``mesh``; the
      optimizer sees global arrays and wraps its Newton-Schulz in a ``shard_map``.
      A dimension that its axes do not divide is moved as if replicated.
    * inside your own ``shard_map`` (with ``check_vma=False``): ``specs`` and
      ``axis_names`` (the manual axes; devices are numbered row-major over them);
      the optimizer sees local blocks, and SAM's norms, φ and the finiteness check
      are summed over the axes each leaf is split over.

    Args:
      specs: a ``PartitionSpec`` (or ``None``: replicated) per param leaf, in a
        tree like the params (or like the updates, for
        :func:`ars2_jax.orthogonalize_with_energy` alone), or one spec for every leaf.
      mesh: the ``jax.sharding.Mesh`` of the ``jax.jit`` way.
      axis_names: the ``shard_map`` way's mesh axes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> import ars2_jax
      >>> mesh = jax.make_mesh((1,), ("fsdp",))
      >>> ns = ars2_jax.NewtonSchulzSharding({"w": P("fsdp")}, mesh=mesh)
      >>> tx = ars2_jax.ars2_neo(1e-2, ns_sharding=ns)
      >>> params = {"w": jnp.ones((4, 3))}
      >>> updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
      >>> updates["w"].shape
      (4, 3)
    """

    specs: Any
    mesh: Mesh | None = None
    axis_names: tuple[str, ...] | None = None

    def __post_init__(self):
        if (self.mesh is None) == (self.axis_names is None):
            raise ValueError(
                f"NewtonSchulzSharding needs exactly one of mesh= (under jax.jit) and "
                f"axis_names= (under shard_map); got mesh={self.mesh}, "
                f"axis_names={self.axis_names}"
            )
        if self.mesh is not None and not isinstance(self.mesh, Mesh):
            raise ValueError(f"mesh={self.mesh!r} must be a jax.sharding.Mesh")
        if self.axis_names is not None:
            names = (self.axis_names,) if isinstance(self.axis_names, str) else self.axis_names
            if not names or not all(isinstance(n, str) for n in names):
                raise ValueError(f"axis_names={self.axis_names!r} must be mesh axis names")
            object.__setattr__(self, "axis_names", tuple(names))
        known = set(self.all_axes)
        for spec in jax.tree.leaves(self.specs, is_leaf=_is_spec):
            if spec is not None and not isinstance(spec, PartitionSpec):
                raise ValueError(f"specs holds {spec!r}, which is not a PartitionSpec")
            for name in _spec_axes(spec):
                if name not in known:
                    raise ValueError(
                        f"specs uses the axis {name!r}, which is not one of {tuple(known)}"
                    )

    @property
    def all_axes(self) -> tuple[str, ...]:
        """The axes the devices are numbered over."""
        return tuple(self.mesh.axis_names) if self.mesh is not None else self.axis_names

    def _key(self):
        leaves, treedef = jax.tree.flatten(self.specs, is_leaf=_is_spec)
        return (tuple(leaves), treedef, self.mesh, self.axis_names)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, NewtonSchulzSharding) and self._key() == other._key()


def _spec_axes(spec: PartitionSpec | None) -> tuple[str, ...]:
    if spec is None:
        return ()
    out = []
    for entry in spec:
        if entry is None:
            continue
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, tuple) and all(isinstance(n, str) for n in entry):
            out += list(entry)
        else:
            raise ValueError(f"specs holds {spec}, whose entry {entry!r} is not an axis name")
    return tuple(out)


def _leaf_spec(spec: PartitionSpec | None, ndim: int) -> LeafSpec:
    entries = () if spec is None else tuple(spec)
    if len(entries) > ndim:
        raise ValueError(f"specs holds {spec} for a leaf with ndim={ndim}")
    entries = entries + (None,) * (ndim - len(entries))
    return tuple(() if e is None else ((e,) if isinstance(e, str) else tuple(e)) for e in entries)


class _Box:
    """Wraps a spec so that tree functions treat it as one leaf."""

    def __init__(self, spec):
        self.spec = spec


def specs_for_leaves(specs: Any, tree: Any) -> list[PartitionSpec | None]:
    """The spec of each leaf of ``tree``; ``specs`` is one spec, or a tree like ``tree`` whose
    ``MaskedNode`` positions (``optax.partition``'s other track) are skipped."""
    if _is_spec(specs):
        return [specs] * len(jax.tree.leaves(tree))
    try:
        boxed = jax.tree.map(
            lambda spec, leaf: None if isinstance(leaf, MaskedNode) else _Box(spec),
            specs,
            tree,
            is_leaf=_is_spec,
        )
    except (ValueError, TypeError) as error:
        raise ValueError(f"ns_sharding's specs do not match the params' tree: {error}") from error
    return [box.spec for box in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, _Box))]


def sharded_axes(ns_sharding: NewtonSchulzSharding | None, params: Any) -> Any:
    """Per param leaf, the ``frozenset`` of axes its local block is split over (``shard_map``
    way), or ``None`` (global arrays)."""
    if ns_sharding is None or ns_sharding.mesh is not None:
        return None
    treedef = jax.tree.structure(params)
    specs = specs_for_leaves(ns_sharding.specs, params)
    return jax.tree.unflatten(treedef, [frozenset(_spec_axes(s)) for s in specs])


def orthogonalize_sharded(
    leaves: list[jax.Array],
    dims: list,
    ns_sharding: NewtonSchulzSharding,
    specs: list[PartitionSpec | None],
    steps: int,
    coeffs: tuple[float, float, float],
    ns_dtype: Any,
    eps: float,
) -> list[jax.Array]:
    """``‖u‖ · NS(u)`` of every leaf with owner devices (see :class:`NewtonSchulzSharding`)."""
    if not leaves:
        return []
    if ns_sharding.mesh is None:
        sizes = {name: jax.lax.axis_size(name) for name in ns_sharding.axis_names}
        local = [_leaf_spec(s, x.ndim) for s, x in zip(specs, leaves)]
        return orthogonalize_local_blocks(
            leaves, local, dims, ns_sharding.axis_names, sizes, steps, coeffs, ns_dtype, eps
        )
    mesh = ns_sharding.mesh
    sizes = dict(mesh.shape)
    used = []
    for spec, x in zip(specs, leaves):
        leaf_spec = _leaf_spec(spec, x.ndim)
        divisible = all(
            n % math.prod(sizes[a] for a in names) == 0 for n, names in zip(x.shape, leaf_spec)
        )
        used.append(leaf_spec if divisible else ((),) * x.ndim)
    partition_specs = tuple(PartitionSpec(*(names or None for names in s)) for s in used)
    axis_names = tuple(mesh.axis_names)

    def local_fn(*blocks):
        return tuple(
            orthogonalize_local_blocks(
                list(blocks), used, dims, axis_names, sizes, steps, coeffs, ns_dtype, eps
            )
        )

    mapped = jax.shard_map(
        local_fn, mesh=mesh, in_specs=partition_specs, out_specs=partition_specs, check_vma=False
    )
    out = mapped(*(_place(x, mesh, s) for x, s in zip(leaves, partition_specs)))
    return [
        y if u == _leaf_spec(s, x.ndim) else _place(y, mesh, s or PartitionSpec())
        for x, y, u, s in zip(leaves, out, used, specs)
    ]


def _place(x: jax.Array, mesh: Mesh, spec: PartitionSpec) -> jax.Array:
    """``x`` laid out as ``spec`` says: ``shard_map`` wants it so on meshes with explicit axes
    (there ``reshard``); on automatic ones a sharding constraint lets XLA move it."""
    sharding = jax.sharding.NamedSharding(mesh, spec)
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def state_specs(optimizer: optax.GradientTransformation, params: Any, param_specs: Any) -> Any:
    """PartitionSpecs for an optimizer's state, from the params' specs.

    Every state leaf that stands for a param (Adam's moments, the shear force)
    takes that param's spec; the rest (counters, φ, the adaptive scalars) is
    replicated, ``PartitionSpec()``.

    Args:
      optimizer: the transformation, e.g. ``ars2_jax.ars2_neo(...)``.
      params: the params, or their ``jax.ShapeDtypeStruct``\\ s.
      param_specs: a ``PartitionSpec`` per param leaf, in a tree like ``params``.

    Returns:
      A tree like ``optimizer.init(params)`` of ``PartitionSpec``\\ s (pass it to
      ``NamedSharding`` for ``jax.jit``'s shardings or to ``shard_map``'s specs).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> import ars2_jax
      >>> tx = ars2_jax.ars2_neo(rho=0.05, k=2)
      >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
      >>> specs = ars2_jax.state_specs(tx, params, {"w": P("fsdp"), "b": P()})
      >>> specs.shear_force["w"], specs.step
      (P('fsdp',), P())
    """
    shapes = jax.eval_shape(optimizer.init, params)
    param_paths = {
        tuple(path): (jax.numpy.shape(leaf), spec or PartitionSpec())
        for (path, leaf), spec in zip(
            jax.tree_util.tree_leaves_with_path(params), specs_for_leaves(param_specs, params)
        )
    }

    def spec_of(path, leaf):
        # A state leaf stands for the param whose key path ends its own (optax's states
        # keep the params' tree under their fields), if the shapes agree.
        for start in range(len(path)):
            found = param_paths.get(tuple(path[start:]))
            if found is not None and found[0] == leaf.shape:
                return found[1]
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec_of, shapes)
