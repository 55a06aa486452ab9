r"""MBPP zero-RL with the R1-Zero template: train on MBPP's train split, evaluate on its test split.

Not a published recipe: the settings are those of experiments/configs/humaneval_r1_zero.py (the
GSM8K recipe's optimiser values at 32 prompts per step), with MBPP's own split (train task_ids
601-974, test 11-510, as in Austin et al. 2021).

Launch (a local copy of a Hugging Face causal LM, default ~/models/Qwen2.5-0.5B, and MBPP's
mbpp.jsonl or the Hugging Face 'full' parquet files in ~/data/mbpp):
  python -m experiments.train --config=experiments/configs/mbpp_r1_zero.py \
      --config.model.path=/ckpt/Qwen2.5-Coder-1.5B --config.data.manual_dir=~/data/mbpp
  python -m experiments.train --config=experiments/configs/mbpp_r1_zero.py:smoke

Expected: accuracy before is the base model's pass@1 on MBPP test at greedy decoding; the run
shows whether RL on MBPP train moves it.

The :smoke variant runs 2 GRPO steps on a tiny random Qwen2-family model with the MBPP-layout
fixture in tests/fixtures/mbpp, in well under a minute on CPU.
"""

import ml_collections

from experiments.configs.humaneval_r1_zero import get_config as humaneval_config
from experiments.configs.recipe_common import FIXTURES, smoke


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = humaneval_config()
    c.unlock()
    c.workdir = "runs/mbpp_r1_zero"
    c.task.name = "mbpp"
    c.data.update(manual_dir="~/data/mbpp", train_split="train", eval_split="test", eval_size=0)
    c.grpo.max_prompt_len = 512
    if arg == "smoke":
        smoke(c, family="qwen2", data=dict(manual_dir=str(FIXTURES / "mbpp"), eval_size=2))
        c.grpo.max_prompt_len = 256
    elif arg:
        raise ValueError(f"unknown config arg {arg!r}; valid: '' or 'smoke'")
    c.lock()
    return c
