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


def grpo_section(**values) -> ml_collections.ConfigDict:
    """Every GRPO option (rl_reason.core.config.GRPOConfig) at its default, updated with
    `values` (nested sections as dicts: loss=dict(kl_coef=0.01)), so that every knob can be set
    from the command line (--config.grpo.loss.kl_coef=0.01). A misspelt or old flat name fails
    here, naming the new one."""
    from rl_reason.core.config import GRPOConfig, check_names, defaults

    check_names(GRPOConfig, values, "config.grpo")

    def build(tree):
        out = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                out[name] = ml_collections.ConfigDict(build(value))
            elif isinstance(value, tuple):
                out[name] = ml_collections.FieldReference(None, field_type=value[1])
            else:
                out[name] = value
        return out

    section = ml_collections.ConfigDict(build(defaults(GRPOConfig)))
    section.update(values)
    return section
