"""The analytic memory estimate of a training step, from a model's config.json alone: pure Python, no torch.

analytic.py     EstimateConfig, the model shapes, estimate() -> Estimate (bytes per component), max_seq_table
activations.py  the activation terms: per layer, checkpoints on device or host, MLP tiles, loss head
devices.py      per-device terms of a multi-process run (DDP, FSDP2) and what makes it fit

May import: the root modules only. Imported by measure/ (estimate next to measured) and the CLI.
"""
