"""The one rollout record: a sampling round of P prompts x G samples, from the sampler to the
update.

`RolloutArrays` is its device part, a pytree the jitted functions take as it is: the prompts
(once per group), the completions, which tokens enter the loss, the sampler's and the policy's
log-probs, and the reference / recomputed old log-probs once the trainer has them. `Rollout`
is the host part around it: the examples, the decoded texts, the verifier's rewards and
correctness, which groups go into the update, and the verification timings. Dynamic sampling,
one-step-off-policy pipelining, multi-process gathering and checkpointing of a round in flight
all operate on this record; the batch is built from a list of them.

Row i of a round belongs to group (prompt) i // G.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import struct


@struct.dataclass
class RolloutArrays:
    """A round's device arrays: B = P * G rows, completion width N, prompt width Tp."""

    prompt_ids: jax.Array  # [P, Tp] int32, left-padded
    prompt_mask: jax.Array  # [P, Tp] bool
    tokens: jax.Array  # [B, N] int32, pad after the end of each completion
    mask: jax.Array  # [B, N] bool: completion tokens (the stop token included)
    # [B, N] bool: the tokens the objective scores. The policy's own tokens; tokens it did not
    # write (a tool's output in a multi-turn rollout) are 0.
    loss_mask: jax.Array
    sample_logprobs: jax.Array  # [B, N] float32: under the sampling distribution
    policy_logprobs: jax.Array  # [B, N] float32: under the plain policy, scored while sampling
    lengths: jax.Array  # [B] int32
    truncated: jax.Array  # [B] bool: budget reached without a stop token
    ref_logprobs: jax.Array | None = None  # [B, N] under the reference policy (KL term)
    old_logprobs: jax.Array | None = None  # [B, N] rescored by the trainer's forward pass

    @classmethod
    def from_sample(cls, out, *, ref_logprobs=None, old_logprobs=None) -> RolloutArrays:
        """The record of a sampler's output (`rollout.sampling.SampleOutput`); no copies."""
        fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        if fields.get("loss_mask") is None:
            fields["loss_mask"] = fields["mask"]
        return cls(**fields, ref_logprobs=ref_logprobs, old_logprobs=old_logprobs)

    @property
    def ratio_logprobs(self) -> jax.Array:
        """The old log-probs of the importance ratio: the trainer's rescoring if made, else the
        sampler's own."""
        return self.policy_logprobs if self.old_logprobs is None else self.old_logprobs

    def to_checkpoint(self) -> dict[str, jax.Array]:
        """A flat dict of the arrays (absent ones left out): a round in flight, checkpointed.
        A loss mask that is the completion mask itself (no tool tokens) is not stored twice."""
        items = ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        arrays = {name: x for name, x in items if x is not None}
        if self.loss_mask is self.mask:
            del arrays["loss_mask"]
        return arrays

    @classmethod
    def from_checkpoint(cls, arrays: Mapping[str, Any]) -> RolloutArrays:
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in arrays.items() if k in names}
        fields.setdefault("loss_mask", fields["mask"])
        return cls(**fields)


@dataclasses.dataclass
class Rollout:
    """A sampling round on the host, filled in as it goes: dispatched (arrays), sent to the
    verifiers (texts, pending), verified (rewards ... truncated), selected (for the update)."""

    examples: list[dict]  # this process's examples, one per group
    arrays: RolloutArrays
    group_size: int
    texts: list[str] | None = None  # this process's completions
    # [B] over every process's rows (the global batch), once verified.
    rewards: np.ndarray | None = None
    correct: np.ndarray | None = None
    lengths: np.ndarray | None = None
    truncated: np.ndarray | None = None
    # [P] groups that enter the update (dynamic sampling drops groups with equal rewards).
    selected: np.ndarray | None = None
    verify_seconds: float = 0.0  # from submission to the last reward
    verify_wait_seconds: float = 0.0  # of which the host waited for
    pending: Any = None  # the verifier pool's handle while the round is being verified
    submitted_at: float = 0.0
    # The continuous-batching engine's (slot steps, live slot steps) of this round, if it sampled.
    engine_counts: tuple[Any, Any] | None = None
    # Streamed to the verifiers by the engine: the share of samples submitted while others
    # were still decoding (None: verified after sampling).
    streamed_frac: float | None = None
    # Partial rollouts (rollout/partial.py): the share of samples with tokens drawn under an
    # older policy version, and how many versions behind the completion tokens are, on mean.
    partial_stats: dict[str, float] | None = None
    # Multi-turn rollouts (rollout/multi_turn.py): the host's record of the turns (observation
    # spans, tool-call reasons) and, once sent, its means over the round's trajectories.
    turns: Any = None
    turn_stats: dict[str, float] | None = None
    # Process supervision (loss.process_weight > 0): [B, N] each scored step's reward at its
    # last token and 1 there (rollout/step_rewards.py), over every process's rows.
    step_rewards: np.ndarray | None = None
    step_mask: np.ndarray | None = None

    @property
    def groups(self) -> int:
        return self.arrays.prompt_ids.shape[0]

    @property
    def group_index(self) -> np.ndarray:
        """[B] the group (prompt) of each row."""
        return np.repeat(np.arange(self.groups), self.group_size)

    @property
    def selected_rows(self) -> np.ndarray:
        """[B] bool: the rows of the selected groups."""
        selected = np.ones(self.groups, bool) if self.selected is None else self.selected
        return np.repeat(selected, self.group_size)

    def example_per_row(self, rows: int) -> list[dict]:
        """This process's example of each of its `rows` completions."""
        return [self.examples[i // self.group_size] for i in range(rows)]
