"""R1-Zero in miniature: the default experiment (stage 1 pretraining, stage 2 GRPO).

Launch:
  python -m experiments.r1_zero_tiny                      # defaults below
  python -m experiments.train --config=experiments/configs/r1_zero_tiny.py
  python -m experiments.train --config=experiments/configs/r1_zero_tiny.py:smoke   # < 1 min
  ... --config.grpo.loss.kl_coef=0.01 --config.workdir=/tmp/run2                       # ablations

Expected on a 2-core CPU (see README for the measured figures): a tiny base model that rarely
writes its steps and answers few held-out chains correctly; after GRPO on the outcome reward
only, it writes its steps before answering and held-out greedy accuracy rises by tens of points.
"""

import ml_collections

from experiments.configs.common import grpo_section, metrics_section


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.pipeline = "r1_zero"
    c.workdir = "runs/r1_zero_tiny"
    c.seed = 0
    c.smoke = False
    # "shipped": the base model committed in models/bases/ (stage 1 already done); "scratch":
    # pretrain it first (python -m experiments.pretrain_base rebuilds the shipped one); or the
    # path of a directory written by experiments.pretrain_base.
    c.base = "shipped"

    c.task = ml_collections.ConfigDict(
        dict(min_ops=2, max_ops=4, max_value=19, ops="+-", max_factor=3)
    )
    c.data = ml_collections.ConfigDict(
        dict(
            corpus_size=40_000,  # pretraining texts
            # The base model learns arithmetic from worked texts in other layouts, but inside the RL
            # prompt template it has mostly seen bare answers.
            frac_worked=0.5,  # share of corpus texts that show their steps
            frac_template=0.7,  # share of bare-answer texts written in the RL prompt template
            frac_template_worked=0.15,  # share of worked texts written in the template
            eval_size=256,  # held-out problems for before/after evaluation
            rl_pool_size=2048,  # RL training problems (none in the corpus)
        )
    )
    c.tokenizer = ml_collections.ConfigDict(dict(vocab_size=256, train_texts=5000))
    c.model = ml_collections.ConfigDict(
        dict(
            preset="tiny",
            overrides=ml_collections.ConfigDict(
                dict(
                    num_layers=4,
                    embed_dim=128,
                    num_heads=4,
                    num_kv_heads=4,
                    head_dim=32,
                    mlp_dim=384,
                    max_seq_len=256,
                )
            ),
        )
    )
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.metrics = metrics_section()
    # Modules imported before the run (and by the verifier workers) that register estimators,
    # objectives, verifiers or tasks (rl_reason/plugins.py).
    c.plugins = ()
    c.pretrain = ml_collections.ConfigDict(
        dict(
            steps=2000,
            batch_size=16,
            seq_len=256,
            learning_rate=3e-3,
            warmup_steps=50,
            weight_decay=0.01,
            max_grad_norm=1.0,
            seed=0,
        )
    )
    c.grpo = grpo_section(
        **dict(
            steps=30,
            prompts_per_step=16,
            group_size=8,
            max_prompt_len=80,
            max_new_tokens=96,
            off_policy_steps=0,  # 1: sample step k+1 while step k trains
            eval_every=0,
            eval_samples=4,
            checkpoint_every=15,
            checkpoint_keep=2,
            verifier_workers=2,
            verifier_timeout_s=10.0,
            seed=0,
            sampling=dict(temperature=1.0),
            loss=dict(
                advantage_estimator="grpo",
                objective="ppo_clip",
                aggregation="token-mean",
                kl_coef=0.0,
                clip_eps_low=0.2,
                clip_eps_high=0.2,
            ),
            optim=dict(
                learning_rate=2e-4,
                warmup_steps=5,
                lr_schedule="constant",
                max_grad_norm=1.0,
                inner_iterations=1,
                minibatches=1,
                microbatches=1,
            ),
            # PPO's critic, used with loss.advantage_estimator="gae": a copy of the policy's
            # trunk learning faster than the policy (its head starts at zero).
            critic=dict(learning_rate=1e-3, warmup_steps=5),
        )
    )

    if arg == "smoke":
        c.smoke = True
        # Stage 1 from scratch on a tiny model: the smoke run exercises the whole pipeline.
        c.base = "scratch"
        c.workdir = "runs/r1_zero_tiny_smoke"
        c.data.update(corpus_size=2000, eval_size=16, rl_pool_size=256)
        c.tokenizer.train_texts = 2000
        c.model.overrides.update(num_layers=2, embed_dim=64, head_dim=16, mlp_dim=128)
        c.pretrain.update(steps=20, batch_size=4, warmup_steps=2)
        # The soft overlong penalty makes rewards vary even for an untrained model, so the
        # smoke run exercises real (non-zero) updates.
        c.grpo.update(
            steps=3,
            prompts_per_step=4,
            group_size=4,
            max_new_tokens=32,
            eval_samples=2,
            checkpoint_every=2,
            verifier_workers=1,
            reward=dict(overlong_buffer=16),
        )
    elif arg:
        raise ValueError(f"unknown config arg {arg!r}; valid: '' or 'smoke'")

    c.lock()
    return c
