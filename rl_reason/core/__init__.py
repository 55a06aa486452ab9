"""The RL math and the device programs: pure functions of arrays, no I/O, no config files.

advantages  registered advantage estimators and `compute_advantages`
objectives  registered policy objectives and KL estimators, `policy_loss`, `loss_normalizer`
logprobs    chunked token log-probs and entropy
registry    the `Registry` the three plug-in points share

`rl_reason.losses` re-exports the public names; import from there.
"""
