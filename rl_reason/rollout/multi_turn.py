"""Multi-turn rollouts: the policy writes a turn, the environment answers, decoding goes on.

A turn that calls the environment ends at its stop marker (one token, e.g. `</code>`); the
sample waits in its engine slot while the host asks its episode (rollout/envs/) for an
observation, whose tokens are then emitted into the same completion buffer, one a decode step,
each fed through the slot's KV cache like a drawn token: the context is never prefilled again
(engine.py, `turns=`). The trajectory is one completion of up to `max_new_tokens` tokens,
observations included; the loss mask is 0 on observation tokens, so the objective scores only
what the policy wrote, while every later token is scored given the whole context.

The verifier sees the trajectory's final turn (the text after its last observation), so a
tool's output can neither answer for the policy nor confuse the answer's extraction.

Faults never stop the run: a tool's timeout, crash, error or flood comes back as an
observation with its reason, and a trajectory that keeps calling is ended at the
environment's turn cap (reason "turn_limit"); the reasons are counted in `TurnRecord.stats`.

The static sampler's rows share one cache index, so they cannot wait one by one: a
multi-turn rollout always runs the engine, with a slot per sample when the run samples with
the static sampler (then nothing is refilled, as in the static layout).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from rl_reason.rollout import engine, sampling
from rl_reason.rollout.envs.base import Environment, Episode, Observation
from rl_reason.rollout.sampling import SampleOutput

# Why a trajectory ended, besides the environment's own reasons ("answered", "solved", ...).
STOPPED = "stopped"  # the policy ended its turn with a stop token
BUDGET = "budget"  # the token budget ran out (truncated)

_PLAIN, _ONE_SLOT_EACH = sampling.SamplingConfig(), engine.EngineConfig()
_WORKERS = 8  # episodes answered at once (each tool call waits on its sandbox process)


def stop_marker_id(tokenizer, marker: str) -> int:
    """The token id of an environment's stop marker, which must be one token of the
    vocabulary (decoding stops on a token, not on text)."""
    try:
        return int(tokenizer.piece_to_id(marker))
    except KeyError:
        raise ValueError(
            f"the environment's stop marker {marker!r} is not one token of the tokenizer "
            f"({tokenizer.source}): train the tokenizer with it among its user-defined "
            "symbols, or use an environment whose marker is a special token"
        ) from None


@dataclasses.dataclass
class TurnRecord:
    """The host side of one multi-turn call (`engine.TurnHost`), and what it leaves: per row
    the observation spans, the tool calls' reasons and why the trajectory ended.

    `examples` has one example per row (prompt-major, as the sampler's rows)."""

    env: Environment
    tokenizer: object
    examples: Sequence[dict]
    max_observation_tokens: int = 256

    def __post_init__(self) -> None:
        self.stop_ids = (stop_marker_id(self.tokenizer, self.env.stop_marker),)
        n = len(self.examples)
        self.episodes: dict[int, Episode] = {}
        self.turn_start = np.zeros(n, np.int64)  # where each row's current turn begins
        self.spans: list[list[tuple[int, int]]] = [[] for _ in range(n)]
        self.reasons: list[list[str]] = [[] for _ in range(n)]  # one per observation
        self.ended: dict[int, str] = {}  # rows the environment ended, with its reason

    def answer(self, rows, tokens, lengths) -> list[tuple[list[int], bool]]:
        turns = []
        for row, ids, n in zip(rows, tokens, lengths, strict=True):
            row = int(row)
            turns.append((row, self.tokenizer.decode(ids[self.turn_start[row] : int(n)]), int(n)))
        # The episodes are independent (a tool call is a sandboxed subprocess): ask them at
        # once, then record in row order, so the result is what asking one by one gives.
        live = [(row, turn) for row, turn, _ in turns if len(self.spans[row]) < self.env.max_turns]
        with concurrent.futures.ThreadPoolExecutor(max_workers=_WORKERS) as pool:
            observed = dict(zip([r for r, _ in live], pool.map(self._ask, live), strict=True))
        return [self._record(row, observed.get(row), n) for row, _, n in turns]

    def _ask(self, row_turn: tuple[int, str]) -> Observation:
        row, turn = row_turn
        return self.episode_of(row).respond(turn)

    def episode_of(self, row: int) -> Episode:
        episode = self.episodes.get(row)
        if episode is None:
            episode = self.episodes[row] = self.env.episode(self.examples[row])
        return episode

    def _record(self, row: int, obs: Observation | None, n: int) -> tuple[list[int], bool]:
        if obs is None:  # past the turn cap: not asked
            self.ended[row] = "turn_limit"
            return [], True
        if obs.done:
            self.ended[row] = obs.reason
            return [], True
        self.reasons[row].append(obs.reason)
        ids = self.tokenizer.encode(obs.text)[: self.max_observation_tokens]
        self.spans[row].append((n, n + len(ids)))
        self.turn_start[row] = n + len(ids)
        return ids, False

    # -- after the call ------------------------------------------------------------------------

    def observed(self, width: int) -> np.ndarray:
        """[rows, width] bool: the observation tokens (cut at the width)."""
        out = np.zeros((len(self.examples), width), bool)
        for row, spans in enumerate(self.spans):
            for a, b in spans:
                out[row, a : min(b, width)] = True
        return out

    def final_turns(self, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
        """Each row's text after its last observation: what the verifier checks."""
        return [
            self.tokenizer.decode(row[int(start) : int(n)])
            for row, start, n in zip(tokens, self.turn_start, lengths, strict=True)
        ]

    def end_reasons(self, truncated: np.ndarray) -> list[str]:
        return [
            self.ended.get(i, BUDGET if truncated[i] else STOPPED) for i in range(len(truncated))
        ]

    def stats(self, lengths: np.ndarray, truncated: np.ndarray) -> dict[str, float]:
        """Means over the call's trajectories: tool calls, the share that called at all,
        turns (model turns: calls + the final one), model and observation tokens; each
        tool-call reason as a share of the calls, each end reason as a share of the rows."""
        rows = len(self.examples)
        calls = np.asarray([len(s) for s in self.spans], np.float64)
        obs_tokens = np.asarray(
            [
                sum(min(b, int(n)) - a for a, b in s if a < n)
                for s, n in zip(self.spans, lengths, strict=True)
            ],
            np.float64,
        )
        out = {
            "tool_calls_mean": float(calls.mean()),
            "tool_call_frac": float(np.mean(calls > 0)),
            "turns_mean": float(calls.mean() + 1),
            "model_tokens_mean": float(np.mean(lengths - obs_tokens)),
            "observation_tokens_mean": float(obs_tokens.mean()),
        }
        every = [r for rs in self.reasons for r in rs]
        for reason, count in sorted(collections.Counter(every).items()):
            out[f"tool_{reason}_frac"] = count / max(len(every), 1)
        for reason, count in sorted(collections.Counter(self.end_reasons(truncated)).items()):
            out[f"ended_{reason}_frac"] = count / rows
        return out


def sample(
    model,
    prompts: Sequence[Sequence[int]],
    key: jax.Array,
    *,
    env: Environment,
    tokenizer,
    examples: Sequence[dict],
    group_size: int = 1,
    max_new_tokens: int,
    config: sampling.SamplingConfig = _PLAIN,
    engine_config: engine.EngineConfig = _ONE_SLOT_EACH,
    max_observation_tokens: int = 256,
    look_steps: int = 8,
    pad_id: int = 0,
    buffer_len: int | None = None,
    prompt_width: int | None = None,
    mesh=None,
    on_finished=None,
) -> tuple[engine.EngineOutput, TurnRecord]:
    """Multi-turn rollouts of `prompts` (one example per prompt, in `examples`): the engine's
    output, whose `.sample` carries the loss mask (0 on observation tokens), and the call's
    `TurnRecord`. The host answers waiting samples every `look_steps` decode steps, or sooner
    when none can go on. Other arguments as `engine.sample`."""
    if len(examples) != len(prompts):
        raise ValueError(f"{len(examples)} examples for {len(prompts)} prompts")
    per_row = [ex for ex in examples for _ in range(group_size)]
    record = TurnRecord(env, tokenizer, per_row, max_observation_tokens)
    out = engine.sample(
        model,
        prompts,
        key,
        group_size=group_size,
        max_new_tokens=max_new_tokens,
        config=config,
        engine=engine_config,
        pad_id=pad_id,
        buffer_len=buffer_len,
        prompt_width=prompt_width,
        mesh=mesh,
        on_finished=on_finished,
        stream_steps=look_steps,
        turns=record,
    )
    return out.replace(sample=with_loss_mask(out.sample, record)), record


def with_loss_mask(out: SampleOutput, record: TurnRecord) -> SampleOutput:
    """`out` with its loss mask: the completion mask without the observation tokens."""
    observed = record.observed(out.mask.shape[1])
    sharding = out.mask.sharding
    loss = jax.device_put(np.asarray(out.mask) & ~observed, sharding)
    return out.replace(loss_mask=loss)
