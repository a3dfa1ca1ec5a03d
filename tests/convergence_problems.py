"""Problems with a known optimum, and the settings that drive them, shared by both frameworks.

Each problem is a loss over a small dict of parameters whose minimizer is known in
closed form. The arrays are NumPy float64; the losses use only operators that
NumPy arrays, jax arrays and torch tensors share (``@``, ``**``, ``.sum()``), so
both frameworks optimize the same function. Every matrix here is 2-D, and a 2-D
tensor is one matrix in both frameworks' default views (SPEC §2), so the same
arrays serve both layouts unchanged.

* ``parabola``: ``½‖W − W*‖² + ½‖b − b*‖²``: a ``(4, 3)`` matrix on the ARS2 track,
  a vector on the AdamW track.
* ``rosenbrock``: ``Σ_j (1 − x_j)² + 100 (y_j − x_j²)²`` with ``x``, ``y`` the two
  rows of a ``(2, 3)`` matrix: three Rosenbrock valleys that share one
  Newton-Schulz direction. Optimum: all ones.
* ``regression``: noise-free linear regression ``mean_i ½‖x_i W + b − y_i‖²`` with a
  full-rank ``(32, 5)`` design, so ``(W*, b*)`` is the unique minimizer.

Every run uses weight decay 0 and a cosine decay of the learning rate to 0 over
the run (:func:`learning_rate`): with a constant rate, Adam-type steps keep
oscillating at the scale of the rate around the optimum, and where a run ends in
that oscillation depends on rounding.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

PROBLEMS = ("parabola", "rosenbrock", "regression")
STEPS = {"parabola": 200, "rosenbrock": 1000, "regression": 400}
PEAK_LEARNING_RATE = 0.05

# The optimizer configurations of the harness: the four ARS2-Neo modes of SPEC §5
# and two building blocks alone, "tracks_only" (the two track updates of SPEC §2 and
# §4 without the SAM wrapper) and "sam_only" (the SAM wrapper, every step, around
# plain Adam: no Newton-Schulz anywhere).
OPTIMIZERS = ("base", "sync", "delayed", "adaptive", "tracks_only", "sam_only")
HYPERPARAMETERS = dict(b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0)
# SAM's normalized perturbation keeps its gradient from vanishing near the optimum
# and the injected shear force is a stale direction: on the stiff Rosenbrock valley
# a larger radius or shear strength leaves the runs short of the optimum in the
# fixed number of steps (rho 0.01 / alpha 0.03: errors up to 0.1). These are
# convergence tests; the SAM arithmetic itself is checked by the parity tests.
RHO = 0.003
ALPHA = 0.01
SAM_SETTINGS = {
    "base": dict(rho=0.0, k=0),
    "sync": dict(rho=RHO, k=1),
    "delayed": dict(rho=RHO, k=3, alpha=ALPHA),
    "adaptive": dict(
        rho=RHO, k=6, alpha=ALPHA, adaptive=True, adaptive_beta=0.9, adaptive_lambda=0.3
    ),
    "tracks_only": dict(rho=0.0, k=0),
    "sam_only": dict(rho=RHO, k=1),
}

# max |θ − θ*| allowed at the end of a run. Measured in both frameworks (JAX at XLA's
# default and at the tests' optimization level 0; ``python -m tests.test_hardening_jax``
# and ``..._torch`` print the table), worst case over the six configurations:
#   float32:  parabola 1.8e-4, rosenbrock 5.2e-3, regression 2.3e-4;
#   bfloat16: parabola 6.9e-3, rosenbrock 7.0e-2, regression 1.7e-2.
# Where a run ends depends on rounding (the same float32 JAX run ends 2e-7 or 5e-3
# from the Rosenbrock optimum at two XLA optimization levels), so the bounds keep a
# margin of 2x or more. bfloat16 params cannot end closer: an entry near 1 is resolved
# to 2^-8..2^-7 (4e-3..8e-3), and on the Rosenbrock valley the rounding of (x, y)
# makes the stiff term's gradient noise (~200·ulp) larger than the gradient along the
# valley within a few 1e-2 of the optimum, which is where bf16 runs stop.
TOLERANCE = {
    "float32": {"parabola": 1e-3, "rosenbrock": 2e-2, "regression": 1e-3},
    "bfloat16": {"parabola": 2e-2, "rosenbrock": 0.15, "regression": 4e-2},
}


def learning_rate(name: str, step: int) -> float:
    """The learning rate of step ``step`` (0-based) of problem ``name``: a cosine decay to 0.

    ``optax.cosine_decay_schedule(PEAK_LEARNING_RATE, STEPS[name])`` is the same schedule.
    """
    progress = min(step, STEPS[name]) / STEPS[name]
    return PEAK_LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * progress))


def _regression_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    inputs = rng.standard_normal((32, 5))
    weights = rng.standard_normal((5, 3)) / 2
    bias = rng.standard_normal(3) / 2
    return inputs, weights, bias, inputs @ weights + bias


def initial_params(name: str) -> dict[str, np.ndarray]:
    """The starting point of problem ``name``."""
    if name == "parabola":
        rng = np.random.default_rng(0)
        return {"w": rng.standard_normal((4, 3)) / 2, "b": rng.standard_normal(3) / 2}
    if name == "rosenbrock":
        # Near the valley y = x², on both sides of the optimum.
        return {"xy": np.array([[0.8, 1.2, 0.9], [0.6, 1.4, 0.8]])}
    if name == "regression":
        return {"w": np.zeros((5, 3)), "b": np.zeros(3)}
    raise ValueError(f"unknown problem {name!r}")


def optimum(name: str) -> dict[str, np.ndarray]:
    """The known minimizer of problem ``name``."""
    if name == "parabola":
        rng = np.random.default_rng(1)
        return {"w": rng.standard_normal((4, 3)) / 2, "b": rng.standard_normal(3) / 2}
    if name == "rosenbrock":
        return {"xy": np.ones((2, 3))}
    if name == "regression":
        _, weights, bias, _ = _regression_data()
        return {"w": weights, "b": bias}
    raise ValueError(f"unknown problem {name!r}")


def data(name: str) -> dict[str, np.ndarray]:
    """The constants the loss of ``name`` reads (the ``batch`` of :func:`loss`)."""
    if name == "parabola":
        return optimum(name)
    if name == "rosenbrock":
        return {}
    if name == "regression":
        inputs, _, _, targets = _regression_data()
        return {"x": inputs, "y": targets}
    raise ValueError(f"unknown problem {name!r}")


def loss(name: str, params, batch):
    """The loss of problem ``name`` for NumPy arrays, jax arrays or torch tensors."""
    if name == "parabola":
        return (
            0.5 * ((params["w"] - batch["w"]) ** 2).sum()
            + 0.5 * ((params["b"] - batch["b"]) ** 2).sum()
        )
    if name == "rosenbrock":
        x, y = params["xy"][0], params["xy"][1]
        return ((1 - x) ** 2 + 100 * (y - x**2) ** 2).sum()
    if name == "regression":
        residual = batch["x"] @ params["w"] + params["b"] - batch["y"]
        return 0.5 * (residual**2).sum() / batch["x"].shape[0]
    raise ValueError(f"unknown problem {name!r}")


def max_error(params: dict, name: str) -> float:
    """``max |θ − θ*|`` over every entry of every tensor of problem ``name``."""
    target = optimum(name)
    return max(float(np.max(np.abs(np.asarray(params[n], np.float64) - target[n]))) for n in target)


def check_convergence(errors: dict[str, float], dtype: str) -> list[str]:
    """The problems whose final error exceeds :data:`TOLERANCE`, described."""
    return [
        f"{name}: max |θ − θ*| = {error:.2e} > {TOLERANCE[dtype][name]:g}"
        for name, error in errors.items()
        if not error <= TOLERANCE[dtype][name]
    ]


# The non-finite gradient tests: the regression problem on minibatches of 8 rows (so
# that the adaptive mode sees varying gradients), a matrix on the ARS2 track and a
# vector on the AdamW track; weight decay on, so that a skipped step would show it.
NON_FINITE_HYPERPARAMETERS = dict(learning_rate=0.02, b1=0.9, b2=0.98, weight_decay=0.1)


def regression_minibatches(steps: int, size: int = 8) -> list[dict[str, np.ndarray]]:
    """``steps`` batches of ``size`` rows of the regression data, cycling through it."""
    inputs, _, _, targets = _regression_data()
    starts = [(i * size) % len(inputs) for i in range(steps)]
    return [{"x": inputs[s : s + size], "y": targets[s : s + size]} for s in starts]


# The long run: a small MLP regression for 20 000 steps of adaptive mode.
LONG_RUN_STEPS = 20_000
MLP_SIZES = (2, 16, 16, 1)


def mlp_params(seed: int = 0) -> dict[str, np.ndarray]:
    """A ``2-16-16-1`` tanh MLP, kernels ``(in, out)`` (ARS2 track), biases (AdamW track)."""
    rng = np.random.default_rng(seed)
    params = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(MLP_SIZES)):
        params[f"w{i}"] = rng.standard_normal((fan_in, fan_out)) / math.sqrt(fan_in)
        params[f"b{i}"] = np.zeros(fan_out)
    return params


def mlp_data(seed: int = 3) -> dict[str, np.ndarray]:
    """64 points of a smooth target on [-2, 2]²."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, (64, 2))
    y = np.sin(x[:, :1]) * np.cos(x[:, 1:])
    return {"x": x, "y": y}


def mlp_loss(params, batch, tanh):
    """Mean squared error of the MLP; ``tanh`` is the framework's (``jnp.tanh``, ``torch.tanh``)."""
    h = batch["x"]
    layers = len(MLP_SIZES) - 1
    for i in range(layers):
        h = h @ params[f"w{i}"] + params[f"b{i}"]
        if i < layers - 1:
            h = tanh(h)
    return ((h - batch["y"]) ** 2).mean()
