"""The timed calls of ``python -m benchmarks.step_time``: optimizers, steps and their state.

A :class:`Candidate` is one thing to time: ``run()`` performs one optimizer update or one
train step and blocks until its results are ready. Builders here turn an optimizer name
(a key of :data:`OPTIMIZERS`) into candidates for each framework and section, and record
every optimizer's state in a :class:`Registry` for the memory rows.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ars2_jax
from benchmarks import workloads
from experiments import common, grokking

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs" / "grokking"
DELAYED_K = 10  # the grokking A-GSAM config's fallback period, as the delayed mode's period
# A φ variance that puts the adaptive threshold (−λ·sqrt(var)) far below any φ ∈ [−1, 1].
HUGE_PHI_VAR = 1e12

# Row names, in table order, and how the tables call them.
OPTIMIZERS = {
    "adamw": "AdamW",
    "muon": "Muon",
    "ars2_base": "ARS2-Neo base",
    "ars2_base_grouped": "ARS2-Neo base, NS grouped by shape",
    "ars2_base_per_leaf": "ARS2-Neo base, NS per leaf",
    "ars2_sync": "ARS2-Neo sync (k=1)",
    "ars2_delayed": f"ARS2-Neo delayed (k={DELAYED_K})",
    "ars2_delayed:sync": "  delayed, sync step",
    "ars2_delayed:other": "  delayed, other step",
    "ars2_adaptive": "ARS2-Neo adaptive (A-GSAM)",
    "ars2_adaptive:sync": "  adaptive, sync step",
    "ars2_adaptive:other": "  adaptive, other step",
    "ars2_2d": "ARS2-Neo, same 2-D matrices",
}
# The names one may ask for (the others are branches or follow from "muon").
CHOICES = (
    "adamw",
    "muon",
    "ars2_base",
    "ars2_base_grouped",
    "ars2_base_per_leaf",
    "ars2_sync",
    "ars2_delayed",
    "ars2_adaptive",
)
CONDITIONAL = ("ars2_delayed", "ars2_adaptive")
TORCH_CHOICES = ("adamw", "ars2_base", "ars2_sync", "ars2_delayed", "ars2_adaptive")
SECTIONS = {
    "update": "update alone",
    "step": "full train step",
    "update_2d": "update alone, 2-D matrices, bf16 NS",
}


# --- optimizers -------------------------------------------------------------------------


def optimizer_configs(ns_dtype: str) -> dict[str, dict[str, Any]]:
    """The grokking configs' ``[optimizer]`` tables, ARS2-Neo's NS dtype set to ``ns_dtype``."""
    load = lambda name: dict(common.load_config(CONFIG_DIR / f"{name}.toml")["optimizer"])
    agsam = load("ars2_neo_agsam")
    configs = {
        "adamw": load("adamw"),
        "muon": load("muon"),
        "ars2_base": load("ars2_neo_base"),
        "ars2_sync": load("ars2_neo_sync"),
        "ars2_delayed": {**agsam, "adaptive": False, "k": DELAYED_K},
        "ars2_adaptive": agsam,
    }
    for name, config in configs.items():
        if name.startswith("ars2"):
            config["ns_dtype"] = ns_dtype
    configs["ars2_base_grouped"] = configs["ars2_base_per_leaf"] = configs["ars2_base"]
    return configs


# The variants of ARS2-Neo base: group_same_shapes of orthogonalize_with_energy.
GROUPING = {"ars2_base_grouped": True, "ars2_base_per_leaf": False}


def ars2_base_grouping(optimizer: dict[str, Any], group: bool):
    """ARS2-Neo base composed as ``ars2_neo`` composes it, with ``group_same_shapes=group``:
    one Newton-Schulz call per matrix shape, or one per leaf."""
    b1, b2 = optimizer["betas"]
    eps = optimizer.get("eps", 1e-8)
    lr = optimizer["learning_rate"]
    track = optimizer.get("adamw_track", {})
    track_b1, track_b2 = track.get("betas", (b1, b2))
    ars2_track = optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        ars2_jax.orthogonalize_with_energy(
            optimizer.get("ns_steps", 5), common.ns_dtype_of(optimizer), group_same_shapes=group
        ),
        optax.add_decayed_weights(optimizer["weight_decay"]),
        optax.scale_by_learning_rate(lr),
    )
    adamw_track = optax.adamw(
        track.get("learning_rate", lr),
        b1=track_b1,
        b2=track_b2,
        eps=track.get("eps", eps),
        weight_decay=track.get("weight_decay", optimizer["weight_decay"]),
    )
    tracks = optax.partition(
        {"ars2": ars2_track, "adamw": adamw_track}, ars2_jax.default_param_labels
    )
    return ars2_jax.sharpness_aware(tracks, ars2_jax.adam_second_moments(b2, eps), rho=0.0, k=0)


def jax_muon(optimizer: dict[str, Any], dimension_numbers: Any, ns_dtype: str):
    """``optax.contrib.muon`` whose Newton-Schulz iterates in ``ns_dtype``.

    optax iterates in the dtype of Muon's momentum: float32 for float32 params. For
    ``bfloat16`` the momentum is kept in bfloat16 (``mu_dtype``) and the Muon leaves'
    gradients are cast to bfloat16 first, so that every matmul of its Newton-Schulz has
    bfloat16 inputs, as ARS2-Neo's have.
    """
    if ns_dtype == "float32":
        return common.optax_optimizer(optimizer, muon_dimension_numbers=dimension_numbers)
    adam = optimizer.get("adam", {})
    adam_b1, adam_b2 = adam.get("betas", (0.9, 0.999))
    muon = optax.contrib.muon(
        learning_rate=optimizer["learning_rate"],
        beta=optimizer.get("momentum", 0.95),
        weight_decay=optimizer.get("weight_decay", 0.0),
        nesterov=optimizer.get("nesterov", True),
        adam_learning_rate=adam.get("learning_rate", optimizer["learning_rate"]),
        adam_b1=adam_b1,
        adam_b2=adam_b2,
        adam_weight_decay=adam.get("weight_decay", 0.0),
        muon_weight_dimension_numbers=dimension_numbers,
        mu_dtype=jnp.bfloat16,
    )
    is_leaf = lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)

    def to_bfloat16(updates, state, params=None):
        del params
        updates = jax.tree.map(
            lambda dims, g: g if dims is None else g.astype(jnp.bfloat16),
            dimension_numbers,
            updates,
            is_leaf=is_leaf,
        )
        return updates, state

    cast = optax.GradientTransformation(optax.init_empty_state, to_bfloat16)
    return optax.with_extra_args_support(optax.chain(cast, muon))


def jax_optimizer(name: str, configs: dict, dimension_numbers: Any, ns_dtype: str):
    if name == "muon":
        return jax_muon(configs["muon"], dimension_numbers, ns_dtype)
    if name in GROUPING:
        return ars2_base_grouping(configs[name], GROUPING[name])
    return common.optax_optimizer(configs[name])


def branches(name: str) -> tuple[str | None, ...]:
    """The timed branches of a mode: both for delayed and adaptive, the step itself otherwise."""
    return ("sync", "other") if name in CONDITIONAL else (None,)


def row_name(name: str, branch: str | None) -> str:
    return name if branch is None else f"{name}:{branch}"


# Each step takes a traced branch code, so that one compiled step serves the real
# decision (0) and each forced branch (1: sync, 2: other).
BRANCH_CODES = {None: 0, "sync": 1, "other": 2}


def force_branch(state: Any, code: jax.Array) -> Any:
    """Forces the sync decision of an ARS2-Neo state (any other state is returned as is).

    Sync: the step counter at 0, so that ``t = 1``, which always syncs. Other: ``t = 2``
    with the last sync at step 1 (a gap of 1, below any fallback period, and ``2 mod k ≠ 1``)
    and a ``φ`` variance so large that no drift crosses the adaptive threshold.
    """
    if not isinstance(state, ars2_jax.SharpnessAwareState):
        return state
    sync, other = code == 1, code == 2
    one = jnp.ones_like(state.step)
    huge = jnp.asarray(HUGE_PHI_VAR, state.phi_var.dtype)
    return state._replace(
        step=jnp.where(sync, 0, jnp.where(other, one, state.step)),
        last_sync=jnp.where(other, one, state.last_sync),
        phi_var=jnp.where(other, huge, state.phi_var),
    )


def jax_update_fn(tx):
    """``(params, state, grads, adversarial, code) -> (params, state)``: the update alone."""

    def update(params, state, grads, adversarial, code):
        state = force_branch(state, code)
        updates, state = tx.update(grads, state, params, grad_fn=lambda _: adversarial)
        return optax.apply_updates(params, updates), state

    return jax.jit(update, donate_argnums=(0, 1))


def jax_train_step_fn(model, tx):
    """``(params, state, x, y, mask, code) -> (params, state, loss)``: loss, gradient, update."""

    def train_step(params, state, x, y, mask, code):
        state = force_branch(state, code)
        loss_fn = functools.partial(grokking.batch_loss, model, x=x, y=y, mask=mask)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grad_fn = jax.grad(lambda p: loss_fn(p)[0])
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state, loss

    return jax.jit(train_step, donate_argnums=(0, 1))


# --- candidates -------------------------------------------------------------------------


@dataclasses.dataclass
class Candidate:
    """One timed call: ``run()`` does one step and blocks until its results are ready."""

    workload: str  # "a" | "b"
    section: str  # a key of SECTIONS
    framework: str  # "jax" | "torch"
    optimizer: str  # a key of OPTIMIZERS
    run: Callable[[], None]
    warmup: int = 1  # untimed calls before the rounds

    @property
    def key(self) -> str:
        return f"{self.workload}/{self.section}/{self.framework}/{self.optimizer}"


class Slot:
    """A mutable cell for the params and states that donated calls replace."""

    def __init__(self, value: Any):
        self.value = value


@dataclasses.dataclass
class Registry:
    """What the memory rows read (every optimizer's state), and compiled steps to reuse."""

    states: list[tuple[str, str, str, Callable[[], int], int]] = dataclasses.field(
        default_factory=list
    )  # (workload, framework, optimizer, state bytes, params it updates)
    programs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def memory_rows(self) -> list[dict[str, Any]]:
        rows = []
        for workload, framework, optimizer, state_bytes, count in self.states:
            size = state_bytes()
            rows.append(
                {
                    "workload": workload,
                    "framework": framework,
                    "optimizer": optimizer,
                    "state_bytes": size,
                    "params": count,
                    "bytes_per_param": size / count,
                }
            )
        return rows


def _copy(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


def jax_candidates(
    workload: str,
    section: str,
    names,
    params,
    configs,
    dimension_numbers,
    ns_dtype: str,
    registry: Registry,
    warmup: Callable[[str], int],
    inputs: tuple,
    model=None,
) -> list[Candidate]:
    """JAX candidates of one section; ``inputs`` are ``(grads, adversarial)`` for the update
    alone, ``(x, y, mask)`` for the full step. Every step is compiled here (untimed).

    The update-alone candidates share one params buffer (their values do not change the
    cost): each call donates it and stores the result; every full step has its own.
    """
    candidates = []
    n_params = sum(x.size for x in jax.tree.leaves(params))
    shared = Slot(_copy(params))
    for name in names:
        tx = jax_optimizer(name, configs, dimension_numbers, ns_dtype)
        state = Slot(tx.init(params))
        params_slot = shared if section == "update" else Slot(_copy(params))
        fn = jax_update_fn(tx) if section == "update" else jax_train_step_fn(model, tx)
        code = jnp.asarray(0, jnp.int32)
        compiled = fn.lower(params_slot.value, state.value, *inputs, code).compile()
        registry.programs[f"{workload}/{section}/{name}"] = compiled
        if section == "update":
            registry.states.append(
                (
                    workload,
                    "jax",
                    name,
                    lambda state=state: workloads.tree_bytes(state.value),
                    n_params,
                )
            )

        def run(params_slot, state, compiled, code):
            params_slot.value, state.value, *rest = compiled(
                params_slot.value, state.value, *inputs, code
            )
            jax.block_until_ready((params_slot.value, state.value, rest))

        for branch in branches(name):
            code = jnp.asarray(BRANCH_CODES[branch], jnp.int32)
            candidates.append(
                Candidate(
                    workload,
                    section,
                    "jax",
                    row_name(name, branch),
                    functools.partial(run, params_slot, state, compiled, code),
                    warmup(name),
                )
            )
    return candidates


# --- PyTorch ----------------------------------------------------------------------------


def torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _torch_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _force_torch_branch(optimizer, branch: str | None) -> None:
    """As :func:`force_branch`, on ``ARS2Neo.sam_state``."""
    if branch == "sync":
        optimizer.sam_state["step"] = 0
    elif branch == "other":
        optimizer.sam_state.update(step=1, last_sync=1, phi_var=HUGE_PHI_VAR)


def torch_state_bytes(optimizer) -> int:
    import torch

    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )


def _register_torch(registry, workload, name, optimizer, tensors) -> None:
    count = sum(t.numel() for t in tensors)
    registry.states.append(
        (workload, "torch", name, functools.partial(torch_state_bytes, optimizer), count)
    )


def _torch_branch_candidates(workload, section, name, run, warmup) -> list[Candidate]:
    """One candidate per timed branch of ``run(branch=...)``, a PyTorch step."""
    if name in CONDITIONAL:
        run(branch="sync")  # the other branch injects the shear a sync step caches
    return [
        Candidate(
            workload,
            section,
            "torch",
            row_name(name, branch),
            functools.partial(run, branch=branch),
            warmup(name),
        )
        for branch in branches(name)
    ]


def torch_update_candidates(
    workload, names, tensors, grads, adversarial, configs, registry, warmup
) -> list[Candidate]:
    """The update alone: gradients set by reference; a SAM closure hands precomputed ones."""
    import torch

    module = torch.nn.ParameterList(tensors)
    candidates = []
    for name in names:
        optimizer = common.torch_optimizer(configs[name], module)
        _register_torch(registry, workload, name, optimizer, tensors)

        def run(optimizer=optimizer, branch=None):
            for param, grad in zip(tensors, grads):
                param.grad = grad
            calls = []

            def closure():
                for param, grad in zip(tensors, adversarial if calls else grads):
                    param.grad = grad
                calls.append(None)
                return 0.0

            _force_torch_branch(optimizer, branch)
            if getattr(optimizer, "sam_enabled", False):
                optimizer.step(closure)
            else:
                optimizer.step()
            _torch_sync()

        candidates += _torch_branch_candidates(workload, "update", name, run, warmup)
    return candidates


def torch_2d_candidates(workload, tensors, grads, configs, registry, warmup) -> list[Candidate]:
    """``torch.optim.Muon`` and ``ARS2Neo`` (bfloat16 Newton-Schulz) on the same 2-D tensors."""
    import torch

    from ars2_torch import ARS2Neo

    muon, ars2 = configs["muon"], configs["ars2_base"]
    optimizers = {
        "muon": torch.optim.Muon(
            tensors,
            lr=muon["learning_rate"],
            momentum=muon.get("momentum", 0.95),
            weight_decay=muon.get("weight_decay", 0.0),
        ),
        "ars2_2d": ARS2Neo(
            [{"params": tensors, "ars2": True}],
            lr=ars2["learning_rate"],
            betas=tuple(ars2["betas"]),
            eps=ars2.get("eps", 1e-8),
            weight_decay=ars2["weight_decay"],
            ns_steps=ars2.get("ns_steps", 5),
            ns_dtype=torch.bfloat16,
        ),
    }
    candidates = []
    for name, optimizer in optimizers.items():
        _register_torch(registry, workload, name, optimizer, tensors)

        def run(optimizer=optimizer):
            for param, grad in zip(tensors, grads):
                param.grad = grad
            optimizer.step()
            _torch_sync()

        candidates.append(Candidate(workload, "update_2d", "torch", name, run, warmup(name)))
    return candidates


def torch_step_candidates(work: workloads.Grokking, names, configs, warmup) -> list[Candidate]:
    """The full train step of the grokking model's PyTorch twin (same weights, same batch)."""
    import torch

    from models.grokking_torch import from_flax_params

    device = torch_device()
    x, y, mask = (torch.from_numpy(np.array(a)).to(device) for a in work.batches[0])
    x, y = x.long(), y.long()
    candidates = []
    for name in names:
        net = from_flax_params(work.model.config, work.params).to(device)
        optimizer = common.torch_optimizer(configs[name], net)

        def closure(net=net):
            logits = net(x)[:, -1]
            losses = torch.nn.functional.cross_entropy(logits, y, reduction="none")
            loss = torch.sum(losses * mask) / torch.sum(mask)
            loss.backward()
            return loss

        def run(optimizer=optimizer, closure=closure, branch=None):
            optimizer.zero_grad()
            _force_torch_branch(optimizer, branch)
            if getattr(optimizer, "sam_enabled", False):
                optimizer.step(closure)
            else:
                closure()
                optimizer.step()
            _torch_sync()

        candidates += _torch_branch_candidates("a", "step", name, run, warmup)
    return candidates
