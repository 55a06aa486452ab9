"""The Python tool in Qwen2.5's tool-call format: calls parsed from the policy's JSON, answers
written by the tokenizer's own chat template (checked against transformers'), and the recipe's
smoke config run end to end on a tiny random Qwen2 with the tool-call tokens."""

import json

import pytest

from experiments.configs import tool_countdown_qwen2_5
from rl_reason.infra.tokenizer import load_tokenizer
from rl_reason.pipelines import chat_task, recipe, tiny_model
from rl_reason.rollout import multi_turn
from rl_reason.rollout.envs import chat_tool
from rl_reason.rollout.envs.python_tool import PythonTool

CALL = '<tool_call>\n{"name": "python", "arguments": {"code": "%s"}}\n</tool_call>'
TEXTS = ["Using the numbers [3, 5], create an equation that equals 8.", CALL % "print(3 + 5)"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "qwen2"
    return tiny_model.build_tiny_model(path, "qwen2", TEXTS * 20, tool_tokens=True)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_tokenizer(tiny_dir)


@pytest.mark.parametrize(
    "turn, code, problem",
    [
        ("Let me check. " + CALL % "print(1)", "print(1)", ""),
        ("no call at all", None, "no tool call"),
        ('{"name": "python"}</tool_call>', None, "no <tool_call>"),
        ("<tool_call>{not json}</tool_call>", None, "not JSON"),
        ('<tool_call>{"name": "bash", "arguments": {"code": "ls"}}</tool_call>', None, "must be"),
        ('<tool_call>{"name": "python", "arguments": {"code": 1}}</tool_call>', None, "string"),
    ],
)
def test_tool_calls_are_parsed_or_said_what_is_wrong(turn, code, problem):
    got, why = chat_tool.parse_call(turn)
    assert got == code and problem in why


def test_the_tool_call_tokens_are_single_tokens(tok):
    for piece in tiny_model.TOOL_TOKENS:
        assert tok.encode(piece) == [tok.piece_to_id(piece)]
    assert multi_turn.stop_marker_id(tok, chat_tool.CLOSE) == tok.piece_to_id("</tool_call>")


def test_prompt_and_tool_response_are_what_transformers_renders(tok, tiny_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    task = chat_task.ChatTask(None, tok, "You are terse.", "", chat_tool.TOOLS)
    messages = task.messages(TEXTS[0])
    want = ref.apply_chat_template(
        messages, tools=list(chat_tool.TOOLS), tokenize=False, add_generation_prompt=True
    )
    assert task.prompt({"question": TEXTS[0]}) == want
    assert "<tools>" in want and json.dumps(chat_tool.TOOLS[0]) in want
    # The observation: the template's text between an assistant turn and the next reply.
    turn = CALL % "print(8)"
    convo = [*messages, {"role": "assistant", "content": turn}, {"role": "tool", "content": "8"}]
    full = ref.apply_chat_template(
        convo, tools=list(chat_tool.TOOLS), tokenize=False, add_generation_prompt=True
    )
    head = want + turn
    assert full.startswith(head)
    assert chat_tool.response_text(tok, "8") == full[len(head) :]
    assert full[len(head) :].startswith("<|im_end|>\n<|im_start|>user\n<tool_response>\n8\n")


def test_chat_episode_runs_code_with_state_and_answers_in_the_template(tok):
    env = chat_tool.ChatPythonTool(tok, PythonTool(timeout_s=2.0, max_turns=3))
    ep = env.episode({})
    first = ep.respond(CALL % "x = 6 * 7")
    second = ep.respond(CALL % "print(x)")
    bad = ep.respond("<tool_call>{oops</tool_call>")
    assert (first.reason, second.reason, bad.reason) == ("ok", "ok", "malformed")
    assert second.text == chat_tool.response_text(tok, "42")
    assert "not JSON" in bad.text and not any(o.done for o in (first, second, bad))
    assert ep.respond("The answer is <answer>42</answer>").reason == "answered"


@pytest.mark.slow
def test_tool_recipe_smoke_calls_the_tool_and_trains(tmp_path):
    config = tool_countdown_qwen2_5.get_config("smoke")
    with config.unlocked():
        config.workdir = str(tmp_path)
    summary = recipe.run(config)
    assert summary["rl_steps"] == 2 and summary["rl_param_change_l2"] > 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "mt_tool_calls_mean" in r]
    assert len(steps) == 2
    # The random policy closes tool calls (its </tool_call> row is as strong as eos), every one
    # answered through the template, and none stops the run.
    assert sum(r["mt_tool_calls_mean"] for r in steps) > 0
    assert all(r["mt_observation_tokens_mean"] > 0 for r in steps if r["mt_tool_calls_mean"])
    assert "tool_call_rate" in summary["after"]
