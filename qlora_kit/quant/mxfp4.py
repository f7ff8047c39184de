"""MXFP4 expert weights as released gpt-oss checkpoints store them, decoded in plain torch.

config.json says `quantization_config: {"quant_method": "mxfp4", ...}`; per MoE layer the safetensors hold, for
P in gate_up_proj / down_proj:

    mlp.experts.P_blocks  uint8 (E, R, G, 16)  32 FP4 (E2M1) codes per block of a row, two per byte, low nibble first
    mlp.experts.P_scales  uint8 (E, R, G)      one E8M0 exponent per block: the block's values times 2**(s - 127)

with R the Linear's out features (gate_up: 2I, down: H) and G * 32 its in features. Decoded, a projection is the
(E, in, out) tensor transformers' GptOssExperts holds (gate_up_proj (E, H, 2I), down_proj (E, I, H)): each expert's
(out, in) rows, transposed. `decode` computes what transformers' own convert_moe_packed_tensors computes (same
value table, same exponent), expert by expert: every decoded value is a 4-bit code times a power of two, exact in
bf16, so the result is a bf16 tensor like a 16-bit gpt-oss checkpoint's, and the rest of qlora-kit (loading,
quantizing to nf4/fp4/int8, exporting) treats it as one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import torch

QUANT_METHOD = "mxfp4"
BLOCKS, SCALES = "_blocks", "_scales"
# E2M1: sign bit, 2 exponent bits, 1 mantissa bit; code c (0..15) is VALUES[c]
VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
DTYPE = torch.bfloat16  # what `decode` returns (exact: a 2-bit significand times 2**k, k in bf16's range)

T = TypeVar("T")


def is_mxfp4(config) -> bool:
    """Whether a config (config.json dict or transformers config) says its experts are stored in MXFP4."""
    qc = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config",
                                                                                     None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    return bool(qc) and qc.get("quant_method") == QUANT_METHOD


def is_mxfp4_folder(folder: Path) -> bool:
    """Whether a model folder's config.json says MXFP4 (False where it cannot be read: the loader says why)."""
    try:
        return is_mxfp4(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, AttributeError):
        return False


def decode(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks uint8 (E, R, G, 16), scales uint8 (E, R, G) -> (E, G * 32, R) bf16: each expert's (R, G * 32) weight
    transposed, as transformers lays out gpt-oss's expert parameters. One expert is decoded in fp32 at a time."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.dim() != 4 or blocks.shape[-1] != 16 \
            or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} and scales {tuple(scales.shape)} "
                         f"{scales.dtype}: expected uint8 (E, R, G, 16) and uint8 (E, R, G)")
    E, R, G, _ = blocks.shape
    table = torch.tensor(VALUES, dtype=torch.float32)
    out = torch.empty(E, G * 32, R, dtype=DTYPE)
    for e in range(E):
        b = blocks[e].long()  # (R, G, 16)
        codes = torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(R, G, 32)  # low nibble first
        values = torch.ldexp(table[codes], scales[e].int().sub(127).unsqueeze(-1).float())  # (R, G, 32) fp32
        out[e] = values.reshape(R, G * 32).t().to(DTYPE)
    return out


def decoded_entries(entries: Iterable[tuple[str, T]], pair: Callable[[T, T], T]) -> list[tuple[str, T]]:
    """A checkpoint's entries (name, x) with each `P_blocks` + `P_scales` pair replaced by one entry (P,
    pair(x_blocks, x_scales)): the decoded tensor, under the name a 16-bit checkpoint stores it by. A block or scale
    tensor without its partner is an incomplete checkpoint (ValueError)."""
    entries = list(entries)
    names = {n for n, _ in entries}
    out, halves = [], {}
    for name, x in entries:
        for suffix, other in ((BLOCKS, SCALES), (SCALES, BLOCKS)):
            if name.endswith(suffix) and name[: -len(suffix)] + other in names:
                halves.setdefault(name[: -len(suffix)], {})[suffix] = x
                break
        else:
            if name.endswith((BLOCKS, SCALES)) and ".experts." in name:
                raise ValueError(f"{name} has no matching {SCALES if name.endswith(BLOCKS) else BLOCKS} tensor")
            out.append((name, x))
    out += [(stem, pair(h[BLOCKS], h[SCALES])) for stem, h in halves.items()]
    return out
