"""Named variants that plug in by decorator: advantage estimators, policy objectives, KL.

A `Registry` is a dict from name to function that the config validates against and the
update looks names up in, so adding a variant is one decorated function (and its test):

    from rl_reason import losses

    @losses.register_advantage_estimator("median_baseline")
    def median_baseline(r_PG, w_PG, n_P1, eps):
        ...

    GRPOConfig(loss=dict(advantage_estimator="median_baseline"))   # validated against the registry

Registration happens when the defining module is imported, so import it before building the
config (a config file can import it at its top).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def _origin(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


class Registry(dict):
    """name → function of one kind (``kind`` names it in error messages)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str, fn: F | None = None, *, replace: bool = False):
        """``@registry.register(name)`` over a function, or ``registry.register(name, fn)``.

        A name already taken by another function is an error unless ``replace=True``; the same
        function defined again (a module or notebook cell run twice) replaces its old self.
        """
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a {self.kind} needs a non-empty string name, got {name!r}")

        def add(f: F) -> F:
            if not callable(f):
                raise TypeError(f"{self.kind} {name!r} must be a function, got {f!r}")
            old = self.get(name)
            if old is not None and not replace and _origin(old) != _origin(f):
                raise ValueError(
                    f"{self.kind} {name!r} is registered already (by {_origin(old)}); choose "
                    "another name, or pass replace=True to override it"
                )
            self[name] = f
            return f

        return add if fn is None else add(fn)

    def check(self, name: Any) -> None:
        """Raise ValueError naming the valid choices if ``name`` is not registered."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(map(repr, self))}")
