"""The method's open questions as experiments on the synthetic arithmetic task.

`pipeline` runs one arm (config.pipeline = "research"), `base_cache` shares each seed's base
model between arms, `measures` and `bridge` are what the experiments measure (with `steps`, the
lenient step checker, and `corruption`, the bridge's causal test), `held_out` keeps every
evaluation's completions, `hyper` writes sweeps next to a config (big_vision style), `sweep`
runs them as separate processes and `summary` turns their run directories into tables and
plots.
"""
