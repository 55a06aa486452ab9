"""Outcome verifiers: (response, example) -> VerifyResult, and the process pool that runs them.

    from rl_reason import verifiers
    result = verifiers.get("math")(response, {"answer": "\\\\frac{1}{2}"})
    result.reward, result.correct, result.reason

Names: ``math``, ``gsm8k``, ``countdown``, ``code``, ``format``, ``arithmetic``,
``arithmetic_process`` (a perfect process reward model); ``names()`` lists
them and ``register(name, fn)`` adds one. A verifier raises ValueError for a malformed example
(the dataset's fault) and never for anything in the response (the policy's output): those score 0
with a reason. Nothing here imports jax: verifiers run in CPU worker processes
(``VerifierPool``), which never import the trainer's modules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from rl_reason.verifiers.arithmetic import verify_arithmetic
from rl_reason.verifiers.arithmetic_process import verify_arithmetic_process
from rl_reason.verifiers.code_execution import verify_code
from rl_reason.verifiers.countdown import verify_countdown
from rl_reason.verifiers.format_reward import verify_format
from rl_reason.verifiers.gsm8k import verify_gsm8k
from rl_reason.verifiers.math_equivalence import verify_math
from rl_reason.verifiers.pool import VerifierError, VerifierPool, VerifyHandle
from rl_reason.verifiers.result import VerifyResult
from rl_reason.verifiers.sandbox import SandboxError, SandboxLimits, SandboxUnavailable

Verifier = Callable[[str, Mapping[str, Any]], VerifyResult]

_REGISTRY: dict[str, Verifier] = {
    "math": verify_math,
    "gsm8k": verify_gsm8k,
    "countdown": verify_countdown,
    "code": verify_code,
    "format": verify_format,
    "arithmetic": verify_arithmetic,
    "arithmetic_process": verify_arithmetic_process,
}


def get(name: str) -> Verifier:
    """The verifier registered as ``name``; ValueError listing the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown verifier {name!r}; valid names: {', '.join(names())}") from None


def names() -> list[str]:
    """Registered verifier names, sorted."""
    return sorted(_REGISTRY)


def register(name: str, verifier: Verifier) -> None:
    """Adds a verifier. Pool workers see it only if the module registering it is imported there:
    register at import time of a module listed in ``VerifierPool(..., imports=[...])``."""
    if name in _REGISTRY and _REGISTRY[name] is not verifier:
        raise ValueError(f"verifier {name!r} is already registered")
    _REGISTRY[name] = verifier


_WORKER_IMPORTS: list[str] = []


def add_worker_imports(modules) -> None:
    """Modules every `VerifierPool` created from now on has its workers import first (what
    `rl_reason.plugins.load` records, so that plugin verifiers reach the workers)."""
    for name in modules:
        if name not in _WORKER_IMPORTS:
            _WORKER_IMPORTS.append(name)


def worker_imports() -> tuple[str, ...]:
    return tuple(_WORKER_IMPORTS)


__all__ = [
    "add_worker_imports",
    "SandboxError",
    "SandboxLimits",
    "SandboxUnavailable",
    "Verifier",
    "VerifierError",
    "VerifierPool",
    "VerifyHandle",
    "VerifyResult",
    "get",
    "names",
    "register",
    "worker_imports",
]
