"""RL step time of the tiny experiment with the real verifier vs a no-op verifier.

    python -m benchmarks.rl_step [--json=PATH] [--steps=6] [--workers=2]

Both runs use the same policy (the r1_zero_tiny model shape, randomly initialised, so every
completion runs to its budget: the worst case for verification volume), the same prompts and
the same keys; only the verifier named in the examples differs. The ratio is the cost of
verification that the overlap with device work does not hide (goal: <= 1.1).
"""

from __future__ import annotations

import statistics

from absl import app, flags

from benchmarks import common, noop_verifier  # noqa: F401  (registers "noop" here too)
from experiments.configs import r1_zero_tiny
from rl_reason import data as data_lib
from rl_reason import grpo_run, r1_zero, sharding, verifiers
from rl_reason.tasks.templates import SPECIAL_TOKENS
from rl_reason.tokenizer import train_sentencepiece
from rl_reason.trainer import GRPOTrainer

_JSON = flags.DEFINE_string("json", None, "Write the results to this JSON file.")
_STEPS = flags.DEFINE_integer("steps", 6, "Timed RL steps per verifier (after one warm-up).")
_WORKERS = flags.DEFINE_integer("workers", 2, "Verifier pool worker processes.")


def _run(config, data, tokenizer, verifier: str, pool) -> list[float]:
    from models import get_config as model_preset

    grpo = grpo_run.config_from(r1_zero.GRPOConfig, config.grpo)
    model_cfg = model_preset(
        config.model.preset, vocab_size=tokenizer.vocab_size, **dict(config.model.overrides)
    )
    graphdef, params = sharding.create_model(model_cfg, sharding.make_mesh(), seed=0)
    pool_examples = [dict(p, verifier=verifier) for p in data["rl_pool"]]
    trainer = GRPOTrainer(
        grpo,
        graphdef=graphdef,
        params=params,
        tokenizer=tokenizer,
        task=data["task"],
        train_batches=data_lib.train_iterator(
            pool_examples, global_batch_size=grpo.prompts_per_step, seed=0
        ),
        pool=pool,
        stop_token_ids=(tokenizer.eos_id,),
    )
    trainer.step()  # compile
    return [trainer.step()["time_step"] for _ in range(_STEPS.value)]


def main(argv):
    del argv
    config = r1_zero_tiny.get_config()
    data = r1_zero.build_data(config)
    tokenizer = train_sentencepiece(
        data["corpus"][:2000],
        "/tmp/rl_step_bench_tok.model",
        vocab_size=config.tokenizer.vocab_size,
        user_defined_symbols=SPECIAL_TOKENS,
    )
    with verifiers.VerifierPool(_WORKERS.value, imports=["benchmarks.noop_verifier"]) as pool:
        times = {name: _run(config, data, tokenizer, name, pool) for name in ("noop", "arithmetic")}
    med = {k: statistics.median(v) for k, v in times.items()}
    record = {
        "step_seconds_noop": med["noop"],
        "step_seconds_real": med["arithmetic"],
        "ratio": med["arithmetic"] / med["noop"],
        "steps": _STEPS.value,
        "workers": _WORKERS.value,
        "rows_per_step": config.grpo.prompts_per_step * config.grpo.group_size,
        "max_new_tokens": config.grpo.max_new_tokens,
        "all_step_seconds": times,
        "environment": common.environment(),
    }
    common.print_table(
        [
            ["noop", f"{med['noop']:.3f}"],
            ["arithmetic", f"{med['arithmetic']:.3f}"],
            ["ratio", f"{record['ratio']:.3f}"],
        ],
        ["verifier", "median step s"],
    )
    if _JSON.value:
        common.write_json(_JSON.value, record)


if __name__ == "__main__":
    app.run(main)
