"""Two GRPO steps of a tiny model, in one process or several (jax.distributed on localhost).

    python -m tests.multidevice.grpo_processes OUT.npz --process_id=I --num_processes=N --port=P

Every process holds XLA_FLAGS' fake CPU devices; the mesh (--mesh, default data x fsdp x
tensor = 2 x 2 x 2) spans all of them. Each process feeds its slice of the same global batches
and verifies only its own completions. Process 0 writes the per-step metrics and the final
params (gathered whole).
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from rl_reason.infra import sharding

# The loss options of each --algorithm: GRPO with a KL term, and REINFORCE++-baseline (its KL
# folded into per-token returns normalised over the global batch) with dual-clip PPO.
LOSSES = {
    "grpo": dict(kl_coef=0.05),
    "reinforce_pp": dict(
        advantage_estimator="reinforce_pp_baseline", reward_kl_coef=0.05, objective="dual_clip"
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--process_id", type=int, default=0)
    ap.add_argument("--num_processes", type=int, default=1)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--mesh", default="2,2,2", help="data,fsdp,tensor")
    ap.add_argument("--algorithm", default="grpo", choices=sorted(LOSSES))
    args = ap.parse_args()
    if args.num_processes > 1:
        sharding.initialize_distributed(
            f"127.0.0.1:{args.port}", args.num_processes, args.process_id
        )
    # Imported after the runtime is up: nothing may touch the devices before.
    from jax.experimental import multihost_utils

    from models import get_config
    from rl_reason import verifiers
    from rl_reason.infra.tokenizer import train_sentencepiece
    from rl_reason.tasks import arithmetic
    from rl_reason.tasks.templates import SPECIAL_TOKENS
    from rl_reason.trainer import GRPOConfig, GRPOTrainer

    task = arithmetic.ArithmeticTask(arithmetic.ArithmeticConfig(max_value=9, max_ops=3))
    corpus = task.pretraining_corpus(0, 600, frac_worked=0.5)
    # Every process trains the same tokenizer (training is deterministic) into its own file.
    tokenizer = train_sentencepiece(
        corpus,
        f"{args.out}.{args.process_id}.spm",
        vocab_size=128,
        user_defined_symbols=SPECIAL_TOKENS,
    )
    data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    mesh = sharding.make_mesh(sharding.MeshConfig(data, fsdp, tensor))
    model_cfg = get_config("tiny").replace(vocab_size=128, max_seq_len=128)
    graphdef, params = sharding.create_model(model_cfg, mesh, seed=0)

    P, G = 8, 4
    cfg = GRPOConfig(
        steps=2,
        prompts_per_step=P,
        group_size=G,
        max_prompt_len=64,
        max_new_tokens=16,
        eval_samples=2,
        verifier_workers=1,
        loss=LOSSES[args.algorithm],
        optim=dict(
            learning_rate=1e-3,
            minibatches=2,
            microbatches=2,
        ),
        reward=dict(overlong_buffer=12),
    )
    n, h = jax.process_count(), jax.process_index()
    local = P // n

    def batches():
        for batch in task.train_iterator(1, P):
            yield batch[h * local : (h + 1) * local]

    # Many stop tokens so completion lengths (and so the overlong penalty) vary within groups.
    stops = tuple(range(5, 128, 9))
    with verifiers.VerifierPool(1, timeout_s=30.0) as pool:
        trainer = GRPOTrainer(
            cfg,
            graphdef=graphdef,
            params=params,
            tokenizer=tokenizer,
            task=task,
            train_batches=batches(),
            eval_examples=task.eval_set(2, 12),
            pool=pool,
            stop_token_ids=stops,
            mesh=mesh,
        )
        history = trainer.train()
        evaluation = trainer.evaluate()
    full = multihost_utils.process_allgather(trainer.params, tiled=True)
    if h == 0:
        leaves = jax.tree_util.tree_flatten_with_path(full)[0]
        arrays = {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}
        timeless = [
            {k: v for k, v in m.items() if not k.startswith(("time_", "generated"))}
            for m in history
        ]
        np.savez(
            args.out,
            metrics=json.dumps(timeless),
            evaluation=json.dumps(evaluation),
            **arrays,
        )
    print("done", h, flush=True)


if __name__ == "__main__":
    main()
