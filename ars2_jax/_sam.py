"""The SAM wrapper of ARS2-Neo: sync, delayed and adaptive (A-GSAM) modes (SPEC §5, §6)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.transforms import MaskedNode

from ars2_jax._orthogonalize import accumulation_dtype, frobenius_norm, psum_over
from ars2_jax._validation import check, check_static_int, concrete_float

#: Guards every norm and ratio against division by zero (SPEC: ``tiny``).
TINY = 1e-12

# (nu, b2, eps): per-leaf trees, shaped like the params, of each tensor's second
# moment as the inner transformation holds it before this step's update, and the
# β2 and ε of the tensor's track.
SecondMoments = tuple[Any, Any, Any]
SecondMomentsFn = Callable[[optax.OptState, optax.Params], SecondMoments]


class SharpnessAwareState(NamedTuple):
    """State of :func:`sharpness_aware`, the outermost state of :func:`ars2_neo`.

    Example:
      >>> import jax.numpy as jnp
      >>> import ars2_jax
      >>> state = ars2_jax.ars2_neo(1e-2, rho=0.05, k=4).init({"w": jnp.ones((3, 2))})
      >>> isinstance(state, ars2_jax.SharpnessAwareState), int(state.step)
      (True, 0)
      >>> state.shear_force["w"].shape  # kept by the delayed and adaptive modes
      (3, 2)
    """

    step: jax.Array  # shape=(), int32: steps taken (t of SPEC §5), skipped steps excluded
    last_sync: jax.Array  # shape=(), int32: the last sync step, 0 before the first
    sync_count: jax.Array  # shape=(), int32
    skipped_steps: jax.Array  # shape=(), int32: steps skipped for non-finite gradients
    phi: jax.Array  # shape=(), float: φ_t of the last step (0 unless adaptive)
    phi_var: jax.Array  # shape=(), float: the EMA of φ² (0 unless adaptive)
    threshold: jax.Array  # shape=(), float: −λ·sqrt(phi_var) (0 unless adaptive)
    alpha_t: jax.Array  # shape=(), float: the shear strength of the last step
    shear_force: optax.Updates  # like params; None when the mode keeps no shear
    inner_state: optax.OptState


def _scalar_dtype() -> jnp.dtype:
    # float64 under jax_enable_x64, float32 otherwise, whatever the params' dtype.
    return jnp.asarray(0.0).dtype


def _tree_sum(fn: Callable[..., jax.Array], *trees: Any) -> jax.Array:
    terms = jax.tree.leaves(jax.tree.map(fn, *trees))
    return sum(terms, jnp.zeros([], _scalar_dtype()))


def _dot(a: jax.Array, b: jax.Array, axes: Any = ()) -> jax.Array:
    dtype = accumulation_dtype(jnp.result_type(a, b))
    return psum_over(jnp.sum(a.astype(dtype) * b.astype(dtype)), axes).astype(_scalar_dtype())


def tree_all_finite(tree: Any, axes: Any = ()) -> jax.Array:
    """Whether every entry of every leaf is finite (a traced boolean), on every device
    along ``axes`` (under ``shard_map``, where each holds other blocks)."""
    leaves = jax.tree.leaves(tree)
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves], dtype=bool))
    if not axes:
        return finite
    return jax.lax.pmin(finite.astype(jnp.int32), tuple(sorted(axes))) > 0


def perturbation(
    param: jax.Array,
    grad: jax.Array,
    nu: jax.Array,
    b2: jax.Array,
    eps: jax.Array,
    rho: jax.Array,
    step: jax.Array,
    axes: Any = (),
) -> jax.Array:
    """The scale-aware natural-gradient perturbation ``e`` of one tensor (SPEC §5.2).

    ``nu`` is the second moment before this step's update; ``‖e‖ = rho`` unless the
    direction is zero. The direction is divided by its largest entry before its
    norm is taken: ``rho·(n/s) / (‖n/s‖ + tiny/s)`` is SPEC's ``rho·n / (‖n‖ + tiny)``,
    and stays finite when ``‖n‖²`` would overflow (on step 1 ``n = g/eps·|θ|``).

    Args:
      param: the tensor ``θ``.
      grad: its gradient ``g``.
      nu: its second moment ``ν`` before this step's update.
      b2: the ``β2`` of its track.
      eps: the ``ε`` of its track.
      rho: the SAM radius.
      step: this step's number ``t`` (1-based).
      axes: under ``shard_map``, the mesh axes the tensor's block is split over
        (its norms are summed over them); ``()`` otherwise.

    Returns:
      ``e``, shaped and typed like ``param``.

    Example:
      >>> import jax.numpy as jnp
      >>> from ars2_jax import perturbation
      >>> e = perturbation(jnp.ones((2, 2)), jnp.array([[1.0, -2.0], [0.5, 0.0]]),
      ...                  nu=jnp.full((2, 2), 0.5), b2=0.999, eps=1e-8, rho=0.05, step=3)
      >>> round(float(jnp.linalg.norm(e)), 6)
      0.05
    """
    bias = 1 - b2 ** jnp.maximum(1, step - 1) + TINY
    v_hat_prev = nu / bias
    direction = grad / (jnp.sqrt(v_hat_prev) + eps) * jnp.abs(param)
    largest = jnp.max(jnp.abs(direction), initial=0.0)
    if axes:
        largest = jax.lax.pmax(largest, tuple(sorted(axes)))
    scale = jnp.where(largest > 0, largest, 1.0)
    unit = direction / scale
    e = rho * unit / (frobenius_norm(unit, axes) + TINY / scale)
    return e.astype(param.dtype)


def shear_force(adversarial_grad: jax.Array, grad: jax.Array, axes: Any = ()) -> jax.Array:
    """The component of ``adversarial_grad`` orthogonal to ``grad`` (SPEC §5.2).

    Computed from ``Δ = g_adv − g`` as ``Δ − (⟨Δ, g⟩ / (‖g‖² + tiny))·g``: the same
    vector as SPEC's ``g_adv − (⟨g_adv, g⟩ / (‖g‖² + tiny))·g`` up to
    ``tiny/(‖g‖² + tiny)·g``, without the cancellation that costs the SPEC form
    its low-order digits in float32 when ``g_adv ≈ g``.

    Args:
      adversarial_grad: the gradient at the perturbed point, ``g_adv``.
      grad: the gradient at ``θ``, ``g``.
      axes: see :func:`perturbation`.

    Returns:
      The shear force ``v``, shaped and typed like ``grad``.

    Example:
      >>> import jax.numpy as jnp
      >>> from ars2_jax import shear_force
      >>> shear_force(jnp.array([1.0, 1.0]), jnp.array([1.0, 0.0]))
      Array([0., 1.], dtype=float32)
    """
    delta = adversarial_grad - grad
    coef = _dot(delta, grad, axes) / (_dot(grad, grad, axes) + TINY)
    return (delta - coef * grad).astype(grad.dtype)


def inject_shear(
    grad: jax.Array, shear: jax.Array, alpha_t: jax.Array, axes: Any = ()
) -> jax.Array:
    """``g + α_t · ‖g‖ / ‖v_shear‖ · v_shear``: the cached shear on a non-sync step (SPEC §5.3).

    Args:
      grad: this step's gradient ``g``.
      shear: the cached shear force ``v_shear``.
      alpha_t: the shear strength.
      axes: see :func:`perturbation`.

    Returns:
      The gradient handed to the inner transformation, typed like ``grad``.

    Example:
      >>> import jax.numpy as jnp
      >>> from ars2_jax import inject_shear
      >>> inject_shear(jnp.array([3.0, 4.0]), jnp.array([0.0, 2.0]), alpha_t=0.1)
      Array([3. , 4.5], dtype=float32)
    """
    scale = frobenius_norm(grad, axes) / (frobenius_norm(shear, axes) + TINY)
    return (grad + alpha_t * scale * shear).astype(grad.dtype)


def adam_second_moments(b2: float, eps: float) -> SecondMomentsFn:
    """The ``second_moments`` function of an inner transformation holding one Adam state.

    For example ``optax.adam`` or ``optax.chain(optax.scale_by_adam(), ...)``; every
    leaf shares ``b2`` and ``eps``. :func:`ars2_jax.ars2_neo` builds its own accessor
    for its two tracks.

    Args:
      b2: the inner Adam's ``β2``.
      eps: the inner Adam's ``ε``.

    Returns:
      ``second_moments(inner_state, params) -> (nu, b2, eps)``, three trees shaped
      like ``params``, as :func:`sharpness_aware` takes it.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from ars2_jax import adam_second_moments
      >>> params = {"w": jnp.ones((2, 3))}
      >>> nu, b2, eps = adam_second_moments(0.999, 1e-8)(optax.adam(1e-2).init(params), params)
      >>> nu["w"].shape, b2["w"], eps["w"]
      ((2, 3), 0.999, 1e-08)
    """

    def second_moments(inner_state, params):
        nu = optax.tree_utils.tree_get(inner_state, "nu")
        return (
            nu,
            jax.tree.map(lambda _: b2, params),
            jax.tree.map(lambda _: eps, params),
        )

    return second_moments


def _is_masked(x: Any) -> bool:
    return isinstance(x, MaskedNode)


def masked_grad_fn(
    grad_fn: Callable[[optax.Params], optax.Updates], params: optax.Params
) -> Callable[[optax.Params], optax.Updates]:
    """A ``grad_fn`` for an ARS2-Neo nested in ``optax.partition`` or ``optax.masked``.

    Those wrappers hand their inner transformation the params with
    ``optax.transforms.MaskedNode()`` in place of the leaves (or subtrees) it does
    not own, and forward ``grad_fn`` unchanged, so SAM would call a full-tree
    ``grad_fn`` on a masked tree. The returned function fills every masked place
    with the leaf of ``params`` (the other transformations' parameters stay where
    they are: only the inner optimizer's leaves are perturbed), calls
    ``grad_fn``, and masks the gradients like its input. On a tree with no
    ``MaskedNode`` it is ``grad_fn`` itself, so one function serves every
    transformation of the partition.

    Args:
      grad_fn: ``grad_fn(params) -> grads`` on the whole params tree.
      params: the whole params tree of this step (what ``tx.update`` gets).

    Returns:
      ``grad_fn(masked_params) -> masked_grads``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import ars2_jax
      >>> params = {"a": jnp.zeros(3), "b": {"w": jnp.zeros((8, 4))}}
      >>> loss = lambda p: jnp.sum((p["b"]["w"] - 1) ** 2) + jnp.sum((p["a"] - 1) ** 2)
      >>> tx = optax.partition(
      ...     {"x": ars2_jax.ars2_neo(1e-2, rho=0.05, k=1), "y": optax.sgd(1e-2)},
      ...     {"a": "y", "b": "x"})
      >>> state = tx.init(params)
      >>> grad_fn = ars2_jax.masked_grad_fn(jax.grad(loss), params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params, grad_fn=grad_fn)
      >>> updates["b"]["w"].shape
      (8, 4)
    """

    def masked(masked_params):
        full = jax.tree.map(
            lambda leaf, whole: whole if _is_masked(leaf) else leaf,
            masked_params,
            params,
            is_leaf=_is_masked,
        )
        grads = grad_fn(full)
        return jax.tree.map(
            lambda leaf, grad: leaf if _is_masked(leaf) else grad,
            masked_params,
            grads,
            is_leaf=_is_masked,
        )

    return masked


def _check_same_structure(
    tree: Any, reference: Any, what: str, reference_name: str = "the gradients"
) -> None:
    if jax.tree.structure(tree) != jax.tree.structure(reference):
        raise ValueError(
            f"{what} has the tree structure {jax.tree.structure(tree)}, "
            f"but {reference_name} have {jax.tree.structure(reference)}"
        )
    for (path, leaf), ref in zip(
        jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(reference)
    ):
        if jnp.shape(leaf) != jnp.shape(ref):
            raise ValueError(
                f"{what} has a leaf {jax.tree_util.keystr(path)} of shape {jnp.shape(leaf)} "
                f"where {reference_name} have {jnp.shape(ref)}"
            )


def validate_sam(rho: Any, k: Any, alpha: Any, adaptive: Any, **adaptive_args: Any) -> None:
    """Raises ``ValueError`` for bad or inconsistent SAM settings (SPEC §5).

    ``k`` and ``adaptive`` must be static; the float settings are checked only
    when concrete (under :func:`optax.inject_hyperparams` they may be traced).
    """
    check_static_int("k", k, 0)
    if not isinstance(adaptive, bool):
        raise ValueError(f"adaptive={adaptive!r} must be a bool")
    check("rho", rho, lambda v: v >= 0, "must be >= 0")
    check("alpha", alpha, lambda v: v >= 0, "must be >= 0")
    check(
        "adaptive_beta", adaptive_args["adaptive_beta"], lambda v: 0 <= v < 1, "must be in [0, 1)"
    )
    check("adaptive_lambda", adaptive_args["adaptive_lambda"], lambda v: v >= 0, "must be >= 0")
    check("adaptive_gamma", adaptive_args["adaptive_gamma"], lambda v: v >= 0, "must be >= 0")
    rho_value = concrete_float("rho", rho)
    if rho_value is None:
        return
    if rho_value > 0 and k == 0 and not adaptive:
        raise ValueError(
            f"rho={rho_value} turns SAM on but k=0 and adaptive=False: set k >= 1 or adaptive"
        )
    if rho_value == 0 and (k > 0 or adaptive):
        raise ValueError(f"rho=0 turns SAM off but k={k}, adaptive={adaptive}: set rho > 0")


def sharpness_aware(
    inner: optax.GradientTransformation,
    second_moments: SecondMomentsFn,
    rho: optax.ScalarOrSchedule = 0.05,
    k: int = 1,
    alpha: float = 0.1,
    *,
    adaptive: bool = False,
    adaptive_beta: float = 0.99,
    adaptive_lambda: float = 2.0,
    adaptive_gamma: float = 2.0,
    axis_name: str | None = None,
    gradient_transform: optax.GradientTransformation | None = None,
    sharded_axes: Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Wraps ``inner`` so that it sees ARS2-Neo's SAM gradient (SPEC §5).

    Each step starts from the gradient ``g`` at ``θ``. On a *sync* step the
    wrapper perturbs every tensor along its scale-aware natural-gradient
    direction, with the second moment ``ν`` the inner state holds::

      n = g / (sqrt(ν / (1 − β2^max(1, t−1))) + ε) · |θ|,   e = ρ · n / ‖n‖

    and hands ``inner`` the gradient ``g_adv = grad_fn(θ + e)``; in the delayed and
    adaptive modes it caches the shear force ``v = g_adv − (⟨g_adv, g⟩/‖g‖²) g``.
    On other steps it hands ``inner`` ``g + α_t · ‖g‖/‖v‖ · v``.

    Which steps sync: every step (``k == 1``), steps ``1, k+1, 2k+1, …``
    (``k > 1``), or, adaptive (A-GSAM), when the drift
    ``φ = Σ⟨g, v⟩ / sqrt(Σ‖g‖² Σ‖v‖²)`` falls below ``−λ·std(φ)`` (with
    ``k > 1`` a fallback period), where ``α_t = α·(1 + max(0, φ))^γ``. The decision
    is a traced value and the second gradient sits under :func:`jax.lax.cond`,
    so a non-sync step never calls ``grad_fn``.

    Inside ``optax.partition`` or ``optax.masked`` the params this wrapper sees hold
    ``MaskedNode``s, and so does the tree it hands ``grad_fn``: build ``grad_fn``
    with :func:`masked_grad_fn`.

    Non-finite gradients: if ``g`` or ``g_adv`` holds a NaN or an Inf anywhere,
    the step is skipped: the updates are zero, the state (inner state included)
    is left as it was, and ``skipped_steps`` counts it.

    Args:
      inner: the transformation to feed (for ARS2-Neo, the partition of the two
        tracks).
      second_moments: ``(inner_state, params) -> (nu, b2, eps)``, per-leaf trees
        shaped like the params (see :func:`adam_second_moments`); the wrapper reads
        the inner state and keeps no copy.
      rho: the perturbation radius (per tensor); ``0`` turns SAM off.
      k: the period: ``1`` every step, ``> 1`` every ``k`` steps (the fallback
        period when adaptive), ``0`` with SAM off or adaptive without fallback.
        Static.
      alpha: the shear strength on non-sync steps.
      adaptive: decide sync steps from the drift ``φ`` (A-GSAM). Static.
      adaptive_beta: EMA decay of ``φ²``.
      adaptive_lambda: sync when ``φ < −λ·sqrt(EMA(φ²))``.
      adaptive_gamma: the exponent of ``α_t``.
      axis_name: if set, ``g`` and every output of ``grad_fn`` are
        :func:`jax.lax.pmean`-ed over this axis first (under ``pmap``/``shard_map``).
      gradient_transform: a stateless transformation (for example
        ``optax.clip_by_global_norm(1.0)``) applied to ``g`` and to every output of
        ``grad_fn``, after the ``pmean``. An outer ``optax.chain(clip, ...)`` would
        only reach ``g``.
      sharded_axes: under ``shard_map`` with params split into blocks, a function
        of the params returning, per leaf, the ``frozenset`` of mesh axes its block
        is split over: norms, dot products and φ are summed over them, and the
        finiteness check agrees over all of them. ``None`` (or a function
        returning ``None``): whole tensors.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
      ``grad_fn=`` (``params -> grads`` on the same batch), required when SAM is
      on.

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021

      Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
      Scale-Invariant Learning of Deep Neural Networks
      <https://arxiv.org/abs/2102.11600>`_, 2021

      Zhuang et al., `Surrogate Gap Guided Sharpness-Aware Minimization
      <https://arxiv.org/abs/2203.08065>`_, 2022

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ars2_jax import adam_second_moments, sharpness_aware
      >>> tx = sharpness_aware(optax.adam(1e-2), adam_second_moments(0.999, 1e-8), rho=0.05, k=1)
      >>> params = {"w": jnp.ones((2, 3))}
      >>> loss = lambda p: jnp.sum(p["w"] ** 2)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params, grad_fn=jax.grad(loss))
      >>> int(state.sync_count)
      1
    """
    validate_sam(
        rho,
        k,
        alpha,
        adaptive,
        adaptive_beta=adaptive_beta,
        adaptive_lambda=adaptive_lambda,
        adaptive_gamma=adaptive_gamma,
    )
    # Modes are chosen from static values only, so that rho may be traced.
    sam_on = k >= 1 or adaptive
    keeps_shear = sam_on and (k > 1 or adaptive)

    def init_fn(params):
        dtype = _scalar_dtype()
        return SharpnessAwareState(
            step=jnp.zeros([], jnp.int32),
            last_sync=jnp.zeros([], jnp.int32),
            sync_count=jnp.zeros([], jnp.int32),
            skipped_steps=jnp.zeros([], jnp.int32),
            phi=jnp.zeros([], dtype),
            phi_var=jnp.zeros([], dtype),
            threshold=jnp.zeros([], dtype),
            alpha_t=jnp.asarray(alpha, dtype),
            shear_force=optax.tree.zeros_like(params) if keeps_shear else None,
            inner_state=inner.init(params),
        )

    def preprocess(grads, params):
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
        if gradient_transform is not None:
            grads, _ = gradient_transform.update(grads, gradient_transform.init(params), params)
        return grads

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "sharpness_aware needs params: call tx.update(grads, state, params, ...)"
            )
        if sam_on and grad_fn is None:
            raise ValueError(
                "SAM is on (rho > 0): call tx.update(grads, state, params, grad_fn=grad_fn) "
                "with grad_fn(params) -> grads on the same batch"
            )
        _check_same_structure(updates, params, "the gradient", "the params")
        axes = None if sharded_axes is None else sharded_axes(params)
        if axes is None:
            axes = jax.tree.map(lambda _: frozenset(), params)
        every_axis = frozenset().union(*jax.tree.leaves(axes))
        dtype = _scalar_dtype()
        grads = preprocess(updates, params)
        t = state.step + 1
        finite = tree_all_finite(grads, every_axis)
        gap = t - state.last_sync
        phi = phi_var = threshold = jnp.zeros([], dtype)
        alpha_t = jnp.asarray(alpha, dtype)

        if adaptive:
            phi = _tree_sum(_dot, grads, state.shear_force, axes) / (
                jnp.sqrt(
                    _tree_sum(_dot, grads, grads, axes)
                    * _tree_sum(_dot, state.shear_force, state.shear_force, axes)
                )
                + TINY
            )
            decay = jnp.asarray(adaptive_beta, dtype)
            phi_var = jnp.where(
                t == 1,
                phi**2,
                jnp.where(gap > 1, decay * state.phi_var + (1 - decay) * phi**2, state.phi_var),
            ).astype(dtype)
            threshold = (-adaptive_lambda * jnp.sqrt(phi_var)).astype(dtype)
            sync = (phi < threshold) | (t == 1)
            if k > 1:
                sync = sync | (gap >= k)
            alpha_t = alpha * (1 + jnp.maximum(0.0, phi)) ** adaptive_gamma
            alpha_t = alpha_t.astype(dtype)
        elif k == 1:
            sync = True
        elif k > 1:
            sync = t % k == 1
        else:
            sync = False

        def sync_branch():
            nu, b2, eps = second_moments(state.inner_state, params)
            perturbed = jax.tree.map(
                lambda p, g, v, b, e, a: p + perturbation(p, g, v, b, e, rho, t, a),
                params,
                grads,
                nu,
                b2,
                eps,
                axes,
            )
            try:
                adversarial = grad_fn(perturbed)
            except TypeError as error:
                if not any(map(_is_masked, jax.tree.leaves(params, is_leaf=_is_masked))):
                    raise
                raise ValueError(
                    "the params hold optax.transforms.MaskedNode()s (SAM inside optax.partition "
                    "or optax.masked) and grad_fn failed on them: pass "
                    "grad_fn=ars2_jax.masked_grad_fn(grad_fn, params)"
                ) from error
            _check_same_structure(adversarial, grads, "grad_fn's output")
            adversarial = jax.tree.map(lambda a, g: a.astype(g.dtype), adversarial, grads)
            adversarial = preprocess(adversarial, params)
            shear = (
                jax.tree.map(shear_force, adversarial, grads, axes)
                if keeps_shear
                else state.shear_force
            )
            return adversarial, shear

        def other_branch():
            if not keeps_shear:
                return grads, state.shear_force
            injected = jax.tree.map(
                lambda g, v, a: inject_shear(g, v, alpha_t, a), grads, state.shear_force, axes
            )
            return injected, state.shear_force

        if sync is True:
            used, shear = sync_branch()
        elif sync is False:
            used, shear = other_branch()
        else:
            # A non-finite g skips the step anyway: spare the second gradient.
            used, shear = jax.lax.cond(sync & finite, sync_branch, other_branch)
        finite = finite & tree_all_finite(used, every_axis)

        def apply():
            new_updates, inner_state = inner.update(used, state.inner_state, params)
            new_state = SharpnessAwareState(
                step=t,
                last_sync=jnp.where(sync, t, state.last_sync),
                sync_count=state.sync_count + jnp.asarray(sync, jnp.int32),
                skipped_steps=state.skipped_steps,
                phi=phi,
                phi_var=phi_var,
                threshold=threshold,
                alpha_t=alpha_t,
                shear_force=shear,
                inner_state=inner_state,
            )
            # Dtypes stay those of the params and of the initial state, even when
            # injected float32 hyperparameters would promote bfloat16 moments.
            return optax.tree.cast_like(new_updates, params), optax.tree.cast_like(new_state, state)

        def skip():
            shapes = jax.eval_shape(lambda: inner.update(used, state.inner_state, params)[0])
            zeros = jax.tree.map(lambda s, p: jnp.zeros(s.shape, p.dtype), shapes, params)
            return zeros, state._replace(skipped_steps=state.skipped_steps + 1)

        return jax.lax.cond(finite, apply, skip)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_sam_state(state: Any) -> SharpnessAwareState:
    """The :class:`SharpnessAwareState` inside ``state`` (``inject_hyperparams``, chains)."""
    found = [
        node
        for node in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, SharpnessAwareState))
        if isinstance(node, SharpnessAwareState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"expected one SharpnessAwareState in the optimizer state, found {len(found)}"
        )
    return found[0]


def diagnostics(state: Any) -> dict[str, jax.Array]:
    """SPEC §6 diagnostics of an ARS2-Neo (or :func:`sharpness_aware`) state, as arrays.

    ``phi``, ``phi_std``, ``threshold``, ``alpha_t``, ``sync_count``,
    ``effective_k = step / max(1, sync_count)``, plus ``step`` and ``skipped_steps``.
    Works on the state of ``optax.inject_hyperparams(ars2_neo)`` or of a chain too.

    Args:
      state: an optimizer state holding one :class:`SharpnessAwareState`.

    Returns:
      A dict of scalar arrays.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import ars2_jax
      >>> tx = ars2_jax.ars2_neo(1e-2, rho=0.05, k=2)
      >>> params = {"w": jnp.ones((3, 2))}
      >>> loss = lambda p: jnp.sum(p["w"] ** 2)
      >>> state = tx.init(params)
      >>> grad_fn = jax.grad(loss)
      >>> for _ in range(3):
      ...     updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
      >>> stats = ars2_jax.diagnostics(state)
      >>> int(stats["step"]), int(stats["sync_count"]), float(stats["effective_k"])
      (3, 2, 1.5)
    """
    sam = find_sam_state(state)
    # jnp.asarray unwraps the Variables of an nnx.Optimizer's state.
    step, sync_count, phi_var = (jnp.asarray(x) for x in (sam.step, sam.sync_count, sam.phi_var))
    return {
        "phi": jnp.asarray(sam.phi),
        "phi_std": jnp.sqrt(phi_var),
        "threshold": jnp.asarray(sam.threshold),
        "alpha_t": jnp.asarray(sam.alpha_t),
        "sync_count": sync_count,
        "effective_k": step.astype(phi_var.dtype) / jnp.maximum(1, sync_count),
        "step": step,
        "skipped_steps": jnp.asarray(sam.skipped_steps),
    }
