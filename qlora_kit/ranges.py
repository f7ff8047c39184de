"""What each recipe value may be, beyond its type: (section, key) -> a predicate and the words for it, and upper
bounds past which no machine holds one step (or one step never ends). config.py checks every recipe with them;
estimate/ bounds its own sizes by the same numbers. Torch-free."""

from __future__ import annotations

import typing
from typing import Any

from .terms import BLOCKSIZES

# (section, key) -> (predicate, what the value must be). Checked after types.
RANGES: dict[tuple[str, str], tuple[typing.Callable[[Any], bool], str]] = {
    ("quant", "blocksize"): (lambda v: v in BLOCKSIZES, f"one of {list(BLOCKSIZES)}"),
    ("lora", "r"): (lambda v: v > 0, "> 0"),
    ("lora", "alpha"): (lambda v: v > 0, "> 0"),
    ("lora", "dropout"): (lambda v: 0 <= v < 1, "in [0, 1)"),
    ("lora", "plus_ratio"): (lambda v: v > 0, "> 0 (1 is plain LoRA)"),
    ("lora", "loftq_iters"): (lambda v: 1 <= v <= 100, "in [1, 100]"),
    ("data", "max_length"): (lambda v: v > 0, "> 0"),
    ("data", "val_fraction"): (lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train", "steps"): (lambda v: v > 0, "> 0"),
    ("train", "batch_size"): (lambda v: v > 0, "> 0"),
    ("train", "grad_accum"): (lambda v: v > 0, "> 0"),
    ("train", "lr"): (lambda v: v > 0, "> 0"),
    ("train", "warmup_steps"): (lambda v: v >= 0, ">= 0"),
    ("train", "weight_decay"): (lambda v: v >= 0, ">= 0"),
    ("train", "max_grad_norm"): (lambda v: v >= 0, ">= 0"),
    ("train", "log_every"): (lambda v: v > 0, "> 0"),
    ("train", "loss_chunk"): (lambda v: v > 0, "> 0"),
    ("train", "mlp_chunk"): (lambda v: v >= 0, ">= 0 (0: off)"),
    ("train", "eval_every"): (lambda v: v >= 0, ">= 0"),
    ("train", "save_every"): (lambda v: v >= 0, ">= 0"),
    ("train", "keep_checkpoints"): (lambda v: v > 0, "> 0"),
    ("train", "dist_timeout_s"): (lambda v: 10 <= v <= 86400, "in [10, 86400]"),
    ("train", "num_threads"): (lambda v: 0 <= v <= 4096, "in [0, 4096]"),  # torch overflows on absurd counts
    ("train", "seed"): (lambda v: 0 <= v < 2**64, "in [0, 2**64)"),  # torch.manual_seed takes a uint64
    ("train", "beta"): (lambda v: v > 0, "> 0"),
    ("train", "label_smoothing"): (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    ("train", "simpo_gamma"): (lambda v: v >= 0, ">= 0"),
    ("train", "kto_desirable_weight"): (lambda v: v > 0, "> 0"),
    ("train", "kto_undesirable_weight"): (lambda v: v > 0, "> 0"),
    ("output", "dir"): (lambda v: v.strip() != "", "a folder name, not empty"),  # '' would be the current folder
}

# Upper bounds, checked with RANGES: past them no machine holds one step, or one step never ends (a grad_accum of
# 10**12 micro-batches). Within them `train` still compares the estimated memory of a step with the machine's before
# the first step (train/fits.py). (lora.r is bounded by the targeted layers' sizes once the model is known.)
LIMITS: dict[tuple[str, str], int] = {
    ("data", "max_length"): 1 << 24, ("train", "batch_size"): 1 << 20,
    ("train", "grad_accum"): 1 << 16, ("train", "steps"): 1 << 31, ("train", "warmup_steps"): 1 << 31,
    ("train", "loss_chunk"): 1 << 24, ("train", "mlp_chunk"): 1 << 24,
}
