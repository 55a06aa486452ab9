"""Process fidelity under outcome-only RL: do right answers come through wrong steps, and less so
over training?

Nobody rewards the steps under R1-Zero's outcome reward, so a correct answer may follow wrong
intermediate steps. On every step's training rollouts (16 prompts x 8 samples at T=1) this
logs the share of correct final answers reached through at least one wrong step line, and the
share of correct answers whose steps are not exactly the problem's (wrong, missing or extra).
The process and mixed rewards are shown for contrast (the same runs as research_supervision:
they cost nothing extra). Those two figures use the strict checker (the one canonical chain);
the deviation rate D = P(wrong step | correct answer, steps written) uses the lenient one
(`rl_reason.pipelines.research.steps`: equivalent forms and retries accepted), with its
denominator and the share of completions that write steps beside it, and P(correct | a wrong
step) is read against answer_chance, the chance that a wrong chain lands on the gold answer.

Launch:
  python -m experiments.research --config=experiments/configs/research_fidelity.py
"""

from experiments.configs import research


def get_config(arg: str | None = None):
    return research.get_config(arg)


def get_hyper(hyper):
    return hyper.product([research.seeds(hyper), research.arms(hyper, research.REWARD_ARMS)])


SUMMARY = {
    "title": "Process fidelity under outcome-only RL",
    "question": (
        "Among correct final answers, how many were reached through at least one wrong step, and "
        "does that share shrink as outcome-only RL goes on?"
    ),
    "table": [
        (
            "wrong step given correct, first 10 steps",
            "rollout.rollout_wrong_step_given_correct.first10",
        ),
        (
            "wrong step given correct, last 10 steps",
            "rollout.rollout_wrong_step_given_correct.last10",
        ),
        (
            "steps not exact given correct, first 10",
            "rollout.rollout_not_process_given_correct.first10",
        ),
        (
            "steps not exact given correct, last 10",
            "rollout.rollout_not_process_given_correct.last10",
        ),
        ("writes steps, last 10", "rollout.rollout_frac_with_steps.last10"),
        ("wrong step given correct, held-out after", "after.wrong_step_given_correct"),
        ("process-correct, held-out after", "after.frac_process_correct"),
        # The lenient checker (research.steps): D = P(wrong step | correct, steps written).
        ("D, first 10 steps", "rollout.rollout_deviation_rate.first10"),
        ("D, last 10 steps", "rollout.rollout_deviation_rate.last10"),
        (
            "D's denominator (correct with steps), first 10",
            "rollout.rollout_frac_correct_wrote_steps.first10",
        ),
        (
            "D's denominator (correct with steps), last 10",
            "rollout.rollout_frac_correct_wrote_steps.last10",
        ),
        ("writes steps (lenient), first 10", "rollout.rollout_frac_wrote_steps.first10"),
        ("writes steps (lenient), last 10", "rollout.rollout_frac_wrote_steps.last10"),
        ("D, held-out before", "before.deviation_rate"),
        ("D, held-out after", "after.deviation_rate"),
        ("correct given a wrong step, held-out after", "after.correct_given_deviated"),
        ("chance of the right answer (sum p^2)", "answer_chance"),
        ("repairs per completion, last 10", "rollout.rollout_repairs_mean.last10"),
        ("has an answer, held-out after", "after.frac_has_answer"),
        ("truncated, held-out after", "after.truncated_frac"),
    ],
    "changes": [
        (
            "D, last 10 minus first 10 steps",
            "rollout.rollout_deviation_rate.first10",
            "rollout.rollout_deviation_rate.last10",
        ),
        (
            "writes steps, last 10 minus first 10",
            "rollout.rollout_frac_wrote_steps.first10",
            "rollout.rollout_frac_wrote_steps.last10",
        ),
        ("D held-out, after minus before RL", "before.deviation_rate", "after.deviation_rate"),
    ],
    # A wrong chain lands on the gold answer by chance about sum(p^2) of the time; well above
    # that, answers survive wrong steps (the chain is not what produces them).
    "chance": [
        (
            "correct given a wrong step, held-out after",
            "after.correct_given_deviated",
            "after.frac_deviated",
            "answer_chance",
        ),
    ],
    "curves": [
        ("wrong step given correct answer", "rollout_wrong_step_given_correct"),
        ("steps not exact given correct answer", "rollout_not_process_given_correct"),
        ("writes steps", "rollout_frac_with_steps"),
        ("D (lenient checker)", "rollout_deviation_rate"),
    ],
}
