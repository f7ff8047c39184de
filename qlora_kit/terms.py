"""The words every module shares, each defined once (torch-free, like config.py and errors.py).

Quantization types and block sizes, the label value the loss skips, the LoRA scaling rule, and byte sizes: the
recipe (`config`), the estimator (`memory_estimate`), the quantizer (`quant`), the loss, the LoRA layers, the PEFT
format and the CLI all import them from here (docs/ARCHITECTURE.md, "Dependency rules").
"""

from __future__ import annotations

import math
import re
import typing
from typing import Literal

from .errors import ConfigError

QuantizedType = Literal["nf4", "fp4", "int8"]  # a base that is quantized: nf4 | fp4 (4-bit blockwise) | int8 (row-wise)
QuantType = Literal[QuantizedType, "none"]  # what a recipe may ask for; none: a plain 16-bit base
QUANTIZED_TYPES: tuple[str, ...] = typing.get_args(QuantizedType)
QUANT_TYPES: tuple[str, ...] = typing.get_args(QuantType)
FOUR_BIT = ("nf4", "fp4")  # blockwise 4-bit types (blocksize, double quant apply)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' 4-bit blocksizes (weights per absmax)
NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for double quantization of the 4-bit absmax constants

IGNORE = -100  # label value cross-entropy skips (torch's default ignore_index; Hugging Face's convention)


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    """s in W' = W + s * B @ A: alpha / r (Hu et al. 2021), or alpha / sqrt(r) with rsLoRA (arXiv 2312.03732)."""
    return alpha / (math.sqrt(r) if rslora else r)


# ---- byte sizes ------------------------------------------------------------------------------------------------

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
# GB is 10^9 (transformers' max_shard_size, disk vendors); GiB and the one-letter K/M/G/T are 2^30 (`free -g`).
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB, "k": KiB, "m": MiB, "g": GiB, "t": TiB}


def parse_size(text: str | int, what: str = "size") -> int:
    """'24GiB', '24 GB' (10^9), '24G' (GiB), '1.5GiB', '500MB' -> bytes; a Python int is bytes already.

    A bare number in text ('24') is refused: 24 bytes, 24 GB and 24 GiB are all plausible readings, so the user
    writes the unit. `what` names the option in the message (e.g. '--gpu-mem')."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ConfigError(f"{what} {text} is not a positive number of bytes.")
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if m and not unit:
        raise ConfigError(f"{what} {text!r} has no unit: write {m.group(1)}GiB (2^30 bytes), {m.group(1)}GB "
                          "(10^9 bytes) or MiB/MB.")
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"{what} {text!r} is not a size: write a positive number with a unit, e.g. 24GiB, 2GB, "
                          "512MiB.")
    return int(float(m.group(1)) * _UNITS[unit])


def human_bytes(n: int) -> str:
    """2.00 GiB, 512.00 MiB, 3.00 KiB, 12 B (binary units, two decimals)."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


# The prefix of torch.profiler `record_function` ranges that mark where a phase of a step starts: train/loop.py marks
# the optimizer step, measure/breakdown.py the rest, and measure/timeline.py reads them back from the trace.
PROFILER_MARK = "qlora_kit::mark::"


# config.json sizes that must be positive integers when present (0 divides by zero, a negative one allocates
# nonsense); the model loader and the estimate both check them.
CONFIG_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "head_dim", "max_position_embeddings")


def bad_config_sizes(config: dict) -> list[str]:
    """`key=value` for every CONFIG_SIZES entry of `config` that is present (not null) and not a positive int."""
    return [f"{k}={config[k]!r:.40}" for k in CONFIG_SIZES if config.get(k) is not None
            and (not isinstance(config[k], int) or isinstance(config[k], bool) or config[k] <= 0)]
