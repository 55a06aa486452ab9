"""Countdown with a Python tool: Qwen2.5-1.5B-Instruct calls a sandboxed interpreter in its own
tool-call format and is trained on the outcome only (multi-turn GRPO).

Launch (a local copy of Qwen/Qwen2.5-1.5B-Instruct, default ~/models/Qwen2.5-1.5B-Instruct;
the problems are generated):
  python -m experiments.train --config=experiments/configs/tool_countdown_qwen2_5.py \
      --config.model.path=/ckpt/Qwen2.5-1.5B-Instruct
  python -m experiments.train --config=experiments/configs/tool_countdown_qwen2_5.py:smoke

The policy writes `<tool_call>{"name": "python", "arguments": {"code": ...}}</tool_call>`;
decoding stops there, the code runs in the verifiers' bubblewrap sandbox (earlier calls of
the trajectory re-run first), and the output comes back as the chat template renders a
"tool" message (Qwen2.5: a user turn with `<tool_response>`), appended through the KV cache
and masked out of the loss (rl_reason/rollout/multi_turn.py, envs/chat_tool.py). The
verifier checks the final turn's `<answer>`. The prompt announces the tool through the
template's `tools` argument, as a chat deployment would.

These settings are this library's choices for a first tool-integrated run, not a published
recipe's: the countdown task and GRPO settings of countdown_qwen2_5_3b.py (TinyZero's),
an instruct model (its template and tool-call training are what the format relies on), a
budget of 1,024 tokens for the whole trajectory (observations included), at most 4 calls of
5 s each. No result of this config is reported yet.

The :smoke variant runs 2 GRPO steps on a tiny random Qwen2-family model whose tokenizer has
Qwen's tool-call tokens, in well under a minute on CPU.
"""

import ml_collections

from experiments.configs.recipe_common import recipe_config, smoke

SUFFIX = (
    " You may run Python with the python tool. Give the final expression between <answer> "
    "and </answer>."
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = recipe_config(
        workdir="runs/tool_countdown_qwen2_5",
        task="countdown",
        task_params=dict(seed=0, num_train=8001, num_test=2001),
        model=dict(path="~/models/Qwen2.5-1.5B-Instruct"),
        prompt=dict(format="chat", system="You are a helpful assistant.", suffix=SUFFIX),
        data=dict(eval_split="test", eval_size=1024),
        grpo=dict(
            steps=465,
            prompts_per_step=256,
            group_size=8,
            max_prompt_len=512,
            max_new_tokens=1024,
            eval_every=100,
            eval_samples=4,
            checkpoint_every=100,
            multi_turn=dict(
                env="python_tool_chat",
                max_turns=4,
                max_observation_tokens=256,
                tool_timeout_s=5.0,
                tool_max_output_chars=1024,
            ),
            loss=dict(kl_coef=1e-3),
            optim=dict(
                learning_rate=1e-6,
                lr_schedule="constant",
                minibatches=2,
                microbatches=8,
            ),
        ),
    )
    if arg == "smoke":
        c.task.params.update(num_train=64, num_test=16)
        smoke(c, family="qwen2", data=dict(eval_size=8))
        c.grpo.update(max_prompt_len=576, max_new_tokens=48)
        c.grpo.multi_turn.update(max_observation_tokens=64, tool_timeout_s=2.0)
        c.grpo.reward.update(overlong_buffer=40)
    elif arg:
        raise ValueError(f"unknown config arg {arg!r}; valid: '' or 'smoke'")
    c.lock()
    return c
