"""ARS2-Neo for JAX: composable Optax transformations (SPEC.md)."""

import importlib.metadata

from ars2_jax._alias import (
    DEFAULT_MAX_DIM,
    STATIC_ARGS,
    ars2_neo,
    default_param_labels,
)
from ars2_jax._distributed import NewtonSchulzSharding, state_specs
from ars2_jax._newton_schulz import (
    NS_COEFFS,
    NS_EPS,
    default_dimension_numbers,
    default_ns_dtype,
    newton_schulz,
)
from ars2_jax._orthogonalize import orthogonalize_with_energy
from ars2_jax._owner_exchange import assign_owners, newton_schulz_flops
from ars2_jax._sam import (
    TINY,
    SharpnessAwareState,
    adam_second_moments,
    diagnostics,
    inject_shear,
    masked_grad_fn,
    perturbation,
    sharpness_aware,
    shear_force,
)

# The version is written once, in pyproject.toml.
__version__ = importlib.metadata.version("ars2")

__all__ = [
    "DEFAULT_MAX_DIM",
    "NS_COEFFS",
    "NS_EPS",
    "STATIC_ARGS",
    "TINY",
    "NewtonSchulzSharding",
    "SharpnessAwareState",
    "adam_second_moments",
    "ars2_neo",
    "assign_owners",
    "default_dimension_numbers",
    "default_ns_dtype",
    "default_param_labels",
    "diagnostics",
    "inject_shear",
    "masked_grad_fn",
    "newton_schulz",
    "newton_schulz_flops",
    "orthogonalize_with_energy",
    "perturbation",
    "sharpness_aware",
    "shear_force",
    "state_specs",
]
