"""The shared parity fixture: parameters, batches and a loss with a closed-form gradient.

Every parity test (NumPy oracle, PyTorch, JAX) draws its initial parameters and
its batches from here, so that all of them optimize exactly the same problem.
Arrays are kept in the PyTorch layout; :func:`to_flax` maps them to Flax's.

The loss couples the tracks and is nonlinear enough for SAM to matter::

    L(θ; D, x) = Σ_θ Σ (θ⁴/4 + c_θ·θ²/2 − D_θ ⊙ θ) + γ · biasᵀ (W x)

with ``W = params['linear']`` (``(out, in)``), ``bias = params['bias']`` (``(out,)``).
"""

from __future__ import annotations

import numpy as np

# name -> PyTorch-layout shape. One tensor of each kind the optimizer meets.
SHAPES = {
    "linear": (6, 5),  # Linear weight (out, in): a tall matrix in this layout
    "heads": (3, 4, 5),  # per-head weights (heads, d_head, d_model)
    "conv": (4, 3, 3, 2),  # conv weight (out, in, kh, kw)
    "bias": (6,),  # 1-D: AdamW track
    "embedding": (10000, 2),  # a matrix with a dimension >= 10000: AdamW track
}
TRACKS = {
    "linear": "ars2",
    "heads": "ars2",
    "conv": "ars2",
    "bias": "adamw",
    "embedding": "adamw",
}
QUADRATIC = {"linear": 0.5, "heads": 1.0, "conv": 0.2, "bias": 0.3, "embedding": 1.0}
# The embedding is small, in parameters and data, so that its 20000 entries do not
# swamp the global φ of the adaptive mode, which then drifts below its threshold
# at some steps: the fixture exercises adaptive syncs as well as the fallback.
SCALE = {"linear": 1.0, "heads": 1.0, "conv": 1.0, "bias": 1.0, "embedding": 0.02}
COUPLING = 0.7

# Each track its own hyperparameters, so that a mixed-up track shows.
ARS2_HPARAMS = dict(lr=0.02, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1)
ADAMW_HPARAMS = dict(lr=0.01, b1=0.8, b2=0.995, eps=1e-6, weight_decay=0.01)

# The four SAM modes of SPEC §5.
MODES = {
    "base": dict(rho=0.0, k=0, alpha=0.1, adaptive=False),
    "sync": dict(rho=0.3, k=1, alpha=0.1, adaptive=False),
    "delayed": dict(rho=0.3, k=3, alpha=0.3, adaptive=False),
    "adaptive": dict(
        rho=0.3,
        k=6,
        alpha=0.3,
        adaptive=True,
        adaptive_beta=0.9,
        adaptive_lambda=0.3,
        adaptive_gamma=2.0,
    ),
}
SAM_DEFAULTS = dict(adaptive_beta=0.99, adaptive_lambda=2.0, adaptive_gamma=2.0)
STEPS = 30


def sam_settings(mode: str) -> dict:
    return {**SAM_DEFAULTS, **MODES[mode]}


def initial_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: 0.5 * SCALE[name] * rng.standard_normal(shape) for name, shape in SHAPES.items()}


def batches(steps: int = STEPS, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        batch = {name: SCALE[name] * rng.standard_normal(shape) for name, shape in SHAPES.items()}
        batch["x"] = rng.standard_normal(SHAPES["linear"][1])
        out.append(batch)
    return out


def loss(params, batch):
    """The loss for NumPy arrays, torch tensors or jax arrays in the PyTorch layout."""
    total = 0.0
    for name in SHAPES:
        p = params[name]
        total = total + (0.25 * p**4 + 0.5 * QUADRATIC[name] * p**2 - batch[name] * p).sum()
    return total + COUPLING * (params["bias"] * (params["linear"] @ batch["x"])).sum()


def grad(params: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The closed-form gradient of :func:`loss` (the oracle needs no autodiff)."""
    grads = {
        name: params[name] ** 3 + QUADRATIC[name] * params[name] - batch[name] for name in SHAPES
    }
    grads["linear"] = grads["linear"] + COUPLING * np.outer(params["bias"], batch["x"])
    grads["bias"] = grads["bias"] + COUPLING * params["linear"] @ batch["x"]
    return grads


def to_flax(name: str, array):
    """PyTorch layout -> Flax layout (SPEC §2).

    Dense kernels are ``(in, out)``, conv kernels ``(kh, kw, in, out)``.
    """
    if name == "linear":
        return array.T
    if name == "conv":
        return array.transpose(2, 3, 1, 0)
    return array


def from_flax(name: str, array):
    """Flax layout -> PyTorch layout, the inverse of :func:`to_flax`."""
    if name == "linear":
        return array.T
    if name == "conv":
        return array.transpose(3, 2, 0, 1)
    return array


def relative_error(a: dict, b: dict) -> float:
    """SPEC §6b: the maximum over tensors of ``‖a − b‖ / ‖b‖``."""
    return max(
        float(np.linalg.norm(np.asarray(a[n], np.float64) - np.asarray(b[n], np.float64)))
        / float(np.linalg.norm(np.asarray(b[n], np.float64)))
        for n in b
    )
