"""Argument checks and safe arithmetic shared by the objective's pure functions."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
ArrayLike = jax.typing.ArrayLike


def check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(map(repr, choices))}")


def safe_div(num: Array, den: Array) -> Array:
    """num / den, and 0 where den == 0 (a sequence or batch with no tokens).

    The inner `where` keeps the unused branch finite, so gradients stay NaN-free too.
    """
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def concrete_float(x: Any) -> float | None:
    """The Python value of x if it is known at trace time, else None (x is a tracer)."""
    try:
        return float(x)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def positive_int(what: str, x: Any) -> int:
    """x as a Python int (numpy integers welcome), or a ValueError saying what is wrong."""
    try:
        if isinstance(x, bool):
            raise TypeError
        value = operator.index(x)
    except TypeError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"{what} must be a positive int, got {x!r}")
    return value


def float_dtype(*xs: ArrayLike) -> jnp.dtype:
    # At least float32: bf16 log-probs make exp(logp - old_logp) too coarse to clip at 1 ± 0.2.
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)
