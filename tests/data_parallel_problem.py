"""The data-parallel fixture: a small MLP whose loss is a mean over examples.

Data parallelism rests on one identity: the mean of the per-device mean losses
over equal shards is the mean loss of the global batch, and so are the
gradients. The parity fixture (``tests/parity_problem.py``) has no batch
dimension, so the multi-device tests (JAX sharding, ``shard_map``, ``pmap``,
PyTorch DDP) optimize this problem instead::

    h = tanh(x W_hidden + b_hidden)                       # (batch, 32)
    z = tanh(einsum('bhi,hoi->bho', h.reshape(batch, 4, 8), W_heads)).reshape(batch, 16)
    L = mean over examples and outputs of (z W_out + b_out − y)²

``W_heads`` is a per-head 3-D weight ``(heads, d_head, d_in)``, so the ARS2 track
sees a batch of matrices too. Both frameworks use the same layouts (``x @ W``), so
the arrays below serve both unchanged.

No matrix is square: Adam's first step is nearly ``sign(g)``, a small square
matrix of signs is often singular, and Newton-Schulz amplifies last-bit
differences along near-null directions up to ``3.4445⁵ ≈ 490`` times. With
``(4, 4, 4)`` heads, summing the gradient in another order (which is all data
parallelism changes) moved the params by 1.2e-5 after 20 steps; with
``(4, 4, 8)``, by 3e-6.
"""

from __future__ import annotations

import itertools

import numpy as np

from tests import parity_problem

SHAPES = {
    "hidden": (8, 32),
    "hidden_bias": (32,),
    "heads": (4, 4, 8),
    "out": (16, 2),
    "out_bias": (2,),
}
GLOBAL_BATCH = 32  # divisible by the 4 JAX devices and the 2 DDP processes
STEPS = 20

ARS2_HPARAMS = dict(lr=0.02, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1)
# The AdamW track's eps is large enough against the bias gradients (~1e-2) that
# the update depends on the gradient's scale: a data-parallel step that summed
# the per-device gradients instead of averaging them would show.
ADAMW_HPARAMS = dict(lr=0.01, b1=0.8, b2=0.995, eps=1e-3, weight_decay=0.01)

# The four SAM modes of SPEC §5. The adaptive settings are chosen so that 20 steps
# of this problem hold φ-triggered syncs and non-sync steps, every decision far
# from its threshold (see check_adaptive_decisions).
MODES = {
    "base": dict(rho=0.0, k=0, alpha=0.1, adaptive=False),
    "sync": dict(rho=0.1, k=1, alpha=0.1, adaptive=False),
    "delayed": dict(rho=0.1, k=3, alpha=0.3, adaptive=False),
    "adaptive": dict(
        rho=0.1,
        k=5,
        alpha=0.3,
        adaptive=True,
        adaptive_beta=0.9,
        adaptive_lambda=0.3,
        adaptive_gamma=2.0,
    ),
}
SAM_DEFAULTS = parity_problem.SAM_DEFAULTS
DECISION_MARGIN = 1e-6  # SPEC §6b
TOLERANCE = 1e-5  # SPEC §6b: float32 with float32 Newton-Schulz


def sam_settings(mode: str) -> dict:
    return {**SAM_DEFAULTS, **MODES[mode]}


def ars2_neo_kwargs(mode: str) -> dict:
    """``ars2_jax.ars2_neo`` arguments: both tracks' values and the mode's SAM settings."""
    ars2, adamw = ARS2_HPARAMS, ADAMW_HPARAMS
    return dict(
        learning_rate=ars2["lr"],
        b1=ars2["b1"],
        b2=ars2["b2"],
        eps=ars2["eps"],
        weight_decay=ars2["weight_decay"],
        adamw_learning_rate=adamw["lr"],
        adamw_b1=adamw["b1"],
        adamw_b2=adamw["b2"],
        adamw_eps=adamw["eps"],
        adamw_weight_decay=adamw["weight_decay"],
        **sam_settings(mode),
    )


def torch_group_settings(ars2: bool) -> dict:
    """An ``ARS2Neo`` param group's keys for one track (without ``'params'``)."""
    hp = ARS2_HPARAMS if ars2 else ADAMW_HPARAMS
    return dict(
        ars2=ars2,
        lr=hp["lr"],
        betas=(hp["b1"], hp["b2"]),
        eps=hp["eps"],
        weight_decay=hp["weight_decay"],
    )


def initial_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in SHAPES.items():
        fan_in = shape[-1] if name == "heads" else shape[0]
        params[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    # Nonzero biases: ASAM's |θ| scaling would give a zero bias no perturbation.
    params["hidden_bias"] = 0.1 * params["hidden_bias"]
    params["out_bias"] = 0.1 * params["out_bias"]
    return params


def batches(steps: int = STEPS, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """``steps`` global batches ``{'x': (GLOBAL_BATCH, 8), 'y': (GLOBAL_BATCH, 2)}`` of a
    noisy random teacher."""
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((8, 2))
    out = []
    for _ in range(steps):
        x = rng.standard_normal((GLOBAL_BATCH, 8))
        y = np.sin(x @ teacher) + 0.1 * rng.standard_normal((GLOBAL_BATCH, 2))
        out.append({"x": x.astype(np.float32), "y": y.astype(np.float32)})
    return out


def loss(params, batch, xp):
    """The mean squared error; ``xp`` is ``jax.numpy`` or ``torch`` (both have
    ``tanh`` and ``einsum``)."""
    x, y = batch["x"], batch["y"]
    n = x.shape[0]
    h = xp.tanh(x @ params["hidden"] + params["hidden_bias"])
    z = xp.tanh(xp.einsum("bhi,hoi->bho", h.reshape(n, 4, 8), params["heads"])).reshape(n, 16)
    return xp.mean((z @ params["out"] + params["out_bias"] - y) ** 2)


def is_ars2(name: str) -> bool:
    return len(SHAPES[name]) >= 2


def shard(batch: dict[str, np.ndarray], index: int, count: int) -> dict[str, np.ndarray]:
    """The ``index``-th of ``count`` equal contiguous shards of a global batch."""
    size = GLOBAL_BATCH // count
    return {name: value[index * size : (index + 1) * size] for name, value in batch.items()}


def sync_pattern(sync_counts: list[int]) -> list[bool]:
    """Whether each step synced, from the sync count after every step."""
    counts = [0, *sync_counts]
    return [after > before for before, after in itertools.pairwise(counts)]


def decided_by_phi(sync_pattern: list[bool], k: int) -> list[bool]:
    """Whether each adaptive step's branch was chosen by comparing φ with the
    threshold, not forced (step 1, or the fallback period ``k``; SPEC §5.1)."""
    out, last_sync = [], 0
    for t, sync in enumerate(sync_pattern, start=1):
        forced = t == 1 or (k > 1 and t - last_sync >= k)
        out.append(not forced)
        if sync:
            last_sync = t
    return out


def check_adaptive_decisions(sync_pattern: list[bool], phi: list, threshold: list) -> None:
    """Asserts that an adaptive run synced on φ at least once and skipped at least
    one sync, and that every decision φ took is well posed (SPEC §6b)."""
    by_phi = decided_by_phi(sync_pattern, MODES["adaptive"]["k"])
    steps = list(zip(range(1, len(sync_pattern) + 1), sync_pattern, by_phi, phi, threshold))
    assert any(sync and chosen for _, sync, chosen, _, _ in steps), "no φ-triggered sync"
    assert not all(sync_pattern), "no step without a sync"
    for t, sync, chosen, phi_t, threshold_t in steps:
        if chosen:
            assert sync == (phi_t < threshold_t), f"step {t}: the sync does not follow φ"
            assert abs(phi_t - threshold_t) > DECISION_MARGIN, (
                f"step {t}: φ={phi_t} is within {DECISION_MARGIN} of {threshold_t}"
            )


def relative_error(a: dict, b: dict) -> float:
    """SPEC §6b."""
    return parity_problem.relative_error(a, b)
