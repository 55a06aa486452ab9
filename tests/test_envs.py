"""The environments of multi-turn rollouts (rl_reason/rollout/envs/): the protocol on fixed turns.

The Python tool runs in the real sandbox (bubblewrap): state persists across a trajectory's
calls, and every fault (exception, timeout, signal, output flood) comes back as an observation
with its reason while the trajectory goes on; the turn cap ends it.
"""

import pytest

from rl_reason.rollout.envs.base import Observation, run_turns
from rl_reason.rollout.envs.guess_number import GuessNumber
from rl_reason.rollout.envs.python_tool import PythonTool, code_of


def test_guess_number_hints_until_solved():
    obs = run_turns(
        GuessNumber(), {"secret": 7}, ["<guess>3</guess>", "<guess>9</guess>", "<guess>7</guess>"]
    )
    assert obs == [
        Observation("<hint>higher</hint>"),
        Observation("<hint>lower</hint>"),
        Observation(done=True, reason="solved"),
    ]
    # Prose without a guess is the final answer; the cap ends a trajectory that keeps asking.
    assert run_turns(GuessNumber(), {"secret": 1}, ["I give up."])[0].reason == "answered"
    capped = run_turns(GuessNumber(max_turns=2), {"secret": 5}, ["<guess>1</guess>"] * 5)
    assert [o.reason for o in capped] == ["ok", "ok", "turn_limit"] and capped[-1].done
    with pytest.raises(ValueError, match="secret"):
        GuessNumber().episode({"secret": "7"})


def test_code_of_takes_the_last_block_of_a_turn_that_ends_in_it():
    assert code_of("think <code>a</code> more <code>\nb = 1\n</code>") == "b = 1"
    assert code_of("<code>x</code> and then prose") is None
    assert code_of("no code at all") is None


def test_python_state_persists_and_faults_continue_the_trajectory():
    tool = PythonTool(timeout_s=2, max_output_chars=40, max_turns=8)
    turns = [
        "Let me compute. <code>x = 6 * 7</code>",
        "<code>print(x)</code>",
        "<code>print(y)</code>",  # an exception: its last line is the output
        "<code>while True: pass</code>",  # timeout: not re-run by later calls
        "<code>print(x + 1)</code>",
        "<code>print('a' * 1000)</code>",  # flood: truncated
        "<code>import os; os.kill(os.getpid(), 9)</code>",  # crash
        "The answer is 42.",
    ]
    obs = run_turns(tool, {}, turns)
    assert [o.reason for o in obs] == [
        "ok", "ok", "error", "timeout", "ok", "truncated", "crash", "answered",
    ]  # fmt: skip
    assert "42" in obs[1].text and "NameError" in obs[2].text and "timed out" in obs[3].text
    assert "43" in obs[4].text  # x survived the error and the timeout
    assert "a" * 40 in obs[5].text and "a" * 41 not in obs[5].text
    assert "signal 9" in obs[6].text and obs[-1].done and not any(o.done for o in obs[:-1])
    for o in obs[:-1]:
        assert o.text.startswith("\n<output>\n") and o.text.endswith("\n</output>\n")


def test_python_tool_turn_cap_and_bad_limits():
    capped = run_turns(PythonTool(max_turns=1), {}, ["<code>1</code>", "<code>2</code>"])
    assert [o.reason for o in capped] == ["ok", "turn_limit"]
    # A stray end marker runs nothing and says so; the trajectory goes on.
    (bad,) = run_turns(PythonTool(), {}, ["x = 1 </code>"])
    assert bad.reason == "malformed" and not bad.done and "no <code>" in bad.text
    with pytest.raises(ValueError, match="timeout_s"):
        PythonTool(timeout_s=0)
