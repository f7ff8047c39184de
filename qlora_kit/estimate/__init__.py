"""The analytic memory estimate of a training step, from a model's config.json alone: pure Python, no torch.

analytic.py      estimate() -> Estimate (bytes per component), max_seq_table, model resolution
settings.py      EstimateConfig: the settings that decide memory, flat, with the recipe's defaults
recipe.py        the recipe's sections -> EstimateConfig (the one mapping; the CLI's flags override it)
shapes.py        LinearShape, Moe, Layout, ModelShapes: what a model holds and how its layers compute
count.py         count_params: config.json -> ModelShapes, by model_type (families.py, families_moe.py)
builtins.py      built-in names: config.json values of well-known models
activations.py   the activation terms: per layer, checkpoints on device or host, MLP tiles, loss head
devices.py       per-device terms of a multi-process run (DDP, FSDP2) and what makes it fit

May import: the root modules only. Imported by measure/ (estimate next to measured) and the CLI.
"""
