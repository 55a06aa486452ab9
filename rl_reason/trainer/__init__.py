"""The GRPO trainer: the loop (`loop.py`), evaluation, and the resumable state."""

from rl_reason.core.config import GRPOConfig, overlong_penalty
from rl_reason.trainer.loop import GRPOTrainer, Task

__all__ = ["GRPOConfig", "GRPOTrainer", "Task", "overlong_penalty"]
