"""The reasoning bridge: does the model's own reasoning make the gold answer more likely?

Per-token perplexity of the gold answer (teacher-forced, between <answer> and </answer>) given
the question alone (empty think block), given the question plus the policy's own greedy
reasoning, and given the question plus the gold worked solution, measured with the base model
before RL and with the policy after RL, on the 256 held-out problems. Since both reasoning
contexts end with a step whose result is the answer, the copy rate (own answer = own chain's
last value), the gold-step prefixes (first k steps only) and the causal test (one intermediate
value corrupted and carried on: does the answer follow it or recover?) tell copying from use.
Arms: the three rewards (the runs of research_supervision) and the cold start (the run of
research_cold_start).

Launch:
  python -m experiments.research --config=experiments/configs/research_bridge.py
"""

from experiments.configs import research


def get_config(arg: str | None = None):
    return research.get_config(arg)


def get_hyper(hyper):
    table = {**research.REWARD_ARMS, "cold start + outcome": research.COLD_START}
    return hyper.product([research.seeds(hyper), research.arms(hyper, table)])


SUMMARY = {
    "title": "The reasoning bridge",
    "question": (
        "Does the model's own reasoning lower the perplexity of the gold answer, before and after "
        "RL?"
    ),
    "table": [
        ("ppl given question, before", "bridge_before.ppl_none"),
        ("ppl given own reasoning, before", "bridge_before.ppl_own"),
        ("ppl given gold steps, before", "bridge_before.ppl_gold"),
        ("ppl given question, after", "bridge_after.ppl_none"),
        ("ppl given own reasoning, after", "bridge_after.ppl_own"),
        ("ppl given gold steps, after", "bridge_after.ppl_gold"),
        ("own < none (share), after", "bridge_after.frac_own_below_none"),
        ("own steps right (share), after", "bridge_after.frac_own_right"),
        ("ppl given own right steps, after", "bridge_after.ppl_own_right"),
        ("ppl given question, on right-step ones", "bridge_after.ppl_none_right"),
        ("ppl given own wrong steps, after", "bridge_after.ppl_own_wrong"),
        ("ppl given question, on wrong-step ones", "bridge_after.ppl_none_wrong"),
        ("median NLL given own reasoning, after", "bridge_after.nll_median_own"),
        ("median NLL given question, after", "bridge_after.nll_median_none"),
        ("own answer = own last value, after", "bridge_after.own_copy_rate"),
        ("follows a wrong last value, after", "bridge_after.own_follow_wrong_last"),
        ("answer given 1 gold step, after", "bridge_after.prefix1_accuracy"),
        ("copies the 1-step value, after", "bridge_after.prefix1_copy"),
        ("corrupted chain: follows, before", "bridge_before.causal_follow_rate"),
        ("corrupted chain: recovers, before", "bridge_before.causal_recovery_rate"),
        ("corrupted chain: follows, after", "bridge_after.causal_follow_rate"),
        ("corrupted chain: recovers, after", "bridge_after.causal_recovery_rate"),
    ],
    "curves": [],
}
