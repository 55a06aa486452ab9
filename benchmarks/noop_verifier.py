"""A verifier that does nothing, registered as "noop": the baseline of benchmarks.rl_step."""

from rl_reason import verifiers
from rl_reason.verifiers.result import VerifyResult


def verify_noop(response, example) -> VerifyResult:
    del response, example
    return VerifyResult(reward=0.0, correct=False, reason="noop")


if "noop" not in verifiers.names():
    verifiers.register("noop", verify_noop)
