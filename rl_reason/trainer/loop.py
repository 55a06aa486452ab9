"""The GRPO loop: sample on device, verify on host CPU, update on device.

One step, in the order it runs (`GRPOTrainer.step`):

  1. P examples -> prompts -> token ids (host).
  2. G samples per prompt in one jitted call (`rollout.sampling.sample`), prompt prefilled once.
  3. Completions -> text -> the verifier pool (host worker processes). While the pool works, the
     device computes the reference log-probs (with a KL term) and, if asked, rescored old
     log-probs; JAX dispatch is asynchronous, so the two overlap (`rollout.rounds`).
  4. Rewards (+ DAPO overlong penalty, + optional format reward) -> group advantages. With
     dynamic sampling, groups whose rewards are all equal are dropped and more prompts sampled.
  5. mu passes over the batch, each split into minibatches (one optimizer update each) and
     microbatches (exact gradient accumulation, `core.update.StepFns.update`).
  6. Metrics to console / JSONL / TensorBoard; periodic evaluation and checkpoints.

Each sampling round is one `core.record.Rollout` from the sampler to the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rl_reason import losses
from rl_reason.core import critic as critic_lib
from rl_reason.core import update
from rl_reason.core.config import GRPOConfig
from rl_reason.core.record import Rollout
from rl_reason.infra import sharding
from rl_reason.rollout.rounds import Rounds, Task
from rl_reason.trainer import state as state_lib
from rl_reason.trainer.evaluator import Evaluator
from rl_reason.trainer.health import Health, stop_diverged
from rl_reason.trainer.step_metrics import step_metrics


class GRPOTrainer:
    """Owns the policy state and runs GRPO steps. See the module docstring for the data flow.

    Args:
      cfg: the loop's options.
      graphdef, params: the policy (`nnx.split` of a Transformer, params possibly sharded).
      tokenizer: encodes prompts, decodes completions.
      task: gives the prompt text and the verifier name of each example.
      train_batches: an endless iterator of lists of P example dicts.
      eval_examples: held-out examples for `evaluate`.
      pool: a `rl_reason.verifiers.VerifierPool` (or anything with `submit(items)` returning a
        handle with `result()`).
      metrics: a `rl_reason.infra.metrics.MetricsWriter` (optional).
      stop_token_ids: end-of-completion tokens (default: the tokenizer's eos).
      response_stats: optional fn(texts, examples) -> dict of extra eval metrics (means).
      rollout_stats: optional fn(texts, examples) -> dict of means over a sampling round's
        completions (examples repeated per row); logged each step as ``rollout_<name>``,
        averaged over the step's sampling rounds and over processes (each its own rows).
      mesh: the device mesh (default: the one the params live on). With several JAX processes
        `train_batches` yields this process's P / process_count examples per step (its slice of
        the global batch, in process order), each process verifies only its own completions, and
        rewards and metrics are gathered so that every process takes the same decisions.
      frozen: weights that complete the policy but are not trained: with LoRA, `params` are
        the adapters and `frozen` the base weights (`nnx.split(model, nnx.LoRAParam,
        nnx.Param)`). The reference policy is then the base itself (adapters zeroed, no copy),
        and checkpoints hold the adapters only.
    """

    def __init__(
        self,
        cfg: GRPOConfig,
        *,
        graphdef,
        params,
        tokenizer,
        task: Task,
        train_batches: Iterator[list[dict]],
        eval_examples: Sequence[dict] = (),
        pool,
        metrics=None,
        checkpointer=None,
        stop_token_ids: Sequence[int] | None = None,
        response_stats: Callable[[list[str], list[dict]], dict] | None = None,
        mesh: Mesh | None = None,
        frozen=None,
        rollout_stats: Callable[[list[str], list[dict]], dict] | None = None,
    ):
        self.cfg, self.graphdef, self.task = cfg, graphdef, task
        self.train_batches, self.eval_examples = train_batches, list(eval_examples)
        self.metrics, self.checkpointer = metrics, checkpointer
        self.frozen = () if frozen is None else (frozen,)
        tokenizer.assert_fits(nnx.merge(graphdef, params, *self.frozen).cfg.vocab_size)
        self.mesh = sharding.mesh_of(params) if mesh is None else mesh
        self.frozen = tuple(
            jax.device_put(f, sharding.state_shardings(f, self.mesh)) for f in self.frozen
        )
        self.processes = jax.process_count()
        sharding.check_batch_split(
            cfg.prompts_per_step, cfg.rows // cfg.optim.minibatches, self.mesh, self.processes
        )
        state_lib.init(self, params)  # optimizer, jitted step, params, reference, critic, key
        if self.critic is not None:
            tokenizer.assert_fits(
                nnx.merge(self.critic.graphdef, self.critic_params["trunk"]).cfg.vocab_size
            )
        stops = (tokenizer.eos_id,) if stop_token_ids is None else tuple(stop_token_ids)
        self.rounds = Rounds(
            cfg,
            tokenizer=tokenizer,
            task=task,
            pool=pool,
            mesh=self.mesh,
            stop_token_ids=stops,
            logprobs=self.fns.logprobs,
            rollout_stats=rollout_stats,
        )
        self.rounds.training_policy(self.policy)  # a bad sampling.compute_dtype fails here
        self.evaluator = Evaluator(self.rounds, response_stats=response_stats)
        self.step_count = self.updates = 0
        self.in_flight: Rollout | None = None  # off_policy_steps=1: next step's round
        # sampling.partial_rollout_steps: the later steps' batches decoding beside this one's
        self.partial = None
        if cfg.sampling.partial_rollout_steps:
            self.partial = self.rounds.partial_rollouts()
        self.data_before_in_flight: dict | None = None
        self.health = Health(cfg.max_nonfinite_steps, cfg.max_entropy_change)

    @property
    def policy(self) -> tuple:
        """(graphdef, params, *frozen): what the sampler and the evaluator take."""
        return (self.graphdef, self.params, *self.frozen)

    @property
    def local_prompts(self) -> int:
        """Examples this process contributes to each step's batch."""
        return self.cfg.prompts_per_step // self.processes

    # -- one step ---------------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One GRPO step; returns its metrics."""
        t0 = time.perf_counter()
        self.rounds.stats = []
        if self.partial is not None:
            parts, rounds = [self._partial_rollout()], 1
        elif self.cfg.off_policy_steps:
            parts, rounds = self._pipelined_rollout(), 1
        else:
            self.key, key = jax.random.split(self.key)
            parts, rounds = self.rounds.for_step(
                self.policy, self.ref_params, self.next_examples, key
            )
        t_sampled = time.perf_counter()
        batch, host = self._assemble(parts)
        train_metrics = self._train_on(batch)
        t_trained = time.perf_counter()
        self.step_count += 1
        counters = {
            "learning_rate": float(self.lr_fn(max(self.updates - 1, 0))),
            "nonfinite_updates": float(self.health.nonfinite_total),
            "sampling_rounds": float(rounds),
        }
        replaced = getattr(self.rounds.pool, "replaced", None)  # any pool with submit() works
        if replaced is not None:
            counters["verifier_workers_replaced"] = float(replaced)
        times = {"t0": t0, "sampled": t_sampled, "trained": t_trained}
        return step_metrics(
            self.cfg, parts, host, train_metrics, counters, times, self.rounds.stats
        )

    def _pipelined_rollout(self) -> list[Rollout]:
        """One-step-off-policy: this step trains on the round sampled during the previous step
        (with the weights before its update) and dispatches the next round now, before this
        step's update, so that its sampling and verification overlap the update."""
        if self.in_flight is None:  # first step, or resumed without a round in flight
            self.in_flight = self._dispatch_next()
            self.rounds.send(self.in_flight)
        current, self.data_before_in_flight = self.in_flight, self.data_state()
        nxt = self._dispatch_next()
        self.rounds.receive(current)
        self.rounds.send(nxt)  # waits for nxt's sampling, queued before the update
        self.in_flight = nxt
        return [current]

    def _partial_rollout(self) -> Rollout:
        """Partial rollouts: this step's batch (drawn partial_rollout_steps steps ago, or at
        the first step) decoded to its end, the batches drawn after it keeping their progress."""
        while self.partial.wanted:
            prompts, key, fields = self._next_batch()
            self.partial.add(prompts, key, **fields)
        return self.rounds.run_partial(
            self.partial, self.policy, self.ref_params, version=self.step_count
        )

    def _next_batch(self) -> tuple[list[list[int]], jax.Array, dict]:
        """The next examples' prompts, key (a step's first round key, as on-policy) and the
        fields `PartialRollouts.add` keeps with them."""
        before = self.data_state()
        examples = self.next_examples()
        key = self._first_round_key()
        prompts = self.rounds.encode_prompts(examples)
        return prompts, key, {"examples": examples, "data_before": before}

    def _first_round_key(self) -> jax.Array:
        """The key of a step's first sampling round, as `step` derives it on-policy."""
        self.key, key = jax.random.split(self.key)
        return jax.random.split(key)[1]

    def _dispatch_next(self) -> Rollout:
        key = self._first_round_key()
        return self.rounds.dispatch(self.policy, self.ref_params, self.next_examples(), key)

    def _assemble(self, parts: list[Rollout]) -> tuple[update.Batch, dict[str, Any]]:
        """The selected groups of each round as one [B] training batch (and host arrays [B])."""
        cfg = self.cfg
        picked = [r.selected_rows for r in parts]
        host = {
            k: np.concatenate([getattr(r, k)[m] for r, m in zip(parts, picked, strict=True)])
            for k in ("rewards", "correct", "lengths", "truncated")
        }
        rows = [i * cfg.rows + np.flatnonzero(m) for i, m in enumerate(picked)]
        rows_B = np.concatenate(rows).astype(np.int32)
        identity = len(parts) == 1 and np.array_equal(rows_B, np.arange(cfg.rows))
        advantages = losses.compute_advantages(
            jnp.asarray(host["rewards"]), cfg.group_size, estimator=cfg.loss.advantage_estimator
        )
        if cfg.loss.process_weight > 0:
            advantages = self._with_process(parts, picked, advantages)
        values = None
        if self.critic is not None:
            values = [
                self.critic.values(
                    self.critic_params, a.prompt_ids, a.prompt_mask, a.tokens, a.mask
                )
                for a in (r.arrays for r in parts)
            ]
        batch = self.fns.make_batch(
            [r.arrays for r in parts],
            None if identity else rows_B,
            np.asarray(advantages, np.float32),
            values,
        )
        if cfg.loss.recompute_old_logprobs:
            # The same tokens under the same weights, scored by the sampler (decode with a KV
            # cache) and by the trainer (full forward): their gap is numerical, and grows in bf16.
            host["logprob_gap"] = [  # device scalars, read after the update
                update.logprob_gap(a.policy_logprobs, a.old_logprobs, a.mask)
                for a in (r.arrays for r in parts)
            ]
        return batch, host

    def _with_process(self, parts: list[Rollout], picked: list, outcome_B) -> jax.Array:
        """(1 - w) * outcome advantages + w * the step rewards' per-token advantages [B, N]."""
        steps = [
            np.concatenate([getattr(r, k)[m] for r, m in zip(parts, picked, strict=True)])
            for k in ("step_rewards", "step_mask")
        ]
        process = losses.process_advantages(*steps, self.cfg.group_size)
        w = self.cfg.loss.process_weight
        return (1 - w) * outcome_B[:, None] + w * process

    def _train_on(self, batch: update.Batch) -> dict[str, float]:
        cfg, o = self.cfg, self.cfg.optim
        rows_per_mb = cfg.rows // o.minibatches
        # PPO's critic may train alone for the first steps; the policy's update then only
        # reports its metrics.
        apply = self.critic is None or self.step_count >= cfg.critic.policy_delay_steps
        collected = []
        for epoch in range(o.inner_iterations):
            # One minibatch is the whole batch: its gradient does not depend on row order, so
            # only several minibatches need (re)shuffled rows.
            perm = None
            if o.minibatches > 1:
                rng = np.random.default_rng([cfg.seed, self.step_count, epoch])
                perm = np.arange(cfg.rows) if epoch == 0 else rng.permutation(cfg.rows)
            for m in range(o.minibatches):
                mb = batch
                if perm is not None:
                    idx = perm[m * rows_per_mb : (m + 1) * rows_per_mb].astype(np.int32)
                    mb = self.fns.take_rows(batch, idx)
                self.params, self.opt_state, metrics = self.fns.update(
                    self.params, self.opt_state, mb, apply=apply
                )
                if self.critic is not None:
                    self.critic_params, self.critic_opt_state, value_metrics = self.critic.update(
                        self.critic_params, self.critic_opt_state, mb
                    )
                    metrics = {**metrics, **value_metrics}
                # Fetching the metrics blocks on each update: it keeps the host honest about step
                # time and avoids the CPU collective stalls seen with unblocked sharded loops.
                collected.append(jax.device_get(metrics))
                self.updates += int(apply)
        means = {k: float(np.mean([m[k] for m in collected])) for k in collected[-1]}
        if self.critic is not None:
            means["value_explained_variance"] = float(
                critic_lib.batch_explained_variance(batch.returns, batch.old_values, batch.mask)
            )
        finite = [m["finite"] * m.get("value_finite", 1.0) for m in collected]
        why = self.health.observe(self.step_count + 1, finite, means["entropy"])
        if self.health.should_stop:
            stop_diverged(self.health, why, self.checkpointer)
        return means

    # -- the loop -------------------------------------------------------------------------------

    def evaluate(self, examples: Sequence[dict] | None = None, **kwargs) -> dict[str, float]:
        """`Evaluator.evaluate` of the current policy (default: the held-out examples)."""
        examples = self.eval_examples if examples is None else examples
        return self.evaluator.evaluate(self.policy, examples, **kwargs)

    def train(
        self,
        on_step: Callable[[int, dict], None] | None = None,
        *,
        preemption=None,
        extra_meta: Mapping[str, Any] | None = None,
    ) -> list[dict]:
        """Run steps `step_count + 1 .. cfg.steps` with metrics, evaluation and checkpoints.

        `preemption` (a `rl_reason.infra.preemption.PreemptionGuard`, entered) is asked after
        every step; when it says stop, the step just finished is checkpointed and the loop
        returns early (`self.preempted` is then True). `extra_meta` goes into every checkpoint's
        meta.
        """
        history = []
        self.preempted = False
        for step in range(self.step_count, self.cfg.steps):
            metrics = self.step()
            eval_metrics = None
            if self.cfg.eval_every and (step + 1) % self.cfg.eval_every == 0:
                eval_metrics = {f"eval_{k}": v for k, v in self.evaluate().items()}
                metrics.update(eval_metrics)
            if self.metrics is not None:
                self.metrics.write(step + 1, metrics)
                self.metrics.log_progress(step + 1, metrics)
            stop = preemption is not None and preemption.should_stop(step + 1)
            if self.checkpointer is not None:
                self.checkpointer.save(
                    step + 1,
                    self.state(),
                    meta=self.meta(extra_meta),
                    metrics=eval_metrics,
                    force=stop or step + 1 == self.cfg.steps,
                )
            history.append(metrics)
            if on_step is not None:
                on_step(step + 1, metrics)
            if stop:
                self.preempted = True
                break
        if self.checkpointer is not None:
            self.checkpointer.wait()
        return history

    # -- resumable state and data position (trainer/state.py) ----------------------------------

    state, abstract_state = state_lib.state, state_lib.abstract_state
    meta, resume = state_lib.meta, state_lib.resume
    next_examples, data_state = state_lib.next_examples, state_lib.data_state
