"""What one sampling round carries through a GRPO step, on the host and on the device."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from rl_reason.rollout import sampling
from rl_reason.verifiers import answer_extraction


@dataclasses.dataclass
class Rollout:
    """One sampling round on the host: P prompts x G samples, with rewards."""

    examples: list[dict]
    out: Any  # sampling.SampleOutput (device arrays)
    texts: list[str]
    rewards: np.ndarray  # [B]
    correct: np.ndarray  # [B] bool
    lengths: np.ndarray  # [B]
    truncated: np.ndarray  # [B]
    verify_seconds: float
    verify_wait_seconds: float


@dataclasses.dataclass
class InFlight:
    """A sampling round dispatched to the device and, once submitted, to the verifiers."""

    examples: list[dict]
    out: Any  # sampling.SampleOutput
    logprobs: tuple  # (ref, recomputed old): device arrays or None
    texts: list[str] | None = None
    lengths: np.ndarray | None = None
    truncated: np.ndarray | None = None
    handle: Any = None
    submitted_at: float = 0.0


def flight_arrays(out, ref, old) -> dict:
    """An in-flight round as a flat dict of arrays for the checkpoint (absent ones left out)."""
    arrays = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    arrays.update({k: v for k, v in (("ref", ref), ("old", old)) if v is not None})
    return arrays


def flight_from_arrays(arrays: Mapping[str, Any]) -> tuple:
    fields = {f.name for f in dataclasses.fields(sampling.SampleOutput)}
    out = sampling.SampleOutput(**{k: v for k, v in arrays.items() if k in fields})
    return out, arrays.get("ref"), arrays.get("old")


def vote_answer(text: str) -> str | None:
    """The answer maj@k votes on: the verifiers' anchored extraction, None unless unique."""
    answers = answer_extraction.final_answers(text).answers
    return answers[0] if len(answers) == 1 else None
