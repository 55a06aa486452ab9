"""The tool demo's task and pipeline: problems and corpus as stated, and both arms of one seed
end to end at toy sizes (the aggregate the README's figures come from)."""

import json

import pytest

from experiments.configs import tool_arithmetic as configs
from rl_reason import verifiers
from rl_reason.pipelines import tool_arithmetic
from rl_reason.rollout.envs.python_tool import PythonTool, code_of
from rl_reason.tasks import tool_arithmetic as ta

TASK = ta.ToolArithmeticTask()


def test_problems_are_distinct_disjoint_and_deterministic():
    held = TASK.eval_set(0, 200)
    assert held == TASK.eval_set(0, 200)
    keys = {TASK.key(p) for p in held}
    assert len(keys) == 200
    pool = TASK.eval_set(1, 300, exclude_keys=keys)
    assert not keys & {TASK.key(p) for p in pool}
    for p in held:
        assert 100 <= p["a"] <= 999 and 10 <= p["b"] <= 99 and int(p["answer"]) == p["a"] * p["b"]


def test_corpus_shows_tool_calls_that_the_tool_answers_alike():
    corpus = TASK.pretraining_corpus(0, 400, frac_tool=0.25)
    with_tool = [t for t in corpus if "<code>" in t]
    assert 0.15 < len(with_tool) / len(corpus) < 0.35
    ex = TASK.eval_set(5, 1)[0]
    text = TASK.prompt(ex) + ta.tool_completion(ex)
    assert ta.calls_tool(ta.tool_completion(ex)) and not ta.calls_tool("\n</think>\n<answer>1")
    # The corpus's output block is the one the tool writes for the corpus's call.
    turn = text[: text.index("</code>") + len("</code>")]
    obs = PythonTool().episode(ex).respond(turn)
    assert obs.reason == "ok" and text[len(turn) :].startswith(obs.text.rstrip("\n"))
    assert code_of(turn) == f"print({ex['a']} * {ex['b']})"
    assert verifiers.get(TASK.verifier_name)(ta.tool_completion(ex), ex).correct


def test_frac_tool_is_checked():
    with pytest.raises(ValueError, match="frac_tool"):
        TASK.pretraining_corpus(0, 10, frac_tool=1.5)


@pytest.mark.slow
def test_both_arms_of_one_seed_run_and_aggregate(tmp_path):
    def smoke(arm):
        config = configs.get_config("smoke")
        with config.unlocked():
            config.grpo.multi_turn.env = "python_tool" if arm == "tool" else ""
        return config

    summary = tool_arithmetic.run_arms(smoke, [0], tmp_path / "out", runs_dir=tmp_path / "runs")
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0
    for arm in ("tool", "no_tool"):
        got = summary["arms"][arm]
        assert got["seeds"] == [0] and got["per_seed"]["0"]["arm"] == arm
        for when in ("before", "after"):
            assert set(got[when]) >= {"accuracy", "tool_call_rate", "mean_response_tokens"}
            assert got[when]["accuracy"]["n"] == 1
        curve = got["curves"]["0"]  # per-step curves from metrics.jsonl
        assert curve["accuracy"]["step"] == [1, 2] and len(curve["accuracy"]["value"]) == 2
        # The evaluation before RL is step 0 of the held-out curves.
        assert curve["eval_accuracy"]["step"] == [0]
        assert curve["eval_accuracy"]["value"] == [got["per_seed"]["0"]["before"]["accuracy"]]
        delta = got["after_minus_before"]["accuracy"]["mean"]
        assert delta == got["after"]["accuracy"]["mean"] - got["before"]["accuracy"]["mean"]
    # One base per seed, pretrained once and read back by the second arm.
    assert (tmp_path / "runs" / "bases" / "seed0" / "base_info.json").is_file()
    assert "per_seed" in summary["accuracy_after_tool_minus_no_tool"]
