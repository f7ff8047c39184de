"""The merge an export writes, as pure pieces: the base weight training multiplied by (dequant(quant(W)), LoftQ
offsets included), and W_base plus every adapter of the stack, in blocks of rows. `--format merged|quantized` and
the GGUF writer share them, so every format merges the same way."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import loftq, methods, peft_format
from ..quant import bnb as quant
from .files import linear_weights
from .shards import TensorInfo, row_blocks
from .source import Source


def merge_base_weight(W: torch.Tensor, trained_with: quant.QuantSpec, frozen: torch.dtype, merge_base: str,
                      device: str = "cpu", offset=None) -> torch.Tensor:
    """W_base: the checkpoint's W, or dequant(quant(W)) computed as training did (W cast to the frozen dtype, then
    quantized on `device`; dequantized to the compute dtype: the weight every training forward multiplied by)."""
    if merge_base == "original" or trained_with.type == "none":
        return W
    # LoftQ: quant(W - offset), the very tensor model.load_base quantized (loftq.base_weight on the frozen-dtype W)
    return quant.roundtrip(loftq.base_weight(W.to(device, frozen), offset), trained_with,
                           trained_with.compute_dtype).cpu()


EMBEDDING_MODULES = {"embed_tokens", "lm_head", "wte", "wpe", "word_embeddings", "embed_out", "embed_positions"}
"""Module names that are transformers' input/position embeddings (nn.Embedding) or the output embedding (which
training leaves unquantized): never in linear_weights(), so a 2-D weight of these is no unadapted quantized Linear."""


def unadapted_quantized(src: Source, base: Path, index: dict[str, TensorInfo], merge_base: str) -> set[str]:
    """Linear weights training quantized that no adapter touches. With the dequantized merge base they are written
    as dequant(Q) too (a partial target set, IA3 on three modules): the merged model computes what the
    training-time model computed. (--format quantized quantizes such a W itself: the very codes training used.)"""
    if src.from_codes:  # a pre-quantized base: its Linears are read whole as dequant(stored codes) (source.py)
        return {n for n, t in index.items() if t.decoded is not None} - src.weight_names()
    if merge_base != "dequantized" or src.trained_with.type == "none":
        return set()
    rest = {n for n, t in index.items() if n.endswith(".weight") and len(t.shape) == 2} - src.weight_names()
    if all(n.split(".")[-2] in EMBEDDING_MODULES for n in rest):
        return set()  # every Linear is adapted (all-linear, the default): skip building the model (~2 s of imports)
    return linear_weights(base) & rest


def merge_rows(W_base: torch.Tensor, stack: list[peft_format.Adapter], module: str, out_dtype: torch.dtype):
    """Yield (row, block) of the merged weight of `module` (every adapter of the stack, in order, over W_base) in
    blocks of rows: fp32 temporaries stay at ~16 MB each. Every method is row-separable (methods.merge_rows)."""
    for i, j in row_blocks(tuple(W_base.shape), 4, 16 << 20):
        yield i, methods.merge_rows(W_base[i:j], stack, module, (i, j), out_dtype)


def merged_weight(W_base, stack: list[peft_format.Adapter], module: str, out_dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(W_base.shape, dtype=out_dtype)
    for i, rows in merge_rows(W_base, stack, module, out_dtype):
        out[i : i + len(rows)] = rows
    return out


@dataclass(frozen=True)
class Merge:
    """How every weight of a merged export is computed: the adapter stack of `src` over the base `merge_base`
    names (dequantized: dequant(quant(W)) with the frozen dtype and the run's quantization, on `device`).
    `roundtrip`: unadapted Linear weights written as dequant(Q) too (unadapted_quantized)."""

    src: Source
    merge_base: str
    frozen: torch.dtype
    device: str
    roundtrip: frozenset[str] = frozenset()

    def base(self, W: torch.Tensor, name: str, module: str | None) -> torch.Tensor:
        """The base weight `name` (adapted `module`, or None) as this merge adds to it: W itself when neither
        adapted nor in `roundtrip`."""
        if module is None and name not in self.roundtrip or self.src.from_codes:
            return W  # from_codes: read as dequant(stored codes) already, the weight training multiplied by
        return merge_base_weight(W, self.src.trained_with, self.frozen, self.merge_base, self.device,
                                 self.src.offset(module))
