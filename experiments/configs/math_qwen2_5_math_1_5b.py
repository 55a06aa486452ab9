r"""MATH zero-RL from the Qwen2.5-Math-1.5B base model, with Dr. GRPO's settings.

Source (the settings are Dr. GRPO's, not SimpleRL-Zoo's): Liu et al. 2025, "Understanding
R1-Zero-Like Training: A Critical Perspective", arXiv:2503.20783, code
github.com/sail-sg/understand-r1-zero ([script]: examples/qwen2.5-math-1.5b.sh, its Qwen-Math
template run; [code]: train_zero_math.py; [README]: the "minimalist R1-Zero recipe").

Launch (defaults ~/models/Qwen2.5-Math-1.5B and ~/data/prm800k/math_splits, overridable as
below; local copies of Qwen/Qwen2.5-Math-1.5B and PRM800K's math_splits: train.jsonl holds
the 12,000 MATH problems outside MATH-500, test.jsonl is MATH-500, so one manual_dir gives both
splits; or MATH's original train/ with MATH-500 under eval_manual_dir + eval_data_dir):
  python -m experiments.train --config=experiments/configs/math_qwen2_5_math_1_5b.py \
      --config.model.path=/ckpt/Qwen2.5-Math-1.5B \
      --config.data.manual_dir=~/data/prm800k/math_splits
  python -m experiments.train --config=experiments/configs/math_qwen2_5_math_1_5b.py:smoke
  python -m experiments.evaluate --config=experiments/configs/math_qwen2_5_math_1_5b.py \
      --config.model.path=/ckpt/Qwen2.5-Math-1.5B --checkpoint=latest

Hyperparameters, each with its source:
  advantage_estimator dr_grpo            [code] r - mean(r) of the group, no division by std
  aggregation seq-mean-token-sum-norm    [code] per-sequence token sum / generate_max_length
                                         (max_new_tokens here), averaged over sequences
  kl_coef 0                              [script] --beta 0
  learning_rate 1e-6, constant           [script] --learning_rate 0.000001 --lr_scheduler constant
  prompts_per_step 128, group_size 8     [script] --rollout_batch_size 128 --num_samples 8
  minibatches 8                          [script] --train_batch_size 128 samples per update:
                                         1024 / 128 updates per step, --num_ppo_epochs 1
  max_new_tokens 3000                    [script] --generate_max_length 3000
  max_prompt_len 1024                    [script] --prompt_max_length 1024
  temperature 1.0, top_p 1.0             [script] --temperature 1 --top_p 1
  prompt (Qwen-Math template)            [code] apply_qwen_math_template: system "Please reason
                                         step by step, and put your final answer within
                                         \boxed{}.", user: the question (the tokenizer's chat
                                         template renders exactly that text)
  eval: greedy, every 16 steps           [script] --eval_temperature 0 --eval_steps 16
  data                                   [script] --prompt_data math_12k; MATH-500 held out
  steps 1875                             [script] --num_prompt_epoch 20: 20 x 12,000 / 128
  Not supported here: [code] gives truncated completions reward 0 (ours scores them like any
  other). Not stated in the sources and left at this library's defaults: clipping (0.2), Adam
  betas (0.9, 0.99), weight decay (0), gradient clipping (1.0). The README's minimalist recipe
  (Qwen2.5-Math-7B) trains on MATH levels 3-5; their 1.5B script uses all of math_12k, as here.

Memory: 128 x 8 completions of up to 1024 + 3000 tokens are sampled in one call (KV cache
~0.12 TB in bfloat16 for this model); on fewer chips lower prompts_per_step (minibatches =
prompts_per_step * 8 / 128) and report the change.

Expected: the paper reports its Oat-Zero-1.5B results (MATH500 and four other benchmarks) in
its tables; they are not restated here, read them there before comparing. Our `after` is
greedy accuracy on MATH-500.

The :smoke variant runs 2 GRPO steps on a tiny random Qwen2-family model, training on the
original-layout MATH fixtures and evaluating on the MATH-500 fixture (each its own data_dir),
in well under a minute on CPU.
"""

import ml_collections

from experiments.configs.recipe_common import FIXTURES, recipe_config, smoke

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = recipe_config(
        workdir="runs/math_qwen2_5_math_1_5b",
        task="math",
        # Malformed rows the build skips before it fails (rl_reason/tasks/bad_rows.py).
        task_params=dict(max_bad_fraction=0.01),
        model=dict(path="~/models/Qwen2.5-Math-1.5B"),
        prompt=dict(format="chat", system=SYSTEM),
        data=dict(manual_dir="~/data/prm800k/math_splits", eval_split="test", eval_size=500),
        grpo=dict(
            steps=1875,
            prompts_per_step=128,
            group_size=8,
            max_prompt_len=1024,
            max_new_tokens=3000,
            eval_every=16,
            eval_samples=1,
            eval_temperature=1.0,
            checkpoint_every=16,
            sampling=dict(
                temperature=1.0,
                top_p=1.0,
            ),
            loss=dict(
                advantage_estimator="dr_grpo",
                objective="ppo_clip",
                aggregation="seq-mean-token-sum-norm",
                kl_coef=0.0,
            ),
            optim=dict(
                learning_rate=1e-6,
                lr_schedule="constant",
                warmup_steps=0,
                inner_iterations=1,
                minibatches=8,
                microbatches=4,
            ),
        ),
    )
    if arg == "smoke":
        smoke(
            c,
            family="qwen2",
            data=dict(
                manual_dir=str(FIXTURES / "math" / "original"),
                eval_manual_dir=str(FIXTURES / "math" / "math500"),
                eval_data_dir="{workdir}/tfds_math500",
                eval_size=0,
            ),
        )
    elif arg:
        raise ValueError(f"unknown config arg {arg!r}; valid: '' or 'smoke'")
    c.lock()
    return c
