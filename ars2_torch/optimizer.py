"""ARS2-Neo as a ``torch.optim.Optimizer``: the readable reference of SPEC.md."""

from __future__ import annotations

import collections
import contextlib
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ars2_torch.newton_schulz import _check_block_counts, _check_blocks, newton_schulz

#: Guards every norm and ratio against division by zero (SPEC: ``tiny``).
TINY = 1e-12
# Tensors with a dimension this large (embedding tables) stay on AdamW (SPEC §1).
DEFAULT_MAX_DIM = 10000
# The SAM settings are one value for the whole optimizer (SPEC §1): no param
# group may carry its own.
SAM_SETTINGS = (
    "rho",
    "k",
    "alpha",
    "adaptive",
    "adaptive_beta",
    "adaptive_lambda",
    "adaptive_gamma",
)


def is_ars2_tensor(param: torch.Tensor, max_dim: int = DEFAULT_MAX_DIM) -> bool:
    """The routing rule of SPEC §1: ``ndim >= 2`` and every dimension below ``max_dim``.

    Args:
      param: a parameter.
      max_dim: tensors with a dimension of at least this size go to AdamW.

    Returns:
      Whether ``param`` belongs on the ARS2 track.

    Example:
      >>> import torch
      >>> from ars2_torch import is_ars2_tensor
      >>> [is_ars2_tensor(torch.zeros(shape)) for shape in [(4, 3), (3,), (10000, 8)]]
      [True, False, False]
    """
    return param.ndim >= 2 and max(param.shape) < max_dim


def ars2_param_groups(
    model_or_params: nn.Module | Iterable[torch.Tensor], max_dim: int = DEFAULT_MAX_DIM
) -> list[dict[str, Any]]:
    """Splits parameters into the ARS2 track and the AdamW track (SPEC §1).

    Args:
      model_or_params: a module (its ``parameters()`` are used) or an iterable of
        tensors.
      max_dim: tensors with a dimension ``>= max_dim`` go to AdamW even when they
        are matrices (embedding tables).

    Returns:
      ``[{'params': [...], 'ars2': True}, {'params': [...], 'ars2': False}]``,
      leaving out a group that would be empty. Add per-group keys (``lr``,
      ``betas``, ``weight_decay``, ...) before handing them to :class:`ARS2Neo`.

    Example:
      >>> import torch
      >>> from ars2_torch import ars2_param_groups
      >>> groups = ars2_param_groups(torch.nn.Linear(4, 3))
      >>> [(group["ars2"], [tuple(p.shape) for p in group["params"]]) for group in groups]
      [(True, [(3, 4)]), (False, [(3,)])]
    """
    params = (
        model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    )
    ars2, adamw = [], []
    for param in params:
        (ars2 if is_ars2_tensor(param, max_dim) else adamw).append(param)
    groups = [{"params": ars2, "ars2": True}, {"params": adamw, "ars2": False}]
    return [group for group in groups if group["params"]]


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """``⟨a, b⟩`` summed in float64, so that the adaptive decision is not rounded."""
    return torch.sum(a.double() * b.double()).item()


def perturbation(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg_sq: torch.Tensor | None,
    beta2: float,
    eps: float,
    rho: float,
    step: int,
) -> torch.Tensor:
    """The scale-aware natural-gradient SAM perturbation ``e`` of one tensor (SPEC §5.2).

    ``exp_avg_sq`` is the second moment before this step's update (``None`` when
    the tensor has no state yet, as on step 1); ``‖e‖ = rho`` unless ``n = 0``. The
    direction is divided by its largest entry before its norm is taken:
    ``rho·(n/s) / (‖n/s‖ + tiny/s)`` is SPEC's ``rho·n / (‖n‖ + tiny)``, and stays
    finite when ``‖n‖²`` would overflow (on step 1 ``n = g/eps·|θ|``).

    Args:
      param: the tensor ``θ``.
      grad: its gradient ``g``.
      exp_avg_sq: its second moment before this step's update, or ``None``.
      beta2: the ``β2`` of its group.
      eps: the ``eps`` of its group.
      rho: the SAM radius.
      step: this step's number ``t`` (1-based).

    Returns:
      ``e``, shaped like ``param``.

    Example:
      >>> import torch
      >>> from ars2_torch import perturbation
      >>> e = perturbation(torch.ones(2, 2), torch.tensor([[1.0, -2.0], [0.5, 0.0]]),
      ...                  torch.full((2, 2), 0.5), beta2=0.999, eps=1e-8, rho=0.05, step=3)
      >>> round(torch.linalg.vector_norm(e).item(), 6)
      0.05
    """
    if exp_avg_sq is None:
        exp_avg_sq = torch.zeros_like(grad)
    v_hat_prev = exp_avg_sq / (1 - beta2 ** max(1, step - 1) + TINY)
    direction = grad / (v_hat_prev.sqrt() + eps) * param.abs()
    largest = direction.abs().max() if direction.numel() else direction.new_zeros(())
    scale = torch.where(largest > 0, largest, torch.ones_like(largest))
    unit = direction / scale
    return rho * unit / (torch.linalg.vector_norm(unit) + TINY / scale)


def shear_force(adversarial_grad: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The component of ``adversarial_grad`` orthogonal to ``grad`` (SPEC §5.2).

    Computed from ``Δ = g_adv − g`` as ``Δ − (⟨Δ, g⟩ / (‖g‖² + tiny))·g``: the same
    vector as SPEC's ``g_adv − (⟨g_adv, g⟩ / (‖g‖² + tiny))·g`` up to
    ``tiny/(‖g‖² + tiny)·g``, without the cancellation that costs the SPEC form
    its low-order digits in float32 when ``g_adv ≈ g``.

    Args:
      adversarial_grad: the gradient at the perturbed point, ``g_adv``.
      grad: the gradient at ``θ``, ``g``.

    Returns:
      The shear force ``v``, shaped like ``grad``.

    Example:
      >>> import torch
      >>> from ars2_torch import shear_force
      >>> shear_force(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]))
      tensor([0., 1.])
    """
    delta = adversarial_grad - grad
    coef = torch.sum(delta * grad) / (torch.sum(grad * grad) + TINY)
    return delta - coef * grad


def inject_shear(grad: torch.Tensor, shear: torch.Tensor, alpha_t: float) -> torch.Tensor:
    """``g + α_t · ‖g‖ / ‖v_shear‖ · v_shear``: the cached shear on a non-sync step (SPEC §5.3).

    Args:
      grad: this step's gradient ``g``.
      shear: the cached shear force ``v_shear``.
      alpha_t: the shear strength.

    Returns:
      The gradient the step uses.

    Example:
      >>> import torch
      >>> from ars2_torch import inject_shear
      >>> inject_shear(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0]), alpha_t=0.1)
      tensor([3.0000, 4.5000])
    """
    scale = torch.linalg.vector_norm(grad) / (torch.linalg.vector_norm(shear) + TINY)
    return grad + alpha_t * scale * shear


def _scalar_dtype() -> torch.dtype:
    # torch.optim.AdamW's dtype for its tensor step counters (whole numbers, exact
    # up to 2**24 in float32).
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _step_count(step: torch.Tensor | int) -> torch.Tensor | float | int:
    """The step counter ``t`` for the bias corrections ``1 - β**t``.

    Eagerly a Python number, so that ``β**t`` rounds as it always has. Under
    ``torch.compile`` the counter itself in float64, as ``torch.optim.AdamW`` keeps
    its tensor there (``.item()`` would break the graph), and float64 so that
    ``1 - β2**t`` does not lose the digits float32 would.
    """
    if not torch.is_tensor(step):
        return step
    if torch.compiler.is_compiling():
        return step.double()
    return step.item()


def _update_moments(state: dict, grad: torch.Tensor, beta1: float, beta2: float) -> None:
    # The same moment arithmetic as torch.optim.AdamW, on both tracks.
    if torch.is_tensor(state["step"]):
        # In place, as AdamW's: a new tensor stored back into the dict would make
        # torch.compile recompile the step.
        state["step"].add_(1)
    else:
        state["step"] += 1
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def ars2_update(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """One ARS2-track step of one tensor (SPEC §2): ``θ ← θ(1 − lr·wd) − lr·‖u‖·NS(u)``.

    ``u = m̂ / (√v̂ + eps)`` from the moments after this step's update.

    Args:
      param: the tensor, updated in place.
      grad: its gradient.
      state: its state, ``step`` (a number, or the 0-d tensor ARS2Neo keeps),
        ``exp_avg`` and ``exp_avg_sq``, updated in place.
      group: its param group: ``lr``, ``betas``, ``eps``, ``weight_decay``,
        ``ns_steps``, ``ns_dtype``.

    Example:
      >>> import torch
      >>> from ars2_torch import ars2_update
      >>> param, grad = torch.eye(2), torch.tensor([[1.0, 0.0], [0.0, -1.0]])
      >>> state = {"step": 0, "exp_avg": torch.zeros(2, 2), "exp_avg_sq": torch.zeros(2, 2)}
      >>> group = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, ns_steps=5,
      ...              ns_dtype=torch.float32)
      >>> ars2_update(param, grad, state, group)
      >>> state["step"], param.diagonal().round(decimals=2)
      (1, tensor([0.8400, 1.1600]))
    """
    beta1, beta2 = group["betas"]
    _update_moments(state, grad, beta1, beta2)
    step = _step_count(state["step"])
    m_hat = state["exp_avg"] / (1 - beta1**step)
    v_hat = state["exp_avg_sq"] / (1 - beta2**step)
    u = m_hat / (v_hat.sqrt() + group["eps"])
    energy = torch.linalg.vector_norm(u)
    # .get: groups loaded from a state dict saved before the block views existed.
    direction = newton_schulz(
        u,
        group["ns_steps"],
        dtype=group["ns_dtype"],
        row_blocks=group.get("row_blocks", 1),
        column_blocks=group.get("column_blocks", 1),
    )
    param.mul_(1 - group["lr"] * group["weight_decay"])
    param.add_(energy * direction, alpha=-group["lr"])


def adamw_update(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """One AdamW-track step of one tensor (SPEC §4), written as ``torch.optim.AdamW`` writes it.

    Args:
      param: the tensor, updated in place.
      grad: its gradient.
      state: its state, ``step`` (a number, or the 0-d tensor ARS2Neo keeps),
        ``exp_avg`` and ``exp_avg_sq``, updated in place.
      group: its param group: ``lr``, ``betas``, ``eps``, ``weight_decay``.

    Example:
      >>> import torch
      >>> from ars2_torch import adamw_update
      >>> param, grad = torch.ones(2), torch.tensor([0.5, -2.0])
      >>> state = {"step": 0, "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
      >>> group = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
      >>> adamw_update(param, grad, state, group)
      >>> param
      tensor([0.9000, 1.1000])
    """
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    param.mul_(1 - lr * group["weight_decay"])
    _update_moments(state, grad, beta1, beta2)
    step = _step_count(state["step"])
    step_size = lr / (1 - beta1**step)
    bias_correction2 = 1 - beta2**step
    bias_correction2_sqrt = (
        bias_correction2.sqrt()
        if torch.is_tensor(bias_correction2)
        else math.sqrt(bias_correction2)
    )
    denom = (state["exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(group["eps"])
    param.addcdiv_(state["exp_avg"], denom, value=-step_size)


def _check_loss(loss: Any, which: str) -> None:
    if loss is None:
        raise ValueError(f"the closure returned None on the {which} pass; it must return the loss")
    if isinstance(loss, torch.Tensor) and loss.numel() != 1:
        raise ValueError(
            f"the closure returned a tensor of shape {tuple(loss.shape)} on the {which} pass; "
            "it must return the scalar loss"
        )


class ARS2Neo(torch.optim.Optimizer):
    r"""ARS2-Neo: Adam's energy along a Newton-Schulz direction, with optional SAM.

    Matrix parameters (the ARS2 track) step along ``E · NS(u)``, where
    ``u = m̂ / (√v̂ + eps)`` is Adam's scaled momentum, ``E = ‖u‖`` its energy and
    ``NS`` the quintic Newton-Schulz orthogonalization; every other parameter
    (the AdamW track) steps with AdamW. With ``rho > 0`` the gradient is first
    replaced by a SAM gradient taken at a scale-aware natural-gradient
    perturbation, every step (``k=1``), every ``k`` steps with the cached shear
    force injected in between (``k>1``), or when the gradient drifts against the
    shear (``adaptive=True``, A-GSAM). The full rule is SPEC.md §1-§6.

    Param groups: give each group ``'ars2': True`` or ``False`` (see
    :func:`ars2_param_groups`, or :func:`model_param_groups` for a model built
    from ``torch.nn`` modules); a group without the key, or a plain iterable of
    tensors, is routed tensor by tensor by the rule of SPEC §1. Groups may
    override ``lr``, ``betas``, ``eps``, ``weight_decay``, ``ns_steps`` and
    ``ns_dtype``; the SAM settings are global. An ``ars2=True`` group of 2-D
    weights may set ``row_blocks`` / ``column_blocks`` (default 1): each weight is
    then orthogonalized as that many equal blocks (:func:`as_matrices`), as
    :func:`model_param_groups` does for attention heads; ``E`` stays the norm of
    the whole tensor.

    Calling: with SAM off, ``loss.backward(); opt.step()`` as usual, or
    ``opt.step(closure)``. With SAM on, ``opt.step(closure)`` where ``closure``
    runs forward and backward on one batch and returns the loss; the optimizer
    calls it once at ``θ`` and, on sync steps, once more at ``θ + e`` after
    zeroing the gradients, then restores ``θ`` exactly from a copy. ``step``
    returns the loss at the unperturbed ``θ``; after a sync step ``p.grad`` holds
    the adversarial gradient. A model with buffers or randomness (BatchNorm,
    Dropout) wants ``opt.step(sam_closure(model, closure))``: the second pass then
    calls the closure's ``adversarial()``, which replays the base pass's dropout
    masks and keeps the base pass's running statistics (:func:`sam_closure`).

    Non-finite gradients: if the base gradient or the adversarial gradient of
    any parameter holds a NaN or an Inf, the step is skipped: parameters and all
    optimizer state are left as they were, and ``diagnostics['skipped_steps']``
    counts it.

    Edge cases (tested in ``tests/test_hardening_torch.py``): a zero gradient
    leaves a tensor to weight decay alone, while a tensor whose ``.grad`` is
    ``None`` is left alone entirely, as in every ``torch.optim`` optimizer; a
    rank-1 ``u`` (``1×N``, ``N×1``, all-equal gradients) has ``NS(u) =
    f⁵(1)·u/‖u‖`` with ``f⁵(1) ≈ 0.70``, so such a tensor steps like Adam scaled by
    0.70 (within ~6% with the bfloat16 iteration); a 5-D or larger weight is the
    matrix ``(out, rest)``; an empty parameter list raises ``ValueError``, as in
    ``torch.optim``. bfloat16 params keep bfloat16 moments, where ``ν·β2`` rounds
    back to ``ν`` for ``β2`` above about 0.998: use ``β2 <= 0.995`` with bfloat16
    params, or float32 params. With SAM off the closure's return value is passed
    through unchecked, as ``torch.optim`` does; with SAM on it must be the scalar
    loss on both passes (``ValueError`` otherwise).

    ``torch.optim`` conventions (tested in ``tests/test_torch_conventions.py``):
    every constructor argument is in ``opt.defaults``; the SAM settings live
    there only, never in ``param_groups`` (they are global, and a group that sets
    one is refused), and :attr:`sam` reads them. ``copy.deepcopy`` and pickle
    keep them and the SAM step state (``sam_state``). ``state_dict()`` adds
    an ``'ars2'`` entry before the state-dict post hooks run; load pre hooks see
    it and load post hooks see the restored SAM state. Parameters on the
    ``meta`` device step in the base, sync and delayed modes (the adaptive
    decision reads values, which meta tensors lack). Under ``torch.compile`` the
    finiteness check reads one flag per device, which adds no graph to a
    compiled base step, and the step counts (a float32 tensor per parameter,
    ``state['step']``, as in ``torch.optim.AdamW``) cause no recompilation:
    with SAM off a compiled training step has AdamW's number of graphs.

    Args:
      params: tensors or param groups.
      lr: learning rate.
      betas: ``(β1, β2)`` of the moments.
      eps: added to ``√v̂``.
      weight_decay: decoupled weight decay (multiplied by ``lr``).
      ns_steps: Newton-Schulz iterations.
      ns_dtype: dtype of the Newton-Schulz iteration; ``None``: bfloat16 for
        float32 parameters, the parameter's dtype otherwise.
      rho: SAM radius; ``0`` turns SAM off.
      k: SAM period: ``1`` every step, ``>1`` every ``k`` steps (a fallback
        period when adaptive), ``0`` with SAM off or adaptive without fallback.
      alpha: shear-force strength on non-sync steps.
      adaptive: decide sync steps from the drift ``φ`` (A-GSAM).
      adaptive_beta: EMA decay of ``φ²``.
      adaptive_lambda: sync when ``φ < −λ·std(φ)``.
      adaptive_gamma: ``α_t = alpha · (1 + max(0, φ))^γ``.

    Example:
      >>> import torch
      >>> from ars2_torch import ARS2Neo, ars2_param_groups
      >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
      >>> opt = ARS2Neo(ars2_param_groups(model), lr=1e-2, rho=0.05, k=1)
      >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
      >>> def closure():
      ...     loss = torch.nn.functional.mse_loss(model(x), y)
      ...     loss.backward()
      ...     return loss
      >>> opt.zero_grad()
      >>> loss = opt.step(closure)
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        ns_steps: int = 5,
        ns_dtype: torch.dtype | None = None,
        rho: float = 0.0,
        k: int = 0,
        alpha: float = 0.1,
        adaptive: bool = False,
        adaptive_beta: float = 0.99,
        adaptive_lambda: float = 2.0,
        adaptive_gamma: float = 2.0,
    ):
        sam = _validate_sam(
            rho=rho,
            k=k,
            alpha=alpha,
            adaptive=adaptive,
            adaptive_beta=adaptive_beta,
            adaptive_lambda=adaptive_lambda,
            adaptive_gamma=adaptive_gamma,
        )
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            ars2=None,
            row_blocks=1,
            column_blocks=1,
            **sam,
        )
        _validate_group(defaults, "defaults")
        super().__init__(params, defaults)
        self.sam_state = {
            "step": 0,
            "last_sync": 0,
            "sync_count": 0,
            "phi_var": 0.0,
            "phi": 0.0,
            "threshold": 0.0,
            "alpha_t": float(alpha),
            "skipped_steps": 0,
        }

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps defaults, state and param_groups; the SAM step state
        # must travel with them through copy.deepcopy and pickle.
        return {**super().__getstate__(), "sam_state": self.sam_state}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        overridden = sorted(set(param_group) & set(SAM_SETTINGS))
        if overridden:
            raise ValueError(
                f"param group sets {overridden}: SAM settings are global, pass them to ARS2Neo"
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # torch fills every defaults key into the group; the SAM settings live in
        # self.defaults only, so that no group seems to hold a setting of its own.
        for name in SAM_SETTINGS:
            group.pop(name, None)
        where = f"param group {len(self.param_groups) - 1}"
        _validate_group(group, where)
        if group["ars2"]:
            for param in group["params"]:
                if param.ndim < 2:
                    raise ValueError(
                        f"{where} has ars2=True but holds a tensor of shape "
                        f"{tuple(param.shape)}; the ARS2 track needs ndim >= 2"
                    )
        blocks = group["row_blocks"], group["column_blocks"]
        _check_block_counts(*blocks)
        if blocks != (1, 1):
            if group["ars2"] is not True:
                raise ValueError(
                    f"{where} sets row_blocks={blocks[0]}, column_blocks={blocks[1]}: "
                    f"block views are for ars2=True groups, got ars2={group['ars2']!r}"
                )
            for param in group["params"]:
                try:
                    _check_blocks(tuple(param.shape), *blocks)
                except ValueError as error:
                    raise ValueError(f"{where}: {error}") from None

    @property
    def sam(self) -> dict[str, Any]:
        """The SAM settings (SPEC §5), read from ``defaults``: one value for every group."""
        return {name: self.defaults[name] for name in SAM_SETTINGS}

    @property
    def sam_enabled(self) -> bool:
        return self.sam["rho"] > 0

    @property
    def diagnostics(self) -> dict[str, float]:
        """The diagnostics of SPEC §6, as Python numbers.

        ``phi``, ``phi_std``, ``threshold``, ``alpha_t``, ``sync_count``,
        ``effective_k``, plus ``skipped_steps`` (non-finite gradients).
        """
        s = self.sam_state
        return {
            "phi": s["phi"],
            "phi_std": math.sqrt(s["phi_var"]),
            "threshold": s["threshold"],
            "alpha_t": s["alpha_t"],
            "sync_count": s["sync_count"],
            "effective_k": s["step"] / max(1, s["sync_count"]),
            "skipped_steps": s["skipped_steps"],
        }

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus an ``'ars2'`` entry: the SAM settings and step state.

        State-dict post hooks run after the ``'ars2'`` entry is in, so they see the
        whole dict.
        """
        with _hooks_held(self, "_optimizer_state_dict_post_hooks") as post_hooks:
            state_dict = super().state_dict()
        state_dict["ars2"] = {"sam_state": dict(self.sam_state), "sam": dict(self.sam)}
        for hook in post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a dict from :meth:`state_dict`, refusing other SAM settings or shapes.

        Load pre hooks see the whole dict, ``'ars2'`` entry included; load post
        hooks see the optimizer with its SAM step state restored.
        """
        state_dict = dict(state_dict)
        with (
            _hooks_held(self, "_optimizer_load_state_dict_pre_hooks") as pre_hooks,
            _hooks_held(self, "_optimizer_load_state_dict_post_hooks") as post_hooks,
        ):
            for hook in pre_hooks.values():
                result = hook(self, state_dict)
                if result is not None:
                    state_dict = dict(result)
            saved = state_dict.pop("ars2", None)
            if saved is None:
                raise ValueError("state_dict has no 'ars2' entry: it was not saved by ARS2Neo")
            self._check_fits(state_dict, saved)
            super().load_state_dict(state_dict)
            for state in self.state.values():
                # A state dict saved when the step counters were Python ints.
                if "step" in state and not torch.is_tensor(state["step"]):
                    state["step"] = torch.tensor(float(state["step"]), dtype=_scalar_dtype())
            self.sam_state = dict(saved["sam_state"])
        for hook in post_hooks.values():
            hook(self)

    def _check_fits(self, state_dict: dict[str, Any], saved: dict[str, Any]) -> None:
        differ = {
            name: (saved["sam"].get(name), value)
            for name, value in self.sam.items()
            if saved["sam"].get(name) != value
        }
        if differ:
            raise ValueError(
                f"state_dict was saved with other SAM settings (saved, current): {differ}"
            )
        # torch checks the group sizes (and names a mismatch itself) but not the
        # shapes of the state tensors: a state of another model would load silently.
        saved_groups = state_dict["param_groups"]
        sizes = [len(group["params"]) for group in self.param_groups]
        if sizes == [len(group["params"]) for group in saved_groups]:
            for index, (group, saved_group) in enumerate(zip(self.param_groups, saved_groups)):
                for position, (param, key) in enumerate(
                    zip(group["params"], saved_group["params"])
                ):
                    for name, value in state_dict["state"].get(key, {}).items():
                        if name != "step" and torch.is_tensor(value) and value.shape != param.shape:
                            raise ValueError(
                                f"state_dict does not fit param group {index}, parameter "
                                f"{position}: its {name!r} has shape {tuple(value.shape)}, the "
                                f"parameter {tuple(param.shape)}"
                            )

    def _track_is_ars2(self, group: dict, param: torch.Tensor) -> bool:
        return is_ars2_tensor(param) if group["ars2"] is None else group["ars2"]

    @torch.compiler.disable
    def _init_states(self, params: list[torch.Tensor]) -> None:
        """Creates the state of each of ``params`` that has none yet.

        Outside ``torch.compile``'s graph: the rest of the step is then traced with
        the states in place, and is not compiled again on step 2 when they exist
        (``torch.optim.AdamW`` gets the same from dynamo running its ``_init_group``
        outside the graph).
        """
        for param in params:
            self._state(param)

    @torch.compiler.disable
    def _count_step(self, scalars: dict, sync: bool) -> None:
        # Outside torch.compile's graph, so that the Python counters, which change
        # every step, are not compiled in (a recompilation on step 2).
        t = self.sam_state["step"] + 1
        self.sam_state.update(scalars, step=t)
        if sync:
            self.sam_state["last_sync"] = t
            self.sam_state["sync_count"] += 1

    def _state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            # A tensor, as torch.optim.AdamW's: a Python int would be compiled
            # into the graph and recompiled when it changes.
            state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def _decide(self, entries: list, t: int) -> tuple[bool, dict]:
        """Whether step ``t`` is a sync step, and the adaptive scalars (SPEC §5.1)."""
        sam, previous = self.sam, self.sam_state
        scalars = {"phi": 0.0, "phi_var": 0.0, "threshold": 0.0, "alpha_t": float(sam["alpha"])}
        if not sam["adaptive"]:
            k = sam["k"]
            return k == 1 or (k > 1 and t % k == 1), scalars
        grad_dot_shear = grad_sq = shear_sq = 0.0
        for param, _, grad in entries:
            grad_sq += _dot(grad, grad)
            shear = self.state.get(param, {}).get("shear_force")
            if shear is not None:
                grad_dot_shear += _dot(grad, shear)
                shear_sq += _dot(shear, shear)
        phi = grad_dot_shear / (math.sqrt(grad_sq * shear_sq) + TINY)
        phi_var = previous["phi_var"]
        if t == 1:
            phi_var = phi**2
        elif t - previous["last_sync"] > 1:
            beta = sam["adaptive_beta"]
            phi_var = beta * phi_var + (1 - beta) * phi**2
        threshold = -sam["adaptive_lambda"] * math.sqrt(phi_var)
        k = sam["k"]
        sync = phi < threshold or t == 1 or (k > 1 and t - previous["last_sync"] >= k)
        scalars.update(
            phi=phi,
            phi_var=phi_var,
            threshold=threshold,
            alpha_t=sam["alpha"] * (1 + max(0.0, phi)) ** sam["adaptive_gamma"],
        )
        return sync, scalars

    def _adversarial_grads(self, entries: list, closure: Callable, t: int) -> list[torch.Tensor]:
        """Gradients at ``θ + e`` on the same batch; ``θ`` is restored from a copy."""
        rho = self.sam["rho"]
        backups = []
        for param, group, grad in entries:
            # .get: reading self.state[param] would store an empty state for a new
            # tensor, and a skipped step must leave the state as it was.
            state = self.state.get(param, {})
            e = perturbation(
                param, grad, state.get("exp_avg_sq"), group["betas"][1], group["eps"], rho, t
            )
            backups.append(param.detach().clone())
            param.add_(e)
        self.zero_grad(set_to_none=True)
        # A closure from sam_closure() replays the base pass's random draws and
        # keeps its buffers; a plain closure is simply called again.
        adversarial_pass = getattr(closure, "adversarial", closure)
        try:
            with torch.enable_grad():
                _check_loss(adversarial_pass(), "adversarial")
        finally:
            for (param, _, _), backup in zip(entries, backups):
                param.copy_(backup)
        # A tensor the second pass left without a gradient keeps its base gradient.
        return [param.grad if param.grad is not None else grad for param, _, grad in entries]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Performs one optimization step; returns the closure's loss at ``θ`` (or ``None``)."""
        if self.sam_enabled and closure is None:
            raise ValueError(
                "SAM is on (rho > 0): call opt.step(closure) with a closure that runs "
                "forward and backward on the batch and returns the loss"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if self.sam_enabled:
                _check_loss(loss, "base")
        entries = [
            (param, group, param.grad)
            for group in self.param_groups
            for param in group["params"]
            if param.grad is not None
        ]
        if self.sam_enabled and not entries:
            raise ValueError(
                "the closure left every parameter without a gradient: with SAM on it must "
                "run forward and call loss.backward()"
            )
        if not _all_finite([grad for _, _, grad in entries]):
            self.sam_state["skipped_steps"] += 1
            return loss

        sam = self.sam
        sync, scalars, t = False, {}, None
        if self.sam_enabled:
            t = self.sam_state["step"] + 1
            sync, scalars = self._decide(entries, t)
        keeps_shear = sam["k"] > 1 or sam["adaptive"]
        new_shear = {}
        if sync:
            grads = self._adversarial_grads(entries, closure, t)
            if not _all_finite(grads):
                self.sam_state["skipped_steps"] += 1
                return loss
            if keeps_shear:
                new_shear = {
                    param: shear_force(adv, grad) for (param, _, grad), adv in zip(entries, grads)
                }
        elif self.sam_enabled and keeps_shear:
            grads = [
                inject_shear(grad, self.state[param]["shear_force"], scalars["alpha_t"])
                if "shear_force" in self.state.get(param, {})
                else grad
                for param, _, grad in entries
            ]
        else:
            grads = [grad for _, _, grad in entries]

        self._init_states([param for param, _, _ in entries])
        for (param, group, _), grad in zip(entries, grads):
            state = self._state(param)
            update = ars2_update if self._track_is_ars2(group, param) else adamw_update
            update(param, grad, state, group)
            if param in new_shear:
                state["shear_force"] = new_shear[param]

        self._count_step(scalars, sync)
        return loss


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor is free of NaN and Inf, read back once per device.

    Tensors on the ``meta`` device hold no values, so they count as finite: a
    model built on ``meta`` steps as it does under ``torch.optim.AdamW``.
    """
    flags_by_device: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        if tensor.device.type != "meta":
            flags_by_device.setdefault(tensor.device, []).append(torch.isfinite(tensor).all())
    return all(bool(torch.stack(flags).all()) for flags in flags_by_device.values())


@contextlib.contextmanager
def _hooks_held(optimizer: torch.optim.Optimizer, attribute: str):
    """Takes the hooks in ``optimizer.<attribute>`` out while torch's method runs.

    torch runs state-dict hooks inside ``state_dict``/``load_state_dict``, before
    ARS2Neo has added (or after it has taken out) its ``'ars2'`` entry; holding them
    lets ARS2Neo run them itself on the whole dict.
    """
    hooks = getattr(optimizer, attribute)
    setattr(optimizer, attribute, collections.OrderedDict())
    try:
        yield hooks
    finally:
        setattr(optimizer, attribute, hooks)


def _is_real(value: Any) -> bool:
    """One finite real number: a Python or NumPy number, or a one-element tensor.

    Strings, ``None``, bools and sequences are not (``"0.1" >= 0`` would raise a
    ``TypeError`` deep inside, and ``True`` would pass for ``1``).
    """
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and bool(torch.isfinite(value).all())
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _check_real(name: str, value: Any) -> None:
    if not _is_real(value):
        raise ValueError(f"{name}={value!r} must be a finite real number")


def _validate_group(group: dict[str, Any], where: str) -> None:
    for name in ("lr", "eps", "weight_decay"):
        _check_real(f"{where}: {name}", group[name])
    lr, eps, weight_decay, ns_steps = (
        group["lr"],
        group["eps"],
        group["weight_decay"],
        group["ns_steps"],
    )
    if not lr >= 0:
        raise ValueError(f"{where}: lr={lr} must be >= 0")
    betas = group["betas"]
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(_is_real(beta) and 0 <= beta < 1 for beta in betas)
    ):
        raise ValueError(f"{where}: betas={betas!r} must be two numbers in [0, 1)")
    if not eps > 0:
        raise ValueError(f"{where}: eps={eps} must be > 0")
    if not weight_decay >= 0:
        raise ValueError(f"{where}: weight_decay={weight_decay} must be >= 0")
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or ns_steps < 1:
        raise ValueError(f"{where}: ns_steps={ns_steps!r} must be an integer >= 1")
    ns_dtype = group["ns_dtype"]
    if ns_dtype is not None and not (
        isinstance(ns_dtype, torch.dtype) and ns_dtype.is_floating_point
    ):
        raise ValueError(f"{where}: ns_dtype={ns_dtype!r} must be None or a floating torch dtype")
    if group["ars2"] not in (None, True, False):
        raise ValueError(f"{where}: ars2={group['ars2']!r} must be True, False or None")


def _validate_sam(**sam: Any) -> dict[str, Any]:
    for name in ("rho", "alpha", "adaptive_beta", "adaptive_lambda", "adaptive_gamma"):
        _check_real(name, sam[name])
    rho, k, alpha, adaptive = sam["rho"], sam["k"], sam["alpha"], sam["adaptive"]
    if not rho >= 0:
        raise ValueError(f"rho={rho} must be >= 0")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k={k!r} must be a non-negative integer")
    if not alpha >= 0:
        raise ValueError(f"alpha={alpha} must be >= 0")
    if not isinstance(adaptive, bool):
        raise ValueError(f"adaptive={adaptive!r} must be a bool")
    if not 0 <= sam["adaptive_beta"] < 1:
        raise ValueError(f"adaptive_beta={sam['adaptive_beta']} must be in [0, 1)")
    if not sam["adaptive_lambda"] >= 0:
        raise ValueError(f"adaptive_lambda={sam['adaptive_lambda']} must be >= 0")
    if not sam["adaptive_gamma"] >= 0:
        raise ValueError(f"adaptive_gamma={sam['adaptive_gamma']} must be >= 0")
    if rho > 0 and k == 0 and not adaptive:
        raise ValueError(
            f"rho={rho} turns SAM on but k=0 and adaptive=False: set k >= 1 or adaptive"
        )
    if rho == 0 and (k > 0 or adaptive):
        raise ValueError(f"rho=0 turns SAM off but k={k}, adaptive={adaptive}: set rho > 0")
    return {name: value for name, value in sam.items()}
