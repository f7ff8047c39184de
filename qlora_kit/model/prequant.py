"""Pre-quantized bases: a bitsandbytes-serialised checkpoint (`*-bnb-4bit` downloads, qlora-kit's own quantized
export) loaded as the frozen base from its stored codes, never re-quantized.

What transformers' bitsandbytes integration saves per quantized Linear (module `m`):
  4-bit: m.weight (numel/2, 1) uint8 packed codes; m.weight.absmax (fp32, or uint8 with double quantization);
         m.weight.quant_map (16,) fp32; double quant: m.weight.nested_absmax, m.weight.nested_quant_map;
         m.weight.quant_state.bitsandbytes__<nf4|fp4>: uint8 JSON {quant_type, blocksize, shape, nested_offset...}
  int8:  m.weight (out, in) int8; m.SCB (out,) fp32 row absmax; m.weight_format (a layout marker)
These become exactly QuantLinear's own tensors (qweight, code, absmax, nested_*, offset / scale), so the frozen
base computes what the checkpoint's codes say. The stored quantization wins over the recipe's quant type,
blocksize and double quantization (which describe how to quantize a 16-bit base); quant.compute_dtype still applies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError, ModelError
from ..quant import mxfp4
from ..quant.bnb import QuantLinear, QuantSpec

_STATE = ".weight.quant_state.bitsandbytes__"
_FOUR_BIT_AUX = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def stored(config) -> dict | None:
    """The checkpoint's bitsandbytes quantization_config (a dict), None for a 16-bit checkpoint and for gpt-oss's
    MXFP4 experts (decoded to bf16 as they are read: quant/mxfp4.py, so the base is a 16-bit one); another method
    (GPTQ, AWQ...) is refused: qlora-kit's frozen base is bitsandbytes NF4/FP4/int8."""
    qc = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if not qc or mxfp4.is_mxfp4(config):
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitsandbytes":
        raise ModelError(f"the checkpoint is quantized with {qc.get('quant_method')!r}; qlora-kit trains on "
                         "bitsandbytes-quantized (nf4/fp4/int8), MXFP4 (gpt-oss as released) or 16-bit checkpoints. "
                         "Pass the original 16-bit model.")
    return qc


def decode_mxfp4(folder: Path, items: list[tuple[str, Callable]]) -> list[tuple[str, Callable]]:
    """One group of (key, read) checkpoint entries with each MXFP4 blocks/scales pair read as the decoded bf16
    tensor (quant/mxfp4.py), named as a 16-bit checkpoint names it: what the loader then quantizes."""
    try:
        return mxfp4.decoded_entries(items, lambda b, s: lambda: mxfp4.decode(b(), s()))
    except ValueError as e:
        raise ModelError(f"{folder} (MXFP4): {e}; the checkpoint is incomplete (a missing shard?).") from None


def module_of(key: str) -> str | None:
    """The Linear a stored quantization tensor belongs to, or None for an ordinary tensor (bias, norm...)."""
    if _STATE in key:
        return key[: key.index(_STATE)]
    for suffix in (*(f".weight.{a}" for a in _FOUR_BIT_AUX), ".SCB", ".weight_format"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


class Collector:
    """Gathers each pre-quantized Linear's tensors as they stream in (`add`), then builds its QuantLinear."""

    def __init__(self, compute_dtype: torch.dtype, device: torch.device):
        self.compute_dtype, self.device = compute_dtype, device
        self.parts: dict[str, dict[str, torch.Tensor]] = {}

    def wants(self, key: str, quantized_modules: set[str]) -> bool:
        m = module_of(key)
        return m is not None or (key.endswith(".weight") and key[: -len(".weight")] in quantized_modules)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        m = module_of(key)
        if m is None:  # the codes themselves: m.weight
            m, leaf = key[: -len(".weight")], "weight"
        else:
            leaf = key[len(m) + 1:]
        self.parts.setdefault(m, {})[leaf] = tensor

    def build(self, name: str, bias: torch.Tensor | None) -> QuantLinear:
        spec, (out_f, in_f), tensors = buffers(name, self.parts.pop(name), self.compute_dtype)
        layer = QuantLinear(in_f, out_f, spec, bias)
        for k, v in tensors.items():
            layer.register_parameter(k, torch.nn.Parameter(v.to(self.device), requires_grad=False))
        return layer


def buffers(name: str, t: dict[str, torch.Tensor], compute_dtype: torch.dtype
            ) -> tuple[QuantSpec, tuple[int, int], dict[str, torch.Tensor]]:
    """One Linear's stored tensors (leaf name after the module -> tensor) -> (its QuantSpec computing in
    `compute_dtype`, (out, in), QuantLinear's tensors: qweight, code, absmax [, nested_*, offset] | qweight, scale)."""
    where = f"{name} (pre-quantized)"
    if "SCB" in t:
        if "weight" not in t or t["weight"].dtype != torch.int8 or t["weight"].dim() != 2:
            raise ModelError(f"{where}: an int8 weight needs `weight` (out, in) int8 beside `SCB`; the checkpoint "
                             "is incomplete or in an unknown layout.")
        return (QuantSpec("int8", compute_dtype=compute_dtype), tuple(t["weight"].shape),
                {"qweight": t["weight"], "scale": t["SCB"].float()})
    state_key = next((k for k in t if k.startswith("weight.quant_state.")), None)
    if state_key is None or "weight" not in t or "weight.absmax" not in t or "weight.quant_map" not in t:
        raise ModelError(f"{where}: missing 4-bit tensors (found {sorted(t)}); the checkpoint is incomplete.")
    state = quant_state(t[state_key])
    nested = "weight.nested_absmax" in t
    spec = four_bit_spec(state, nested, compute_dtype)
    tensors = {"qweight": t["weight"], "code": t["weight.quant_map"].float(), "absmax": t["weight.absmax"]}
    if nested:
        if int(state.get("nested_blocksize", 256)) != 256:
            raise ModelError(f"{where}: nested blocksize {state['nested_blocksize']}; bitsandbytes' double "
                             "quantization uses 256, which qlora-kit supports.")
        tensors |= {"nested_absmax": t["weight.nested_absmax"].float(),
                    "nested_code": t["weight.nested_quant_map"].float(),
                    "offset": torch.tensor([float(state["nested_offset"])])}
    else:
        tensors["absmax"] = tensors["absmax"].float()
    return spec, tuple(state["shape"]), tensors


def quant_state(blob: torch.Tensor) -> dict:
    """A 4-bit Linear's quant-state blob (uint8 JSON: quant_type, blocksize, shape, nested_offset...)."""
    return json.loads(bytes(blob.tolist()).decode("utf-8"))


def four_bit_spec(state: dict, nested: bool, compute_dtype: torch.dtype) -> QuantSpec:
    return QuantSpec(state["quant_type"], int(state["blocksize"]), nested, compute_dtype)


def check(folder: Path, spec: QuantSpec, before_quantize) -> None:
    if spec.type == "none":
        raise ConfigError(f"quant.type is none, but {folder} is a quantized checkpoint, whose 16-bit weights are gone. "
                          "Train on it quantized (quant.type nf4: its stored codes are used as they are), or pass "
                          "the original 16-bit model.")
    if before_quantize is not None:
        raise ConfigError(f"lora.init loftq quantizes the base around low-rank offsets, but {folder} is already "
                          "quantized; use lora.init kaiming, or the original 16-bit model.")
