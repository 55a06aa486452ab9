"""Sampling rounds: prompts in, verified `Rollout` records out.

A round is dispatched (the sampler and, queued behind it, the reference / rescored log-probs:
JAX dispatch is asynchronous), sent to the verifier pool (decoding waits for the sampler), and
received (rewards gathered over processes). The three are separate calls so that the trainer
can overlap them: verification with the reference pass, or (one-step-off-policy) the next
round's sampling and verification with this step's update.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import numpy as np
from flax import nnx

from models.transformer import Transformer
from rl_reason.core.config import GRPOConfig, overlong_penalty
from rl_reason.core.record import Rollout, RolloutArrays
from rl_reason.infra import sharding
from rl_reason.rollout import engine, envs, multi_turn, partial, sampling, step_rewards
from rl_reason.rollout.sampling import SamplingConfig


class Task(Protocol):
    """What sampling needs from a task (see rl_reason/tasks/).

    A task may also set ``prompt_add_bos = False`` when its prompts carry their own start (a
    chat template writes the bos it wants, or none); prompts are encoded with bos otherwise.
    """

    verifier_name: str

    def prompt(self, example: dict) -> str: ...


def check_verifier(name: str) -> None:
    # The pool would only fail inside a worker, after a whole sampling round.
    from rl_reason import verifiers

    if name not in verifiers.names():
        raise ValueError(
            f"unknown verifier {name!r}; valid: {verifiers.names()} (register a new one "
            "with rl_reason.verifiers.register in a module the pool imports)"
        )


class Rounds:
    """Samples, decodes and verifies rounds of one run's shape (P prompts x G samples).

    `logprobs(params, prompt_ids, prompt_mask, tokens, mask)` scores completions for the
    reference and the rescored old log-probs (`core.update.StepFns.logprobs`); not needed when
    only evaluating. `rollout_stats(texts, examples)` -> dict of means over a round's
    completions, gathered over processes into `stats` (one dict per round since `stats` was
    last cleared).
    """

    def __init__(
        self,
        cfg: GRPOConfig,
        *,
        tokenizer,
        task: Task,
        pool,
        mesh,
        stop_token_ids: Sequence[int],
        logprobs: Callable | None = None,
        rollout_stats: Callable[[list[str], list[dict]], dict] | None = None,
    ):
        self.cfg, self.tokenizer, self.task, self.pool, self.mesh = cfg, tokenizer, task, pool, mesh
        self.logprobs, self.rollout_stats = logprobs, rollout_stats
        self.stats: list[dict[str, float]] = []
        # Embedding rows past the tokenizer's vocabulary (checkpoints pad them, e.g. Qwen2.5's
        # 151,936 rows for 151,665 tokens) are never sampled: no token decodes from them.
        s = cfg.sampling
        self.sampling = SamplingConfig(
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            stop_token_ids=tuple(stop_token_ids),
            vocab_size=tokenizer.vocab_size,
        )
        # The budget is fixed for the run, so its width needs no power-of-two bucket: every row of
        # the training batch is Tp + buffer_len wide, and spare width costs compute.
        self.buffer_len = -(-cfg.max_new_tokens // 8) * 8
        self.engine = (
            engine.EngineConfig(slots=s.engine_slots, min_slots=s.engine_min_slots)
            if s.engine == "continuous"
            else None
        )
        check_verifier(task.verifier_name)
        self._cast: tuple | None = None  # (policy graphdef, its compute_dtype twin)
        self.env = envs.make(cfg.multi_turn, tokenizer) if cfg.multi_turn.env else None
        if self.env is not None:
            if jax.process_count() > 1:
                raise ValueError("multi_turn.env runs in one process for now")
            multi_turn.stop_marker_id(tokenizer, self.env.stop_marker)  # fails early

    def training_policy(self, policy: tuple) -> tuple:
        """`policy` as the training rounds sample with it: the same weights computing in
        `sampling.compute_dtype` when one is set (evaluation keeps the policy's own dtype)."""
        dtype = self.cfg.sampling.compute_dtype
        if not dtype:
            return policy
        graphdef, *states = policy
        if self._cast is None or self._cast[0] is not graphdef:
            self._cast = (graphdef, with_compute_dtype(graphdef, states, dtype))
        return (self._cast[1], *states)

    # -- the parts every round is made of ------------------------------------------------------

    def encode_prompts(self, examples: Sequence[dict]) -> list[list[int]]:
        add_bos = getattr(self.task, "prompt_add_bos", True)
        texts = [self.task.prompt(ex) for ex in examples]
        ids = self.tokenizer.encode_batch(texts, add_bos=add_bos)
        too_long = [len(x) for x in ids if len(x) > self.cfg.max_prompt_len]
        if too_long:
            raise ValueError(
                f"a prompt has {max(too_long)} tokens > max_prompt_len "
                f"{self.cfg.max_prompt_len}: raise max_prompt_len"
            )
        return ids

    def generate(
        self,
        policy: tuple,
        examples,
        key,
        *,
        group_size: int,
        config: SamplingConfig,
        on_finished: Callable | None = None,
    ):
        """Sample with `policy` = (graphdef, params, *frozen): a `SampleOutput`, or with the
        continuous-batching engine an `EngineOutput` (its `.sample` is the same record;
        `on_finished` gets its finished samples as they finish, `engine.sample`)."""
        kw = dict(
            group_size=group_size,
            max_new_tokens=self.cfg.max_new_tokens,
            config=config,
            pad_id=self.tokenizer.pad_id,
            buffer_len=self.buffer_len,
            prompt_width=self.cfg.max_prompt_len,
            mesh=self.mesh,
        )
        prompts = self.encode_prompts(examples)
        if self.env is not None:
            return self._multi_turn(policy, prompts, examples, key, kw)
        if self.engine is None:
            return sampling.sample(policy, prompts, key, **kw)
        if on_finished is not None:
            kw.update(on_finished=on_finished, stream_steps=self.cfg.sampling.engine_stream_steps)
        return engine.sample(policy, prompts, key, engine=self.engine, **kw)

    def _multi_turn(self, policy, prompts, examples, key, kw) -> _TurnsOutput:
        """A multi-turn call: always the engine (a slot per sample unless the run sets
        slots), since rows must wait one by one."""
        mt = self.cfg.multi_turn
        out, record = multi_turn.sample(
            policy,
            prompts,
            key,
            env=self.env,
            tokenizer=self.tokenizer,
            examples=examples,
            engine_config=self.engine or engine.EngineConfig(),
            max_observation_tokens=mt.max_observation_tokens,
            look_steps=mt.look_steps,
            **kw,
        )
        return _TurnsOutput(out, record)

    def sample_texts(self, policy: tuple, examples, key, *, group_size: int, config):
        """The evaluator's call: this process's texts for the verifier (a multi-turn
        trajectory's final turn), their lengths and truncation flags, and (multi-turn) each
        row's tool calls, else None."""
        out = self.generate(policy, examples, key, group_size=group_size, config=config)
        if not isinstance(out, _TurnsOutput):
            out = out.sample if isinstance(out, engine.EngineOutput) else out
            return (*self.decode(out), None)
        s = out.engine.sample
        tokens, lengths = np.asarray(s.tokens), np.asarray(s.lengths)
        calls = np.asarray([len(spans) for spans in out.record.spans])
        texts = out.record.final_turns(tokens, lengths)
        return texts, lengths, np.asarray(s.truncated), calls

    def decode(self, out) -> tuple[list[str], np.ndarray, np.ndarray]:
        """This process's completions as text, with their lengths and truncation flags."""
        tokens, lengths = sharding.local_rows(out.tokens), sharding.local_rows(out.lengths)
        return self.texts(tokens, lengths), lengths, sharding.local_rows(out.truncated)

    def texts(self, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
        """Completions [n, width] (pad after each) as text, each cut at its length."""
        return self.tokenizer.decode_batch(
            [row[:n] for row, n in zip(tokens, lengths, strict=True)]
        )

    def submit(self, texts: list[str], examples_per_row: list[dict]):
        items = [
            (ex.get("verifier", self.task.verifier_name), text, ex)
            for text, ex in zip(texts, examples_per_row, strict=True)
        ]
        if self.cfg.reward.format_reward:
            items += [("format", t, ex) for t, ex in zip(texts, examples_per_row, strict=True)]
        return self.pool.submit(items)

    def outcomes(self, handle, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Rewards and correctness of the first `n` submitted items (waits for the pool)."""
        results = handle.result()
        rewards = np.asarray([r.reward for r in results[:n]], np.float32)
        correct = np.asarray([r.correct for r in results[:n]], bool)
        if self.cfg.reward.format_reward:
            rewards += self.cfg.reward.format_reward * np.asarray(
                [r.reward for r in results[n:]], np.float32
            )
        return rewards, correct

    # -- a training round: dispatch, send, receive --------------------------------------------

    def dispatch(self, policy: tuple, ref_params, examples: list[dict], key) -> Rollout:
        """Sample on the device and queue the reference / rescored old log-probs after it;
        returns at once (JAX dispatch is asynchronous), or, when the engine streams finished
        samples to the verifiers (sampling.engine_stream_steps; the config allows it only with
        the engine), once the sampling is done and every sample submitted."""
        cfg = self.cfg
        stream = cfg.sampling.engine_stream_steps > 0
        streamed = _Streamed(self, examples, cfg.group_size) if stream else None
        out = self.generate(
            self.training_policy(policy),
            examples,
            key,
            group_size=cfg.group_size,
            config=self.sampling,
            on_finished=streamed,
        )
        counts, turns = None, None
        if isinstance(out, _TurnsOutput):
            out, turns = out.engine, out.record
        if isinstance(out, engine.EngineOutput):
            out, counts = out.sample, (out.slot_steps, out.live_slot_steps)
        r = self._record(policy, ref_params, examples, out, counts)
        r.turns = turns
        if streamed is not None:  # already sent, sample by sample
            r.texts, r.lengths, r.truncated, r.pending = streamed.collected()
            r.submitted_at, r.streamed_frac = streamed.first_submitted, streamed.early_frac()
        return r

    def _record(self, policy: tuple, ref_params, examples, out, counts) -> Rollout:
        """The round of a sampler's output, with the reference / rescored old log-probs
        queued behind it."""
        args = (out.prompt_ids, out.prompt_mask, out.tokens, out.mask)
        ref = self.logprobs(ref_params, *args) if ref_params is not None else None
        rescore = self.cfg.loss.recompute_old_logprobs
        old = self.logprobs(policy[1], *args) if rescore else None
        arrays = RolloutArrays.from_sample(out, ref_logprobs=ref, old_logprobs=old)
        return Rollout(examples, arrays, self.cfg.group_size, engine_counts=counts)

    def partial_rollouts(self) -> partial.PartialRollouts:
        """The batches in flight of sampling.partial_rollout_steps, shaped as this run."""
        cfg = self.cfg
        return partial.PartialRollouts(
            steps_ahead=cfg.sampling.partial_rollout_steps,
            group_size=cfg.group_size,
            max_new_tokens=cfg.max_new_tokens,
            buffer_len=self.buffer_len,
            config=self.sampling,
            engine_config=self.engine,
            pad_id=self.tokenizer.pad_id,
            prompt_width=cfg.max_prompt_len,
            mesh=self.mesh,
            cache=cfg.sampling.partial_rollout_cache,
        )

    def run_partial(
        self, batches: partial.PartialRollouts, policy: tuple, ref_params, version: int
    ) -> Rollout:
        """The verified round of the oldest batch in flight, decoded to its end with
        `policy` (policy version `version`) while the later batches use the freed slots."""
        got = batches.step(self.training_policy(policy), version)
        # No slot steps: the batch had finished in earlier calls; this step decoded nothing and
        # has no occupancy to report.
        counts = (got.slot_steps, got.live_slot_steps) if got.slot_steps else None
        r = self._record(policy, ref_params, got.batch.examples, got.sample, counts)
        stale = got.batch.staleness(version)
        behind = stale[stale >= 0]
        r.partial_stats = {
            "partial_stale_sample_frac": float(np.mean(stale.max(axis=1) > 0)),
            "partial_staleness_mean": float(behind.mean()) if behind.size else 0.0,
        }
        self.send(r)
        return self.receive(r)

    def send(self, r: Rollout) -> None:
        """Decode this process's completions (waits for the sampler) and submit them; a round
        the engine streamed to the verifiers as it decoded was sent already."""
        if r.pending is not None:
            return
        r.texts, local_lengths, local_truncated = self.decode(r.arrays)
        r.lengths, r.truncated = local_lengths, local_truncated
        verify = r.texts
        if r.turns is not None:
            # The verifier checks the final turn: no observation can answer for the policy.
            verify = r.turns.final_turns(sharding.local_rows(r.arrays.tokens), local_lengths)
            r.turn_stats = r.turns.stats(local_lengths, local_truncated)
        r.submitted_at = time.perf_counter()
        r.pending = self.submit(verify, r.example_per_row(len(r.texts)))

    def receive(self, r: Rollout) -> Rollout:
        """Rewards of a sent round, gathered over processes (waits for the verifiers)."""
        t_wait = time.perf_counter()
        rewards, correct = self.outcomes(r.pending, len(r.texts))
        t1 = time.perf_counter()
        rewards += overlong_penalty(
            r.lengths,
            self.cfg.max_new_tokens,
            self.cfg.reward.overlong_buffer,
            self.cfg.reward.overlong_penalty,
        )
        if self.rollout_stats is not None:
            self.stats.append(self._gathered_stats(r))
        if self.cfg.loss.process_weight > 0:
            steps = [res.steps for res in r.pending.result()[: len(r.texts)]]
            tokens = sharding.local_rows(r.arrays.tokens)
            arrays = step_rewards.step_reward_arrays(self.tokenizer, tokens, r.lengths, steps)
            r.step_rewards, r.step_mask = (sharding.all_rows(x) for x in arrays)
        r.rewards, r.correct, r.lengths, r.truncated = (
            sharding.all_rows(x) for x in (rewards, correct, r.lengths, r.truncated)
        )
        r.pending = None
        r.verify_seconds, r.verify_wait_seconds = t1 - r.submitted_at, t1 - t_wait
        return r

    def _gathered_stats(self, r: Rollout) -> dict[str, float]:
        stats = self.rollout_stats(r.texts, r.example_per_row(len(r.texts)))
        names = sorted(stats)
        # Every process computes the same names on its own rows; the mean of equal-sized parts.
        values = sharding.all_rows(np.asarray([[stats[n] for n in names]], np.float64))
        return {n: float(values[:, i].mean()) for i, n in enumerate(names)}

    def run(self, policy: tuple, ref_params, examples: list[dict], key) -> Rollout:
        """Dispatch, send and receive one round: the device computes the reference (and
        rescored old) log-probs while the pool verifies."""
        r = self.dispatch(policy, ref_params, examples, key)
        self.send(r)
        return self.receive(r)

    def for_step(
        self, policy: tuple, ref_params, next_examples: Callable[[], list[dict]], key
    ) -> tuple[list[Rollout], int]:
        """A step's verified rounds and how many were sampled: one, or with dynamic sampling
        up to max_sampling_rounds, keeping only groups with reward variance where it can."""
        opts, verified, informative = self.cfg.sampling, [], 0
        while True:
            key, sub = jax.random.split(key)
            r = self.run(policy, ref_params, next_examples(), sub)
            if not opts.dynamic_sampling:
                return [r], 1
            verified.append(r)
            informative += int(informative_groups(r).sum())
            if informative >= self.cfg.prompts_per_step:
                break
            if len(verified) >= opts.max_sampling_rounds:
                break
        return select_informative(verified, self.cfg.prompts_per_step), len(verified)


@dataclasses.dataclass
class _TurnsOutput:
    """A multi-turn call's engine output and its host record."""

    engine: engine.EngineOutput
    record: multi_turn.TurnRecord


class _Streamed:
    """The engine's `on_finished`: decodes and submits each batch of finished samples as it
    comes, and gathers them back into this process's row order."""

    def __init__(self, rounds: Rounds, examples: list[dict], group_size: int):
        self.rounds, self.examples, self.group_size = rounds, examples, group_size
        self.parts: list[tuple[np.ndarray, engine.Finished, list[str], object]] = []
        self.first_submitted = 0.0

    def __call__(self, f: engine.Finished) -> None:
        texts = self.rounds.texts(f.tokens, f.lengths)
        if not self.parts:
            self.first_submitted = time.perf_counter()
        per_row = [self.examples[i // self.group_size] for i in f.rows]
        self.parts.append((f.rows, f, texts, self.rounds.submit(texts, per_row)))

    def collected(self):
        """(texts, lengths, truncated, handle) over this process's rows, in row order."""
        n = sum(len(rows) for rows, *_ in self.parts)
        texts: list[str] = [""] * n
        lengths, truncated = np.zeros(n, np.int32), np.zeros(n, bool)
        for rows, f, part_texts, _ in self.parts:
            for i, t in zip(rows, part_texts, strict=True):
                texts[i] = t
            lengths[rows], truncated[rows] = f.lengths, f.truncated
        with_format = bool(self.rounds.cfg.reward.format_reward)
        handles = [(rows, h) for rows, _, _, h in self.parts]
        return texts, lengths, truncated, _MergedHandle(handles, n, with_format)

    def early_frac(self) -> float:
        """The share of the samples handed over before the call's last look."""
        if not self.parts:
            return 0.0
        last = self.parts[-1][1].decode_steps
        early = sum(len(rows) for rows, f, *_ in self.parts if f.decode_steps < last)
        return early / sum(len(rows) for rows, *_ in self.parts)


class _MergedHandle:
    """The results of a round submitted in parts, as one submission of every row would give
    them: each row's verifier result in row order, then (with a format reward) each row's
    format result."""

    def __init__(self, parts: list, rows: int, with_format: bool):
        self.parts, self.rows, self.with_format = parts, rows, with_format

    def result(self, timeout: float | None = None) -> list:
        main: list = [None] * self.rows
        fmt: list = [None] * self.rows
        for rows, handle in self.parts:
            results = handle.result(timeout)
            for i, r in zip(rows, results[: len(rows)], strict=True):
                main[i] = r
            if self.with_format:
                for i, r in zip(rows, results[len(rows) :], strict=True):
                    fmt[i] = r
        return main + fmt if self.with_format else main


def with_compute_dtype(graphdef, states: Sequence, dtype: str):
    """The graphdef of `graphdef`'s Transformer with compute dtype `dtype`, for the same states.

    The compute dtype is static (part of the graph), so a twin graph is built from the model's
    config; the weights keep their dtype and are cast inside the matmuls as always.
    """
    model = nnx.merge(graphdef, *states)
    if type(model) is not Transformer or len(states) != 1:
        raise ValueError(
            "sampling.compute_dtype needs a plain Transformer policy (one state, no LoRA "
            f"adapters); got {type(model).__name__} with {len(states)} states: set "
            "sampling.compute_dtype='' or train without LoRA"
        )
    cfg = dataclasses.replace(model.cfg, dtype=dtype)
    twin, twin_state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    same = jax.tree.structure(twin_state) == jax.tree.structure(states[0])
    if not same:
        raise ValueError(f"the {dtype} twin of the policy has other parameters than the policy")
    return twin


def select_informative(rounds: list[Rollout], prompts: int) -> list[Rollout]:
    """DAPO's dynamic sampling: exactly `prompts` groups over the rounds, those with reward
    variance first, then (if the rounds ran out) the others, whose advantages are 0 anyway.

    Returns the records whose `selected` groups enter the update, in batch order: a round that
    gives both kinds appears twice (two records over the same arrays, each with its groups).
    """
    informative = [informative_groups(r) for r in rounds]
    need, chosen = prompts, []
    for wanted in (True, False):
        for r, mask in zip(rounds, informative, strict=True):
            take = np.flatnonzero(mask == wanted)[:need]
            if len(take):
                need -= len(take)
                pick = np.zeros(r.groups, bool)
                pick[take] = True
                chosen.append(dataclasses.replace(r, selected=pick))
    return chosen


def informative_groups(r: Rollout) -> np.ndarray:
    """[P] bool: the groups of a verified round whose rewards are not all equal."""
    groups = r.rewards.reshape(r.groups, r.group_size)
    return groups.max(axis=1) > groups.min(axis=1)
