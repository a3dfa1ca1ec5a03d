"""Argument checks that work under ``optax.inject_hyperparams``, where floats may be traced."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def concrete_float(value: Any) -> float | None:
    """``float(value)``, or ``None`` when the value is traced or a schedule."""
    if callable(value):
        return None
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def check(name: str, value: Any, ok: Callable[[float], bool], requirement: str) -> None:
    """Raises ``ValueError(f"{name}={value} {requirement}")`` when a concrete value fails ``ok``."""
    number = concrete_float(value)
    if number is not None and not ok(number):
        raise ValueError(f"{name}={number} {requirement}")


def check_static_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be a static integer >= {minimum}")
