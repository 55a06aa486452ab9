"""Config sections every pipeline shares."""

import ml_collections


def metrics_section(project: str = "rl_reason") -> ml_collections.ConfigDict:
    """Where metrics go besides metrics.jsonl and TensorBoard
    (rl_reason.infra.metrics.MetricsConfig).

    --config.metrics.wandb=True also logs to Weights & Biases (pip install -e ".[wandb]");
    WANDB_MODE=offline (or --config.metrics.wandb_mode=offline) keeps the run local.
    """
    return ml_collections.ConfigDict(
        dict(wandb=False, wandb_project=project, wandb_run_name="", wandb_entity="", wandb_mode="")
    )
