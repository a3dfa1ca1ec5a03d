"""Moving a run between PyTorch (``ars2_torch.ARS2Neo``) and JAX (``ars2_jax.ars2_neo``).

:func:`torch_to_jax` turns a torch model's parameters and its ``ARS2Neo`` state into
JAX params and an ``ars2_neo`` state; :func:`jax_to_torch` does the reverse, in
place. This is the one module of ``ars2_jax`` that uses torch, and it imports it
only inside the functions: ``ars2_jax`` imports without torch installed.

The model provides the *name map*: for each torch parameter name (as in
``model.named_parameters()``), the path of the matching leaf in the JAX params
(the tuple of dict keys, attribute names or indices that
``jax.tree_util.tree_flatten_with_path`` reports; a string for a top-level key)
and its layout (SPEC §2):

* ``'linear'``: torch ``Linear`` ``(out, in)`` ↔ Flax ``Dense`` kernel ``(in, out)``;
* ``'conv'``: torch ``(out, in, *spatial)`` ↔ Flax ``(*spatial, in, out)``, e.g.
  ``(out, in, kh, kw)`` ↔ ``(kh, kw, in, out)``;
* ``'same'``: the same array (biases, norms, embeddings, per-head weights).

What is converted: the parameters; each tensor's first and second moments
``m``, ``v`` (``exp_avg``/``exp_avg_sq`` ↔ the ``mu``/``nu`` of the track's
``scale_by_adam``), in the layout of the other framework; the shear force; the
step count; the SAM scalars ``step``, ``last_sync``, ``sync_count``,
``skipped_steps``, ``phi``, ``phi_var``, ``threshold``, ``alpha_t``.

Where one framework keeps what the other lacks:

* Step counts: torch keeps one per tensor (the steps in which it had a
  gradient) and one for the SAM state; optax keeps one per track
  (``count``), equal to the SAM ``step``. torch → JAX requires every per-tensor
  count to equal the SAM step and raises a ``ValueError`` listing those that
  differ; JAX → torch gives every tensor the JAX step. The ``count`` of a
  learning-rate schedule (``ScaleByScheduleState``) is set to the step as well.
* Shear force: torch holds none before the first sync step, JAX holds zeros;
  zeros are what torch → JAX writes for a tensor without one, and JAX → torch
  writes no shear force before the first sync (both leave ``φ`` and the injected
  gradient unchanged). A state with a shear force (delayed, adaptive) does not
  convert into one without (base, sync), nor the reverse: ``ValueError``.
* Scalars: torch computes ``phi``, ``phi_var``, ``threshold``, ``alpha_t`` as
  Python floats (float64); JAX stores them in its default float dtype, so
  torch → JAX rounds them to float32 unless ``jax_enable_x64`` is set.
* Hyperparameters (learning rates, betas, SAM settings, param-group options)
  belong to each optimizer's construction and are not converted; build both
  optimizers with the same values. State of a wrapper around ``ars2_neo``
  (``optax.inject_hyperparams``'s own count, for example) is taken from the
  template unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ars2_jax._sam import SharpnessAwareState, find_sam_state

__all__ = ["LAYOUTS", "jax_to_torch", "to_jax_layout", "to_torch_layout", "torch_to_jax"]

#: The layouts of a name map's entries (the module's docstring describes them).
LAYOUTS = ("linear", "conv", "same")

# torch parameter name -> (JAX params path, layout), as a mapping or a function.
NameMap = Mapping[str, tuple[Any, str]] | Callable[[str], tuple[Any, str]]

_SAM_INTEGERS = ("step", "last_sync", "sync_count", "skipped_steps")
_SAM_FLOATS = ("phi", "phi_var", "threshold", "alpha_t")


def to_jax_layout(array: Any, layout: str) -> Any:
    """A torch-layout array (NumPy or JAX) in the Flax layout (SPEC §2).

    Args:
      array: the array in torch's layout.
      layout: one of :data:`LAYOUTS`.

    Returns:
      The array in Flax's layout.

    Example:
      >>> import numpy as np
      >>> from ars2_jax.convert import to_jax_layout
      >>> to_jax_layout(np.zeros((16, 3, 5, 5)), "conv").shape   # (out, in, kh, kw)
      (5, 5, 3, 16)
    """
    _check_layout(layout, np.ndim(array))
    if layout == "linear":
        return array.T
    if layout == "conv":
        spatial = tuple(range(2, np.ndim(array)))
        return array.transpose((*spatial, 1, 0))
    return array


def to_torch_layout(array: Any, layout: str) -> Any:
    """A Flax-layout array (NumPy or JAX) in the torch layout: inverts :func:`to_jax_layout`.

    Args:
      array: the array in Flax's layout.
      layout: one of :data:`LAYOUTS`.

    Returns:
      The array in torch's layout.

    Example:
      >>> import numpy as np
      >>> from ars2_jax.convert import to_torch_layout
      >>> to_torch_layout(np.zeros((5, 5, 3, 16)), "conv").shape   # (kh, kw, in, out)
      (16, 3, 5, 5)
    """
    _check_layout(layout, np.ndim(array))
    if layout == "linear":
        return array.T
    if layout == "conv":
        ndim = np.ndim(array)
        return array.transpose((ndim - 1, ndim - 2, *range(ndim - 2)))
    return array


def _check_layout(layout: str, ndim: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    if layout == "linear" and ndim != 2:
        raise ValueError(f"layout='linear' needs a 2-D array, got {ndim}-D")
    if layout == "conv" and ndim < 3:
        raise ValueError(f"layout='conv' needs an array of ndim >= 3, got {ndim}-D")


def _plain_key(entry: Any) -> Any:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return getattr(entry, attribute)
    raise ValueError(f"unsupported pytree path entry {entry!r}")


def _plain_path(path: Any) -> tuple:
    return tuple(_plain_key(entry) for entry in path)


def _paths(tree: Any) -> dict[tuple, Any]:
    """``{path tuple: leaf}`` with plain keys (dict keys, attribute names, indices)."""
    return {_plain_path(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _named_parameters(parameters: Any) -> dict[str, Any]:
    named = getattr(parameters, "named_parameters", None)
    named = dict(named()) if callable(named) else dict(parameters)
    return named


def _resolve(
    name_map: NameMap, named: dict[str, Any], jax_leaves: dict[tuple, Any]
) -> dict[str, tuple[tuple, str]]:
    """Validates the name map: every torch name to one JAX leaf of the same shape, and back."""
    if not callable(name_map):
        unknown = sorted(set(name_map) - set(named))
        if unknown:
            raise ValueError(f"name_map names parameters the torch model lacks: {unknown}")
    resolved, owner = {}, {}
    for name, tensor in named.items():
        entry = name_map(name) if callable(name_map) else name_map.get(name)
        if entry is None:
            raise ValueError(f"name_map gives no JAX path for the torch parameter {name!r}")
        path, layout = entry
        path = (path,) if isinstance(path, (str, int)) else tuple(path)
        if path not in jax_leaves:
            raise ValueError(f"name_map sends {name!r} to {path}, which is not a JAX params leaf")
        if path in owner:
            raise ValueError(f"name_map sends both {owner[path]!r} and {name!r} to {path}")
        owner[path] = name
        shape = tuple(tensor.shape)
        expected = tuple(np.shape(to_jax_layout(np.empty(shape, np.bool_), layout)))
        if expected != tuple(jax_leaves[path].shape):
            raise ValueError(
                f"torch parameter {name!r} of shape {shape} is {expected} in the "
                f"{layout!r} layout, but the JAX leaf {path} has shape "
                f"{tuple(jax_leaves[path].shape)}"
            )
        resolved[name] = (path, layout)
    unmapped = sorted(map(str, jax_leaves.keys() - owner.keys()))
    if unmapped:
        raise ValueError(f"no torch parameter maps to the JAX params leaves {unmapped}")
    return resolved


def _optimizer_names(optimizer: Any, named: dict[str, Any]) -> dict[int, str]:
    """``{id(param): name}`` for the optimizer's parameters, all of which must be named."""
    names = {id(tensor): name for name, tensor in named.items()}
    for index, group in enumerate(optimizer.param_groups):
        for position, param in enumerate(group["params"]):
            if id(param) not in names:
                raise ValueError(
                    f"the optimizer's param group {index}, parameter {position} (shape "
                    f"{tuple(param.shape)}) is not among the named torch parameters"
                )
    return names


def _to_numpy(tensor: Any) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()  # NumPy has no bfloat16; float32 holds it exactly.
    return tensor.numpy()


def _like(array: np.ndarray, leaf: Any) -> jax.Array:
    """``array`` as a JAX array of the template leaf's dtype and, if it is placed, sharding."""
    array = np.asarray(array).astype(leaf.dtype)
    sharding = getattr(leaf, "sharding", None)
    # An uncommitted template leaf gives an uncommitted array: a jitted step
    # compiled for the one is not compiled again for the other.
    if sharding is None or (isinstance(leaf, jax.Array) and not leaf.committed):
        return jnp.asarray(array)
    return jax.device_put(array, sharding)


def _to_torch(array: Any, like: Any) -> Any:
    import torch

    array = np.array(array)  # A writable copy, which torch.from_numpy wants.
    if array.dtype not in (np.float64, np.float32, np.float16):
        array = array.astype(np.float32)  # bfloat16: exact in float32.
    tensor = torch.from_numpy(array)
    return tensor.to(dtype=like.dtype, device=like.device)


def _adam_states(inner_state: Any) -> list[optax.ScaleByAdamState]:
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    return [node for node in jax.tree.leaves(inner_state, is_leaf=is_adam) if is_adam(node)]


def _moments_owner(adam_states: list, params_paths: set[tuple]) -> dict[tuple, int]:
    """Which ``scale_by_adam`` state (index) holds each parameter's moments."""
    owner = {}
    for index, adam in enumerate(adam_states):
        for path in _paths(adam.mu):
            if path in owner:
                raise ValueError(f"two scale_by_adam states hold moments for {path}")
            owner[path] = index
    missing = sorted(map(str, params_paths - owner.keys()))
    if missing or owner.keys() - params_paths:
        raise ValueError(
            "the optimizer state is not an ars2_neo state of these params: no moments for "
            f"{missing}, moments for unknown leaves {sorted(map(str, owner.keys() - params_paths))}"
        )
    return owner


def _keeps_shear(optimizer: Any) -> bool:
    return optimizer.sam["rho"] > 0 and (optimizer.sam["k"] > 1 or optimizer.sam["adaptive"])


def _check_same_mode(optimizer: Any, sam: SharpnessAwareState) -> None:
    torch_keeps, jax_keeps = _keeps_shear(optimizer), sam.shear_force is not None
    if torch_keeps != jax_keeps:
        raise ValueError(
            "the SAM modes differ: the torch optimizer "
            f"(rho={optimizer.sam['rho']}, k={optimizer.sam['k']}, "
            f"adaptive={optimizer.sam['adaptive']}) {'keeps' if torch_keeps else 'keeps no'} "
            f"shear force, the JAX state {'has one' if jax_keeps else 'has none'}"
        )


def _replace_sam_state(opt_state: Any, new: SharpnessAwareState) -> Any:
    is_sam = lambda x: isinstance(x, SharpnessAwareState)
    return jax.tree.map(lambda x: new if is_sam(x) else x, opt_state, is_leaf=is_sam)


def torch_to_jax(
    parameters: Any,
    optimizer: Any,
    *,
    params_like: Any,
    opt_state_like: Any,
    name_map: NameMap,
) -> tuple[Any, Any]:
    """JAX params and ``ars2_neo`` state from a torch model and its ``ARS2Neo``.

    Args:
      parameters: the torch model (its ``named_parameters()``) or a mapping from
        parameter name to tensor; it must name every tensor the optimizer holds.
      optimizer: the :class:`ars2_torch.ARS2Neo` (load a saved ``state_dict`` into it
        first).
      params_like: the JAX params, or a template of them (structure, shapes,
        dtypes, shardings).
      opt_state_like: ``tx.init(params_like)`` for the ``ars2_neo`` of the same
        hyperparameters (or its ``jax.eval_shape``).
      name_map: torch name -> ``(JAX path, layout)``, a mapping or a function.

    Returns:
      ``(params, opt_state)`` shaped like the templates.

    Raises:
      ValueError: the per-tensor step counts differ (the message lists them), the
        name map or the shapes do not match, or the SAM modes differ.

    Example:
      >>> import jax.numpy as jnp, torch
      >>> import ars2_jax
      >>> from ars2_jax import convert
      >>> from ars2_torch import ARS2Neo
      >>> model = torch.nn.Linear(4, 3)
      >>> opt = ARS2Neo(model.parameters(), lr=1e-2, rho=0.05, k=1)
      >>> def closure():
      ...     loss = model(torch.ones(2, 4)).square().mean()
      ...     loss.backward()
      ...     return loss
      >>> opt.zero_grad(); _ = opt.step(closure)
      >>> params = {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}
      >>> tx = ars2_jax.ars2_neo(1e-2, rho=0.05, k=1)
      >>> name_map = {"weight": ("kernel", "linear"), "bias": ("bias", "same")}
      >>> params, opt_state = convert.torch_to_jax(
      ...     model, opt, params_like=params, opt_state_like=tx.init(params), name_map=name_map)
      >>> bool(jnp.all(params["kernel"] == jnp.asarray(model.weight.detach().numpy().T)))
      True
      >>> int(ars2_jax.diagnostics(opt_state)["step"])
      1
    """
    named = _named_parameters(parameters)
    jax_leaves = _paths(params_like)
    resolved = _resolve(name_map, named, jax_leaves)
    _optimizer_names(optimizer, named)
    sam_like = find_sam_state(opt_state_like)
    _check_same_mode(optimizer, sam_like)

    step = int(optimizer.sam_state["step"])
    steps = {name: int(optimizer.state[tensor].get("step", 0)) for name, tensor in named.items()}
    differ = {name: count for name, count in steps.items() if count != step}
    if differ:
        raise ValueError(
            f"optax keeps one step count, but these torch tensors did not take the optimizer's "
            f"{step} steps (per-tensor step counts): {differ}"
        )
    by_path = {path: name for name, (path, _) in resolved.items()}

    def from_torch(key: str | None) -> Callable:
        """Fills a JAX leaf from the parameter (``key=None``) or its optimizer state entry."""

        def leaf_value(path, leaf):
            name = by_path[_plain_path(path)]
            tensor = named[name] if key is None else optimizer.state[named[name]].get(key)
            if tensor is None:  # No state yet, or no shear force before the first sync.
                return jnp.zeros(leaf.shape, leaf.dtype)
            return _like(to_jax_layout(_to_numpy(tensor), resolved[name][1]), leaf)

        return leaf_value

    params = jax.tree_util.tree_map_with_path(from_torch(None), params_like)
    adam_states = _adam_states(sam_like.inner_state)
    _moments_owner(adam_states, set(jax_leaves))

    def convert_inner(node):
        if isinstance(node, optax.ScaleByAdamState):
            return optax.ScaleByAdamState(
                count=jnp.asarray(step, node.count.dtype),
                mu=jax.tree_util.tree_map_with_path(from_torch("exp_avg"), node.mu),
                nu=jax.tree_util.tree_map_with_path(from_torch("exp_avg_sq"), node.nu),
            )
        if isinstance(node, optax.ScaleByScheduleState):
            return optax.ScaleByScheduleState(count=jnp.asarray(step, node.count.dtype))
        return node

    is_counted = lambda x: isinstance(x, (optax.ScaleByAdamState, optax.ScaleByScheduleState))
    inner_state = jax.tree.map(convert_inner, sam_like.inner_state, is_leaf=is_counted)
    shear_force = sam_like.shear_force
    if shear_force is not None:
        shear_force = jax.tree_util.tree_map_with_path(from_torch("shear_force"), shear_force)
    scalars = {
        name: jnp.asarray(optimizer.sam_state[name], getattr(sam_like, name).dtype)
        for name in _SAM_INTEGERS + _SAM_FLOATS
    }
    sam = SharpnessAwareState(**scalars, shear_force=shear_force, inner_state=inner_state)
    return params, _replace_sam_state(opt_state_like, sam)


def jax_to_torch(
    params: Any,
    opt_state: Any,
    parameters: Any,
    optimizer: Any,
    *,
    name_map: NameMap,
) -> None:
    """Loads JAX params and an ``ars2_neo`` state into a torch model and its ``ARS2Neo``.

    The torch parameters are overwritten in place and the state goes through
    ``optimizer.load_state_dict``, so the optimizer's own checks apply (same SAM
    settings, state shapes).

    Args:
      params: the JAX params.
      opt_state: their ``ars2_neo`` state.
      parameters: the torch model (its ``named_parameters()``) or a mapping from
        parameter name to tensor; it must name every tensor the optimizer holds.
      optimizer: the :class:`ars2_torch.ARS2Neo` to load, built with the same
        hyperparameters as the JAX optimizer.
      name_map: torch name -> ``(JAX path, layout)``, a mapping or a function.

    Raises:
      ValueError: the name map or the shapes do not match, the SAM modes differ,
        or the state's step counts disagree.

    Example:
      >>> import jax, jax.numpy as jnp, torch
      >>> import ars2_jax
      >>> from ars2_jax import convert
      >>> from ars2_torch import ARS2Neo
      >>> tx = ars2_jax.ars2_neo(1e-2)
      >>> params = {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}
      >>> loss = lambda p: jnp.sum((jnp.ones((2, 4)) @ p["kernel"] + p["bias"]) ** 2)
      >>> opt_state = tx.init(params)
      >>> updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
      >>> model = torch.nn.Linear(4, 3)
      >>> opt = ARS2Neo(model.parameters(), lr=1e-2)
      >>> name_map = {"weight": ("kernel", "linear"), "bias": ("bias", "same")}
      >>> convert.jax_to_torch(params, opt_state, model, opt, name_map=name_map)
      >>> tuple(model.weight.shape), bool(torch.all(model.weight == 1))
      ((3, 4), True)
    """
    import torch

    named = _named_parameters(parameters)
    jax_leaves = _paths(params)
    resolved = _resolve(name_map, named, jax_leaves)
    names = _optimizer_names(optimizer, named)
    sam = find_sam_state(opt_state)
    _check_same_mode(optimizer, sam)
    step = int(sam.step)
    adam_states = _adam_states(sam.inner_state)
    owner = _moments_owner(adam_states, set(jax_leaves))
    counts = sorted({int(adam.count) for adam in adam_states})
    if counts != [step]:
        raise ValueError(f"the JAX state's step {step} and its Adam counts {counts} differ")
    moments = [(_paths(adam.mu), _paths(adam.nu)) for adam in adam_states]
    shear = _paths(sam.shear_force) if sam.shear_force is not None else None
    has_shear = shear is not None and int(sam.sync_count) > 0

    def torch_value(name: str, array: Any) -> Any:
        return _to_torch(to_torch_layout(np.asarray(array), resolved[name][1]), named[name])

    state_dict = optimizer.state_dict()
    state = {}
    for group, saved_group in zip(optimizer.param_groups, state_dict["param_groups"]):
        for param, key in zip(group["params"], saved_group["params"]):
            name = names[id(param)]
            path = resolved[name][0]
            if step == 0:
                continue  # A fresh torch optimizer holds no per-tensor state.
            mu, nu = moments[owner[path]]
            state[key] = {
                "step": step,
                "exp_avg": torch_value(name, mu[path]),
                "exp_avg_sq": torch_value(name, nu[path]),
            }
            if has_shear:
                state[key]["shear_force"] = torch_value(name, shear[path])
    state_dict["state"] = state
    sam_state = {name: int(getattr(sam, name)) for name in _SAM_INTEGERS}
    sam_state.update({name: float(getattr(sam, name)) for name in _SAM_FLOATS})
    state_dict["ars2"] = {**state_dict["ars2"], "sam_state": sam_state}
    optimizer.load_state_dict(state_dict)
    with torch.no_grad():
        for name, (path, _) in resolved.items():
            named[name].copy_(torch_value(name, jax_leaves[path]))
