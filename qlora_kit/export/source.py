"""What an export reads: a run folder or a PEFT adapter folder -> `Source` (the adapter stack, the base it belongs
to, the quantization it was trained against, LoftQ offsets); the base folder resolved; the stack checked against
the base's tensor headers before anything is computed or written (export.py, gguf_export.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters import loftq, peft_format
from ..quant import bnb as quant
from ..config import ModelConfig
from ..errors import ExportError, ModelError
from ..model.load import BUILTINS, cache_dir, resolve
from ..run.folder import adapter_source
from .shards import TensorInfo


@dataclass(frozen=True)
class Source:
    stack: list[peft_format.Adapter]  # applied in order (peft_format.load_stack): LoRA/DoRA, then IA3 over it
    base_name: str | None
    trained_with: quant.QuantSpec  # the quantization the adapter was trained against (type none: a plain base)
    model_cfg: ModelConfig
    loftq: dict = field(default_factory=dict)  # a LoftQ run's base offsets: module -> (B (out, r), A (r, in)) fp32

    def offset(self, module: str | None):
        """The LoftQ offset `module`'s base was quantized around, or None (loftq.base_weight)."""
        return self.loftq.get(module)

    @property
    def adapter(self) -> peft_format.Adapter:
        """The first (root folder's) adapter."""
        return self.stack[0]

    def modules(self) -> set[str]:
        return {m for a in self.stack for m in a.modules()}

    def weight_names(self) -> set[str]:
        return {f"{m}.weight" for m in self.modules()}


# ---- reading the source ----------------------------------------------------------------------------------------------


def open_source(path: str | Path, base: str | None = None, quant_type: str | None = None) -> Source:
    """A run folder (its adapter/, recipe quant settings and base) or a PEFT LoRA adapter folder."""
    adapter_dir, recipe = adapter_source(path)  # a run folder (or RUN/adapter) comes with its recipe
    if recipe is not None:
        spec = quant.QuantSpec.from_config(recipe.quant)
        if quant_type and spec.type != "none" and quant_type != spec.type:
            raise ExportError(f"--quant {quant_type}: this run was trained with quant.type {spec.type} "
                              "(recipe.yaml); drop --quant.")
        stack = peft_format.load_stack(adapter_dir)
        model_cfg = dataclasses.replace(recipe.model, path=base or recipe.model.path)
        offsets = loftq.load(adapter_dir.parent) if loftq.is_loftq_run(recipe) else {}
    else:
        path = adapter_dir
        if not (path / peft_format.CONFIG_NAME).is_file():
            raise ExportError(f"{path} is neither a run folder (recipe.yaml + adapter/) nor a PEFT adapter folder "
                              f"({peft_format.CONFIG_NAME} + {peft_format.WEIGHTS_NAME}).")
        stack = peft_format.load_stack(path)
        spec = quant.QuantSpec(quant_type or "nf4")  # blocksize 64, double quant, bf16 compute: QLoRA's settings
        model_cfg = ModelConfig(path=base or stack[0].base_model or "")
        offsets = {}
    for adapter in stack:
        _check_adapter(adapter)
    return Source(stack, model_cfg.path or None, spec, model_cfg, offsets)


def _check_adapter(adapter: peft_format.Adapter) -> None:
    """peft_format.load_adapter already refused unknown tensors; here the settings export cannot merge."""
    unsupported = [k for k in ("fan_in_fan_out", "lora_bias") if adapter.config.get(k)]
    if unsupported:
        raise ExportError(f"this adapter uses {', '.join(unsupported)}, which export does not support; LoRA, DoRA "
                          "and IA3 on Linear layers (weights stored (out, in)) can be exported.")


def base_folder(name: str | None, required: bool = True) -> Path | None:
    """The base's folder. Not required (an adapter export with no --base): None when it is not here (a hub id, a
    built-in model not converted yet), rather than converting or failing."""
    if not name:
        if required:
            raise ExportError("the adapter does not name its base model (base_model_name_or_path); pass --base.")
        return None
    here = (cache_dir() / "models" / name).is_dir() if name in BUILTINS else Path(name).expanduser().is_dir()
    if not required and not here:
        return None
    try:
        folder = resolve(name)
    except ModelError as e:
        raise ExportError(f"base model: {e} Pass the model the adapter was trained on with --base.") from None
    if not (folder / "config.json").is_file():
        raise ExportError(f"base {folder} has no config.json, so it is not a Hugging Face model folder; pass --base.")
    return folder


def check_fits(stack: list[peft_format.Adapter], index: dict[str, TensorInfo], base: Path) -> None:
    """Every adapted module's weight exists in the base with shape (out, in) = that of B @ A (DoRA's m: (out,);
    IA3's l: (out, 1) or (1, in)). Headers only."""
    missing, bad = [], []
    for adapter, m in [(a, m) for a in stack for m in a.modules()]:
        info = index.get(f"{m}.weight")
        if info is None:
            missing.append(m)
            continue
        if adapter.kind == "ia3":
            l = adapter.ia3_vector(m)
            want = (1, info.shape[1]) if adapter.feedforward(m) else (info.shape[0], 1)
            if tuple(l.shape) != want:
                bad.append(f"{m} (ia3_l {tuple(l.shape)}, base weight {tuple(info.shape)} needs {want})")
            continue
        A, B = adapter.pair(m)
        if adapter.dora and tuple(adapter.magnitude(m).shape) != (B.shape[0],):
            bad.append(f"{m} (lora_magnitude_vector {tuple(adapter.magnitude(m).shape)}, lora_B {tuple(B.shape)})")
        elif A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            bad.append(f"{m} (lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not chain)")
        elif info.shape != (B.shape[0], A.shape[1]) or not info.dtype.is_floating_point:
            bad.append(f"{m} (base weight {tuple(info.shape)} {info.dtype}, adapter B @ A {(B.shape[0], A.shape[1])})")
    if missing or bad:
        what = ([f"{len(missing)} adapted modules are not in the base: {', '.join(missing[:3])}"
                 + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")] if missing else [])
        what += [f"{len(bad)} have the wrong shape: {', '.join(bad[:2])}"] if bad else []
        raise ExportError(f"the adapter does not fit the base {base}: {'; '.join(what)}. Pass the model it was "
                          "trained on with --base.")


