"""Track labels and matrix views read from the Flax modules that own the parameters (SPEC §2)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from optax.contrib import MuonDimensionNumbers

from ars2_jax._alias import DEFAULT_MAX_DIM, default_param_labels
from ars2_jax._newton_schulz import default_dimension_numbers

ADAMW = "adamw"


class _Matrix(NamedTuple):
    """A kernel's view in its module's own layout (``core_ndim`` axes, no stacked axes)."""

    rows: tuple[int, ...]
    cols: tuple[int, ...]
    core_ndim: int


def _tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, Iterable) else (x,)


def _general(batch: int, inputs: int, outputs: int) -> _Matrix:
    # Flax's LinearGeneral / DenseGeneral kernel: (*batch, *inputs, *outputs).
    rows = tuple(range(batch, batch + inputs))
    cols = tuple(range(batch + inputs, batch + inputs + outputs))
    return _Matrix(rows, cols, batch + inputs + outputs)


def _last_is_output(ndim: int) -> _Matrix:
    return _Matrix(tuple(range(ndim - 1)), (ndim - 1,), ndim)


# Per head: Q/K/V kernels (in, heads, head_dim) as in × head_dim,
# the output kernel (heads, head_dim, out) as head_dim × out.
_PER_HEAD_QKV = _Matrix((0,), (2,), 3)
_PER_HEAD_OUT = _Matrix((1,), (2,), 3)


def _einsum_view(einsum_str: str) -> _Matrix | None:
    """The matrix view of an einsum kernel (the second operand), or ``None``."""
    lhs, output = einsum_str.replace(" ", "").split("->")
    inputs, kernel = lhs.split(",")
    if "." in kernel:
        return None
    contracted = [i for i, c in enumerate(kernel) if c in inputs and c not in output]
    produced = [i for i, c in enumerate(kernel) if c not in inputs and c in output]
    if contracted and produced:
        # Output axes ahead of the contracted ones are heads (and the Q/K/V index):
        # batched, as MultiHeadAttention's per-head view, if an output axis remains.
        after = [i for i in produced if i > contracted[0]]
        produced = after or produced
    if not contracted or not produced:
        return None
    return _Matrix(tuple(contracted), tuple(produced), len(kernel))


_NNX_NORMS = (nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm, nnx.GroupNorm)
_LINEN_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm, nn.GroupNorm)


def _nnx_rules(module: Any) -> dict[str, Any]:
    """``{attribute: _Matrix | ADAMW}`` for the Variables of one NNX module."""
    if isinstance(module, _NNX_NORMS):
        # Stacked by nnx.scan, a norm's scale is (layers, features): not a matrix.
        return {"scale": ADAMW, "bias": ADAMW}
    if isinstance(module, nnx.Embed):
        return {"embedding": ADAMW}
    if isinstance(module, nnx.LoRA):
        return {"lora_a": _Matrix((0,), (1,), 2), "lora_b": _Matrix((0,), (1,), 2)}
    if isinstance(module, nnx.Einsum):
        return {"kernel": _einsum_view(module.einsum_str), "bias": ADAMW}
    if isinstance(module, nnx.LinearGeneral):
        view = _general(
            len(module.batch_axis),
            len(_tuple(module.in_features)),
            len(_tuple(module.out_features)),
        )
        return {"kernel": view, "bias": ADAMW}
    if isinstance(module, nnx.Linear):
        return {"kernel": _Matrix((0,), (1,), 2), "bias": ADAMW}
    if isinstance(module, (nnx.Conv, nnx.ConvTranspose)):
        return {"kernel": _last_is_output(len(module.kernel_shape)), "bias": ADAMW}
    return {}


def _linen_rules(module: nn.Module) -> dict[str, Any]:
    """``{parameter name: _Matrix | ADAMW}`` for one Linen module."""
    if isinstance(module, _LINEN_NORMS):
        return {"scale": ADAMW, "bias": ADAMW}
    if isinstance(module, nn.Embed):
        return {"embedding": ADAMW}
    if isinstance(module, nn.Einsum):
        return {"kernel": _einsum_view(module.einsum_str), "bias": ADAMW}
    if isinstance(module, nn.DenseGeneral):
        view = _general(
            len(_tuple(module.batch_dims)), len(_tuple(module.axis)), len(_tuple(module.features))
        )
        return {"kernel": view, "bias": ADAMW}
    if isinstance(module, nn.Dense):
        return {"kernel": _Matrix((0,), (1,), 2), "bias": ADAMW}
    if type(module) in (nn.Conv, nn.ConvTranspose):
        return {"kernel": _last_is_output(len(_tuple(module.kernel_size)) + 2), "bias": ADAMW}
    return {}


def _attention_rules(path: tuple, rules: dict[tuple, Any]) -> None:
    """Per-head views for the four projections of an attention module at ``path``."""
    views = {"query": _PER_HEAD_QKV, "key": _PER_HEAD_QKV, "value": _PER_HEAD_QKV}
    for child, view in {**views, "out": _PER_HEAD_OUT}.items():
        rules[(*path, child, "kernel")] = view
        rules[(*path, child, "bias")] = ADAMW


def _key(entry: Any) -> Any:
    for field in ("key", "idx", "name"):
        if hasattr(entry, field):
            return getattr(entry, field)
    return entry


def _views(params: Any, rules: dict[tuple, Any], max_dim: int) -> dict[str, Any]:
    default_labels = jax.tree.leaves(default_param_labels(params, max_dim))
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    labels, dims = [], []
    for (path, leaf), default_label in zip(leaves_with_path, default_labels):
        name = jax.tree_util.keystr(path)
        rule = rules.get(tuple(_key(entry) for entry in path))
        shape = jnp.shape(leaf)
        if rule == ADAMW:
            labels.append(ADAMW)
            dims.append(None)
            continue
        if isinstance(rule, _Matrix) and len(shape) >= rule.core_ndim:
            stacked = len(shape) - rule.core_ndim  # nnx.scan / nn.scan's leading layer axes
            labels.append("ars2" if max(shape) < max_dim else ADAMW)
            dims.append(
                MuonDimensionNumbers(
                    reduction_axis=tuple(stacked + a for a in rule.rows),
                    output_axis=tuple(stacked + a for a in rule.cols),
                )
            )
            continue
        labels.append(default_label)
        dims.append(None)
        if default_label == "ars2" and len(shape) >= 3:
            warnings.warn(
                f"{name} of shape {shape} has no module whose layout ARS2-Neo knows: it takes "
                f"the default view {default_dimension_numbers(len(shape))} (SPEC §2), which a "
                "bare array cannot confirm; pass its dimension numbers if that is wrong",
                stacklevel=3,
            )
    return {
        "param_labels": jax.tree.unflatten(treedef, labels),
        "weight_dimension_numbers": jax.tree.unflatten(treedef, dims),
    }


def nnx_matrix_views(
    model: nnx.Module, wrt: Any = nnx.Param, *, max_dim: int = DEFAULT_MAX_DIM
) -> dict[str, Any]:
    """Track labels and matrix views of an NNX model's parameters, read from its modules.

    A bare 3-D array cannot tell which of its axes are inputs (SPEC §2); the
    module owning it can. Per module:

    * ``Linear``, ``LoRA``: the ``(in, out)`` matrix; ``LinearGeneral``:
      ``(*batch, *in, *out)`` as ``in × out`` matrices, one per batch index;
    * ``MultiHeadAttention``: per head, ``in × head_dim`` for the Q/K/V kernels
      ``(in, heads, head_dim)``, ``head_dim × out`` for the output kernel
      ``(heads, head_dim, out)``;
    * ``Conv``, ``ConvTranspose``: ``(kh·kw·in, out)``;
    * ``Einsum``: the kernel axes summed over form the rows, those only the output
      has the columns, axes all three operands share are batched, and so are
      output axes ahead of the summed ones (heads: ``"BTD,NDH->BTNH"`` is per head
      ``D × H``; ``"BTNH,NHD->BTD"`` is one ``(N·H) × D`` matrix);
    * ``Embed`` tables, the scales and biases of ``LayerNorm``, ``RMSNorm``,
      ``BatchNorm`` and ``GroupNorm``, and every module's biases, of any shape
      (stacked layers' included): the AdamW track;
    * leading axes beyond the module's own kernel (``nnx.scan`` / ``nnx.vmap``
      stacks of layers) are batched: each layer is orthogonalized apart.

    Other leaves keep :func:`ars2_jax.default_param_labels` and the default view of
    :func:`ars2_jax.default_dimension_numbers`, with a warning when they have 3 or
    more axes and go to the ARS2 track. Kernels with a dimension of ``max_dim``
    or more go to AdamW, as by default.

    Args:
      model: the model (its module tree is read, nothing is run).
      wrt: the filter the optimizer is built with.
      max_dim: see :func:`ars2_jax.default_param_labels`.

    Returns:
      ``{"param_labels": ..., "weight_dimension_numbers": ...}``, trees shaped like
      ``nnx.state(model, wrt)``, to pass to :func:`ars2_jax.ars2_neo` as keywords.

    Example:
      >>> from flax import nnx
      >>> import ars2_jax
      >>> from ars2_jax.training import nnx_matrix_views
      >>> model = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False,
      ...                                rngs=nnx.Rngs(0))
      >>> views = nnx_matrix_views(model)
      >>> views["weight_dimension_numbers"]["query"]["kernel"]
      MuonDimensionNumbers(reduction_axis=(0,), output_axis=(2,))
      >>> views["param_labels"]["query"]["bias"]
      'adamw'
      >>> optimizer = nnx.Optimizer(model, ars2_jax.ars2_neo(1e-3, **views), wrt=nnx.Param)
    """
    rules: dict[tuple, Any] = {}
    attention = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.MultiHeadAttention):
            attention.append(path)
        if isinstance(node, nnx.Module):
            for name, rule in _nnx_rules(node).items():
                rules[(*path, name)] = rule
    for path in attention:
        _attention_rules(path, rules)
    return _views(nnx.as_pure(nnx.state(model, wrt)), rules, max_dim)


def linen_matrix_views(
    module: nn.Module, *init_args: Any, max_dim: int = DEFAULT_MAX_DIM, **init_kwargs: Any
) -> dict[str, Any]:
    """Track labels and matrix views of a Linen module's ``params``, read from its submodules.

    The rules of :func:`nnx_matrix_views`, for ``Dense``, ``DenseGeneral``,
    ``MultiHeadDotProductAttention`` (and ``SelfAttention``), ``Conv``,
    ``ConvTranspose``, ``Einsum`` and ``Embed``; ``nn.scan``'s stacked layer
    axis is batched. The submodules are found by tracing ``module.init`` on the
    given inputs under :func:`jax.eval_shape` (no computation is run).

    Args:
      module: the Linen module.
      *init_args: the inputs ``module.init(rngs, *init_args, **init_kwargs)`` takes.
      max_dim: see :func:`ars2_jax.default_param_labels`.
      **init_kwargs: see ``init_args``.

    Returns:
      ``{"param_labels": ..., "weight_dimension_numbers": ...}``, trees shaped like
      ``variables["params"]``, to pass to :func:`ars2_jax.ars2_neo` as keywords.

    Example:
      >>> import jax.numpy as jnp, flax.linen as nn
      >>> from ars2_jax.training import linen_matrix_views
      >>> views = linen_matrix_views(nn.MultiHeadDotProductAttention(num_heads=2),
      ...                            jnp.zeros((1, 5, 8)))
      >>> views["weight_dimension_numbers"]["out"]["kernel"]
      MuonDimensionNumbers(reduction_axis=(1,), output_axis=(2,))
    """
    rules: dict[tuple, Any] = {}

    def interceptor(next_fun, args, kwargs, context):
        found = context.module
        if isinstance(found, nn.MultiHeadDotProductAttention):
            _attention_rules(found.path, rules)
        for name, rule in _linen_rules(found).items():
            rules.setdefault((*found.path, name), rule)
        return next_fun(*args, **kwargs)

    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(0)}
    with nn.intercept_methods(interceptor):
        variables = jax.eval_shape(lambda: module.init(rngs, *init_args, **init_kwargs))
    return _views(variables["params"], rules, max_dim)
