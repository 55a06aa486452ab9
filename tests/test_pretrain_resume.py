"""Stage 1 survives a kill: pretraining checkpoints as it goes and a rerun continues from the
newest checkpoint, giving the straight run's parameters and losses bit for bit (the research
sweeps' base models take over an hour at 3M parameters on two CPU cores)."""

import jax
import numpy as np
import pytest

from experiments.configs import research
from rl_reason.infra import sharding
from rl_reason.pipelines import r1_zero
from rl_reason.pipelines.base_model import train_base
from rl_reason.pipelines.research import base_cache


class Killed(Exception):
    """Stands for a SIGKILL: the run ends at once, with no save of its own."""


@pytest.fixture(scope="module")
def setting():
    config = research.get_config("smoke")
    with config.unlocked():
        # Few texts, so the 20 steps of 4 rows go through the packed corpus several times and
        # the resumed runs must restore the data order and the generator that reshuffles it.
        config.data.corpus_size = 40
    corpus = r1_zero.build_data(config)["corpus"]
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
    return config, corpus, mesh


def _leaves(params):
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def _assert_same(a, b):
    (tok_a, _, params_a, facts_a), (tok_b, _, params_b, facts_b) = a, b
    assert tok_a.vocab_size == tok_b.vocab_size
    for x, y in zip(_leaves(params_a), _leaves(params_b), strict=True):
        np.testing.assert_array_equal(x, y)
    for key in ("pretrain_final_loss", "pretrain_loss_last_tenth", "pretrain_loss_prev_tenth"):
        assert facts_a[key] == facts_b[key], key


def test_killed_and_preempted_pretraining_continue_bit_for_bit(setting, tmp_path):
    config, corpus, mesh = setting
    steps = config.pretrain.steps
    straight = train_base(config, corpus, mesh, tmp_path / "straight", print)
    assert straight is not None and "pretrain_resumed_from" not in straight[3]

    # Killed at step 13 before its save: the last periodic checkpoint (every steps // 20 = 1
    # step here), step 12's, is where the rerun starts.
    run_dir, ckpt = tmp_path / "run", tmp_path / "run" / "ckpt"

    def kill_at_13(step):
        if step == 13:
            raise Killed
        return False

    with pytest.raises(Killed):
        train_base(config, corpus, mesh, run_dir, print, kill_at_13, checkpoint_dir=ckpt)
    # Preempted at step 17 of the rerun: it saves and stops, and the third run finishes.
    stopped = train_base(
        config, corpus, mesh, run_dir, print, lambda s: s == 17, checkpoint_dir=ckpt
    )
    assert stopped is None
    resumed = train_base(config, corpus, mesh, run_dir, print, checkpoint_dir=ckpt)
    assert resumed[3]["pretrain_resumed_from"] == 17
    assert resumed[3]["pretrain_steps"] == steps
    _assert_same(resumed, straight)


def test_the_base_cache_keeps_a_stopped_run_and_continues_it(setting, tmp_path):
    config, corpus, mesh = setting
    key = base_cache.stage1_key(config)
    straight = base_cache.load_or_train(config, lambda: corpus, mesh, tmp_path / "a", print)
    assert straight[3]["cache_hit"] is False

    cache = tmp_path / "b"
    stopped = base_cache.load_or_train(
        config, lambda: corpus, mesh, cache, print, should_stop=lambda s: s == 9
    )
    assert stopped is None and not (cache / key).exists()
    assert (cache / f".{key}.partial" / "checkpoints").is_dir()  # kept for the rerun
    resumed = base_cache.load_or_train(config, lambda: corpus, mesh, cache, print)
    assert resumed[3]["pretrain_resumed_from"] == 9 and resumed[3]["cache_hit"] is False
    _assert_same(resumed, straight)
    # The entry holds the model, not the checkpoints it was made through.
    assert sorted(p.name for p in (cache / key).iterdir()) == [
        "params.npz",
        "stage1.json",
        "tokenizer.model",
    ]
    again = base_cache.load_or_train(config, lambda: corpus, mesh, cache, print)
    assert again[3]["cache_hit"] is True
    _assert_same(again, straight)
