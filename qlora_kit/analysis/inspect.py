"""What is this folder or file? A model, a PEFT adapter, a run, a quantized export or a GGUF file: facts read from
headers, no weights loaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors import safe_open

from . import artifacts
from ..adapters import peft_format
from ..run import checkpoint
from ..model import load as model
from ..quant import mxfp4
from ..errors import ModelError
from ..run.folder import is_run_dir, read_metrics


def _tensor_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for f in files:
        if f.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    s = h.get_slice(k)
                    out[k] = (tuple(s.get_shape()), s.get_dtype())
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ModelError(f"{f} is truncated or corrupt ({e}).") from None
    return out


def describe_model(folder: Path, allow_pickle: bool = False, trust_remote_code: bool = False) -> dict:
    packed = mxfp4.is_mxfp4_folder(folder)  # gpt-oss as released: loaded (decoded) like a 16-bit checkpoint
    config = model.load_config(folder, trust_remote_code, quantized_ok=packed)
    files = model.weight_files(folder, allow_pickle)
    shapes = _tensor_shapes(files)
    for f in files:  # only reached with allow_pickle: read as tensors only (weights_only), memory-mapped
        if f.suffix == ".bin":
            shapes |= {k: (tuple(v.shape), str(v.dtype)[6:].upper()) for k, v in model.read_pickle(f).items()}
    if packed:  # a blocks byte holds two weights; the scales (one a block of 32) are no parameters of the model
        shapes = {(k[: -len(mxfp4.BLOCKS)] if k.endswith(mxfp4.BLOCKS) else k): ((*s[:-2], s[-2] * 32), "MXFP4")
                  if k.endswith(mxfp4.BLOCKS) else (s, d) for k, (s, d) in shapes.items()
                  if not k.endswith(mxfp4.SCALES)}
    params = sum(math.prod(s) for s, _ in shapes.values())
    linears = sorted({k.rsplit(".", 2)[-2] for k, (s, _) in shapes.items() if len(s) == 2 and k.endswith(".weight")
                      and "embed" not in k and "lm_head" not in k})
    return {"kind": "model", "path": str(folder), "architecture": (config.architectures or [config.model_type])[0],
            "params": params, "dtypes": sorted({d for _, d in shapes.values()}), "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
            "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)), "linear_modules": linears,
            **({"stored_quantization": "mxfp4 experts (decoded when loaded, then quantized as quant.type says)"}
               if packed else {})}


def describe_adapter(folder: Path) -> dict:
    """LoRA / DoRA / IA3, or a stack of them (peft_format.load_stack): `methods` lists each, in applied order."""
    stack = peft_format.load_stack(folder)
    parts = []
    for a in stack:
        part = {"method": a.method, "target_modules": a.target_modules, "modules": len(a.modules()),
                "params": sum(t.numel() for t in a.tensors.values())}
        if a.kind == "ia3":
            part["input_scaled"] = sum(a.feedforward(m) for m in a.modules())
        else:
            part |= {"r": a.r, "alpha": a.alpha, "scaling": a.scaling, "rslora": a.rslora}
        parts.append(part)
    first = parts[0]
    out = {"kind": "adapter", "path": str(folder), "method": "+".join(p["method"] for p in parts)}
    out |= {k: first[k] for k in ("r", "alpha", "scaling", "rslora") if k in first}
    out |= {"target_modules": first["target_modules"], "modules": first["modules"],
            "params": sum(p["params"] for p in parts), "base_model": stack[0].base_model}
    if len(parts) > 1:
        out["methods"] = parts
    return out


def describe_run(folder: Path) -> dict:
    from ..config import load_recipe

    recipe = load_recipe(folder / "recipe.yaml")
    metrics = read_metrics(folder)
    method = ("dora" if recipe.lora.dora else "lora") if recipe.lora.targets != [] else None
    method = "+".join(m for m in (method, "ia3" if recipe.ia3 is not None else None) if m)
    out = {"kind": "run", "path": str(folder), "model": recipe.model.path, "quant": recipe.quant.type,
           "method": method, "lora_r": recipe.lora.r, "targets": recipe.lora.targets,
           "steps_planned": recipe.train.steps,
           "steps_logged": metrics[-1]["step"] if metrics else 0,
           "first_loss": metrics[0]["loss"] if metrics else None, "last_loss": metrics[-1]["loss"] if metrics else None,
           "checkpoints": [p.name for p in checkpoint.all_checkpoints(folder)],
           "finished": (folder / "adapter" / peft_format.WEIGHTS_NAME).is_file()}
    if (folder / "summary.json").is_file():
        try:
            out["summary"] = json.loads((folder / "summary.json").read_bytes().decode("utf-8"))
        except ValueError:  # written atomically, so only damaged later: say so rather than fail
            out["summary"] = "damaged (not UTF-8 JSON)"
    return out


def describe(path: str, allow_pickle: bool = False, trust_remote_code: bool = False) -> dict:
    p = Path(path)
    if p.is_dir() and is_run_dir(p):
        return describe_run(p)
    if p.is_dir() and (p / peft_format.CONFIG_NAME).is_file():
        return describe_adapter(p)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return artifacts.describe_gguf(p)
    folder = model.resolve(path, allow_pickle)
    if artifacts.is_quantized_folder(folder) and not mxfp4.is_mxfp4_folder(folder):  # MXFP4: loads as 16-bit
        return artifacts.describe_quantized(folder)
    return describe_model(folder, allow_pickle, trust_remote_code)
