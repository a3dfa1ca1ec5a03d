"""``ars2_neo``: the SAM wrapper around the ARS2 and AdamW tracks, composed from optax."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax.transforms import MaskedNode

from ars2_jax._distributed import sharded_axes
from ars2_jax._orthogonalize import (
    WeightDimensionNumbers,
    check_ns_sharding,
    is_dimension_numbers_leaf,
    orthogonalize_with_energy,
)
from ars2_jax._sam import SecondMomentsFn, sharpness_aware
from ars2_jax._validation import check, check_float_dtype, check_static_int

TRACKS = ("ars2", "adamw")
#: Tensors with a dimension this large (embedding tables) stay on AdamW (SPEC §1).
DEFAULT_MAX_DIM = 10000
#: The arguments ``optax.inject_hyperparams`` must leave alone: integers that choose
#: shapes or modes, dtypes, label and dimension-number trees or functions, the
#: axis name and the gradient transform. Pass them as ``static_args``:
#: ``optax.inject_hyperparams(ars2_neo, static_args=STATIC_ARGS)(...)``.
STATIC_ARGS = (
    "ns_steps",
    "ns_dtype",
    "k",
    "param_labels",
    "weight_dimension_numbers",
    "axis_name",
    "gradient_transform",
    "ns_sharding",
)


def default_param_labels(params: optax.Params, max_dim: int = DEFAULT_MAX_DIM) -> Any:
    """SPEC §1: ``'ars2'`` for leaves with ``ndim >= 2`` and every dimension below
    ``max_dim``, ``'adamw'`` for the rest.

    Args:
      params: a tree of arrays (or of anything with a shape).
      max_dim: leaves with a dimension of at least this size (embedding tables)
        go to AdamW.

    Returns:
      A tree of ``'ars2'`` / ``'adamw'`` labels shaped like ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> from ars2_jax import default_param_labels
      >>> params = {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4), "embed": jnp.ones((10000, 8))}
      >>> default_param_labels(params)
      {'bias': 'adamw', 'embed': 'adamw', 'kernel': 'ars2'}
    """
    return jax.tree.map(
        lambda x: "ars2" if jnp.ndim(x) >= 2 and max(jnp.shape(x)) < max_dim else "adamw",
        params,
    )


def _resolve_labels(param_labels: Any, params: Any) -> Any:
    labels = param_labels(params) if callable(param_labels) else param_labels
    # A prefix tree of labels is allowed, as in optax.partition: broadcast it.
    try:
        labels = jax.tree.map(
            lambda label, sub: jax.tree.map(lambda _: label, sub),
            labels,
            params,
        )
    except (ValueError, TypeError) as error:
        raise ValueError(
            "param_labels must be a tree (or a prefix of the tree) of the params with a "
            f"label 'ars2' or 'adamw' for every leaf: {error}"
        ) from error
    for path, label in jax.tree_util.tree_leaves_with_path(labels):
        if label not in TRACKS:
            raise ValueError(
                f"param_labels gives {label!r} to {jax.tree_util.keystr(path)}; "
                f"the tracks are {TRACKS}"
            )
    for (path, label), leaf in zip(
        jax.tree_util.tree_leaves_with_path(labels), jax.tree.leaves(params)
    ):
        if label == "ars2" and jnp.ndim(leaf) < 2:
            raise ValueError(
                f"param_labels puts {jax.tree_util.keystr(path)} of shape {jnp.shape(leaf)} "
                "on the 'ars2' track, which needs ndim >= 2"
            )
    return labels


def _track_second_moments(
    labels_fn: Callable, hyper: dict[str, tuple[Any, Any]]
) -> SecondMomentsFn:
    """Assembles per-leaf ``(nu, b2, eps)`` from the partition's two masked Adam states.

    Each track's ``nu`` is shaped like the params with a ``MaskedNode`` where the
    other track owns the leaf. The params themselves may hold ``MaskedNode``s too,
    when an outer ``optax.partition`` or ``optax.masked`` wraps ARS2-Neo: the
    labels carry those, so mapping over the labels pairs every label with its own
    leaf of both ``nu`` trees, whatever either wrapper masked.
    """

    def second_moments(partition_state, params):
        labels = labels_fn(params)
        nus = [
            optax.tree_utils.tree_get(partition_state.inner_states[track], "nu") for track in TRACKS
        ]
        nu = jax.tree.map(lambda label, *track_nus: track_nus[TRACKS.index(label)], labels, *nus)
        b2 = jax.tree.map(lambda label: hyper[label][0], labels)
        eps = jax.tree.map(lambda label: hyper[label][1], labels)
        return nu, b2, eps

    return second_moments


def _masked_dimension_numbers(weight_dimension_numbers: WeightDimensionNumbers) -> Callable:
    """Dimension numbers shaped like the ARS2 track's masked updates inside the partition."""

    def resolve(updates):
        dims = weight_dimension_numbers
        if callable(dims):
            dims = dims(updates)
        if dims is None or is_dimension_numbers_leaf(dims):
            return dims
        # The updates lead: an outer optax.partition or optax.masked may have
        # replaced a whole subtree of dims by one MaskedNode.
        return jax.tree.map(
            lambda update, dim: update if isinstance(update, MaskedNode) else dim,
            updates,
            dims,
            is_leaf=lambda x: isinstance(x, MaskedNode),
        )

    return resolve


def ars2_neo(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    ns_steps: int = 5,
    ns_dtype: Any = None,
    rho: float = 0.0,
    k: int = 0,
    alpha: float = 0.1,
    *,
    adaptive: bool = False,
    adaptive_beta: float = 0.99,
    adaptive_lambda: float = 2.0,
    adaptive_gamma: float = 2.0,
    adamw_learning_rate: optax.ScalarOrSchedule | None = None,
    adamw_b1: float | None = None,
    adamw_b2: float | None = None,
    adamw_eps: float | None = None,
    adamw_weight_decay: float | None = None,
    param_labels: Any = None,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    axis_name: str | None = None,
    gradient_transform: optax.GradientTransformation | None = None,
    ns_sharding: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""ARS2-Neo: Adam's energy along a Newton-Schulz direction, with optional SAM.

    Matrix parameters (the ARS2 track) step along their Adam update's energy times
    its orthogonalized direction; the others (the AdamW track) with AdamW:

    .. math::

      u_t = \hat m_t / (\sqrt{\hat v_t} + \epsilon), \qquad
      \theta_{t+1} = \theta_t (1 - \eta \lambda) - \eta\, \|u_t\|_F\, \mathrm{NS}(u_t)

    With ``rho > 0`` the gradient is first replaced by SAM's (see
    :func:`ars2_jax.sharpness_aware`): every step (``k=1``), every ``k`` steps with
    the cached shear force injected in between (``k > 1``), or when the gradient
    drifts against the shear (``adaptive=True``, A-GSAM). The composition is::

      sharpness_aware(partition({
          'ars2': chain(scale_by_adam, orthogonalize_with_energy,
                        add_decayed_weights, scale_by_learning_rate),
          'adamw': adamw}))

    Edge cases (tested in ``tests/test_hardening_jax.py``):

    * a NaN or Inf in the gradient or in any gradient ``grad_fn`` returns skips
      the step: zero updates, the state untouched but for ``skipped_steps``
      (see :func:`ars2_jax.sharpness_aware`);
    * a zero gradient leaves a leaf to weight decay alone (``NS(0) = 0``, and its
      perturbation and shear force are 0); an empty params tree is a no-op that
      counts a step;
    * a rank-1 ``u`` (a ``1×N`` or ``N×1`` leaf, all-equal gradients) has one
      singular value, so ``NS(u) = f⁵(1)·u/‖u‖`` with ``f⁵(1) ≈ 0.70``: such a leaf
      steps like Adam scaled by 0.70 (within a few % with the bfloat16 iteration);
    * scalars and vectors go to AdamW; a 5-D or larger kernel is the matrix
      ``(prod(rest), out)``;
    * bfloat16 params keep bfloat16 moments, in which a ``b2`` above about 0.998
      stops the second moment from decaying (``b2`` or ``ν·b2`` rounds to 1 or to
      ``ν``, also with ``inject_hyperparams(..., hyperparam_dtype=jnp.float32)``):
      use ``b2 <= 0.995`` with bfloat16 params, or float32 params;
    * hyperparameters that are not one finite real number (a string, ``None``,
      a sequence, ``nan``) raise ``ValueError``; gradients or ``grad_fn`` outputs
      shaped unlike the params raise ``ValueError``.

    Args:
      learning_rate: the ARS2 track's learning rate (or schedule).
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added to ``sqrt(v̂)``.
      weight_decay: decoupled weight decay, multiplied by the learning rate.
      ns_steps: Newton-Schulz iterations (static).
      ns_dtype: Newton-Schulz dtype; ``None``: bfloat16 for float32 parameters, the
        parameter's own dtype otherwise (static).
      rho: the SAM radius, per tensor; ``0`` turns SAM off.
      k: the SAM period (static): ``1`` every step, ``> 1`` every ``k`` steps (the
        fallback period when adaptive), ``0`` with SAM off.
      alpha: the shear strength on non-sync steps.
      adaptive: A-GSAM: sync when the drift ``φ`` falls below ``−λ·std(φ)``.
      adaptive_beta: EMA decay of ``φ²``.
      adaptive_lambda: ``λ``.
      adaptive_gamma: ``α_t = alpha·(1 + max(0, φ))^γ``.
      adamw_learning_rate: the AdamW track's values; ``None``: the ARS2 track's.
      adamw_b1: see ``adamw_learning_rate``.
      adamw_b2: see ``adamw_learning_rate``.
      adamw_eps: see ``adamw_learning_rate``.
      adamw_weight_decay: see ``adamw_learning_rate``.
      param_labels: a tree (or prefix tree) of ``'ars2'`` / ``'adamw'``, or a function
        of the params returning one; ``None``: :func:`default_param_labels`.
      weight_dimension_numbers: the matrix view of each ARS2 leaf (see
        :func:`ars2_jax.orthogonalize_with_energy`); ``None``: the Flax views.
      axis_name: if set, the gradients and ``grad_fn``'s outputs are
        ``pmean``-ed over this axis (``pmap`` / ``shard_map``).
      gradient_transform: a stateless transformation applied to the gradient and
        to every output of ``grad_fn``, e.g. ``optax.clip_by_global_norm(1.0)``.
        Under ``shard_map`` with sharded params it sees local blocks (a global
        norm would be the block's).
      ns_sharding: a :class:`ars2_jax.NewtonSchulzSharding` with specs like the
        params: Newton-Schulz runs whole on one owner device per matrix, and under
        ``shard_map`` SAM's norms and φ sum over the axes each block is split over
        (``docs/sharded_newton_schulz.md``). ``None``: where XLA puts it. The state is the same
        either way.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs`. Call
      ``tx.update(grads, state, params, grad_fn=grad_fn)`` with
      ``grad_fn(params) -> grads`` on the same batch; ``grad_fn`` may be omitted
      only with SAM off; inside ``optax.partition`` or ``optax.masked``, pass
      ``grad_fn=ars2_jax.masked_grad_fn(grad_fn, params)``.
      :func:`ars2_jax.diagnostics` reads SPEC §6 from the state.
      Under :func:`optax.inject_hyperparams` pass
      ``static_args=ars2_jax.STATIC_ARGS``.

    References:
      Kingma and Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2015

      Jordan et al., `Muon: An optimizer for hidden layers in neural networks
      <https://kellerjordan.github.io/posts/muon/>`_, 2024

      Foret et al., `Sharpness-Aware Minimization
      <https://arxiv.org/abs/2010.01412>`_, 2021

      Kwon et al., `ASAM <https://arxiv.org/abs/2102.11600>`_, 2021

      Zhuang et al., `Surrogate Gap Guided Sharpness-Aware Minimization
      <https://arxiv.org/abs/2203.08065>`_, 2022

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import ars2_jax
      >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
      >>> batch = jnp.arange(8.0).reshape(2, 4)
      >>> loss = lambda p: jnp.mean((batch @ p["w"] + p["b"]) ** 2)
      >>> tx = ars2_jax.ars2_neo(1e-2, rho=0.05, k=4, adaptive=True)
      >>> state = tx.init(params)
      >>> @jax.jit
      ... def step(params, state):
      ...     grads = jax.grad(loss)(params)
      ...     updates, state = tx.update(grads, state, params, grad_fn=jax.grad(loss))
      ...     return optax.apply_updates(params, updates), state
      >>> params, state = step(params, state)
      >>> int(ars2_jax.diagnostics(state)["sync_count"])
      1
    """
    _validate_track("", learning_rate, b1, b2, eps, weight_decay)
    check_static_int("ns_steps", ns_steps, 1)
    check_float_dtype("ns_dtype", ns_dtype)
    check_ns_sharding(ns_sharding)
    adamw_learning_rate = learning_rate if adamw_learning_rate is None else adamw_learning_rate
    adamw_b1 = b1 if adamw_b1 is None else adamw_b1
    adamw_b2 = b2 if adamw_b2 is None else adamw_b2
    adamw_eps = eps if adamw_eps is None else adamw_eps
    adamw_weight_decay = weight_decay if adamw_weight_decay is None else adamw_weight_decay
    _validate_track(
        "adamw_", adamw_learning_rate, adamw_b1, adamw_b2, adamw_eps, adamw_weight_decay
    )

    labels = default_param_labels if param_labels is None else param_labels
    labels_fn = lambda params: _resolve_labels(labels, params)
    ars2_track = optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        orthogonalize_with_energy(
            ns_steps,
            ns_dtype,
            weight_dimension_numbers=_masked_dimension_numbers(weight_dimension_numbers),
            ns_sharding=ns_sharding,
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    adamw_track = optax.adamw(
        learning_rate=adamw_learning_rate,
        b1=adamw_b1,
        b2=adamw_b2,
        eps=adamw_eps,
        weight_decay=adamw_weight_decay,
    )
    tracks = optax.partition({"ars2": ars2_track, "adamw": adamw_track}, labels_fn)
    second_moments = _track_second_moments(
        labels_fn, {"ars2": (b2, eps), "adamw": (adamw_b2, adamw_eps)}
    )
    return sharpness_aware(
        tracks,
        second_moments,
        rho,
        k,
        alpha,
        adaptive=adaptive,
        adaptive_beta=adaptive_beta,
        adaptive_lambda=adaptive_lambda,
        adaptive_gamma=adaptive_gamma,
        axis_name=axis_name,
        gradient_transform=gradient_transform,
        sharded_axes=None if ns_sharding is None else partial(sharded_axes, ns_sharding),
    )


def _validate_track(prefix: str, learning_rate, b1, b2, eps, weight_decay) -> None:
    check(f"{prefix}learning_rate", learning_rate, lambda v: v >= 0, "must be >= 0")
    check(f"{prefix}b1", b1, lambda v: 0 <= v < 1, "must be in [0, 1)")
    check(f"{prefix}b2", b2, lambda v: 0 <= v < 1, "must be in [0, 1)")
    check(f"{prefix}eps", eps, lambda v: v > 0, "must be > 0")
    check(f"{prefix}weight_decay", weight_decay, lambda v: v >= 0, "must be >= 0")
