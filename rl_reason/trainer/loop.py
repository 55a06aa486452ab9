"""The GRPO loop: sample on device, verify on host CPU, update on device.

One step, in the order it runs:

  1. P examples -> prompts -> token ids (host).
  2. G samples per prompt in one jitted call (`sampling.sample`), prompt prefilled once.
  3. Completions -> text -> the verifier pool (host worker processes). While the pool works, the
     device computes the reference log-probs (when kl_coef > 0) and, if asked, recomputed old
     log-probs; JAX dispatch is asynchronous, so the two overlap.
  4. Rewards (+ DAPO overlong penalty, + optional format reward) -> group advantages. With
     dynamic sampling, groups whose rewards are all equal are dropped and more prompts sampled.
  5. mu passes over the batch, each split into minibatches (one optimizer update each) and
     microbatches (exact gradient accumulation, `train_step.StepFns.update`).
  6. Metrics to console / JSONL / TensorBoard; periodic evaluation and checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from models import lora
from rl_reason import losses
from rl_reason.core import update as train_step
from rl_reason.core.config import GRPOConfig, overlong_penalty  # noqa: F401  (re-exported)
from rl_reason.core.record import InFlight, Rollout, flight_arrays, flight_from_arrays, vote_answer
from rl_reason.infra import sharding
from rl_reason.infra.progress import Progress
from rl_reason.infra.tokenizer import Tokenizer
from rl_reason.rollout import sampling
from rl_reason.rollout.sampling import SamplingConfig
from rl_reason.trainer import eval_metrics as evaluation

log = logging.getLogger(__name__)


class Task(Protocol):
    """What the trainer needs from a task (see rl_reason/tasks/).

    A task may also set ``prompt_add_bos = False`` when its prompts carry their own start (a
    chat template writes the bos it wants, or none); prompts are encoded with bos otherwise.
    """

    verifier_name: str

    def prompt(self, example: Mapping[str, Any]) -> str: ...


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
        tokenizer: Tokenizer,
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
        self.cfg = cfg
        self.graphdef = graphdef
        self.params = params
        self.tokenizer = tokenizer
        self.task = task
        self.train_batches = train_batches
        self.eval_examples = list(eval_examples)
        self.pool = pool
        self.metrics = metrics
        self.checkpointer = checkpointer
        self.response_stats = response_stats
        self.rollout_stats = rollout_stats
        self._round_stats: list[dict[str, float]] = []
        stops = (tokenizer.eos_id,) if stop_token_ids is None else tuple(stop_token_ids)
        # Embedding rows past the tokenizer's vocabulary (checkpoints pad them, e.g. Qwen2.5's
        # 151,936 rows for 151,665 tokens) are never sampled: no token decodes from them.
        self.sampling = SamplingConfig(
            temperature=cfg.sampling.temperature,
            top_k=cfg.sampling.top_k,
            top_p=cfg.sampling.top_p,
            stop_token_ids=stops,
            vocab_size=tokenizer.vocab_size,
        )
        # The budget is fixed for the run, so its width needs no power-of-two bucket: every row of
        # the training batch is Tp + buffer_len wide, and spare width costs compute.
        self.buffer_len = -(-cfg.max_new_tokens // 8) * 8
        self._check_verifier(task.verifier_name)
        self.frozen = () if frozen is None else (frozen,)
        model_vocab = nnx.merge(graphdef, params, *self.frozen).cfg.vocab_size
        tokenizer.assert_fits(model_vocab)
        self.mesh = sharding.mesh_of(params) if mesh is None else mesh
        self.frozen = tuple(
            jax.device_put(f, sharding.state_shardings(f, self.mesh)) for f in self.frozen
        )
        self.processes = jax.process_count()
        self._check_batch_split()
        self.optimizer = train_step.make_optimizer(cfg.optim, cfg.total_updates)
        self.lr_fn = train_step.learning_rate_fn(cfg.optim, cfg.total_updates)
        self.fns = train_step.StepFns(
            graphdef,
            params,
            self.optimizer,
            cfg.loss,
            self.mesh,
            max_len=cfg.max_new_tokens,
            microbatches=cfg.optim.microbatches,
            frozen=self.frozen,
        )
        # The trainer owns (and donates) these arrays from here on.
        self.params = jax.device_put(params, self.fns.param_shardings)
        self.opt_state = self.fns.init_opt_state(self.params)
        # The frozen reference policy: a copy of the initial weights (only with a KL term).
        self.ref_params = None
        if cfg.loss.kl_coef > 0:
            # LoRA: the base model is the reference (zero adapters over the same frozen arrays);
            # otherwise a copy of the initial weights.
            copy = lora.lora_off if self.frozen else lambda p: jax.tree.map(jnp.copy, p)
            self.ref_params = copy(self.params)
        # Replicated over the mesh: a global array every process holds alike (and checkpoints).
        self._replicated = sharding.replicated(self.mesh)
        self.key = jax.jit(lambda: jax.random.key(cfg.seed), out_shardings=self._replicated)()
        self.step_count = 0
        self.updates = 0
        self._in_flight: InFlight | None = None  # off_policy_steps=1: next step's round
        self._data_before_in_flight: dict | None = None
        self._nonfinite_in_a_row = 0
        self._nonfinite_total = 0

    @staticmethod
    def _check_verifier(name: str) -> None:
        # The pool would only fail inside a worker, after a whole sampling round.
        from rl_reason import verifiers

        if name not in verifiers.names():
            raise ValueError(
                f"unknown verifier {name!r}; valid: {verifiers.names()} (register a new one "
                "with rl_reason.verifiers.register in a module the pool imports)"
            )

    def _check_batch_split(self) -> None:
        cfg, shards = self.cfg, sharding.batch_shards(self.mesh)
        problems = []
        if cfg.prompts_per_step % shards:
            problems.append(f"prompts_per_step ({cfg.prompts_per_step})")
        if (cfg.rows // cfg.optim.minibatches) % shards:
            problems.append(f"rows per minibatch ({cfg.rows // cfg.optim.minibatches})")
        if cfg.prompts_per_step % self.processes:
            problems.append(f"prompts_per_step over {self.processes} processes")
        if problems:
            raise ValueError(
                f"{' and '.join(problems)} must split evenly over the {shards} batch shards "
                f"(data x fsdp) of mesh {dict(self.mesh.shape)}: change prompts_per_step, "
                "group_size or minibatches, or the mesh"
            )

    @property
    def local_prompts(self) -> int:
        """Examples this process contributes to each step's batch."""
        return self.cfg.prompts_per_step // self.processes

    # -- sampling and verification --------------------------------------------------------------

    def _encode_prompts(self, examples: Sequence[dict]) -> list[list[int]]:
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

    def _generate(self, examples: Sequence[dict], key, *, group_size: int, config: SamplingConfig):
        return sampling.sample(
            (self.graphdef, self.params, *self.frozen),
            self._encode_prompts(examples),
            key,
            group_size=group_size,
            max_new_tokens=self.cfg.max_new_tokens,
            config=config,
            pad_id=self.tokenizer.pad_id,
            buffer_len=self.buffer_len,
            prompt_width=self.cfg.max_prompt_len,
            mesh=self.mesh,
        )

    def _texts(self, out) -> tuple[list[str], np.ndarray, np.ndarray]:
        """This process's completions as text, with their lengths and truncation flags."""
        tokens, lengths = sharding.local_rows(out.tokens), sharding.local_rows(out.lengths)
        texts = self.tokenizer.decode_batch(
            [row[:n] for row, n in zip(tokens, lengths, strict=True)]
        )
        return texts, lengths, sharding.local_rows(out.truncated)

    def _submit(self, texts: list[str], examples: list[dict], group_size: int):
        per_row = [examples[i // group_size] for i in range(len(texts))]
        items = [
            (ex.get("verifier", self.task.verifier_name), text, ex)
            for text, ex in zip(texts, per_row, strict=True)
        ]
        if self.cfg.reward.format_reward:
            items += [("format", text, ex) for text, ex in zip(texts, per_row, strict=True)]
        return self.pool.submit(items)

    def _collect(self, handle, n: int) -> tuple[np.ndarray, np.ndarray]:
        results = handle.result()
        rewards = np.asarray([r.reward for r in results[:n]], np.float32)
        correct = np.asarray([r.correct for r in results[:n]], bool)
        if self.cfg.reward.format_reward:
            rewards += self.cfg.reward.format_reward * np.asarray(
                [r.reward for r in results[n:]], np.float32
            )
        return rewards, correct

    def _dispatch(self, examples: list[dict], key) -> InFlight:
        """Sample on the device and queue the reference / recomputed old log-probs after it;
        returns at once (JAX dispatch is asynchronous)."""
        out = self._generate(examples, key, group_size=self.cfg.group_size, config=self.sampling)
        return InFlight(examples, out, self._device_logprobs(out))

    def _send_to_verifiers(self, f: InFlight) -> None:
        """Decode this process's completions (waits for the sampler) and submit them."""
        f.texts, f.lengths, f.truncated = self._texts(f.out)
        f.submitted_at = time.perf_counter()
        f.handle = self._submit(f.texts, f.examples, self.cfg.group_size)

    def _receive(self, f: InFlight) -> Rollout:
        """Rewards of a submitted round, gathered over processes (waits for the verifiers)."""
        t_wait = time.perf_counter()
        rewards, correct = self._collect(f.handle, len(f.texts))
        t1 = time.perf_counter()
        rewards += overlong_penalty(
            f.lengths,
            self.cfg.max_new_tokens,
            self.cfg.reward.overlong_buffer,
            self.cfg.reward.overlong_penalty,
        )
        if self.rollout_stats is not None:
            self._round_stats.append(self._gathered_stats(f.texts, f.examples))
        return Rollout(
            f.examples,
            f.out,
            f.texts,
            *(sharding.all_rows(x) for x in (rewards, correct, f.lengths, f.truncated)),
            verify_seconds=t1 - f.submitted_at,
            verify_wait_seconds=t1 - t_wait,
        )

    def _gathered_stats(self, texts: list[str], examples: list[dict]) -> dict[str, float]:
        g = self.cfg.group_size
        stats = self.rollout_stats(texts, [examples[i // g] for i in range(len(texts))])
        names = sorted(stats)
        # Every process computes the same names on its own rows; the mean of equal-sized parts.
        values = sharding.all_rows(np.asarray([[stats[n] for n in names]], np.float64))
        return {n: float(values[:, i].mean()) for i, n in enumerate(names)}

    def rollout(self, examples: list[dict], key) -> tuple[Rollout, tuple]:
        """Sample, decode, verify; the device computes the reference (and recomputed old)
        log-probs while the pool verifies. Returns the Rollout and those (ref, old) arrays.

        `examples` are this process's; the returned rewards, correctness, lengths and truncation
        flags are every process's (the global batch), `texts` this process's.
        """
        f = self._dispatch(examples, key)
        self._send_to_verifiers(f)
        return self._receive(f), f.logprobs

    # -- one step ---------------------------------------------------------------------------------

    def _device_logprobs(self, out):
        """Reference (and recomputed old) log-probs, dispatched asynchronously."""
        args = (out.prompt_ids, out.prompt_mask, out.tokens, out.mask)
        ref = self.fns.logprobs(self.ref_params, *args) if self.ref_params else None
        old = (
            self.fns.logprobs(self.params, *args) if self.cfg.loss.recompute_old_logprobs else None
        )
        return ref, old

    def _next_examples(self) -> list[dict]:
        examples = list(next(self.train_batches))
        for name in {ex["verifier"] for ex in examples if "verifier" in ex}:
            self._check_verifier(name)
        if len(examples) != self.local_prompts:
            raise ValueError(
                f"train_batches gave {len(examples)} examples; each step needs "
                f"{self.local_prompts} from this process (prompts_per_step "
                f"{self.cfg.prompts_per_step} / {self.processes} processes)"
            )
        return examples

    def _data_state(self) -> dict | None:
        return self.train_batches.get_state() if hasattr(self.train_batches, "get_state") else None

    def _round_key(self):
        """The key of a step's first sampling round (as `step` derives it on-policy)."""
        self.key, key = jax.random.split(self.key)
        return jax.random.split(key)[1]

    def _pipelined_rollout(self) -> tuple[list, float, float]:
        """One-step-off-policy: this step trains on the round sampled during the previous step
        (with the weights before its update) and dispatches the next round now, before this
        step's update, so that its sampling and verification overlap the update.

        Returns (parts, seconds until the batch's rewards were in, seconds to hand the next
        round to the verifiers)."""
        t0 = time.perf_counter()
        if self._in_flight is None:  # first step, or resumed without a round in flight
            self._in_flight = self._dispatch(self._next_examples(), self._round_key())
            self._send_to_verifiers(self._in_flight)
        current = self._in_flight
        self._data_before_in_flight = self._data_state()
        nxt = self._dispatch(self._next_examples(), self._round_key())
        ro = self._receive(current)
        t_received = time.perf_counter()
        self._send_to_verifiers(nxt)  # waits for nxt's sampling, queued before the update
        self._in_flight = nxt
        return (
            [(ro, current.logprobs, np.ones(self.cfg.prompts_per_step, bool))],
            t_received - t0,
            (time.perf_counter() - t_received),
        )

    def _gather_rollouts(self, key) -> tuple[list[tuple[Rollout, Any]], int]:
        """Rollouts for this step; with dynamic sampling, only groups with reward variance."""
        cfg = self.cfg
        kept: list[tuple[Rollout, Any, np.ndarray]] = []
        dropped: list[tuple[Rollout, Any, np.ndarray]] = []
        n_kept, rounds = 0, 0
        while True:
            key, sub = jax.random.split(key)
            ro, dev = self.rollout(self._next_examples(), sub)
            rounds += 1
            groups = ro.rewards.reshape(cfg.prompts_per_step, cfg.group_size)
            informative = groups.max(axis=1) > groups.min(axis=1)
            if not cfg.sampling.dynamic_sampling:
                return [(ro, dev, np.ones(cfg.prompts_per_step, bool))], rounds
            kept.append((ro, dev, informative))
            dropped.append((ro, dev, ~informative))
            n_kept += int(informative.sum())
            if n_kept >= cfg.prompts_per_step or rounds >= cfg.sampling.max_sampling_rounds:
                break
        # Fill to exactly P groups: informative first, then (if rounds ran out) the others,
        # whose advantages are 0 anyway.
        chosen, need = [], cfg.prompts_per_step
        for ro, dev, sel in kept + dropped:
            take = np.flatnonzero(sel)[:need]
            sel = np.zeros_like(sel)
            sel[take] = True
            need -= len(take)
            chosen.append((ro, dev, sel))
        return [c for c in chosen if c[2].any()], rounds

    def _assemble(self, parts) -> tuple[train_step.Batch, dict[str, np.ndarray]]:
        """The chosen groups of each rollout as one [B] training batch (and host arrays [B])."""
        cfg, g = self.cfg, self.cfg.group_size
        host: dict[str, list] = {k: [] for k in ("rewards", "correct", "lengths", "truncated")}
        rollouts, rows = [], []
        for i, (ro, (ref, old), sel) in enumerate(parts):
            out = ro.out
            old = out.policy_logprobs if old is None else old
            rollouts.append(
                (out.prompt_ids, out.prompt_mask, out.tokens, out.mask, out.truncated, old, ref)
            )
            picked = np.repeat(sel, g)
            rows.append(i * cfg.rows + np.flatnonzero(picked))
            for k in host:
                host[k].append(getattr(ro, k)[picked])
        hosts = {k: np.concatenate(v) for k, v in host.items()}
        rows_B = np.concatenate(rows).astype(np.int32)
        identity = len(parts) == 1 and np.array_equal(rows_B, np.arange(cfg.rows))
        advantages = losses.compute_advantages(
            jnp.asarray(hosts["rewards"]), g, estimator=cfg.loss.advantage_estimator
        )
        batch = self.fns.make_batch(
            rollouts, None if identity else rows_B, np.asarray(advantages, np.float32)
        )
        if cfg.loss.recompute_old_logprobs:
            # The same tokens under the same weights, scored by the sampler (decode with a KV
            # cache) and by the trainer (full forward): their gap is numerical, and grows in bf16.
            gaps = [
                train_step.logprob_gap(p[0].out.policy_logprobs, p[1][1], p[0].out.mask)
                for p in parts
            ]
            hosts["logprob_gap"] = gaps  # device scalars, read after the update
        return batch, hosts

    def _train_on(self, batch: train_step.Batch) -> dict[str, float]:
        cfg = self.cfg
        rows_per_mb = cfg.rows // cfg.optim.minibatches
        collected = []
        for epoch in range(cfg.optim.inner_iterations):
            # One minibatch is the whole batch: its gradient does not depend on row order, so
            # only several minibatches need (re)shuffled rows.
            perm = None
            if cfg.optim.minibatches > 1:
                rng = np.random.default_rng([cfg.seed, self.step_count, epoch])
                perm = np.arange(cfg.rows) if epoch == 0 else rng.permutation(cfg.rows)
            for m in range(cfg.optim.minibatches):
                mb = batch
                if perm is not None:
                    idx = perm[m * rows_per_mb : (m + 1) * rows_per_mb].astype(np.int32)
                    mb = self.fns.take_rows(batch, idx)
                self.params, self.opt_state, metrics = self.fns.update(
                    self.params, self.opt_state, mb
                )
                # Fetching the metrics blocks on each update: it keeps the host honest about step
                # time and avoids the CPU collective stalls seen with unblocked sharded loops.
                collected.append(jax.device_get(metrics))
                self.updates += 1
        finite = [m["finite"] for m in collected]
        if all(finite):
            self._nonfinite_in_a_row = 0
        else:
            self._nonfinite_total += int(sum(1 for f in finite if not f))
            self._nonfinite_in_a_row += 1
            if self._nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{self._nonfinite_in_a_row} steps in a row had a non-finite loss or "
                    "gradient (updates were skipped). Lower the learning rate, check the data, "
                    "or set dtype=float32."
                )
        keys = collected[-1].keys()
        return {k: float(np.mean([m[k] for m in collected])) for k in keys}

    def step(self) -> dict[str, float]:
        """One GRPO step; returns its metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self._round_stats = []
        if cfg.off_policy_steps:
            parts, waited, handed = self._pipelined_rollout()
            rounds, t_sampled = 1, t0 + waited + handed
        else:
            self.key, key = jax.random.split(self.key)
            parts, rounds = self._gather_rollouts(key)
            t_sampled = time.perf_counter()
        batch, host = self._assemble(parts)
        train_metrics = self._train_on(batch)
        t_trained = time.perf_counter()
        self.step_count += 1

        rewards = host["rewards"].reshape(-1, cfg.group_size)
        verify = sum(p[0].verify_seconds for p in parts)
        verify_wait = sum(p[0].verify_wait_seconds for p in parts)
        generated = sum(int(p[0].lengths.sum()) for p in parts)
        sample_time = t_sampled - t0
        metrics = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "accuracy": float(host["correct"].mean()),
            "zero_std_groups": float(np.mean(rewards.max(1) == rewards.min(1))),
            "response_length_mean": float(host["lengths"].mean()),
            "response_length_min": float(host["lengths"].min()),
            "response_length_max": float(host["lengths"].max()),
            "truncated_frac": float(host["truncated"].mean()),
            "clip_frac_low": train_metrics["clip_frac_low"],
            "clip_frac_high": train_metrics["clip_frac_high"],
            "ratio_mean": train_metrics["ratio_mean"],
            "kl_ref": train_metrics["kl_ref"],
            "kl_old": train_metrics["approx_kl_old"],
            "entropy": train_metrics["entropy"],
            "loss": train_metrics["loss"],
            "grad_norm": train_metrics["grad_norm"],
            "learning_rate": float(self.lr_fn(max(self.updates - 1, 0))),
            "nonfinite_updates": float(self._nonfinite_total),
            "sampling_rounds": float(rounds),
            "time_sample_verify": sample_time,
            "time_verify": verify,
            "time_verify_hidden": max(verify - verify_wait, 0.0),
            "time_train": t_trained - t_sampled,
            "time_step": t_trained - t0,
            "generated_tokens_per_s": generated / max(sample_time, 1e-9),
        }
        if "logprob_gap" in host:
            metrics["logprob_gap_sampler_trainer"] = float(
                np.mean([float(g) for g in host["logprob_gap"]])
            )
        for name in self._round_stats[0] if self._round_stats else ():
            values = [s[name] for s in self._round_stats]
            metrics[f"rollout_{name}"] = float(np.mean(values))
        return metrics

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(
        self,
        examples: Sequence[dict] | None = None,
        *,
        samples: int | None = None,
        batch_size: int = 64,
        echo: Callable[[str], None] | None = None,
    ) -> dict[str, float]:
        """Greedy accuracy, and mean@k / maj@k / pass@k over k sampled answers per problem.

        With `echo`, a progress line (problems done, rate, ETA) after each chunk.

        Every process passes the same `examples`; each chunk of them is split over the processes
        like a training batch (padded to a multiple of the batch shards with copies of its last
        example, which are not counted) and the per-problem results are gathered.
        """
        examples = list(self.eval_examples if examples is None else examples)
        if not examples:
            return {}
        k = self.cfg.eval_samples if samples is None else samples
        ks = sorted({1, k}) if k > 0 else []
        greedy_cfg = dataclasses.replace(self.sampling, temperature=0.0, top_k=0, top_p=1.0)
        sample_cfg = dataclasses.replace(self.sampling, temperature=self.cfg.eval_temperature)
        key = jax.random.key(self.cfg.seed + 10_007)
        shards = sharding.batch_shards(self.mesh)
        chunk_size = -(-batch_size // shards) * shards
        greedy_correct, greedy_len, correct_k, maj_hits = [], [], [], []
        stats_sums: dict[str, float] = {}
        progress = Progress("eval", len(examples), echo, every=chunk_size, unit="problems")
        for start in range(0, len(examples), chunk_size):
            real = examples[start : start + chunk_size]
            width = -(-len(real) // shards) * shards
            padded = real + [real[-1]] * (width - len(real))
            lo = jax.process_index() * width // self.processes
            local = padded[lo : lo + width // self.processes]
            n_real = max(min(len(real) - lo, len(local)), 0)

            out = self._generate(local, key, group_size=1, config=greedy_cfg)
            texts, lengths, _ = self._texts(out)
            _, ok = self._collect(self._submit(texts, local, 1), len(texts))
            greedy_correct += list(sharding.all_rows(ok)[: len(real)])
            greedy_len += list(sharding.all_rows(lengths)[: len(real)])
            if self.response_stats is not None:
                # Called on every process (at least one text) so all gather the same names.
                m = max(n_real, 1)
                stats = self.response_stats(texts[:m], local[:m])
                for name, value in stats.items():
                    stats_sums[name] = stats_sums.get(name, 0.0) + value * n_real
            if k > 0:
                key, sub = jax.random.split(key)
                out = self._generate(local, sub, group_size=k, config=sample_cfg)
                texts, _, _ = self._texts(out)
                _, ok = self._collect(self._submit(texts, local, k), len(texts))
                ok = ok.reshape(-1, k)
                votes = [
                    [vote_answer(t) for t in texts[i * k : (i + 1) * k]] for i in range(len(local))
                ]
                hits = [
                    [evaluation.majority_correct(v[:kk], o[:kk]) for kk in ks]
                    for v, o in zip(votes, ok, strict=True)
                ]
                correct_k += list(sharding.all_rows(ok)[: len(real)])
                maj_hits += list(sharding.all_rows(np.asarray(hits, bool))[: len(real)])
            if echo is not None:
                progress.update(start + len(real))
        result = {
            "accuracy": evaluation.greedy_accuracy(greedy_correct),
            "mean_response_tokens": float(np.mean(greedy_len)),
        }
        if k > 0:
            summary = evaluation.summarize(np.asarray(correct_k), None, ks=ks)
            result.update({key_: float(v) for key_, v in summary.items()})
            result.update(
                {f"maj@{kk}": float(np.mean(np.asarray(maj_hits)[:, i])) for i, kk in enumerate(ks)}
            )
        if self.response_stats is not None:
            names = sorted(stats_sums)
            totals = sharding.all_rows(np.asarray([[stats_sums[n] for n in names]], np.float64))
            result.update(
                {n: float(totals[:, i].sum() / len(examples)) for i, n in enumerate(names)}
            )
        return result

    # -- the loop -------------------------------------------------------------------------------

    def train(
        self,
        on_step: Callable[[int, dict], None] | None = None,
        *,
        preemption=None,
        extra_meta: Mapping[str, Any] | None = None,
    ) -> list[dict]:
        """Run steps `step_count + 1 .. cfg.steps` with metrics, evaluation and checkpoints.

        `preemption` (a `rl_reason.infra.preemption.PreemptionGuard`, entered) is asked after every
        step; when it says stop, the step just finished is checkpointed and the loop returns
        early (`self.preempted` is then True). `extra_meta` goes into every checkpoint's meta.
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

    # -- checkpointed state ----------------------------------------------------------------------

    def state(self) -> dict:
        """The arrays a resumed run needs: params, optimizer state, step, key (+ reference)."""
        state = {
            "params": self.params,
            "opt_state": self.opt_state,
            "step": sharding.from_global_full(np.int32(self.step_count), self.mesh),
            "key": self.key,
        }
        if self.ref_params is not None and not self.frozen:
            state["ref_params"] = self.ref_params
        if self._in_flight is not None:
            # The round sampled for the next step with weights no longer held: saved so a
            # resumed run trains on exactly it (its examples come back from the data position).
            state["in_flight"] = flight_arrays(self._in_flight.out, *self._in_flight.logprobs)
        return state

    def abstract_state(self) -> dict:
        """`state()`'s shapes, dtypes and shardings: the restore target (no arrays touched)."""
        as_target = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        params = jax.tree.map(as_target, self.params, self.fns.param_shardings)
        target = {
            "params": params,
            "opt_state": jax.tree.map(as_target, self.opt_state, self.fns.opt_shardings),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=self._replicated),
            "key": jax.ShapeDtypeStruct((), self.key.dtype, sharding=self._replicated),
        }
        if self.ref_params is not None and not self.frozen:
            target["ref_params"] = params
        if self.cfg.off_policy_steps:  # every checkpoint (step >= 1) has a round in flight
            target["in_flight"] = self._abstract_in_flight()
        return target

    def _abstract_in_flight(self) -> dict:
        p, b, n = self.cfg.prompts_per_step, self.cfg.rows, self.buffer_len
        rows = lambda shape, dtype: jax.ShapeDtypeStruct(
            shape, dtype, sharding=sharding.batch_sharding(self.mesh, len(shape))
        )
        f32 = jnp.float32
        out = sampling.SampleOutput(
            tokens=rows((b, n), jnp.int32),
            mask=rows((b, n), jnp.bool_),
            sample_logprobs=rows((b, n), f32),
            policy_logprobs=rows((b, n), f32),
            lengths=rows((b,), jnp.int32),
            truncated=rows((b,), jnp.bool_),
            prompt_ids=rows((p, self.cfg.max_prompt_len), jnp.int32),
            prompt_mask=rows((p, self.cfg.max_prompt_len), jnp.bool_),
        )
        ref = rows((b, n), f32) if self.ref_params is not None else None
        old = rows((b, n), f32) if self.cfg.loss.recompute_old_logprobs else None
        return flight_arrays(out, ref, old)

    def meta(self, extra: Mapping[str, Any] | None = None) -> dict:
        """JSON-able rest of the state: counters, the data position, the config."""
        meta = {
            "trainer": {
                "step": self.step_count,
                "updates": self.updates,
                "nonfinite_in_a_row": self._nonfinite_in_a_row,
                "nonfinite_total": self._nonfinite_total,
            },
            "config": dataclasses.asdict(self.cfg),
            **dict(extra or {}),
        }
        data = self._data_before_in_flight if self._in_flight is not None else self._data_state()
        if data is not None:
            meta["data"] = data
        return meta

    def resume(self) -> dict | None:
        """Continue from the newest readable checkpoint, if any; returns its meta (or None).

        Restores params, optimizer state, key and counters, and moves the data iterator to
        where that checkpoint left it, so that the resumed run repeats and skips nothing.
        """
        if self.checkpointer is None:
            return None
        resumed = self.checkpointer.restore_latest(self.abstract_state())
        if resumed is None:
            return None
        step, state, meta = resumed
        counters = meta["trainer"]
        if int(state["step"]) != step or counters["step"] != step:
            raise ValueError(
                f"checkpoint step {step} holds trainer step {int(state['step'])} / "
                f"{counters['step']}: the directory mixes runs; use a fresh workdir"
            )
        if "data" in meta:
            if not hasattr(self.train_batches, "set_state"):
                raise ValueError(
                    "the checkpoint holds a data position but train_batches has no set_state: "
                    "pass a resumable iterator (rl_reason.infra.data.train_iterator)"
                )
            self.train_batches.set_state(meta["data"])
        elif step > 0 and hasattr(self.train_batches, "set_state"):
            raise ValueError("the checkpoint holds no data position to resume train_batches from")
        self.params, self.opt_state, self.key = state["params"], state["opt_state"], state["key"]
        if self.ref_params is not None and not self.frozen:
            self.ref_params = state["ref_params"]
        self.step_count = step
        if "in_flight" in state:
            # The data position is the one before the in-flight round's examples were drawn.
            self._data_before_in_flight = meta["data"]
            out, ref, old = flight_from_arrays(state["in_flight"])
            self._in_flight = InFlight(self._next_examples(), out, (ref, old))
            self._send_to_verifiers(self._in_flight)
        self.updates = counters["updates"]
        self._nonfinite_in_a_row = counters["nonfinite_in_a_row"]
        self._nonfinite_total = counters["nonfinite_total"]
        log.warning("resumed from checkpoint step %d", step)
        return meta
