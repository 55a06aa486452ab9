"""What a config's `pipeline` names: the default experiment, recipes on pretrained models,
evaluation, pretraining, and the research experiments (`pipelines.research`)."""
