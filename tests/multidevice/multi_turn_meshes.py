"""Multi-turn rollouts on one mesh: the engine's waiting slots and observations, sharded.

`run(mesh)` samples the tiny random model with a turn-end token it draws often and the test
environment of tests/test_multi_turn.py (`observation`), with a slot per sample and with 8
refilled slots. `compute` (the shared 8-device process, tests/multidevice/runner.py) runs it
on 2x2x2, whose 4 batch shards each wait for and resume their own slots;
tests/test_multi_turn.py runs it on one device with a slot per sample only (that one-device
refilled slots give the same rollout is tests/test_multi_turn.py's cache-continuation test).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from models import get_config
from rl_reason.infra import sharding
from rl_reason.rollout import engine
from rl_reason.rollout.sampling import SamplingConfig
from tests.multidevice.partial_meshes import make_mesh

TURN, STOP = 7, 2
CONFIG = SamplingConfig(stop_token_ids=(STOP,), logit_bias=((STOP, 1.0), (TURN, 2.5)))
SLOTS = (0, 8)


def run(mesh, slot_counts=SLOTS) -> dict[str, np.ndarray]:
    """Per slot count S of `slot_counts`: `tokens/S`, `lengths/S`, `logprobs/S` (policy),
    `calls/S` (per row)."""
    from tests.test_multi_turn import Host

    graphdef, params = sharding.create_model(get_config("tiny"), mesh, seed=0)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 200, size=int(k))) for k in (3, 5, 7, 4)]
    out = {}
    for slots in slot_counts:
        host = Host(stop_ids=(TURN,))
        got = engine.sample(
            (graphdef, params),
            prompts,
            jax.random.key(3),
            group_size=4,
            max_new_tokens=120,
            config=CONFIG,
            buffer_len=128,
            prompt_width=16,
            mesh=mesh,
            engine=engine.EngineConfig(slots=slots),
            turns=host,
            stream_steps=8,
        )
        s = jax.tree.map(np.asarray, got.sample)
        out[f"tokens/{slots}"], out[f"lengths/{slots}"] = s.tokens, s.lengths
        out[f"logprobs/{slots}"] = s.policy_logprobs
        out[f"calls/{slots}"] = np.asarray([host.calls[r] for r in range(len(s.lengths))])
    return out


def compute(name: str, out_dir: str) -> None:
    np.savez(os.path.join(out_dir, f"{name}.npz"), **run(make_mesh(name)))
