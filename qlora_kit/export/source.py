"""What an export reads: a run folder or a PEFT adapter folder -> `Source` (the adapter stack, the base it belongs
to, the quantization it was trained against, LoftQ offsets); the base folder resolved; its weights as the export
reads them (weight_index); the stack checked against the base's tensor headers before anything is computed or
written (export.py, gguf_export.py).

A pre-quantized base (a bitsandbytes-serialised checkpoint, model/prequant.py) has no 16-bit weights: each
quantized Linear's stored tensors (packed codes, absmax, quant map, nested absmax...) become one (out, in) entry of
the index whose read dequantizes them (StoredCodes), one Linear at a time, to the compute dtype training multiplied
by. Every format then reads it like any weight; the merge adds the adapter to it as it is (Source.from_codes).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters import loftq, peft_format
from ..quant import bnb as quant
from ..config import ModelConfig
from ..errors import ExportError, ModelError
from ..model import prequant
from ..model.load import BUILTINS, cache_dir, resolve
from ..run.folder import adapter_source
from .shards import TensorInfo, read_tensor, tensor_index


@dataclass(frozen=True)
class Source:
    stack: list[peft_format.Adapter]  # applied in order (peft_format.load_stack): LoRA/DoRA, then IA3 over it
    base_name: str | None
    trained_with: quant.QuantSpec  # the quantization the adapter was trained against (type none: a plain base)
    model_cfg: ModelConfig
    loftq: dict = field(default_factory=dict)  # a LoftQ run's base offsets: module -> (B (out, r), A (r, in)) fp32
    trained_on: str | None = None  # the model the run's recipe names (base_name unless --base replaced it)
    from_codes: bool = False  # the base read is pre-quantized: its Linear weights are dequant(stored codes) already

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
        trained_on = recipe.model.path
    else:
        path = adapter_dir
        if not (path / peft_format.CONFIG_NAME).is_file():
            raise ExportError(f"{path} is neither a run folder (recipe.yaml + adapter/) nor a PEFT adapter folder "
                              f"({peft_format.CONFIG_NAME} + {peft_format.WEIGHTS_NAME}).")
        stack = peft_format.load_stack(path)
        spec = quant.QuantSpec(quant_type or "nf4")  # blocksize 64, double quant, bf16 compute: QLoRA's settings
        model_cfg = ModelConfig(path=base or stack[0].base_model or "")
        offsets, trained_on = {}, stack[0].base_model
    for adapter in stack:
        _check_adapter(adapter)
    return Source(stack, model_cfg.path or None, spec, model_cfg, offsets, trained_on)


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




# ---- a pre-quantized base's weights ----------------------------------------------------------------------------------


@dataclass(eq=False)
class StoredCodes:
    """One Linear of a pre-quantized base: its stored tensors (headers; leaf name after the module -> TensorInfo),
    read when called and dequantized to the compute dtype: exactly the (out, in) weight training's QuantLinear
    multiplied by (model/prequant.py builds that layer from the same tensors)."""

    module: str
    parts: dict[str, TensorInfo]
    spec: quant.QuantSpec  # the stored quantization, computing in the run's compute dtype

    def buffers(self) -> dict[str, torch.Tensor]:
        """QuantLinear's tensors (qweight, code, absmax [, nested_*, offset] | qweight, scale)."""
        return prequant.buffers(self.module, {k: read_tensor(v) for k, v in self.parts.items()},
                                self.spec.compute_dtype)[2]

    def shape(self) -> tuple[int, int]:
        if self.spec.type == "int8":
            return tuple(self.parts["weight"].shape)
        return tuple(prequant.quant_state(read_tensor(self.parts[_state_leaf(self.parts)]))["shape"])

    def __call__(self) -> torch.Tensor:
        _, shape, buffers = prequant.buffers(self.module, {k: read_tensor(v) for k, v in self.parts.items()},
                                             self.spec.compute_dtype)
        return quant.dequantize(buffers, self.spec, shape, self.spec.compute_dtype)


def _state_leaf(parts: dict) -> str:
    return next(k for k in parts if k.startswith("weight.quant_state."))


def _stored_codes(index: dict[str, TensorInfo], compute_dtype: torch.dtype) -> dict[str, StoredCodes]:
    """module -> StoredCodes of every quantized Linear in a pre-quantized base's index (reads the ~170-byte
    quant-state blobs only)."""
    parts: dict[str, dict[str, TensorInfo]] = {}
    for key, info in index.items():
        m = prequant.module_of(key)
        if m is not None:
            parts.setdefault(m, {})[key[len(m) + 1:]] = info
    out = {}
    for m, p in parts.items():
        if f"{m}.weight" not in index:
            raise ExportError(f"the pre-quantized base stores quantization tensors of {m} but not its codes "
                              f"({m}.weight); the checkpoint is incomplete: re-download it.")
        p["weight"] = index[f"{m}.weight"]
        if "SCB" in p:
            spec = quant.QuantSpec("int8", compute_dtype=compute_dtype)
        elif any(k.startswith("weight.quant_state.") for k in p):
            state = prequant.quant_state(read_tensor(p[_state_leaf(p)]))
            spec = prequant.four_bit_spec(state, "weight.nested_absmax" in p, compute_dtype)
        else:
            raise ExportError(f"{m} (pre-quantized): neither int8 (SCB) nor 4-bit (quant_state) tensors; found "
                              f"{sorted(p)}. The checkpoint is incomplete or in an unknown layout.")
        out[m] = StoredCodes(m, p, spec)
    return out


def _is_prequantized(folder: Path) -> bool:
    try:
        return prequant.stored(json.loads((folder / "config.json").read_text(encoding="utf-8"))) is not None
    except (OSError, ValueError, ModelError):
        return False


def weight_index(src: Source, base: Path, merge_base: str) -> tuple[Source, dict[str, TensorInfo], list[str]]:
    """(the source as this base reads it, name -> TensorInfo of the base's tensors as the export sees them, notes).
    A pre-quantized base: each quantized Linear is one (out, in) entry read as dequant(stored codes) (StoredCodes),
    its stored tensors gone from the index, and the source says it trained on (and merges onto) those codes. A 16-bit
    --base for a run trained on a pre-quantized model: the codes are recomputed with that model's stored settings."""
    index = tensor_index(base)
    try:
        config = json.loads((base / "config.json").read_text(encoding="utf-8"))
        stored = prequant.stored(config)
    except (OSError, ValueError) as e:
        raise ExportError(f"{base}/config.json cannot be read ({e}); pass a Hugging Face model folder with --base.") \
            from None
    except ModelError as e:
        raise ExportError(f"base {base}: {e}") from None
    if stored is None:
        src, notes = _sixteen_bit(src, base, merge_base)
        return src, index, notes
    if merge_base == "original":
        raise ExportError(f"--merge-base original: the base {base} is pre-quantized, so its original 16-bit weights "
                          "are not in it. Pass the 16-bit model with --base to merge onto them, or drop --merge-base "
                          "(the adapter is merged onto the dequantized stored codes, the weights it trained on).")
    codes = _stored_codes(index, src.trained_with.compute_dtype)
    if not codes:
        raise ExportError(f"the base {base} says it is quantized (config.json quantization_config) but stores no "
                          "quantized Linear; the checkpoint is incomplete or in an unknown layout.")
    out: dict[str, TensorInfo] = {}
    for name, info in index.items():
        m = prequant.module_of(name)
        if m is not None:
            continue  # absmax, quant map, SCB...: read through their Linear's StoredCodes
        c = codes.get(name[: -len(".weight")]) if name.endswith(".weight") else None
        if c is None:
            out[name] = info
            continue
        shape, dtype = c.shape(), c.spec.compute_dtype
        out[name] = dataclasses.replace(info, dtype=dtype, shape=shape, nbytes=shape[0] * shape[1] * dtype.itemsize,
                                        decoded=c)
    spec = next(iter(codes.values())).spec
    kinds = sorted({_describe(c.spec) for c in codes.values()})
    note = (f"the base {base.name} is pre-quantized ({', '.join(kinds)}): its Linear weights are its stored codes "
            "dequantized, the weights this adapter trained on. A merged model is that quantized base plus the "
            "adapter's change, not the original 16-bit model; to merge onto the original weights, pass the 16-bit "
            "model with --base (and --merge-base original).")
    return dataclasses.replace(src, trained_with=spec, from_codes=True), out, [note]


def _describe(spec: quant.QuantSpec) -> str:
    if spec.type == "int8":
        return "int8"
    return f"{spec.type}, blocksize {spec.blocksize}" + (", double quant" if spec.double_quant else "")


def _sixteen_bit(src: Source, base: Path, merge_base: str) -> tuple[Source, list[str]]:
    """A 16-bit base. When the run trained on a pre-quantized model (found here), its codes are what quantizing
    these weights with that model's stored settings gives (model/prequant.py: bit-identical to quantizing the
    original), so the dequantized merge base recomputes them with those settings, not the recipe's."""
    if src.trained_with.type == "none" or not src.trained_on or src.trained_on in BUILTINS or merge_base == "original":
        return src, []
    try:
        trained = resolve(src.trained_on)
    except ModelError:  # said, not silent: a pre-quantized original with other settings would round differently
        return src, [f"the model the run trained on ({src.trained_on}) is not found here, so the merge base is --base "
                     f"quantized with the recipe's settings ({_describe(src.trained_with)}); if that model was a "
                     "pre-quantized checkpoint stored with other settings, make it available here or pass "
                     "--merge-base original."]
    if trained.resolve() == base.resolve() or not _is_prequantized(trained):
        return src, []
    codes = _stored_codes(tensor_index(trained), src.trained_with.compute_dtype)
    specs = {c.spec for c in codes.values()}
    if len(specs) != 1:
        raise ExportError(f"the run trained on the pre-quantized {trained}, whose Linears are quantized in "
                          f"{len(specs)} different ways; recomputing its codes from --base {base} is not supported. "
                          "Export without --base (from the stored codes), or pass --merge-base original.")
    return dataclasses.replace(src, trained_with=specs.pop()), []
