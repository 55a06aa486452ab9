"""Every config file, every numeric option: a bad value fails when the config is read (within
seconds, before any data, model or compile), and the error names the field."""

import math
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import pytest

from experiments.configs import common
from rl_reason.pipelines import options

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    p.stem
    for p in (ROOT / "experiments" / "configs").glob("*.py")
    if p.stem not in ("__init__", "common", "recipe_common")
)
# A value no numeric option accepts, by type; the first one its rule rejects is used.
BAD = {int: (-1, 0, 10**12), float: (-1.0, math.nan, 1e12)}


def _load(name: str, arg: str | None = None):
    import importlib

    return importlib.import_module(f"experiments.configs.{name}").get_config(arg)


def _numeric_fields(section, prefix=""):
    for key, value in section.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from _numeric_fields(value, path + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield path, type(value)


def _set(config, path, value):
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    with config.unlocked():
        node[leaf] = value


@pytest.mark.parametrize("name", CONFIGS)
def test_every_numeric_option_has_a_bound_that_names_it(name):
    config = _load(name)
    options.check(config)  # the shipped config itself is fine
    unchecked, unnamed = [], []
    for path, kind in _numeric_fields(config):
        for bad in BAD[kind]:
            broken = _load(name)
            _set(broken, path, bad)
            try:
                options.check(broken)
            except options.OptionsError as e:
                leaf = path.split(".")[-1]
                if leaf not in str(e):
                    unnamed.append((path, bad, str(e)[:200]))
                break
        else:
            unchecked.append(path)
    assert not unnamed, unnamed
    assert not unchecked, f"{name}: no bad value of these options is caught: {unchecked}"


def test_errors_list_every_bad_field_at_once():
    config = _load("r1_zero_tiny")
    with config.unlocked():
        config.grpo.optim.learning_rate = -1.0
        config.grpo.max_new_tokens = 0
        config.pretrain.batch_size = 0
        config.data.frac_worked = 2.0
    with pytest.raises(options.OptionsError) as err:
        options.check(config)
    message = str(err.value)
    for field in ("optim.learning_rate", "max_new_tokens", "batch_size", "frac_worked"):
        assert field in message, message


def test_a_bad_option_fails_in_seconds_before_pretraining(tmp_path):
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.train",
            "--config=experiments/configs/r1_zero_tiny.py",  # stage 1 from the shipped base
            "--config.base=scratch",  # would pretrain first, for minutes
            "--config.grpo.loss.kl_coef=-0.1",
            f"--config.workdir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - start
    assert proc.returncode != 0
    assert "loss.kl_coef=-0.1 must be >= 0" in proc.stderr, proc.stderr[-2000:]
    assert "[stage 1]" not in proc.stdout
    assert took < 30, took  # the interpreter and jax import are most of it


def test_the_grpo_section_lists_every_option():
    from rl_reason.core.config import GRPOConfig, defaults

    section = common.grpo_section()

    def paths(tree, prefix=""):
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from paths(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    listed = set(paths(section.to_dict()))
    assert listed == set(paths(defaults(GRPOConfig)))
