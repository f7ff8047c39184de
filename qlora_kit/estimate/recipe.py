"""The recipe's sections -> the settings the estimate needs: the one mapping from the config language users train
with (config.py's QuantConfig, LoraConfig, IA3Config, DataConfig, TrainConfig) to EstimateConfig. `qlora-kit
estimate RECIPE.yaml`, the measured breakdown (measure/) and `bench memory`'s grid all go through it, so the
estimate answers for exactly the recipe a user is about to train."""

from __future__ import annotations

import dataclasses

from ..config import Recipe
from ..errors import ConfigError
from .settings import EstimateConfig


def _names(targets) -> tuple[str, ...]:
    """ia3.outputs / ia3.inputs as module names (a regex string is passed whole: the estimate names it if unknown)."""
    return (targets,) if isinstance(targets, str) else tuple(targets)


def estimate_device(train_device: str) -> str:
    """train.device -> the estimate's device: `auto` trains on CUDA where there is one, and a GPU is what the
    estimate is asked about."""
    return "cpu" if train_device == "cpu" else "cuda"


def from_recipe(recipe: Recipe, device: str | None = None, replay_dropout: bool = True) -> EstimateConfig:
    """The estimate's settings for a recipe: the same numbers the trainer is given. device None: the recipe's
    train.device (auto -> cuda). replay_dropout: LoRA dropout masks replayed in backward (the trainer's default)."""
    q, lo, t = recipe.quant, recipe.lora, recipe.train
    return EstimateConfig(quant=q.type, blocksize=q.blocksize, double_quant=q.double_quant, rank=lo.r,
                          targets=lo.targets if isinstance(lo.targets, str) else tuple(lo.targets),
                          optimizer=t.optimizer, batch=t.batch_size, seq=recipe.data.max_length,
                          checkpointing=t.gradient_checkpointing,
                          device=device or estimate_device(t.device), loss_chunk=t.loss_chunk,
                          compute_bytes=2 if q.compute_dtype == "bf16" else 4, lora_dropout=lo.dropout,
                          replay_dropout=replay_dropout, offload_activations=t.offload_activations,
                          mlp_chunk=t.mlp_chunk, dora=lo.dora,
                          ia3_outputs=_names(recipe.ia3.outputs) if recipe.ia3 else (),
                          ia3_inputs=_names(recipe.ia3.inputs) if recipe.ia3 else (),
                          objective=t.objective, precompute_reference=t.precompute_reference)


def override(cfg: EstimateConfig, **given) -> EstimateConfig:
    """cfg with the settings a command line gave explicitly (None: not given, the recipe's value stays)."""
    fields = {f.name for f in dataclasses.fields(EstimateConfig)}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ConfigError(f"not an estimate setting: {', '.join(unknown)}; settings: {', '.join(sorted(fields))}")
    return dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})
