"""ARS2-Neo for PyTorch: the reference implementation of SPEC.md."""

import importlib.metadata

from ars2_torch._closure import SAMClosure, sam_closure
from ars2_torch._model_groups import model_param_groups
from ars2_torch.newton_schulz import NS_COEFFS, NS_EPS, as_matrices, default_ns_dtype, newton_schulz
from ars2_torch.optimizer import (
    TINY,
    ARS2Neo,
    adamw_update,
    ars2_param_groups,
    ars2_update,
    inject_shear,
    is_ars2_tensor,
    perturbation,
    shear_force,
)

# The version is written once, in pyproject.toml.
__version__ = importlib.metadata.version("ars2")

__all__ = [
    "NS_COEFFS",
    "NS_EPS",
    "TINY",
    "ARS2Neo",
    "SAMClosure",
    "adamw_update",
    "ars2_param_groups",
    "ars2_update",
    "as_matrices",
    "default_ns_dtype",
    "inject_shear",
    "is_ars2_tensor",
    "model_param_groups",
    "newton_schulz",
    "perturbation",
    "sam_closure",
    "shear_force",
]
