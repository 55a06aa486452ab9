"""The tool demo: GRPO with and without a Python tool on products a tiny model cannot compute
in its head (pipeline "tool_arithmetic", rl_reason/pipelines/tool_arithmetic.py).

Launch (each run one arm and one seed; the seed's base model is pretrained once, under
base_dir, and reused by both arms):
  python -m experiments.train --config=experiments/configs/tool_arithmetic.py:tool
  python -m experiments.train --config=experiments/configs/tool_arithmetic.py:no_tool
  python -m experiments.tool_arithmetic          # 3 seeds x both arms, aggregated
  python -m experiments.train --config=experiments/configs/tool_arithmetic.py:smoke

Args: "tool" or "no_tool" (the arm; default "tool"), "smoke" (the tool arm at toy sizes).
"""

import ml_collections

from experiments.configs.common import grpo_section, metrics_section


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arm = "tool" if arg in (None, "", "smoke") else arg
    if arm not in ("tool", "no_tool"):
        raise ValueError(f"unknown config arg {arg!r}; valid: 'tool', 'no_tool' or 'smoke'")
    c = ml_collections.ConfigDict()
    c.pipeline = "tool_arithmetic"
    c.workdir = f"runs/tool_arithmetic/{arm}_seed0"
    c.base_dir = "runs/tool_arithmetic/bases"  # experiments.tool_arithmetic's runs go here too
    c.seed = 0  # the base model's and the RL run's
    c.data_seed = 0  # the held-out and RL problems (the same for every seed)
    c.smoke = False
    c.task = ml_collections.ConfigDict(dict(a_digits=3, b_digits=2))
    c.data = ml_collections.ConfigDict(
        dict(corpus_size=20_000, frac_tool=0.25, eval_size=256, rl_pool_size=2048)
    )
    c.tokenizer = ml_collections.ConfigDict(dict(vocab_size=128, train_texts=5000))
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
    c.plugins = ()
    c.pretrain = ml_collections.ConfigDict(
        dict(
            steps=2000,
            batch_size=16,
            seq_len=128,
            learning_rate=3e-3,
            warmup_steps=50,
            weight_decay=0.01,
            max_grad_norm=1.0,
            seed=0,
        )
    )
    c.grpo = grpo_section(
        steps=30,
        prompts_per_step=16,
        group_size=8,
        max_prompt_len=48,
        max_new_tokens=64,
        eval_every=10,
        eval_samples=1,
        checkpoint_every=15,
        verifier_workers=2,
        sampling=dict(temperature=1.0),
        multi_turn=dict(
            env="python_tool" if arm == "tool" else "",
            max_turns=2,
            max_observation_tokens=24,
            tool_timeout_s=2.0,
            tool_max_output_chars=64,
        ),
        loss=dict(kl_coef=0.0),
        optim=dict(learning_rate=2e-4, warmup_steps=5, lr_schedule="constant"),
    )
    if arg == "smoke":
        c.smoke = True
        c.workdir = "runs/tool_arithmetic_smoke"
        c.base_dir = "runs/tool_arithmetic_smoke/bases"
        c.data.update(corpus_size=400, eval_size=8, rl_pool_size=64)
        c.tokenizer.train_texts = 400
        c.model.overrides.update(num_layers=2, embed_dim=64, head_dim=16, mlp_dim=128)
        c.pretrain.update(steps=20, batch_size=4, warmup_steps=2)
        c.grpo.update(
            steps=2,
            prompts_per_step=4,
            group_size=4,
            checkpoint_every=1,
            verifier_workers=1,
            reward=dict(overlong_buffer=16),
        )
    c.lock()
    return c
