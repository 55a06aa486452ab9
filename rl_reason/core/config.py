"""The GRPO loop's options: typed, nested (sampling, loss, optim, reward), each field documented
once, validated as a whole when the config is read; and `config_from`, which builds them from a
config section.

    GRPOConfig(steps=30, loss=LossOptions(kl_coef=0.01), optim=OptimOptions(learning_rate=2e-4))
    --config.grpo.loss.kl_coef=0.01 --config.grpo.optim.learning_rate=2e-4      (command line)

The jitted update takes `LossOptions` itself (hashable, static), so a new objective option is a
field here and its use in the objective: nothing copies options from one class to another.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

# A learning rate past this is a typo (1e-1 for 1e-4, say): AdamW steps of that size destroy a
# pretrained policy in one update.
MAX_LEARNING_RATE = 1.0


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How rollouts are sampled. temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # DAPO's dynamic sampling: drop groups whose rewards are all equal (zero advantage) and
    # sample more prompts, up to max_sampling_rounds rounds per step.
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    # "static": the P*G rows decode in lockstep (rl_reason/rollout/sampling.py); "continuous":
    # the continuous-batching engine (rl_reason/rollout/engine.py), the same tokens for the same
    # key, faster when lengths are long-tailed (benchmarks/rollout.py).
    engine: str = "static"
    engine_slots: int = 0  # rows decoded at once; 0: one per sample (only the tail is packed)
    engine_min_slots: int = 0  # the fewest slots the tail is packed into; 0: slots / 16
    # > 0: every that many decode steps, the engine's finished samples go to the verifiers
    # while the others decode (host round trips); 0: a round is verified once it is sampled.
    engine_stream_steps: int = 0
    # Partial rollouts (rl_reason/rollout/partial.py), > 0 with the engine: the prompts of
    # that many later steps decode beside each step's own, and samples still decoding when
    # the step's batch has finished carry over to the next step (their tokens at most this
    # many policy versions old when trained); 0: every step samples and finishes its own.
    partial_rollout_steps: int = 0
    # How a carried sample resumes: "keep" its slot's cache as the last call left it (keys and
    # values of its earlier tokens under the weights they were computed with: no recompute),
    # "rebuild" it by a forward pass under the current weights (every later token then drawn
    # from the current policy given its whole context; costs a prefill per carried sample).
    partial_rollout_cache: str = "keep"
    # The training rounds' compute dtype ("": the policy's own). "bfloat16" samples as a
    # low-precision inference engine would, from the same float32 weights: the sampler's
    # log-probs then differ from the trainer's (loss.correction is what corrects for it).
    compute_dtype: str = ""


@dataclasses.dataclass(frozen=True)
class MultiTurnOptions:
    """Multi-turn rollouts (rl_reason/rollout/multi_turn.py): the policy's turns that end in
    the environment's stop marker get its answer appended (masked out of the loss), and
    decoding goes on from the cache. `env` "" is off, or a name in
    `rl_reason.rollout.envs.ENVIRONMENTS`: "python_tool" (`<code>...</code>`),
    "python_tool_chat" (the same tool in Qwen2.5's `<tool_call>` format, through the chat
    template; chat prompts announce it), "guess_number" (a test game). The token budget
    (max_new_tokens) bounds the whole trajectory, observations included; so that the chat
    template's text around an observation is never cut, keep tool_max_output_chars well
    inside max_observation_tokens."""

    env: str = ""
    max_turns: int = 4  # observations a trajectory gets before it is ended ("turn_limit")
    max_observation_tokens: int = 128  # an observation's tokens past this are cut
    # The host answers waiting samples every this many decode steps (or sooner, when no sample
    # can go on): fewer host round trips against a waiting slot's idle steps.
    look_steps: int = 8
    tool_timeout_s: float = 5.0  # python_tool: each call's wall-clock limit
    tool_max_output_chars: int = 256  # python_tool: output past this is cut ("truncated")


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The objective (rl_reason.losses): static options of the jitted update."""

    advantage_estimator: str = "grpo"  # a name in losses.ADVANTAGE_ESTIMATORS
    objective: str = "ppo_clip"  # a name in losses.POLICY_OBJECTIVES
    aggregation: str = "token-mean"  # a name in losses.AGGREGATIONS
    ratio_level: str = "token"  # "token" (PPO/GRPO) or "sequence" (GSPO)
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    kl_coef: float = 0.0  # > 0 adds a KL term to the frozen initial policy
    kl_estimator: str = "k3"  # a name in losses.KL_ESTIMATORS
    logprob_chunk_size: int | None = None  # completion positions per vocabulary projection
    # Rows cut off at the token budget enter the loss with mask 0 (DAPO's overlong filtering).
    mask_truncated: bool = False
    # Score the sampled tokens again with the trainer's forward pass and use those as the old
    # log-probs (the sampler's own are used otherwise; logged as logprob_gap_sampler_trainer).
    recompute_old_logprobs: bool = False
    dual_clip_c: float = 3.0  # objective "dual_clip": the loss for A < 0 is at most -c*A
    # objective "cispo": the IS weight is clipped to [1 - low, 1 + high]. MiniMax-M1 sets no
    # lower bound (low = 1: the floor is 0) and tunes high, whose value it does not publish.
    cispo_eps_low: float = 1.0
    cispo_eps_high: float = 4.0
    # REINFORCE++ (advantage_estimator "reinforce_pp" / "reinforce_pp_baseline"): beta of the
    # per-token KL to the reference folded into the return, by this estimator of KL.
    reward_kl_coef: float = 0.0
    reward_kl_estimator: str = "k1"  # a name in losses.KL_ESTIMATORS
    # Sampler-trainer mismatch correction, a name in losses.CORRECTIONS ("none": off): weights
    # or rejects tokens / sequences by the ratio of the trainer's rescored old log-probs to the
    # sampler's, with cap C (TIS truncates at C, the masks reject ratios outside [1/C, C]).
    correction: str = "none"
    correction_cap: float = 2.0
    # Process supervision (DeepSeekMath's GRPO, §4.1.3): w of the per-token advantages from the
    # verifier's step rewards (`losses.process_advantages`, each step's reward credited to its
    # own tokens and the ones before), A_t = (1 - w) * A_outcome + w * A_process_t. Needs a
    # verifier that scores steps (`VerifyResult.steps`, e.g. "arithmetic_process").
    process_weight: float = 0.0

    @property
    def needs_reference(self) -> bool:
        """Whether the frozen reference policy scores the rollouts (a KL term anywhere)."""
        return self.kl_coef > 0 or self.reward_kl_coef > 0


@dataclasses.dataclass(frozen=True)
class OptimOptions:
    """AdamW with warmup and a constant or cosine schedule, global-norm clipping, and how each
    step's samples are cut into updates."""

    learning_rate: float = 1e-6
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # or "cosine" (to 10% of the peak)
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.99
    max_grad_norm: float | None = 1.0  # None: no clipping
    inner_iterations: int = 1  # mu: passes over each step's samples
    minibatches: int = 1  # optimizer updates per pass
    microbatches: int = 1  # gradient accumulation inside one update (exact)


@dataclasses.dataclass(frozen=True)
class RewardOptions:
    """What is added to the verifier's outcome reward."""

    overlong_buffer: int = 0  # DAPO's soft overlong penalty over the last `buffer` tokens
    overlong_penalty: float = 1.0
    format_reward: float = 0.0  # weight of the `format` verifier's reward


@dataclasses.dataclass(frozen=True)
class CriticOptions:
    """PPO's critic (`core.critic`), used when loss.advantage_estimator is "gae": a value model
    trained beside the policy on the same minibatches, and GAE's gamma and lambda."""

    # "policy": the policy's trunk, weights copied, with a zero value head; otherwise the path
    # of a model directory (models.from_pretrained) whose trunk gets the head.
    init: str = "policy"
    learning_rate: float = 1e-5
    warmup_steps: int = 0  # updates of linear learning-rate warmup
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    value_clip: float = 0.2  # the value may move this far from the sampled one per step; 0: off
    gamma: float = 1.0  # GAE's discount
    lam: float = 1.0  # GAE's lambda: 1 is Monte Carlo (A = R - V), 0 one-step TD
    whiten_advantages: bool = True  # z-score the advantages over the whole global batch
    # Steps at the start of the run that train only the critic (the policy waits for values
    # better than the zero head's).
    policy_delay_steps: int = 0


LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Every knob of the loop. Defaults follow DeepSeekMath's GRPO where it gives one."""

    steps: int = 100
    prompts_per_step: int = 16  # P
    group_size: int = 8  # G
    max_prompt_len: int = 128  # prompts are left-padded to this (fixed shapes, no recompiles)
    max_new_tokens: int = 128  # the response budget
    sampling: SamplingOptions = dataclasses.field(default_factory=SamplingOptions)
    loss: LossOptions = dataclasses.field(default_factory=LossOptions)
    optim: OptimOptions = dataclasses.field(default_factory=OptimOptions)
    reward: RewardOptions = dataclasses.field(default_factory=RewardOptions)
    critic: CriticOptions = dataclasses.field(default_factory=CriticOptions)
    multi_turn: MultiTurnOptions = dataclasses.field(default_factory=MultiTurnOptions)
    # 1: sample step k+1's rollouts with the weights before step k's update, while step k
    # trains and step k+1's completions are verified (one-step-off-policy; the ratio is taken
    # against the sampler's log-probs). 0: on-policy.
    off_policy_steps: int = 0
    # The divergence guard (trainer/health.py): a step is unhealthy when an update had a
    # non-finite loss or gradient (skipped) or the policy's entropy moved by more than
    # max_entropy_change nats from the last healthy step's (0: not watched); this many unhealthy
    # steps in a row stop the run, leaving a healthy checkpoint as the newest.
    max_nonfinite_steps: int = 3
    max_entropy_change: float = 2.0
    eval_every: int = 0  # 0: only before and after training
    eval_samples: int = 4  # k for mean@k / maj@k / pass@k
    eval_temperature: float = 1.0
    checkpoint_every: int = 0  # 0: no checkpoints (and no resume)
    checkpoint_keep: int = 2
    verifier_workers: int = 2
    verifier_timeout_s: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        # Sections may be given as dicts (GRPOConfig(loss=dict(kl_coef=0.01))), as in configs.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            factory = f.default_factory
            if factory is not dataclasses.MISSING and not isinstance(value, type(factory())):
                section = config_from(type(factory()), value, path=f.name)
                object.__setattr__(self, f.name, section)
        problems = _problems(self)
        if problems:
            raise ValueError(
                "GRPOConfig: " + "; ".join(problems) + " (set them with --config.grpo.<field>)"
            )

    @property
    def rows(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def uses_critic(self) -> bool:
        """Whether the advantage estimator needs PPO's value model (`core.critic`)."""
        from rl_reason import losses

        est = self.loss.advantage_estimator
        return est in losses.ADVANTAGE_ESTIMATORS and losses.needs_critic(est)

    @property
    def total_updates(self) -> int:
        """Optimizer updates over the run (the schedule's length)."""
        return max(self.steps * self.optim.inner_iterations * self.optim.minibatches, 1)


def _registries() -> dict[str, Any]:
    # Imported here: the objective's registries load jax, the options themselves do not.
    from rl_reason import losses

    return {
        "loss.advantage_estimator": losses.ADVANTAGE_ESTIMATORS,
        "loss.objective": losses.POLICY_OBJECTIVES,
        "loss.aggregation": losses.AGGREGATIONS,
        "loss.ratio_level": losses.RATIO_LEVELS,
        "loss.kl_estimator": losses.KL_ESTIMATORS,
        "loss.reward_kl_estimator": losses.KL_ESTIMATORS,
        "loss.correction": losses.CORRECTIONS,
        "optim.lr_schedule": LR_SCHEDULES,
    }


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


ENGINES = ("static", "continuous")
# The environments of rl_reason.rollout.envs.ENVIRONMENTS (a test keeps the two the same).
ENVIRONMENT_NAMES = ("python_tool", "python_tool_chat", "guess_number")
COMPUTE_DTYPES = ("", "float32", "bfloat16")

# field -> (test, the bound it states, why the bound exists)
_Rule = tuple[Callable[[Any, Any], bool], str, str]
_RULES: dict[str, _Rule] = {
    "steps": (lambda v, c: v >= 0, ">= 0", "the number of GRPO steps"),
    "prompts_per_step": (lambda v, c: v >= 1, ">= 1", "each step needs a prompt"),
    "group_size": (
        lambda v, c: v >= 2 or (v == 1 and c.uses_critic),
        ">= 2",
        "advantages are relative to the group; 1 works only with a critic, "
        "loss.advantage_estimator='gae'",
    ),
    "max_prompt_len": (lambda v, c: v >= 1, ">= 1", "the prompt width"),
    "max_new_tokens": (lambda v, c: v >= 1, ">= 1", "the response budget"),
    "off_policy_steps": (lambda v, c: v in (0, 1), "0 or 1", "only one-step-off-policy exists"),
    "max_nonfinite_steps": (lambda v, c: v >= 1, ">= 1", "the divergence guard's patience"),
    "max_entropy_change": (lambda v, c: finite(v) and v >= 0, ">= 0", "0 turns the watch off"),
    "eval_every": (lambda v, c: v >= 0, ">= 0", "0 evaluates only before and after"),
    "eval_samples": (lambda v, c: v >= 1, ">= 1", "k of mean@k needs a sample"),
    "eval_temperature": (lambda v, c: finite(v) and v >= 0, ">= 0", "0 is greedy"),
    "checkpoint_every": (lambda v, c: v >= 0, ">= 0", "0 writes no checkpoints"),
    "checkpoint_keep": (lambda v, c: v >= 1, ">= 1", "resume needs a checkpoint"),
    "verifier_workers": (lambda v, c: v >= 1, ">= 1", "verifiers run in worker processes"),
    "verifier_timeout_s": (lambda v, c: finite(v) and v > 0, "> 0", "a verifier call's limit"),
    "seed": (lambda v, c: v >= 0, ">= 0", "numpy seeds are non-negative"),
    "sampling.temperature": (lambda v, c: finite(v) and v >= 0, ">= 0", "0 is greedy"),
    "sampling.top_k": (lambda v, c: v >= 0, ">= 0", "0 turns top-k off"),
    "sampling.top_p": (lambda v, c: finite(v) and 0 < v <= 1, "in (0, 1]", "1 turns it off"),
    "sampling.max_sampling_rounds": (lambda v, c: v >= 1, ">= 1", "a step samples once"),
    "sampling.engine": (lambda v, c: v in ENGINES, f"one of {list(ENGINES)}", "the samplers"),
    "sampling.engine_slots": (lambda v, c: v >= 0, ">= 0", "0 gives one slot per sample"),
    "sampling.engine_min_slots": (lambda v, c: v >= 0, ">= 0", "0 takes the default"),
    "sampling.engine_stream_steps": (
        lambda v, c: v == 0 or (v > 0 and c.sampling.engine == "continuous"),
        ">= 0, and 0 unless sampling.engine='continuous'",
        "only the engine streams finished samples to the verifiers",
    ),
    "sampling.partial_rollout_steps": (
        lambda v, c: v == 0 or (v > 0 and c.sampling.engine == "continuous"),
        ">= 0, and 0 unless sampling.engine='continuous'",
        "partial rollouts are the engine's: a step's samples carry over in its slots",
    ),
    "sampling.partial_rollout_cache": (
        lambda v, c: v in ("keep", "rebuild"),
        "'keep' or 'rebuild'",
        "how a carried sample's cache resumes",
    ),
    "multi_turn.env": (
        lambda v, c: v == "" or v in ENVIRONMENT_NAMES,
        f"'' or one of {list(ENVIRONMENT_NAMES)}",
        "the environments rl_reason.rollout.envs builds",
    ),
    "multi_turn.max_turns": (lambda v, c: v >= 1, ">= 1", "0 turns would be single-turn"),
    "multi_turn.max_observation_tokens": (lambda v, c: v >= 1, ">= 1", "an observation's cap"),
    "multi_turn.look_steps": (lambda v, c: v >= 1, ">= 1", "decode steps between host looks"),
    "multi_turn.tool_timeout_s": (lambda v, c: finite(v) and v > 0, "> 0", "a tool call's limit"),
    "multi_turn.tool_max_output_chars": (lambda v, c: v >= 1, ">= 1", "an observation's text"),
    "sampling.compute_dtype": (
        lambda v, c: v in COMPUTE_DTYPES,
        f"one of {list(COMPUTE_DTYPES)}",
        "'' keeps the policy's dtype",
    ),
    "loss.clip_eps_low": (lambda v, c: finite(v) and 0 <= v < 1, "in [0, 1)", "1 - eps > 0"),
    "loss.clip_eps_high": (lambda v, c: finite(v) and v >= 0, ">= 0", "the ratio's upper bound"),
    "loss.kl_coef": (lambda v, c: finite(v) and v >= 0, ">= 0", "a penalty, not a reward"),
    "loss.logprob_chunk_size": (lambda v, c: v is None or v >= 1, "None or >= 1", "positions"),
    "loss.dual_clip_c": (lambda v, c: finite(v) and v > 1, "> 1", "c <= 1 overrides the PPO clip"),
    "loss.cispo_eps_low": (lambda v, c: finite(v) and 0 <= v <= 1, "in [0, 1]", "1 - eps >= 0"),
    "loss.cispo_eps_high": (lambda v, c: finite(v) and v >= 0, ">= 0", "the weight's upper bound"),
    "loss.reward_kl_coef": (lambda v, c: finite(v) and v >= 0, ">= 0", "a penalty, not a reward"),
    "loss.correction_cap": (lambda v, c: finite(v) and v > 1, "> 1", "the band is [1/C, C]"),
    "loss.process_weight": (
        lambda v, c: finite(v) and 0 <= v <= 1,
        "in [0, 1]",
        "the process advantages' share beside the outcome's",
    ),
    "optim.learning_rate": (
        lambda v, c: finite(v) and 0 < v <= MAX_LEARNING_RATE,
        f"in (0, {MAX_LEARNING_RATE:g}]",
        "a negative rate climbs the loss and a huge one destroys the policy",
    ),
    "optim.warmup_steps": (lambda v, c: v >= 0, ">= 0", "updates of linear warmup"),
    "optim.weight_decay": (lambda v, c: finite(v) and v >= 0, ">= 0", "decay, not growth"),
    "optim.adam_b1": (lambda v, c: finite(v) and 0 <= v < 1, "in [0, 1)", "a moving average"),
    "optim.adam_b2": (lambda v, c: finite(v) and 0 <= v < 1, "in [0, 1)", "a moving average"),
    "optim.max_grad_norm": (
        lambda v, c: v is None or (finite(v) and v > 0),
        "None or > 0",
        "the clipping norm",
    ),
    "optim.inner_iterations": (lambda v, c: v >= 1, ">= 1", "passes over the samples"),
    "optim.minibatches": (lambda v, c: v >= 1, ">= 1", "updates per pass"),
    "optim.microbatches": (lambda v, c: v >= 1, ">= 1", "accumulation steps per update"),
    "reward.overlong_buffer": (
        lambda v, c: 0 <= v < c.max_new_tokens,
        "in [0, max_new_tokens)",
        "the penalty ramps over the budget's last tokens",
    ),
    "reward.overlong_penalty": (lambda v, c: finite(v) and v >= 0, ">= 0", "a penalty"),
    "reward.format_reward": (lambda v, c: finite(v), "finite", "a reward weight"),
    "critic.init": (lambda v, c: bool(v), "'policy' or a model directory", "the critic's trunk"),
    "critic.learning_rate": (
        lambda v, c: finite(v) and 0 < v <= MAX_LEARNING_RATE,
        f"in (0, {MAX_LEARNING_RATE:g}]",
        "a negative rate climbs the value loss",
    ),
    "critic.warmup_steps": (lambda v, c: v >= 0, ">= 0", "updates of linear warmup"),
    "critic.weight_decay": (lambda v, c: finite(v) and v >= 0, ">= 0", "decay, not growth"),
    "critic.max_grad_norm": (
        lambda v, c: v is None or (finite(v) and v > 0),
        "None or > 0",
        "the clipping norm",
    ),
    "critic.value_clip": (lambda v, c: finite(v) and v >= 0, ">= 0", "0 turns the clip off"),
    "critic.gamma": (lambda v, c: finite(v) and 0 <= v <= 1, "in [0, 1]", "a discount"),
    "critic.lam": (lambda v, c: finite(v) and 0 <= v <= 1, "in [0, 1]", "GAE's lambda"),
    "critic.policy_delay_steps": (
        lambda v, c: 0 <= v < max(c.steps, 1),
        "in [0, steps)",
        "the policy must train at some step",
    ),
}


def _get(obj: Any, path: str) -> Any:
    value: Any = obj
    for part in path.split("."):
        value = getattr(value, part)
    return value


def broken_rules(obj: Any, rules: Mapping[str, _Rule]) -> list[str]:
    """Every rule `obj` breaks, each naming its field (a dotted path), its bound and the reason;
    a rule is (test(value, obj), the bound it states, why the bound exists)."""
    problems = []
    for path, (ok, bound, why) in rules.items():
        value = _get(obj, path)
        try:
            good = bool(ok(value, obj))
        except TypeError:
            good = False
        if not good:
            problems.append(f"{path}={value!r} must be {bound} ({why})")
    return problems


def _problems(cfg: GRPOConfig) -> list[str]:
    """Every broken rule of `cfg`, each naming its field, its bound and the reason."""
    problems = broken_rules(cfg, _RULES)
    for path, valid in _registries().items():
        value = _get(cfg, path)
        if value not in valid:
            problems.append(f"{path}={value!r} is not one of {list(valid)}")
    if cfg.off_policy_steps and cfg.sampling.dynamic_sampling:
        problems.append(
            "off_policy_steps=1 cannot be combined with sampling.dynamic_sampling (a refill "
            "round would have to wait for the update it should overlap)"
        )
    if cfg.sampling.partial_rollout_steps:
        for clash, why in (
            (cfg.off_policy_steps, "off_policy_steps=1 (partial rollouts overlap steps already)"),
            (cfg.sampling.dynamic_sampling, "sampling.dynamic_sampling"),
            (cfg.sampling.engine_stream_steps, "sampling.engine_stream_steps"),
        ):
            if clash:
                problems.append(f"sampling.partial_rollout_steps cannot be combined with {why}")
        if cfg.loss.recompute_old_logprobs and cfg.loss.correction == "none":
            problems.append(
                "sampling.partial_rollout_steps with loss.recompute_old_logprobs=True and no "
                "loss.correction: the ratio would start from the trainer's rescoring and nothing "
                "would weigh the carried tokens' older policy; leave recompute_old_logprobs off "
                "(the ratio then uses the log-probs each token was drawn under) or set "
                "loss.correction"
            )
    if cfg.multi_turn.env:
        for clash, why in (
            (cfg.sampling.partial_rollout_steps, "sampling.partial_rollout_steps"),
            (cfg.off_policy_steps, "off_policy_steps=1"),
            (
                cfg.sampling.engine_stream_steps,
                "sampling.engine_stream_steps (the verifier checks a trajectory's final turn, "
                "known once it ends)",
            ),
        ):
            if clash:
                problems.append(f"multi_turn.env cannot be combined with {why} yet")
    loss, estimators = cfg.loss, _registries()["loss.advantage_estimator"]
    if loss.reward_kl_coef > 0 and loss.advantage_estimator in estimators:
        if not getattr(estimators[loss.advantage_estimator], "token_level", False):
            problems.append(
                f"loss.reward_kl_coef={loss.reward_kl_coef} folds the KL into per-token returns, "
                f"which only a token-level estimator has (reinforce_pp, reinforce_pp_baseline, "
                f"gae), "
                f"not loss.advantage_estimator={loss.advantage_estimator!r}; use loss.kl_coef "
                "for a KL term in the loss"
            )
    if loss.process_weight > 0 and loss.advantage_estimator in estimators:
        if not getattr(estimators[loss.advantage_estimator], "group_relative", True) or getattr(
            estimators[loss.advantage_estimator], "token_level", False
        ):
            problems.append(
                f"loss.process_weight={loss.process_weight} adds group-normalised step "
                "advantages to a group-relative outcome estimator (grpo, dr_grpo, rloo), not "
                f"to loss.advantage_estimator={loss.advantage_estimator!r}"
            )
        if cfg.multi_turn.env:
            problems.append(
                "loss.process_weight with multi_turn.env: the verifier scores a trajectory's "
                "final turn, whose step offsets are not the completion's; not combined yet"
            )
    if loss.correction != "none" and not loss.recompute_old_logprobs:
        problems.append(
            f"loss.correction={loss.correction!r} needs loss.recompute_old_logprobs=True: "
            "without the trainer's rescoring the old log-probs are the sampler's own and every "
            "weight is 1"
        )
    split = cfg.optim.minibatches * cfg.optim.microbatches
    if split >= 1 and cfg.rows % split:
        problems.append(
            f"P*G = {cfg.rows} rows must split evenly into optim.minibatches "
            f"({cfg.optim.minibatches}) x optim.microbatches ({cfg.optim.microbatches})"
        )
    return problems


# Flat names of the options before they were nested, and where they live now.
MOVED = {
    **{f: f"sampling.{f}" for f in ("temperature", "top_k", "top_p")},
    **{f: f"sampling.{f}" for f in ("dynamic_sampling", "max_sampling_rounds")},
    "policy_objective": "loss.objective",
    **{
        f: f"loss.{f}"
        for f in (
            "advantage_estimator",
            "aggregation",
            "ratio_level",
            "clip_eps_low",
            "clip_eps_high",
            "kl_coef",
            "kl_estimator",
            "logprob_chunk_size",
            "mask_truncated",
            "recompute_old_logprobs",
        )
    },
    **{
        f: f"optim.{f}"
        for f in (
            "learning_rate",
            "warmup_steps",
            "lr_schedule",
            "weight_decay",
            "adam_b1",
            "adam_b2",
            "max_grad_norm",
            "inner_iterations",
            "minibatches",
            "microbatches",
        )
    },
    **{f: f"reward.{f}" for f in ("overlong_buffer", "overlong_penalty", "format_reward")},
}


def moved_name(section: str, flat: str) -> str | None:
    """The new dotted name of an old flat GRPO option: grpo.kl_coef -> grpo.loss.kl_coef."""
    if section == "grpo" and flat in MOVED:
        return f"grpo.{MOVED[flat]}"
    return None


def defaults(cls) -> dict[str, Any]:
    """Every field of an options dataclass at its default, nested sections as dicts; a field
    whose default is None as (None, its type), so a config can still give it a value."""
    hints = typing.get_type_hints(cls)
    tree: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            tree[f.name] = defaults(type(f.default_factory()))
        elif f.default is None:
            types = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
            tree[f.name] = (None, types[0] if types else object)
        else:
            tree[f.name] = f.default
    return tree


def check_names(cls, values: Mapping[str, Any], path: str) -> None:
    """Every key of `values` (nested) names a field of `cls`; an old flat name says its new one."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        hints = [f"{u} is now {MOVED[u]}" for u in unknown if cls is GRPOConfig and u in MOVED]
        raise ValueError(
            f"{path} has no field(s) {unknown}"
            + (f" ({'; '.join(hints)})" if hints else "")
            + f"; valid: {sorted(fields)}"
        )
    for name, value in values.items():
        factory = fields[name].default_factory
        if factory is not dataclasses.MISSING and isinstance(value, Mapping):
            check_names(type(factory()), value, f"{path}.{name}")


def config_from(cls, section: Mapping[str, Any] | Any, *, path: str | None = None) -> Any:
    """A frozen dataclass from a config section: unknown fields and wrong types are errors.

    ml_collections checks types of command-line overrides against the config file's values;
    this checks the config file's values against the dataclass, so a typo'd or mistyped field
    stops the run before anything is built, naming the field. Fields whose default is itself
    an options dataclass are read from a nested section the same way.
    """
    path = path or cls.__name__
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = dict(section)
    check_names(cls, values, path)
    for name, value in values.items():
        field = fields[name]
        if field.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(
            sub := field.default_factory()
        ):
            if not isinstance(value, type(sub)):
                values[name] = config_from(type(sub), value, path=f"{path}.{name}")
            continue
        default = field.default
        if default is dataclasses.MISSING or default is None or value is None:
            continue
        ok = isinstance(value, type(default)) or (
            isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)
        )
        if isinstance(default, int) and isinstance(value, bool) != isinstance(default, bool):
            ok = False
        if not ok:
            raise TypeError(
                f"{path}.{name} must be {type(default).__name__} (like its default "
                f"{default!r}), got {type(value).__name__} {value!r}"
            )
    return cls(**values)


def overlong_penalty(
    lengths: np.ndarray, max_new_tokens: int, buffer: int, penalty: float
) -> np.ndarray:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to L_max - buffer, then
    linearly down to -penalty at L_max."""
    if buffer <= 0:
        return np.zeros(lengths.shape, np.float32)
    over = np.clip(lengths - (max_new_tokens - buffer), 0, buffer)
    return (-penalty * over / buffer).astype(np.float32)
