"""PEFT's on-disk LoRA adapter format: read and write, no `peft` import needed.

    adapter_config.json          peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules (sorted), ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight (r, in)
                                 base_model.model.<module>.lora_B.weight (out, r)     metadata {"format": "pt"}

Our module names are Hugging Face's, so a key is our name with a prefix (docs/ARCHITECTURE.md, "Names are the
export format"). Each file is written atomically (`atomic.atomic_file`), so a crash never leaves a half-written one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import atomic
from .errors import ModelError
from .terms import lora_scale

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass(frozen=True)
class Adapter:
    """An adapter read from disk: tensors keyed by our module names (no PEFT prefix), and its settings."""

    tensors: dict[str, torch.Tensor]
    r: int
    alpha: float
    rslora: bool
    target_modules: list[str]
    base_model: str | None
    config: dict

    @property
    def scaling(self) -> float:
        return lora_scale(self.alpha, self.r, self.rslora)

    def module_scaling(self, module: str) -> float:
        """s of one module: alpha / r (alpha / sqrt(r) with rsLoRA), honouring PEFT's per-module `rank_pattern` /
        `alpha_pattern`. A pattern key matches a module name that ends with it after a dot, first key wins (PEFT's
        `get_pattern_key`); the rank is read off the module's A matrix, so `rank_pattern` needs no parsing."""
        r = self.tensors[f"{module}.lora_A.weight"].shape[0]
        alpha = self.alpha
        for key, value in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                alpha = float(value)
                break
        return lora_scale(alpha, r, self.rslora)

    def modules(self) -> list[str]:
        """Full names of the adapted modules, sorted."""
        return sorted({k.rsplit(".lora_", 1)[0] for k in self.tensors})

    def pair(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, in), B (out, r)) of one module."""
        return self.tensors[f"{module}.lora_A.weight"], self.tensors[f"{module}.lora_B.weight"]


def save_adapter(
    folder: str | Path,
    tensors: dict[str, torch.Tensor],
    *,
    r: int,
    alpha: float,
    dropout: float,
    rslora: bool,
    base_model: str | None,
    init: str = "kaiming",
    extra: dict | None = None,
) -> Path:
    """Write `tensors` ({'<module>.lora_A.weight': ...}) as a PEFT adapter folder; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora,
        # PEFT matches a list entry as a module-name suffix; the short names are what people read and edit.
        "target_modules": sorted({m.split(".")[-1] for m in modules}),
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        # loftq: the adapter belongs to a base quantized around the run's loftq.safetensors offsets; PEFT would
        # demand a loftq_config to load "loftq", and initialisation does not matter once trained.
        "init_lora_weights": "gaussian" if init == "gaussian" else True,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
        **(extra or {}),
    }
    with atomic.atomic_file(folder / WEIGHTS_NAME) as tmp:
        save_file({PREFIX + k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt"})
    atomic.write_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return folder


def load_adapter(folder: str | Path) -> Adapter:
    """Read a PEFT LoRA adapter folder (ours or one written by `peft`)."""
    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no such folder"
        raise ModelError(
            f"{folder} is not a PEFT adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME} (found: {found}). "
            "Pass a run folder (it has adapter/) or an adapter folder."
        )
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_path} is not valid JSON: {e}.") from None
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{cfg_path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported.")
    try:
        raw = load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{w_path} is truncated or not a safetensors file ({e}).") from None
    tensors = {}
    for k, v in raw.items():
        k = k[len(PREFIX):] if k.startswith(PREFIX) else k
        k = k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")  # PEFT's in-memory names
        if not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight")):
            raise ModelError(f"{w_path}: tensor {k!r} is not a LoRA A/B weight (DoRA, biases and modules_to_save are not supported).")
        tensors[k] = v
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors}
    for m in modules:
        if f"{m}.lora_A.weight" not in tensors or f"{m}.lora_B.weight" not in tensors:
            raise ModelError(f"{w_path}: module {m} has only one of lora_A / lora_B.")
    targets = config.get("target_modules") or []
    return Adapter(
        tensors=tensors,
        r=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        rslora=bool(config.get("use_rslora", False)),
        target_modules=[targets] if isinstance(targets, str) else list(targets),
        base_model=config.get("base_model_name_or_path"),
        config=config,
    )
