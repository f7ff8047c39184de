"""Before the first step: does one step of this recipe fit the machine? The analytic estimate (estimate/) of the
step's peak against the device's memory (a CUDA GPU's total, or the host's RAM for a CPU run). A batch no machine
holds is refused with the largest batch_size that fits, instead of a step that allocates until the OS kills it.

Only models the estimate knows (Llama-like layouts) are checked; for others training starts as before.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from ..config import Recipe
from ..errors import ConfigError, ModelError
from ..estimate import analytic
from ..estimate.recipe import from_recipe
from ..terms import human_bytes


def device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import psutil

    return psutil.virtual_memory().total


def check(recipe: Recipe, model_folder: Path, device: torch.device, budget: int | None = None) -> None:
    """ConfigError when the estimated peak of one step (at batch_size x max_length, per process) exceeds `budget`
    (default: device_bytes)."""
    try:
        config = json.loads((Path(model_folder) / "config.json").read_text(encoding="utf-8"))
        cfg = from_recipe(recipe, "cuda" if device.type == "cuda" else "cpu")
        need = analytic.estimate(config, cfg).total
    except (OSError, ValueError, TypeError, KeyError, ModelError, ConfigError):
        return  # a layout the estimate does not know, or a config the loader will name: nothing to compare
    budget = device_bytes(device) if budget is None else budget
    if need <= budget:
        return
    lo, hi = 0, cfg.batch  # fits(lo) (0: nothing), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if analytic.estimate(config, replace(cfg, batch=mid)).total <= budget else (lo, mid)
    advice = (f"At most train.batch_size {lo} fits (with train.grad_accum for a larger effective batch)." if lo
              else "Not even batch_size 1 fits: lower data.max_length, or quantize the base (quant.type nf4).")
    raise ConfigError(f"train.batch_size {cfg.batch} x data.max_length {cfg.seq} needs about {human_bytes(need)} for "
                      f"one step (`qlora-kit estimate --batch {cfg.batch} --seq {cfg.seq}`), and this {device.type} "
                      f"has {human_bytes(budget)}. {advice}")
