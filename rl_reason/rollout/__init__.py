"""Producing rollouts: the static sampler and the sampling rounds a GRPO step collects."""
