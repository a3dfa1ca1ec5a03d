"""Argument checks that work under ``optax.inject_hyperparams``, where floats may be traced."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_float(name: str, value: Any) -> float | None:
    """``float(value)``, or ``None`` when the value is traced or a schedule.

    Raises ``ValueError`` naming ``name`` when the value is not one finite real
    number: a string (``float("0.1")`` would accept it), ``None``, a bool, a
    sequence or an array of another shape than ``()``, ``nan`` or ``inf``.
    """
    if callable(value) or isinstance(value, jax.core.Tracer):
        return None
    if value is None or isinstance(value, (bool, str, bytes)) or np.ndim(value) != 0:
        raise ValueError(f"{name}={value!r} must be a finite real number")
    try:
        number = float(value)
    except jax.errors.ConcretizationTypeError:
        return None
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name}={value!r} must be a finite real number") from error
    if not math.isfinite(number):
        raise ValueError(f"{name}={number} must be a finite real number")
    return number


def check(name: str, value: Any, ok: Callable[[float], bool], requirement: str) -> None:
    """Raises ``ValueError(f"{name}={value} {requirement}")`` when a concrete value fails ``ok``."""
    number = concrete_float(name, value)
    if number is not None and not ok(number):
        raise ValueError(f"{name}={number} {requirement}")


def check_static_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be a static integer >= {minimum}")


def check_float_dtype(name: str, value: Any) -> None:
    """``value`` must be ``None`` or a floating dtype (anything ``jnp.dtype`` reads as one)."""
    if value is None:
        return
    try:
        floating = jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise ValueError(f"{name}={value!r} must be None or a floating dtype")
