"""What qlora-kit's own exports are, read from their headers (no weights dequantized): a bitsandbytes-quantized
model folder (`export --format quantized`, or a `*-bnb-4bit` download) and GGUF files (`--format gguf` and
`gguf-adapter`, or any llama.cpp file) through the gguf package's GGUFReader."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from ..errors import ModelError

# the tensors bitsandbytes stores beside a quantized weight: constants, not parameters
_AUX = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format")
_QSTATE = ".quant_state.bitsandbytes__"


def is_quantized_folder(folder: Path) -> bool:
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and bool(raw.get("quantization_config"))


def _quant_summary(qc: dict) -> tuple[str, str]:
    """(type, how) of a quantization_config, as transformers' BitsAndBytesConfig writes it."""
    method = qc.get("quant_method", "?")
    if method != "bitsandbytes":
        return str(method), f"{method} (not bitsandbytes: qlora-kit neither writes nor reads it)"
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        return "int8", f"bitsandbytes int8 (LLM.int8, threshold {qc.get('llm_int8_threshold')})"
    kind = qc.get("bnb_4bit_quant_type", "fp4")
    dq = ", double quant" if qc.get("bnb_4bit_use_double_quant") else ""
    return kind, f"bitsandbytes {kind}{dq}, computes in {qc.get('bnb_4bit_compute_dtype')}"


def describe_quantized(folder: Path) -> dict:
    """A bitsandbytes-serialised model folder: its quantization, how many Linears are quantized, parameters (the
    4-bit weights counted at their dequantized shape, from each quant-state JSON), size on disk, bits per weight."""
    from safetensors import safe_open

    from ..model.load import weight_files

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    qtype, how = _quant_summary(config["quantization_config"])
    files = weight_files(folder)
    params, quantized, blocksizes, dtypes = 0, 0, Counter(), Counter()
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                keys = list(h.keys())
                packed = {k[: k.index(".quant_state.")] for k in keys if _QSTATE in k}
                for k in keys:
                    if _QSTATE in k:  # uint8 JSON blob: the dequantized shape and blocksize of one 4-bit weight
                        state = json.loads(bytes(h.get_tensor(k).tolist()).decode())
                        params += math.prod(state["shape"])
                        blocksizes[state.get("blocksize")] += 1
                        quantized += 1
                    elif k.endswith(_AUX):
                        quantized += k.endswith(".SCB")  # int8: one row-scale vector per quantized weight
                    elif k in packed:
                        continue  # the packed codes of a 4-bit weight: counted from its quant state above
                    else:
                        s = h.get_slice(k)
                        params += math.prod(s.get_shape())
                        dtypes[s.get_dtype()] += 1
        except (OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError) as e:
            raise ModelError(f"{f} is truncated or corrupt ({e}).") from None
    size = sum(f.stat().st_size for f in files)
    out = {"kind": "quantized model", "path": str(folder),
           "architecture": (config.get("architectures") or [config.get("model_type")])[0],
           "quant": how, "quantized_linears": quantized, "params": params, "size_bytes": size,
           "bits_per_weight": round(8 * size / params, 2) if params else None,
           "other_dtypes": sorted(dtypes), "layers": config.get("num_hidden_layers"),
           "hidden_size": config.get("hidden_size"), "vocab_size": config.get("vocab_size")}
    if blocksizes:
        out["blocksize"] = ", ".join(str(b) for b in sorted(blocksizes, key=str))
    out["use"] = ("transformers: AutoModelForCausalLM.from_pretrained(path) (bitsandbytes installed); qlora-kit: "
                  "model.path (a pre-quantized base, its codes used as stored)")
    if qtype not in ("nf4", "fp4", "int8"):
        out["use"] = "not a bitsandbytes model: qlora-kit cannot load it"
    return out


def _field(reader, name: str):
    f = reader.fields.get(name)
    if f is None:
        return None
    try:
        return f.contents()
    except (ValueError, IndexError, TypeError, UnicodeDecodeError):
        return None


def describe_gguf(path: Path) -> dict:
    """A GGUF file: what it holds (model or LoRA adapter), its key metadata, tensor types and size."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise ModelError(f"{path} is not a readable GGUF file ({e}); re-export it.") from None
    arch = _field(reader, "general.architecture") or "?"
    kind = _field(reader, "general.type") or "model"
    types = Counter(t.tensor_type.name for t in reader.tensors)
    tensor_bytes = Counter()
    for t in reader.tensors:
        tensor_bytes[t.tensor_type.name] += int(t.n_bytes)
    out = {"kind": f"gguf {kind}", "path": str(path), "architecture": arch, "name": _field(reader, "general.name"),
           "file_type": _field(reader, "general.file_type"),
           "tensors": len(reader.tensors), "params": sum(int(t.n_elements) for t in reader.tensors),
           "tensor_types": {k: f"{n} tensors, {tensor_bytes[k]:,} bytes" for k, n in types.most_common()},
           "size_bytes": path.stat().st_size}
    for key, label in (("block_count", "layers"), ("embedding_length", "hidden_size"),
                       ("context_length", "context_length")):
        value = _field(reader, f"{arch}.{key}")
        if value is not None:
            out[label] = value
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        out["vocab_size"] = len(tokens.data)
        out["tokenizer"] = _field(reader, "tokenizer.ggml.model")
    if _field(reader, "tokenizer.chat_template"):
        out["chat_template"] = True
    if kind == "adapter":
        out["adapter"] = {"type": _field(reader, "adapter.type"), "alpha": _field(reader, "adapter.lora.alpha")}
    return out
