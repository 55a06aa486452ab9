"""Stage 1 of the default experiment alone: the base model shipped in models/bases/.

Launch:
  python -m experiments.pretrain_base         # rebuilds models/bases/arithmetic_chains_tiny
  python -m experiments.pretrain_base --config=experiments/configs/pretrain_base.py:smoke

Every section but `out_dir` is the default experiment's (experiments/configs/r1_zero_tiny.py):
its task, splits, corpus, tokenizer, model and pretraining settings, and its evaluation budget
for the held-out greedy figures written beside the weights. Expected on a 2-core CPU: about
15 minutes; the README in the output directory gives the figures.
"""

import ml_collections

from experiments.configs import r1_zero_tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = r1_zero_tiny.get_config(arg)
    c.unlock()
    c.pipeline = "pretrain_base"
    del c.base
    c.out_dir = (
        "models/bases/arithmetic_chains_tiny" if not arg else "runs/pretrain_base_smoke/base"
    )
    c.lock()
    return c
