"""A Python tool: the model's `<code>...</code>` runs in the verifiers' sandbox, its output comes
back as `<output>...</output>`, and the trajectory goes on.

State persists across the calls of one trajectory by re-running its earlier cells, output
discarded, before the new one, each call in a fresh sandbox (rl_reason/verifiers/sandbox.py):
nothing survives between trajectories or leaks from one to another, a cell that crashed the
interpreter cannot poison the next call, and a trajectory replays exactly from its text. The
price is re-running earlier cells, bounded by the turn cap; a cell that timed out is not run
again (it would time out every later call).

Every fault ends the call with a reason, never the run: "timeout" (the per-call wall-clock or
CPU limit), "error" (an exception: its last line is the output), "crash" (killed by a signal,
e.g. past the memory limit), "truncated" (output cut at `max_output_chars`), "tool_error" (the
sandbox itself failed to start this once), "malformed" (a `</code>` with no `<code>` before
it: nothing runs, the observation says so). A turn that does not end in `</code>` is the final
answer (reason "answered").
"""

from __future__ import annotations

import dataclasses
import json

from rl_reason.rollout.envs.base import Observation
from rl_reason.verifiers.sandbox import SandboxError, SandboxLimits, run_job

OPEN, CLOSE = "<code>", "</code>"

# Runs the trajectory's cells in one namespace: the earlier ones silently (an exception in one
# stops that cell, as in a notebook), then the last one, whose exception is its output.
_DRIVER = """
import contextlib, io, sys, traceback
cells = json.loads(sys.stdin.read())
g = {"__name__": "__main__"}
for cell in cells[:-1]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            exec(compile(cell, "<cell>", "exec"), g)
        except BaseException:
            pass
try:
    exec(compile(cells[-1], "<cell>", "exec"), g)
except BaseException as e:
    sys.stdout.write("".join(traceback.format_exception_only(type(e), e)))
    sys.stdout.flush()
    sys.exit(1)
"""


def code_of(turn: str) -> str | None:
    """The code of a turn that ends in `</code>` (after its last `<code>`), else None."""
    text = turn.rstrip()
    if not text.endswith(CLOSE):
        return None
    body = text[: -len(CLOSE)]
    start = body.rfind(OPEN)
    return None if start < 0 else body[start + len(OPEN) :].strip("\n")


def _output(text: str) -> str:
    return f"\n<output>\n{text.rstrip()}\n</output>\n"


@dataclasses.dataclass
class PythonEpisode:
    tool: PythonTool
    cells: list[str] = dataclasses.field(default_factory=list)

    def respond(self, turn: str) -> Observation:
        code = code_of(turn)
        if code is None:
            if turn.rstrip().endswith(CLOSE):
                return Observation(text=_output(f"no {OPEN} before {CLOSE}"), reason="malformed")
            return Observation(done=True, reason="answered")
        text, reason = self.tool.run(self.cells + [code])
        if reason != "timeout":
            self.cells.append(code)
        return Observation(text=_output(text), reason=reason)


@dataclasses.dataclass(frozen=True)
class PythonTool:
    """`timeout_s`: each call's wall-clock limit (CPU limit the same, rounded up);
    `max_output_chars`: the most output an observation carries; `max_turns`: tool calls
    before the trajectory is ended (reason "turn_limit")."""

    timeout_s: float = 5.0
    max_output_chars: int = 512
    max_turns: int = 4
    memory_bytes: int = 1 << 29
    stop_marker: str = CLOSE

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"python tool timeout_s must be > 0, got {self.timeout_s}")
        if self.max_output_chars < 1:
            raise ValueError(f"max_output_chars must be >= 1, got {self.max_output_chars}")

    def episode(self, example: dict) -> PythonEpisode:
        del example  # the tool is the same for every problem
        return PythonEpisode(self)

    def limits(self) -> SandboxLimits:
        return SandboxLimits(
            wall_s=self.timeout_s,
            cpu_s=max(1, int(-(-self.timeout_s // 1))),
            memory_bytes=self.memory_bytes,
            # Room to see that the output was too long; the observation keeps less.
            output_bytes=4 * self.max_output_chars + 1024,
            total_output_bytes=4 * self.max_output_chars + 1024,
        )

    def run(self, cells: list[str]) -> tuple[str, str]:
        """(output, reason) of the last of `cells`, run after the others."""
        code = "import json\n" + _DRIVER + "\n"
        job = {"mode": "io", "code": code, "inputs": [json.dumps(cells)]}
        try:
            report = run_job(job, self.limits())
        except SandboxError as e:
            return f"the tool could not start: {e}", "tool_error"
        if report.failure:
            reason = {"timeout": "timeout", "output limit exceeded": "truncated"}.get(
                report.failure, "tool_error"
            )
            return _FAULTS.get(reason, report.failure), reason
        if not report.runs:
            return _FAULTS["timeout"], "timeout"
        run = report.runs[0]
        out = run.stdout.decode("utf-8", "replace")
        if run.timed_out or report.timed_out:
            return _FAULTS["timeout"], "timeout"
        if run.signal is not None:
            return f"killed by signal {run.signal}", "crash"
        if run.overflow or len(out) > self.max_output_chars:
            return out[: self.max_output_chars] + "\n[output truncated]", "truncated"
        return out, "error" if run.exit_code else "ok"


_FAULTS = {
    "timeout": "timed out",
    "truncated": "[output truncated]",
}
