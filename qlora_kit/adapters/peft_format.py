"""PEFT's on-disk adapter formats (LoRA, DoRA, IA3): read and write, no `peft` import needed.

    adapter_config.json          peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules (sorted), ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight (r, in)
                                 base_model.model.<module>.lora_B.weight (out, r)     metadata {"format": "pt"}
    DoRA (use_dora: true)        + base_model.model.<module>.lora_magnitude_vector (out,)
    IA3 (peft_type IA3)          base_model.model.<module>.ia3_l: (out, 1), or (1, in) for feedforward_modules

Several methods in one run (LoRA on attention, IA3 on the MLP) are one PEFT folder per method, stacked: the
folder holds the LoRA/DoRA adapter and its subfolder `ia3/` the IA3 one (PEFT's own layout for a second adapter).
`load_stack` returns them in the order that reproduces the run: the root first, then ia3/ applied OVER it
(y = l ⊙ ((W + s·B A) x) on a module both adapt). With PEFT: load the root, merge_and_unload, load ia3/.

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

from .. import atomic
from . import expert_format
from ..errors import ModelError
from ..terms import lora_scale

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
IA3_SUBFOLDER = "ia3"  # a stacked run's second method (see the module docstring)
LORA_KEYS = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")


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
    kind: str = "lora"  # "lora" (LoRA or DoRA: peft_type LORA) | "ia3"

    @property
    def dora(self) -> bool:
        return self.kind == "lora" and bool(self.config.get("use_dora"))

    @property
    def method(self) -> str:
        """lora | dora | ia3: what the parameter report and inspect call it."""
        return "dora" if self.dora else self.kind

    def magnitude(self, module: str) -> torch.Tensor:
        """DoRA's m (out,) of one module."""
        return self.tensors[f"{module}.lora_magnitude_vector"]

    def ia3_vector(self, module: str) -> torch.Tensor:
        """IA3's l of one module: (out, 1), or (1, in) when it scales the input (feedforward)."""
        return self.tensors[f"{module}.ia3_l"]

    def feedforward(self, module: str) -> bool:
        """IA3: does this module scale its input (PEFT's feedforward_modules, matched like target_modules)?"""
        ff = self.config.get("feedforward_modules") or []
        if isinstance(ff, str):
            return re.fullmatch(ff, module) is not None
        return any(module == t or module.endswith("." + t) for t in ff)

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
        if self.kind == "ia3":
            return sorted(k[: -len(".ia3_l")] for k in self.tensors)
        return sorted({k.rsplit(".lora_", 1)[0] for k in self.tensors})

    def has(self, module: str) -> bool:
        """Whether `module` is adapted: one key lookup, where `module in modules()` builds the set of every module
        (a merge asks once per expert slice: quadratic on a MoE)."""
        return f"{module}{'.ia3_l' if self.kind == 'ia3' else '.lora_A.weight'}" in self.tensors

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
    model_type: str | None = None,
) -> Path:
    """Write `tensors` ({'<module>.lora_A.weight': ...}) as a PEFT adapter folder; returns the folder. `model_type`
    (config.json's): Linears PEFT would misread for it are written as target_parameters (expert_format)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    reread = expert_format.peft_reread(model_type)
    tensors, target_parameters = expert_format.to_peft(tensors, reread)  # experts: PEFT's fused-parameter layout
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors
                      if ".experts.lora_" not in k and ".experts.base_layer." not in k})
    modules = [m for m in modules if not expert_format.as_parameter(m, reread)]
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
        **({"target_parameters": target_parameters} if target_parameters else {}),
        **(extra or {}),
    }
    _write(folder, tensors, config)
    return folder


def _write(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    with atomic.atomic_file(folder / WEIGHTS_NAME) as tmp:
        save_file({PREFIX + k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt"})
    atomic.write_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")


def save_ia3(folder: str | Path, tensors: dict[str, torch.Tensor], *, feedforward: list[str],
             base_model: str | None) -> Path:
    """Write {'<module>.ia3_l': (out, 1) | (1, in)} as a PEFT IA3 folder; `feedforward`: the modules (full names)
    whose input is scaled. target_modules / feedforward_modules are written as short suffixes when those are
    unambiguous, else as the full names (PEFT matches a list entry as a module-name suffix either way)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    modules = sorted(k[: -len(".ia3_l")] for k in tensors)
    ff = set(feedforward)
    by_suffix: dict[str, set[bool]] = {}
    for m in modules:
        by_suffix.setdefault(m.split(".")[-1], set()).add(m in ff)
    if all(len(v) == 1 for v in by_suffix.values()):  # each suffix is input-scaled everywhere or nowhere
        targets, ff_list = sorted(by_suffix), sorted(k for k, v in by_suffix.items() if True in v)
    else:
        targets, ff_list = modules, sorted(ff)
    config = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": targets,
              "feedforward_modules": ff_list, "base_model_name_or_path": base_model, "fan_in_fan_out": False,
              "init_ia3_weights": True, "inference_mode": True, "modules_to_save": None, "revision": None}
    _write(folder, tensors, config)
    return folder


def load_stack(folder: str | Path) -> list[Adapter]:
    """The adapters of a folder in the order that reproduces the run: the folder's own, then ia3/ over it."""
    folder = Path(folder)
    stack = [load_adapter(folder)]
    if (folder / IA3_SUBFOLDER / CONFIG_NAME).is_file():
        sub = load_adapter(folder / IA3_SUBFOLDER)
        if sub.kind != "ia3" or stack[0].kind == "ia3":
            raise ModelError(f"{folder / IA3_SUBFOLDER} must hold an IA3 adapter over a LoRA/DoRA one in {folder}; "
                             f"found {sub.method} over {stack[0].method}.")
        stack.append(sub)
    return stack


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
    kind = {"LORA": "lora", "IA3": "ia3"}.get(config.get("peft_type"))
    if kind is None:
        raise ModelError(f"{cfg_path}: peft_type is {config.get('peft_type')!r}; LORA (with or without use_dora) "
                         "and IA3 adapters are supported.")
    try:
        raw = load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{w_path} is truncated or not a safetensors file ({e}).") from None
    tensors = {}
    for k, v in raw.items():
        k = k[len(PREFIX):] if k.startswith(PREFIX) else k
        # PEFT's in-memory names carry the adapter name: lora_A.default.weight, lora_magnitude_vector.default.weight
        k = k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        k = k.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector").replace(
            ".ia3_l.default", ".ia3_l")
        ok = k.endswith(".ia3_l") if kind == "ia3" else k.endswith(LORA_KEYS[:2]) or (
            config.get("use_dora") and k.endswith(LORA_KEYS[2]))
        if not ok:
            what = "an IA3 vector (ia3_l)" if kind == "ia3" else "a LoRA A/B weight or (with use_dora) a magnitude"
            raise ModelError(f"{w_path}: tensor {k!r} is not {what} (biases and modules_to_save are not supported).")
        tensors[k] = v
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors} if kind == "lora" else set()
    for m in modules:
        if f"{m}.lora_A.weight" not in tensors or f"{m}.lora_B.weight" not in tensors:
            raise ModelError(f"{w_path}: module {m} has only one of lora_A / lora_B.")
        if config.get("use_dora") and f"{m}.lora_magnitude_vector" not in tensors:
            raise ModelError(f"{w_path}: use_dora is set but module {m} has no lora_magnitude_vector.")
    if kind == "lora" and config.get("target_parameters"):  # fused expert pairs -> one pair per expert
        try:
            tensors = expert_format.from_peft(tensors, list(config["target_parameters"]), int(config["r"]))
        except ValueError as e:
            raise ModelError(f"{cfg_path}: {e}.") from None
    targets = config.get("target_modules") or []
    if kind == "ia3":
        return Adapter(tensors=tensors, r=0, alpha=0.0, rslora=False,
                       target_modules=[targets] if isinstance(targets, str) else list(targets),
                       base_model=config.get("base_model_name_or_path"), config=config, kind="ia3")
    return Adapter(
        tensors=tensors,
        r=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        rslora=bool(config.get("use_rslora", False)),
        target_modules=[targets] if isinstance(targets, str) else list(targets),
        base_model=config.get("base_model_name_or_path"),
        config=config,
    )
