"""What an export preserved: its loss next to the training-time model's, on the same examples.

    base     the run's base as training loaded it (quantized as the run was), every adapter switched off
    run      the training-time model: that base + the adapter (generate.load of the run or adapter folder)
    export   the written artifact through the loader its users run: transformers' from_pretrained for a model
             folder (merged, quantized; + peft's PeftModel.from_pretrained for the adapter/ beside a 4-bit base),
             qlora-kit's GGUF reader for a .gguf (export/gguf/reader.py, passed in by the CLI), the adapter folder
             over the run's quantized base

The examples are the run's validation split (or `data`), the first `max_examples` of them, tokenized by the run's
tokenizer; the loss is evaluation.mean_loss (training's loss). `recovered` = (base - export) / (base - run): the
share of the training's loss improvement the export keeps; below RECOVERED_MIN the export lost most of the
training, and the check says so. The numbers are written beside the export (check_path).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import evaluation, generate
from .. import atomic
from ..adapters.methods import disabled
from ..config import QuantConfig
from ..data import pipeline as data
from ..errors import ModelError
from ..quant.bnb import as_stored_on_cpu
from ..run.folder import adapter_source

RECOVERED_MIN = 0.5
"""An export keeping less than this share of the run's loss improvement over its base has lost most of the
training."""
CHECK_NAME = "export_check.json"


@dataclass
class Check:
    data: str
    examples: int = 0
    tokens: int = 0  # label tokens each loss is the mean over
    base_loss: float | None = None
    run_loss: float | None = None
    export_loss: float | None = None
    recovered: float | None = None
    note: str | None = None  # why a number is missing
    seconds: float = 0.0

    @property
    def lost(self) -> bool:
        return self.recovered is not None and self.recovered < RECOVERED_MIN

    def to_dict(self) -> dict:
        return asdict(self) | {"lost_most_of_training": self.lost, "recovered_min": RECOVERED_MIN}


def check_path(out: Path) -> Path:
    """Where the check is written: inside an export folder; beside a file (demo.gguf -> demo.check.json)."""
    return out / CHECK_NAME if out.is_dir() else out.with_name(out.stem + ".check.json")


def run_check(source: str | Path, out: Path, base: str | None = None, quant: str | None = None,
              data_path: str | None = None, data_format: str | None = None, max_examples: int = 64,
              device: str = "cpu", extra: dict | None = None, read_gguf=None) -> Check:
    """Measure, write check_path(out) (with `extra` merged in) and return the check. `read_gguf`: the GGUF reader
    for a .gguf export (generate.load_gguf)."""
    t0 = time.perf_counter()
    check = measure(source, out, base, quant, data_path, data_format, max_examples, device, read_gguf)
    check.seconds = round(time.perf_counter() - t0, 3)
    atomic.write_text(check_path(out), json.dumps(check.to_dict() | (extra or {}), indent=2) + "\n")
    return check


def check_data(source: str | Path, data_path: str | None, data_format: str | None) -> None:
    """A bad check data file fails here, before any model loads (the CLI calls it before exporting)."""
    if data_path is not None:
        recipe = adapter_source(source)[1]
        req = evaluation.Request(source=str(source), data=data_path, format=data_format)
        data.check(evaluation.data_config(req, recipe)[0])


def measure(source, out: Path, base, quant, data_path, data_format, max_examples, device, read_gguf=None) -> Check:
    _, recipe = adapter_source(source)
    if data_path is None and (recipe is None or recipe.data.val_fraction <= 0):
        why = "is not a run folder" if recipe is None else "has no validation split (data.val_fraction 0)"
        return Check(data="", note=f"not measured: {source} {why}; pass --check-data FILE")
    req = evaluation.Request(source=str(source), data=data_path, format=data_format, max_examples=max_examples,
                             base=base, device=device)
    check_data(source, data_path, data_format)
    quant_cfg = recipe.quant if recipe is not None else QuantConfig(type=quant or "nf4")
    loaded = generate.load(str(source), base=base, quant=quant_cfg, device=device)
    cfg, val_split = evaluation.data_config(req, recipe)
    seed = recipe.train.seed if recipe is not None else 0
    examples, _ = evaluation.examples_for(cfg, loaded.tokenizer, val_split, seed, max_examples)
    pad, chunk = data.pad_token_id(loaded.tokenizer), recipe.train.loss_chunk if recipe is not None else 256
    check = Check(data=cfg.path + (" (validation split)" if val_split else ""), examples=len(examples))
    check.run_loss, check.tokens = evaluation.mean_loss(loaded.model, examples, pad, 8, device, chunk=chunk)
    with disabled(loaded.model):
        check.base_loss, _ = evaluation.mean_loss(loaded.model, examples, pad, 8, device, chunk=chunk)
    base_name = base or _base_name(loaded)
    del loaded
    model, check.note = load_export(out, base_name, quant_cfg, device, read_gguf)
    if model is not None:
        check.export_loss, _ = evaluation.mean_loss(model, examples, pad, 8, device, chunk=chunk)
        gain = check.base_loss - check.run_loss
        if gain > 1e-6:  # the run improved on its base here: how much of that the export kept
            check.recovered = (check.base_loss - check.export_loss) / gain
        else:
            check.note = "the run's loss here is no better than its base's: nothing to keep"
    return check


def _base_name(loaded: generate.Loaded) -> str | None:
    return getattr(loaded.model.config, "_name_or_path", None) or None


def load_export(out: Path, base: str | None, quant: QuantConfig, device: str, read_gguf=None):
    """(the export as its users load it, None) or (None, why it is not measured)."""
    if out.is_file():
        if out.suffix.lower() != ".gguf":
            return None, f"not measured: {out} is not a GGUF file"
        import gguf

        kind = str(gguf.GGUFReader(str(out)).get_field("general.type").contents())
        if kind == "adapter":
            return None, "not measured: a LoRA GGUF runs only over a base GGUF, in llama.cpp"
        return generate.load_gguf(str(out), "fp32", device, read_gguf).model, None
    if (out / "adapter_config.json").is_file():  # a PEFT folder: over the base quantized as in training
        return generate.load(str(out), base=base, quant=quant, device=device).model, None
    return _hf_model(out, device)


def _hf_model(out: Path, device: str):
    from transformers import AutoModelForCausalLM

    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    q = config.get("quantization_config") or {}
    if q.get("load_in_4bit") and device == "cpu" and _unaligned(out, q):
        return None, ("not measured: some 4-bit weights have in_features not a multiple of the blocksize, which "
                      "bitsandbytes' CPU kernels compute wrongly; check it on CUDA (--device cuda)")
    kwargs = {"device_map": {"": device}} if q else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(out, dtype="auto", **kwargs)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        raise ModelError(f"{out}: transformers cannot load the export ({str(e).splitlines()[0]}).") from None
    as_stored_on_cpu(model)  # the stored model, not bitsandbytes' bf16 CPU approximation of it
    if (out / "adapter" / "adapter_config.json").is_file():
        import warnings

        from peft import PeftModel

        with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`: not ours
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            model = PeftModel.from_pretrained(model, out / "adapter")
    return (model if q else model.to(device)).eval(), None


def _unaligned(out: Path, q: dict) -> bool:
    """Any 4-bit weight whose in_features (quant-state JSON shape[1]) is not a multiple of its blocksize."""
    from safetensors import safe_open

    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                if ".quant_state.bitsandbytes__" in k:
                    state = json.loads(bytes(h.get_tensor(k).numpy()))
                    if state["shape"][1] % state["blocksize"]:
                        return True
    return False


def loss_line(check: Check) -> str:
    """One line for the terminal."""
    if check.run_loss is None:
        return f"check: {check.note}"
    parts = [f"base {check.base_loss:.4f}", f"run {check.run_loss:.4f}"]
    parts.append(f"export {check.export_loss:.4f}" if check.export_loss is not None else "export -")
    if check.recovered is not None:
        parts.append(f"keeps {check.recovered:.0%} of the training's improvement")
    tail = f" ({check.note})" if check.note else ""
    return (f"check on {check.data}, {check.examples} examples, {check.tokens:,} label tokens: "
            + ", ".join(parts) + tail)

