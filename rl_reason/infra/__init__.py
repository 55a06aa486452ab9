"""Infrastructure under the RL loop: sharding, checkpoints, preemption, metrics, data, tokenizers,
the launcher. Nothing here knows what GRPO is."""
