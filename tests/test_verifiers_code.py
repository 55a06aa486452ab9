"""The code verifier and its sandbox.

Attack tests are written so that the attack *succeeding* would make the verifier accept: the
program prints what it managed to read or do, and the expected output is what a successful
attack would print. Each attack also has a control (same program, expecting the "blocked"
output) that must pass, which shows the program really ran and really was blocked.
"""

import ast
import os
import resource
import socket
import subprocess
import time

import pytest

from rl_reason import verifiers
from rl_reason.verifiers import code_execution, sandbox
from rl_reason.verifiers.sandbox_runner import decode_value, encode_value

RUNNER_MARKER = "The program that runs inside the code sandbox"


def code_response(source: str) -> str:
    return f"<think>I will write it.</think>\n```python\n{source}\n```"


def verify(source: str, example: dict) -> verifiers.VerifyResult:
    result = verifiers.get("code")(code_response(source), example)
    assert result.reward == (1.0 if result.correct else 0.0)
    return result


def io(stdout: str, stdin: str = "", timeout_s: float | None = None) -> dict:
    example = {"io": [{"stdin": stdin, "stdout": stdout}]}
    if timeout_s is not None:
        example["timeout_s"] = timeout_s
    return example


def sandbox_processes() -> list[str]:
    """Host processes that belong to a sandbox run (their command line carries the runner)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode("utf-8", "replace")
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state != b"Z" and (RUNNER_MARKER in cmdline or "31.4159" in cmdline):
            found.append(f"{pid}: {cmdline[:60]!r}")
    return found


@pytest.fixture
def no_leftovers():
    """After the test, no sandbox process may survive (checked for up to 2 s)."""
    yield
    deadline = time.monotonic() + 2.0
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == []


# ------------------------------------------------------------------------------------------------
# io mode.

ADD = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)"


@pytest.mark.parametrize(
    "source, expected, correct",
    [
        (ADD, "5\n", True),
        (ADD, "5", True),  # a missing final newline does not matter
        ("print('5   ')\nprint()\nprint()", "5\n", True),  # trailing whitespace and blank lines
        ("import sys\nsys.stdout.write('5\\r\\n')", "5\n", True),  # CRLF line ends
        ("print(6)", "5\n", False),
        ("print(5)\nprint(5)", "5\n", False),  # extra lines are compared, not zipped away
        ("print(5)", "5\n5\n", False),  # missing lines
        ("print(' 5')", "5\n", False),  # leading whitespace is kept
        ("print(5)\nraise ValueError", "5\n", False),  # a crash after the right output
        ("import sys\nprint(5)\nsys.exit(1)", "5\n", False),
        ("import sys\nprint(5)\nsys.exit(0)", "5\n", True),
        ("print(5)\nexit()", "5\n", True),
        # Solutions that run main in a thread with a bigger stack are waited for.
        ("import threading\nthreading.Thread(target=lambda: print(5)).start()", "5\n", True),
        ("print('é')", "é\n", True),
    ],
)
def test_io_table(source, expected, correct):
    result = verify(source, io(expected, stdin="2 3\n"))
    assert result.correct is correct, result.reason


def test_io_every_case_must_pass():
    cases = [{"stdin": f"{a} {b}", "stdout": str(a + b)} for a, b in [(1, 2), (5, 5), (-3, 3)]]
    assert verify(ADD, {"io": cases}).reason == "passed 3/3"
    wrong = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b if a > 0 else 1)"
    result = verify(wrong, {"io": cases})
    assert not result.correct and "case 2" in result.reason


def test_io_large_input_and_output():
    source = "import sys\ndata = sys.stdin.read().split()\nprint(len(data))\nprint('x' * 500000)"
    assert verify(source, io("200000\n" + "x" * 500000, stdin="7 " * 200_000)).correct


@pytest.mark.parametrize(
    "response, reason",
    [
        ("print(5)", "no complete ```python block after the reasoning"),
        (
            "<think>```python\nprint(5)\n```</think>",
            "no complete ```python block after the reasoning",
        ),
        ("```python\nprint(5)", "no complete ```python block after the reasoning"),
        ("```python\n\n```", "empty code block"),
        ("```python\nprint(5\n```", "syntax error"),
        ("```python\nx = " + "(" * 10_000 + ")" * 10_000 + "\n```", "syntax error"),
    ],
)
def test_responses_without_runnable_code(response, reason):
    result = verifiers.get("code")(response, io("5"))
    assert (result.correct, result.reason) == (False, reason)


def test_examples_may_carry_bytes_as_tfds_gives_text():
    assert verify(ADD, {"io": [{"stdin": b"2 3", "stdout": b"5"}]}).correct
    assert verify(DOUBLE, {"tests": b"assert double(2) == 4"}).correct


def test_last_python_block_is_the_one_that_runs():
    response = "```python\nprint(4)\n```\nBetter:\n```python\nprint(5)\n```"
    assert verifiers.get("code")(response, io("5")).correct
    assert not verifiers.get("code")(response, io("4")).correct


def test_megabyte_response_is_handled_quickly():
    response = "x" * 1_000_000 + code_response("print(5)")
    start = time.monotonic()
    assert verifiers.get("code")(response, io("5")).correct
    assert time.monotonic() - start < 10


# ------------------------------------------------------------------------------------------------
# tests mode.

DOUBLE = "def double(x):\n    return 2 * x\n"


@pytest.mark.parametrize(
    "source, tests, correct",
    [
        (DOUBLE, "assert double(2) == 4\nassert double(-1) == -2", True),
        (DOUBLE, "assert double(2) == 5", False),
        (DOUBLE, "assert double(2) == 4\nassert double(3) == 7", False),  # every test counts
        (DOUBLE, "assert double('ab') == 'abab'", True),
        (DOUBLE, "assert double(2.5) == 5.0", True),
        (DOUBLE, "assert double([1]) == [1, 1]", True),
        (DOUBLE, "assert double((1,)) == [1, 1]", False),  # tuple != list, as in Python
        (DOUBLE, "assert double(None) == 0", False),  # raises TypeError
        (DOUBLE, "assert double(2) != 5\nassert double(2) in (4, 8)\nassert not double(0)", True),
        (DOUBLE, "assert double(1) < double(2) <= 4", True),
        (DOUBLE, "assert double(2) is None", False),
        (
            "def f():\n    return {'a': [1, (2, 3)], 'b': {4}}",
            "assert f() == {'b': {4}, 'a': [1, (2, 3)]}",
            True,
        ),
        ("def f():\n    return 1, 2", "assert f() == (1, 2)", True),
        ("def f():\n    return b'x'", "assert f() == b'x'", True),
        ("def f():\n    return float('nan')", "assert f() == f()", False),  # nan != nan
        ("def f():\n    return 0.1 + 0.2", "assert f() == 0.3", False),
        (
            "from fractions import Fraction\ndef f():\n    return Fraction(1, 2)",
            "assert f() == 0.5",
            True,
        ),
        ("def f():\n    return True", "assert f()", True),
        ("def f():\n    return 1", "assert f() is True", False),
        ("ANSWER = 42", "assert ANSWER == 42", True),
        (
            "class Solution:\n    def add(self, a, b):\n        return a + b",
            "assert Solution().add(2, 3) == 5",
            True,
        ),
        (
            "import collections\ndef f(s):\n    return collections.Counter(s)",
            "assert f('aab') == {'a': 2, 'b': 1}",
            True,
        ),
        # Checks beyond plain comparisons run in the reference sandbox.
        ("def f():\n    return [3, 1, 2]", "assert sorted(f()) == [1, 2, 3]", True),
        ("def f():\n    return [3, 1, 2]", "assert sorted(f()) == [1, 2, 4]", False),
        ("def f():\n    return 0.1 + 0.2", "assert math.isclose(f(), 0.3)", True),
        ("def f():\n    return 0.1 + 0.2", "assert abs(f() - 0.3) < 1e-9", True),
        ("def f():\n    return 0.5", "assert abs(f() - 0.3) < 1e-9", False),
        ("def f(x):\n    return x + 1", "xs = [1, 2]\nassert list(map(f, xs)) == [2, 3]", True),
        ("def f(x):\n    return x + 1", "expected = 3\nassert f(2) == expected", True),
        ("def f(x):\n    return x + 1", "expected = 4\nassert f(2) == expected", False),
        (
            "def total(t):\n    return t.v + sum(total(c) for c in t.kids)",
            "class T:\n    def __init__(self, v, kids=()):\n        self.v, self.kids = v, kids\n"
            "tree = T(1, [T(2), T(3)])\nassert total(tree) == 6",
            True,
        ),
        # The solution's own names shadowing builtins do not leak into the checks.
        (
            "def sorted(x):\n    return [9]\ndef f():\n    return [2, 1]",
            "assert sorted(f()) == [1, 2]",
            True,
        ),
    ],
)
def test_tests_table(source, tests, correct):
    result = verify(source, {"tests": tests})
    assert result.correct is correct, result.reason


def test_parent_and_reference_evaluation_agree(monkeypatch):
    """The parent's evaluation of plain checks and the reference sandbox's agree."""
    cases = [
        (DOUBLE, "assert double(2) == 4"),
        (DOUBLE, "assert double(2) == 5"),
        (DOUBLE, "assert double(2) in [3, 4] and not double(0)"),
        (DOUBLE, "assert double(2) < double(1)"),
        (DOUBLE, "assert double('a') == 'aa'"),
        (DOUBLE, "assert double([1]) == (1, 1)"),
        (DOUBLE, "assert double(1) is not None"),
        ("def f():\n    return {1: 'a'}", "assert f() == {1: 'a'}"),
        ("def f():\n    return float('inf')", "assert f() > 1e300"),
        ("def f():\n    return 'b'", "assert f() < 1"),  # TypeError in both
    ]
    parent = [verify(s, {"tests": t}).correct for s, t in cases]
    assert all(
        code_execution._is_plain(
            code_execution._split(ast.parse(t).body[-1].test, frozenset({"double", "f"}), [])
        )
        for _, t in cases
    )
    monkeypatch.setattr(code_execution, "_is_plain", lambda check: False)
    reference = [verify(s, {"tests": t}).correct for s, t in cases]
    assert parent == reference == [True, False, True, False, True, False, True, True, True, False]


@pytest.mark.parametrize(
    "tests, message",
    [
        ("for x in range(3):\n    assert f(x) == x", "must be top-level"),
        ("def check(candidate):\n    assert candidate(1) == 2\ncheck(f)", "must be top-level"),
        ("y = f(1)\nassert y == 2", "setup must not depend on the solution"),
        ("x = 1", "no assert"),
        ("assert f(", "not valid Python"),
        ("assert all(f(i) == i for i in range(3))", "one assert per case"),
    ],
)
def test_malformed_tests_raise(tests, message):
    with pytest.raises(ValueError, match=message):
        verify("def f(x):\n    return x", {"tests": tests})


@pytest.mark.parametrize(
    "example",
    [
        {},
        {"tests": "assert 1", "io": []},
        {"io": []},
        {"io": [{"stdin": "1"}]},
        {"tests": 3},
        {"tests": "assert True", "timeout_s": -1},
    ],
)
def test_malformed_examples_raise(example):
    with pytest.raises(ValueError, match="code:"):
        verify("print(1)", example)


def test_expected_values_never_reach_the_solution():
    # The probe sent to the sandbox is only the solution call; the expected value, even when it
    # lives in a setup variable, stays in the parent or in the reference run.
    suite = code_execution._parse_tests("secret = 12345\nxs = [7]\nassert f(xs[0]) == secret")
    probes = []
    check = code_execution._split(suite.checks[0], frozenset({"f"}), probes)
    assert probes == ["f(xs[0])"]
    assert ast.unparse(check) == "__probe_0__ == secret"
    assert code_execution._setup_for_probes(suite, probes) == "xs = [7]"


# ------------------------------------------------------------------------------------------------
# Plain values across the boundary.


def test_plain_values_round_trip():
    from decimal import Decimal
    from fractions import Fraction

    values = [
        None,
        True,
        0,
        -(10**50),
        1.5,
        float("inf"),
        2j,
        "é",
        b"\x00",
        [1, (2, {3})],
        {"a": frozenset({1})},
        Fraction(1, 3),
        Decimal("0.1"),
    ]
    for value in values:
        assert decode_value(encode_value(value)) == value
        assert type(decode_value(encode_value(value))) is type(value)


def test_subclasses_cross_as_their_plain_value():
    class Liar(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    decoded = decode_value(encode_value(Liar(3)))
    assert type(decoded) is int and decoded == 3 and decoded != 4


@pytest.mark.parametrize(
    "obj",
    [
        ["x", "1"],
        ["i", 1],
        ["i"],
        ["l", "ab"],
        ["S", [["l", []]]],
        ["d", [["i", "1"]]],
        {"i": "1"},
        ["i", "9" * 5000],
        ["q", "1", "0"],
        "string",
    ],
)
def test_decoder_refuses_malformed_values(obj):
    with pytest.raises(ValueError):
        decode_value(obj)


def test_unsupported_objects_cannot_be_encoded():
    with pytest.raises(TypeError):
        encode_value(object())


# ------------------------------------------------------------------------------------------------
# The sandbox: attacks. Every one scores 0 and leaves the host unharmed.


def test_busy_loop_ignoring_sigalrm_is_killed(no_leftovers):
    source = (
        "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGXCPU, signal.SIG_IGN)\nsignal.alarm(1)\nwhile True:\n    pass"
    )
    start = time.monotonic()
    result = verify(source, io("", timeout_s=1.5))
    assert not result.correct and "timeout" in result.reason
    assert time.monotonic() - start < 1.5 + 1.0


def test_cpu_limit_kills_before_the_wall_clock(no_leftovers):
    # cpu_s is 1 for timeout_s=1.4; SIGXCPU is ignored, the hard limit's SIGKILL is not.
    source = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass"
    result = verify(source, io("", timeout_s=1.4))
    assert not result.correct
    assert "signal 9" in result.reason or "timeout" in result.reason


def test_sleep_is_killed_at_the_wall_clock(no_leftovers):
    start = time.monotonic()
    result = verify("import time\ntime.sleep(60)\nprint(1)", io("1", timeout_s=1.0))
    assert (result.correct, result.reason.split(" ")[0]) == (False, "timeout")
    assert time.monotonic() - start < 1.0 + 1.0


def test_large_allocation_fails(no_leftovers):
    source = "n = int(input())\nx = bytearray(n)\nprint('allocated')"
    assert not verify(source, io("allocated", stdin=str(8 << 30))).correct
    assert verify(source, io("allocated", stdin=str(64 << 20))).correct  # control


def test_bounded_fork_bomb_is_stopped(no_leftovers):
    source = (
        "import os, time\nmade = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(20)\n"
        "        os._exit(0)\n    made += 1\nprint(made)"
    )
    assert not verify(source, io("200")).correct


def test_orphaned_grandchild_is_killed(tmp_path, no_leftovers):
    marker = tmp_path / "marker"
    source = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(1.0)\n"
        f"        try:\n            open({str(marker)!r}, 'w').write('escaped')\n"
        "        except OSError:\n            pass\n"
        "        os.execv('/bin/sleep', ['sleep', '31.4159'])\n"
        "    os._exit(0)\n"
        "print('done')"
    )
    result = verify(source, io("escaped"))
    assert not result.correct
    time.sleep(1.5)  # past the moment the grandchild would write
    assert not marker.exists()


def test_output_flood_is_capped(no_leftovers):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = verify("while True:\n    print('x' * 100000)", io("x"))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert (result.correct, result.reason) == (
        False,
        "output limit exceeded on case 0 (passed 0/1)",
    )
    assert after - before < 100_000  # KiB: the parent read about a megabyte, not gigabytes


READ = (
    "import sys\npath = sys.stdin.read().strip()\n"
    "try:\n    print(open(path).read())\nexcept OSError:\n    print('blocked')"
)


def test_host_files_are_invisible(tmp_path, no_leftovers):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    secret.chmod(0o644)
    assert not verify(READ, io("top secret", stdin=str(secret))).correct
    assert verify(READ, io("blocked", stdin=str(secret))).correct  # control
    repo_file = os.path.abspath(code_execution.__file__)
    assert verify(READ, io("blocked", stdin=repo_file)).correct
    assert verify(READ, io("blocked", stdin="/etc/passwd")).correct


WRITE = (
    "import sys\nok = []\nfor path in sys.stdin.read().split():\n"
    "    try:\n        open(path, 'w').write('x')\n        ok.append(path)\n"
    "    except OSError:\n        pass\nprint(' '.join(ok) or 'blocked')"
)


def test_writes_outside_tmp_fail(tmp_path, no_leftovers):
    target = tmp_path / "written.txt"
    tmp_path.chmod(0o777)
    paths = f"{target} /usr/escape /escape /dev/shm/escape /proc/escape"
    assert verify(WRITE, io("blocked", stdin=paths)).correct
    assert not target.exists()
    assert verify(WRITE, io("/tmp/inside.txt", stdin="/tmp/inside.txt")).correct  # control


def test_private_tmp_and_file_sizes_are_limited(no_leftovers):
    # Files under the per-file limit (16 MiB) fill the 64 MiB tmpfs: ENOSPC, not host memory.
    many = (
        "import errno\ntry:\n    for i in range(20):\n"
        "        with open(f'/tmp/part{i}', 'wb') as f:\n            f.write(b'x' * (10 << 20))\n"
        "    print('wrote 200 MiB')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])"
    )
    assert verify(many, io("ENOSPC")).correct
    one = (
        "import errno\ntry:\n    with open('/tmp/big', 'wb') as f:\n"
        "        f.write(b'x' * (32 << 20))\n    print('wrote 32 MiB')\n"
        "except OSError as e:\n    print(errno.errorcode[e.errno])"
    )
    assert verify(one, io("EFBIG")).correct  # RLIMIT_FSIZE


def test_host_loopback_is_unreachable(no_leftovers):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    source = (
        "import socket\ntry:\n"
        f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        "    s.sendall(b'hello')\n    print('connected')\n"
        "except OSError:\n    print('blocked')"
    )
    try:
        assert not verify(source, io("connected")).correct
        assert verify(source, io("blocked")).correct  # control
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


CANARY = (
    "import os, glob\nfound = [v for v in os.environ.values() if 'canary' in v]\n"
    "for path in glob.glob('/proc/*/environ'):\n"
    "    try:\n        data = open(path, 'rb').read()\n    except OSError:\n        continue\n"
    "    if b'canary' in data:\n        found.append('canary-in-' + path)\n"
    "print(found[0] if found else 'none')"
)


def test_parent_environment_is_invisible(monkeypatch, no_leftovers):
    monkeypatch.setenv("RL_REASON_TEST_CANARY", "canary-7f3a")
    assert verify(CANARY, io("none")).correct  # control: the scan ran and found nothing
    assert not verify(CANARY, io("canary-7f3a")).correct


def test_killing_the_parent_or_everything_harms_nobody(no_leftovers):
    sentinel = subprocess.Popen(["sleep", "30"])
    try:
        for source in (
            "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('killed')",
            "import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('killed')",
        ):
            assert not verify(source, io("killed")).correct
        assert sentinel.poll() is None
        assert verify("print(1)", io("1")).correct  # still serving
    finally:
        sentinel.kill()
        sentinel.wait()


@pytest.mark.parametrize(
    "source",
    [
        "import sys\nsys.exit(0)\n" + DOUBLE,
        DOUBLE + "import sys\nsys.exit(0)",  # right function, but the tests never run
        DOUBLE + "import os\nos._exit(0)",
        DOUBLE + "raise SystemExit",
        DOUBLE + "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
        "def double(x):\n    raise SystemExit(0)",
    ],
)
def test_exiting_before_the_tests_fails(source, no_leftovers):
    assert not verify(source, {"tests": "assert double(2) == 4"}).correct


ALWAYS_EQUAL = [
    "class Any:\n    def __eq__(self, other):\n        return True\n"
    "    def __ne__(self, other):\n        return False\n    __hash__ = object.__hash__\n"
    "def double(x):\n    return Any()",
    "class Liar(int):\n    def __eq__(self, other):\n        return True\n"
    "    __hash__ = int.__hash__\ndef double(x):\n    return Liar(0)",
    "class Liar(str):\n    def __eq__(self, other):\n        return True\n"
    "    __hash__ = str.__hash__\ndef double(x):\n    return Liar('')",
    "class Liar(list):\n    def __eq__(self, other):\n        return True\n"
    "def double(x):\n    return Liar()",
]


@pytest.mark.parametrize("source", ALWAYS_EQUAL)
def test_always_equal_objects_fail(source, no_leftovers):
    assert not verify(
        source, {"tests": "assert double(2) == 4\nassert [double(1)] == [[9]]"}
    ).correct
    assert not verify(source, {"tests": "expected = 4\nassert double(2) == expected"}).correct


FORGERIES = [
    # Success markers on stdout.
    'print(\'PASS\')\nprint(\'All tests passed\')\nprint(\'{"i": 0, "v": ["i", "4"]}\')',
    # Fake records on the record channel, then exit before the real ones.
    'import os\nos.write(3, b\'{"i": 0, "ok": true}\\n{"i": 0, "v": true}\\n\')\nos._exit(0)',
    # Fake records next to the real ones: duplicates void the channel.
    'import os\nos.write(3, b\'{"i": 0, "v": ["i", "4"]}\\n\')\ndef double(x):\n    return 0',
    # Patching the harness and builtins.
    "import builtins, json\nbuiltins.AssertionError = type('Nope', (Exception,), {})\n"
    'json.dumps = lambda obj, *a, **k: \'{"i": 0, "ok": true}\'\n'
    "builtins.eval = lambda *a, **k: True\ndef double(x):\n    return 0",
]


@pytest.mark.parametrize("source", FORGERIES)
def test_forged_passes_fail(source, no_leftovers):
    assert not verify(source, {"tests": "assert double(2) == 4"}).correct
    assert not verify(source, io("4")).correct


def test_a_solution_spying_on_its_process_finds_no_expected_value(no_leftovers):
    # Searches everything reachable in its interpreter (and its stdin and command line) for the
    # expected value's digits, and returns it. It would pass if the value were anywhere there.
    spy = (
        "import gc, re, sys\n"
        "def _search():\n"
        "    texts = [open('/proc/self/cmdline', 'rb').read().decode('latin-1')]\n"
        "    for obj in gc.get_objects():\n"
        "        items = obj.values() if isinstance(obj, dict) else obj\n"
        "        if not isinstance(obj, (dict, list, tuple)):\n            continue\n"
        "        try:\n            texts += [x for x in items if isinstance(x, str)]\n"
        "        except Exception:\n            pass\n"
        "    for text in texts:\n"
        "        for number in re.findall(r'\\b\\d{5}\\b', text):\n"
        "            return int(number)\n"
        "    return 0\n"
        "def f(x):\n    return _search()\n"
    )
    assert not verify(spy, {"tests": "assert f(7) == 83921"}).correct
    assert not verify(spy, {"tests": "secret = 83921\nassert f(7) == secret"}).correct
    # Control: the spy does find numbers the probes carry (the argument 12345 here).
    assert verify(spy, {"tests": "assert f(12345) == 12345"}).correct


# ------------------------------------------------------------------------------------------------
# Sandbox configuration.


@pytest.fixture
def fresh_backend():
    sandbox._resolve_backend.cache_clear()
    sandbox._warn_weak_sandbox.cache_clear()
    yield
    sandbox._resolve_backend.cache_clear()
    sandbox._warn_weak_sandbox.cache_clear()


def test_unavailable_bubblewrap_refuses_with_instructions(monkeypatch, fresh_backend):
    monkeypatch.setattr(sandbox, "_bwrap_path", lambda: "/nonexistent/bwrap")
    with pytest.raises(sandbox.SandboxUnavailable, match="bubblewrap") as info:
        verify("print(1)", io("1"))
    assert "RL_REASON_CODE_SANDBOX=rlimit" in str(info.value)


def test_bubblewrap_setup_failures_raise_instead_of_scoring_zero(monkeypatch):
    real = sandbox._bwrap_command
    calls = []

    def broken(backend, limits):
        calls.append(1)
        cmd = real(backend, limits)
        return [cmd[0], "--bind", "/nonexistent/source", "/x", *cmd[1:]]

    sandbox.current_backend()  # probed with the real command
    monkeypatch.setattr(sandbox, "_bwrap_command", broken)
    with pytest.raises(sandbox.SandboxError, match="bwrap: Can't find source path"):
        verify("print(1)", io("1"))
    assert len(calls) == 2  # retried once


def test_rlimit_mode_is_explicit_and_warns(monkeypatch, fresh_backend):
    monkeypatch.setenv("RL_REASON_CODE_SANDBOX", "rlimit")
    with pytest.warns(RuntimeWarning, match="WITHOUT a sandbox"):
        assert verify(ADD, io("5", stdin="2 3")).correct
    assert not verify("print(6)", io("5")).correct
    start = time.monotonic()
    assert verify("while True:\n    pass", io("", timeout_s=1.0)).reason.startswith("timeout")
    assert time.monotonic() - start < 2.0
    assert not verify("x = bytearray(8 << 30)\nprint(1)", io("1")).correct


def test_unknown_backend_name_is_an_error(monkeypatch):
    monkeypatch.setenv("RL_REASON_CODE_SANDBOX", "docker")
    with pytest.raises(ValueError, match="expected one of"):
        verify("print(1)", io("1"))


def test_sandboxed_interpreter_is_isolated_from_this_venv(no_leftovers):
    source = (
        "import sys\nvenv = any('site-packages' in p and 'venv' in p for p in sys.path)\n"
        "print(sys.flags.isolated, venv)"
    )
    assert verify(source, io("1 False")).correct


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid switch only happens for root")
def test_root_runs_the_sandbox_as_an_unprivileged_host_user(no_leftovers):
    # RLIMIT_NPROC is not enforced for host uid 0, so no sandbox process may run as host root.
    import threading

    results = []
    thread = threading.Thread(
        target=lambda: results.append(verify("import time\ntime.sleep(1.5)", io("")))
    )
    thread.start()
    uids = set()
    while thread.is_alive():
        for line in sandbox_processes():
            pid = line.split(":")[0]
            try:
                with open(f"/proc/{pid}/status") as f:
                    uids |= {row.split()[1] for row in f if row.startswith("Uid:")}
            except OSError:
                pass
        time.sleep(0.05)
    thread.join()
    assert results[0].correct
    assert uids == {str(sandbox.UNPRIVILEGED_HOST_ID)}
