"""The RL math and the device programs: pure functions of arrays, no I/O, no config files.

advantages   registered advantage estimators, `compute_advantages`, REINFORCE++'s
             `token_advantages`, `gae`,
             `process_advantages` (step-level rewards)
objectives   registered policy objectives and KL estimators, `policy_loss`, `loss_normalizer`
corrections  registered sampler–trainer mismatch corrections (`mismatch_correction`)
logprobs     chunked token log-probs and entropy
registry     the `Registry` the four plug-in points share

`rl_reason.losses` re-exports the public names; import from there.
"""
