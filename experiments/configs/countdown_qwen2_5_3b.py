"""Countdown zero-RL from the Qwen2.5-3B base model, with TinyZero's settings (GRPO here).

Source: Pan et al. 2025, "TinyZero", github.com/Jiayi-Pan/TinyZero ([README]; [script]:
scripts/train_tiny_zero.sh, the command the README runs for "3B+ model"; [reward]:
verl/utils/reward_score/countdown.py; [data]: examples/data_preprocess/countdown.py).

Launch (a local copy of Qwen/Qwen2.5-3B, default ~/models/Qwen2.5-3B; the problems are
generated, nothing else to download):
  python -m experiments.train --config=experiments/configs/countdown_qwen2_5_3b.py \
      --config.model.path=/ckpt/Qwen2.5-3B
  python -m experiments.train --config=experiments/configs/countdown_qwen2_5_3b.py:smoke
  python -m experiments.evaluate --config=experiments/configs/countdown_qwen2_5_3b.py \
      --config.model.path=/ckpt/Qwen2.5-3B --checkpoint=latest --samples=8

Hyperparameters, each with its source:
  prompts_per_step 256                   [script] data.train_batch_size=256
  max_prompt_len 256, max_new_tokens 1024  [script] data.max_prompt_length=256,
                                         data.max_response_length=1024
  learning_rate 1e-6                     [script] actor_rollout_ref.actor.optim.lr=1e-6
  minibatches 2                          [script] ppo_mini_batch_size=128: 256 / 128 updates per
                                         step
  kl_coef 1e-3                           [script] algorithm.kl_ctrl.kl_coef=0.001 (TinyZero puts
                                         it in the reward, PPO-style; ours is k3 in the loss)
  format_reward 0.1                      [reward] format_score=0.1 for a well-formed wrong
                                         answer (ours adds 0.1 for the format on top of the
                                         0/1 outcome, so a correct formatted answer earns 1.1)
  task                                   3-4 numbers below 100, TinyZero's Countdown-Tasks-3to4
                                         setting, generated here (rl_reason/tasks/countdown.py)
  num_train 8001, num_test 2001          [data] default train_size / test_size
  steps 465                              [script] trainer.total_epochs=15: 15 x (8001 // 256)
  eval_every 100, checkpoint_every 100   [script] trainer.test_freq=100, trainer.save_freq=100
  Algorithm: TinyZero's main run is PPO with a critic (critic.optim.lr=1e-5, GAE, one sample
  per prompt: verl's rollout.n=1). This recipe runs GRPO instead, so the group size is not
  TinyZero's: group_size 8 as in SimpleRL-Zoo and Dr. GRPO. Prompt: the project's plain R1-Zero
  template around TinyZero's question (ours ends in "<think>" like TinyZero's "base" template,
  with shorter instructions). Not stated in the sources and left at this library's defaults:
  clipping (0.2; verl's default is also 0.2), warmup (0), Adam betas (0.9, 0.99), weight decay
  (0), gradient clipping (1.0), eval size (the first 1024 test problems, our choice).

Expected, quoted from [README]: no accuracy table; "Through RL, the 3B base LM develops
self-verification and search abilities all on its own", while "for Qwen2.5-0.5B base, we know
it fails to learn reasoning". Training curves are in their W&B log (wandb.ai/jiayipan/TinyZero).

The :smoke variant runs 2 GRPO steps on a tiny random Qwen2-family model with a few generated
problems, in well under a minute on CPU.
"""

import ml_collections

from experiments.configs.recipe_common import recipe_config, smoke


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = recipe_config(
        workdir="runs/countdown_qwen2_5_3b",
        task="countdown",
        task_params=dict(seed=0, num_train=8001, num_test=2001),
        model=dict(path="~/models/Qwen2.5-3B"),
        prompt=dict(format="r1_zero"),
        data=dict(eval_split="test", eval_size=1024),
        grpo=dict(
            steps=465,
            prompts_per_step=256,
            group_size=8,
            max_prompt_len=256,
            max_new_tokens=1024,
            eval_every=100,
            eval_samples=4,
            eval_temperature=1.0,
            checkpoint_every=100,
            sampling=dict(temperature=1.0),
            loss=dict(
                advantage_estimator="grpo",
                objective="ppo_clip",
                aggregation="token-mean",
                kl_coef=1e-3,
                kl_estimator="k3",
            ),
            optim=dict(
                learning_rate=1e-6,
                lr_schedule="constant",
                warmup_steps=0,
                inner_iterations=1,
                minibatches=2,
                microbatches=8,
            ),
            reward=dict(format_reward=0.1),
        ),
    )
    if arg == "smoke":
        c.task.params.update(num_train=64, num_test=16)
        smoke(c, family="qwen2", data=dict(eval_size=8))
    elif arg:
        raise ValueError(f"unknown config arg {arg!r}; valid: '' or 'smoke'")
    c.lock()
    return c
