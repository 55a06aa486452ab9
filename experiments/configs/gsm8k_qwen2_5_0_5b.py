r"""GSM8K zero-RL from the Qwen2.5-0.5B base model, with SimpleRL-Zoo's settings.

Source: Zeng et al. 2025, "SimpleRL-Zoo: Investigating and Taming Zero Reinforcement Learning
for Open Base Models in the Wild", arXiv:2503.18892, code github.com/hkust-nlp/simpleRL-reason
([README]: "Reproducing SimpleRL-Zoo"; [script]: train_grpo_math_tune_ray.sh defaults; [eval]:
the README's evaluation command, whose --template qwen-boxed is the prompt of Qwen2.5-Math's
evaluation code).

Launch (local copies of Qwen/Qwen2.5-0.5B and GSM8K's official train.jsonl / test.jsonl; the
defaults are ~/models/Qwen2.5-0.5B and ~/data/gsm8k, the flags below override them):
  python -m experiments.train --config=experiments/configs/gsm8k_qwen2_5_0_5b.py \
      --config.model.path=/ckpt/Qwen2.5-0.5B --config.data.manual_dir=~/data/gsm8k
  python -m experiments.train --config=experiments/configs/gsm8k_qwen2_5_0_5b.py:smoke
  python -m experiments.evaluate --config=experiments/configs/gsm8k_qwen2_5_0_5b.py \
      --config.model.path=/ckpt/Qwen2.5-0.5B --checkpoint=latest --samples=8

Hyperparameters, each with its source:
  prompts_per_step 1024, group_size 8   [README] --train_batch_size 1024 --rollout_n 8
  kl_coef 1e-4, kl_estimator k3          [README] "For models between 0.5B and 14B, we use
                                         kl_loss_coef=1e-4"; [script] KL_LOSS_TYPE=low_var_kl
                                         (verl's k3, which verl also clamps; we do not clamp)
  max_new_tokens 8192                    [README] --max_response_length 8192 ("for other
                                         models, use the same command")
  max_prompt_len 1024                    [script] MAX_PROMPT_LENGTH=1024
  learning_rate 5e-7, constant           [script] LEARNING_RATE=5e-7 (the README command does
                                         not set it; the paper's value is not restated here)
  minibatches 4                          [script] PPO_MINI_BATCH_SIZE=256 prompts: 1024 / 256
                                         optimizer updates per step, one pass (verl ppo_epochs 1)
  clip_eps 0.2, temperature 1.0          [script] CLIP_RATIO=0.2, TEMPERATURE=1.0
  prompt                                 [eval] qwen-boxed: system "You are a helpful
                                         assistant.", user: question + "\nPlease reason step by
                                         step, and put your final answer within \boxed{}."
                                         (the Qwen chat template renders exactly that text)
  steps 100                              [README] 7B and 14B "for approximately 100 steps";
                                         the 0.5B step count is not stated there
  data                                   [README] three difficulty levels: Easy (GSM8K and MATH
                                         lv.1), Medium (MATH lv.1-4), Hard (MATH lv.3-5). This
                                         recipe trains on GSM8K's train split only (the GSM8K
                                         part of Easy), not their exact mixture; the paper says
                                         which level each model used.
  eval_every 5, checkpoint_every 5       [script] TEST_FREQ=5; [README] --save_freq 5
  microbatches 32                        ours: memory only (gradients accumulate exactly)
  Not supported here: the entropy bonus ([README] --entropy_coeffient 0.001). Not stated in the
  sources and left at this library's defaults: warmup (0), weight decay (0), Adam betas
  (0.9, 0.99), gradient clipping (1.0), aggregation (token-mean).

Memory: the sampler draws all 1024 x 8 completions in one call; at 1024 + 8192 tokens their
KV cache alone is ~0.9 TB in bfloat16 for this model, so the published batch needs a large
slice. On fewer chips lower prompts_per_step (keep minibatches = prompts_per_step / 256) and
report the change.

Expected, quoted from [README] (Qwen-2.5-0.5B, GSM8K / MATH 500 accuracy): base 36.7 / 15.8,
after SimpleRL-Zoo 49.5 / 34.4; their RL model is sampled at temperature 1.0, top-p 0.95, the
base greedily. Our `after` is greedy accuracy on GSM8K test (and mean@k at eval_temperature).

The :smoke variant runs 2 GRPO steps on a tiny random Qwen2-family model with the GSM8K test
fixtures (tests/fixtures/gsm8k/official), in well under a minute on CPU.
"""

import ml_collections

from experiments.configs.recipe_common import FIXTURES, recipe_config, smoke

SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = recipe_config(
        workdir="runs/gsm8k_qwen2_5_0_5b",
        task="gsm8k",
        # Malformed rows the build skips before it fails (rl_reason/tasks/bad_rows.py).
        task_params=dict(max_bad_fraction=0.01),
        model=dict(path="~/models/Qwen2.5-0.5B"),
        prompt=dict(format="chat", system="You are a helpful assistant.", suffix=SUFFIX),
        data=dict(manual_dir="~/data/gsm8k", eval_split="test", eval_size=0),
        grpo=dict(
            steps=100,
            prompts_per_step=1024,
            group_size=8,
            max_prompt_len=1024,
            max_new_tokens=8192,
            eval_every=5,
            eval_samples=4,
            eval_temperature=1.0,
            checkpoint_every=5,
            # Continuous batching: R1-style responses up to 8,192 tokens are long-tailed, where the
            # engine doubled useful tokens/s on the CPU benchmark (benchmarks/rollout.py).
            sampling=dict(temperature=1.0, engine="continuous"),
            loss=dict(
                advantage_estimator="grpo",
                objective="ppo_clip",
                aggregation="token-mean",
                clip_eps_low=0.2,
                clip_eps_high=0.2,
                kl_coef=1e-4,
                kl_estimator="k3",
            ),
            optim=dict(
                learning_rate=5e-7,
                lr_schedule="constant",
                warmup_steps=0,
                inner_iterations=1,
                minibatches=4,
                microbatches=32,
            ),
        ),
    )
    if arg == "smoke":
        smoke(c, family="qwen2", data=dict(manual_dir=str(FIXTURES / "gsm8k" / "official")))
        # The tiny random model stops within 16 tokens in ~6% of its samples; with this seed
        # both steps sample a group with an early stop (reward variance), so both update.
        c.grpo.seed = 2
        # The tail packed once (16 -> 8 slots): each packing level is one more compiled loop.
        c.grpo.sampling.engine_min_slots = 8
    elif arg:
        raise ValueError(f"unknown config arg {arg!r}; valid: '' or 'smoke'")
    c.lock()
    return c
