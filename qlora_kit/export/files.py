"""The files of an export folder besides the weights, and its atomic creation (used by `export`).

    config.json             the base's, without quantization_config (merged) or with transformers' bitsandbytes
                            one (quantized); dtype = the output dtype
    generation_config.json  copied, or derived from config.json as transformers does
    tokenizer files         copied from the base (tokenizer.json, tokenizer_config.json, chat template, *.model...)

Free space is checked here for every format (`check_free_space`); `free_bytes` is the one seam tests replace to
simulate a full disk.
"""

from __future__ import annotations

import errno
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import atomic
from ..quant import bnb as quant
from ..errors import ExportError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "vocab.txt")
TOKENIZER_GLOBS = ("*.model", "*.tiktoken")
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def free_bytes(path: Path) -> int:
    """Free space on the filesystem holding `path` (its nearest existing parent)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_free_space(out: Path, need: int) -> None:
    """Refuse before writing when the filesystem of `out` has less than `need` bytes free."""
    free = free_bytes(out.parent)
    if free < need:
        raise ExportError(f"not enough disk space for {out}: the export needs about {need / 1e9:.2f} GB, "
                          f"{free / 1e9:.2f} GB are free. Free some space or choose another --out.")


def linear_weights(base: Path) -> set[str]:
    """`<module>.weight` of every nn.Linear or transformers Conv1D but the output embeddings (what training
    quantizes on load), from the model built on the meta device (no memory)."""
    return _layer_weights(base)[0]


def transposed_weights(base: Path) -> set[str]:
    """`<module>.weight` of every Conv1D but the output embeddings: stored (in, out), trained as (out, in)
    (model.load: transposed_names)."""
    return _layer_weights(base)[1]


def _layer_weights(base: Path) -> tuple[set[str], set[str]]:
    from ..model.conv1d import layer_weights
    from ..model.load import load_config

    config = load_config(base, quantized_ok=True)  # a pre-quantized base: which Linears, not how they are stored
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    return layer_weights(config)


def bnb_config(spec: quant.QuantSpec, compute: str) -> dict:
    """config.json's quantization_config, as transformers' BitsAndBytesConfig writes it."""
    four = spec.type != "int8"
    return {"_load_in_4bit": four, "_load_in_8bit": not four, "bnb_4bit_compute_dtype": compute if four else "float32",
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": spec.type if four else "fp4",
            "bnb_4bit_use_double_quant": spec.double_quant if four else False,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "load_in_4bit": four, "load_in_8bit": not four,
            "quant_method": "bitsandbytes"}


def write_config(base: Path, tmp: Path, out_dtype: torch.dtype, qspec: quant.QuantSpec | None) -> None:
    """config.json (dtype = out_dtype; with `qspec`, bitsandbytes' quantization_config computing in
    qspec.compute_dtype) and generation_config.json."""
    config = json.loads((base / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = DTYPE_NAMES[out_dtype]
    if "torch_dtype" in config:  # transformers < 4.56 spelling; keep both consistent
        config["torch_dtype"] = DTYPE_NAMES[out_dtype]
    if qspec is not None:
        config["quantization_config"] = bnb_config(qspec, DTYPE_NAMES[qspec.compute_dtype])
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (base / "generation_config.json").is_file():
        shutil.copy2(base / "generation_config.json", tmp)
    else:  # what transformers derives from the model config
        gen = {"_from_model_config": True} | {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                              if config.get(k) is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def copy_tokenizer(base: Path, tmp: Path) -> list[str]:
    files = [base / n for n in TOKENIZER_FILES if (base / n).is_file()]
    files += [p for g in TOKENIZER_GLOBS for p in base.glob(g) if p.is_file()]
    for p in files:
        shutil.copy2(p, tmp)
    if (base / "additional_chat_templates").is_dir():
        shutil.copytree(base / "additional_chat_templates", tmp / "additional_chat_templates")
    return [] if files else [f"the base {base} has no tokenizer files, so neither has the export"]


@contextmanager
def writing(out: Path):
    """An OSError while writing (ENOSPC, a read-only folder...) -> ExportError; `atomic_folder` has cleaned up."""
    try:
        yield
    except OSError as e:
        why = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise ExportError(f"writing {out} failed: {why}. Nothing was left behind; free space or choose another "
                          "--out, then run export again.") from None


@contextmanager
def atomic_folder(out: Path, force: bool):
    """`atomic.atomic_folder` for an export: an `out` that appeared meanwhile is replaced only with --force."""
    try:
        with atomic.atomic_folder(out, replace=force) as tmp:
            yield tmp
    except FileExistsError:
        raise ExportError(f"{out} appeared while exporting; pass --force to replace it.") from None
