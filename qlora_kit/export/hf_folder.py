"""The weights of a Hugging Face export folder (merged, quantized, quantized-adapter): every output tensor planned
from the safetensors headers, then computed and written into its shard one source tensor at a time.

    plan()           source tensor -> Item: its output entries (a 16-bit tensor, or the bitsandbytes buffers of a
                     quantized Linear: codes, absmax, quant map, the quant-state JSON blob)
    write_weights()  shards written behind the computation (shards.ShardWriter), index when there are several
    Survival         what re-quantizing a merged weight kept of the adapter's change (--format quantized)

A quantized item is either a merged weight quantized again (`module` set) or a base weight quantized exactly as
training quantized it (`module` None: W cast to the frozen dtype, minus its LoftQ offset), which is what
--format quantized-adapter stores under the adapter.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import loftq, methods
from ..quant import bnb as quant
from .merge import Merge, merge_rows, merged_weight
from .shards import Entry, ShardWriter, TensorInfo, read_tensor, row_blocks, shard_names, write_index

TAIL_MAX = 1024  # bytes reserved per 4-bit quant-state JSON blob (~170 used)


@dataclass
class Item:
    """One source tensor and the output tensors it becomes."""

    info: TensorInfo
    module: str | None  # adapted module name (merged in), or None
    quantize: bool
    entries: list[Entry]
    tail: str | None = None
    roundtrip: bool = False  # a Linear weight training quantized but no adapter touches: written as dequant(Q)
    transposed: bool = False  # a Conv1D weight: stored (in, out), merged as (out, in), written back as (in, out)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries) + (TAIL_MAX if self.tail else 0)


def plan(index: dict[str, TensorInfo], adapted: set[str], to_quantize: set[str], out_dtype: torch.dtype,
         qspec: quant.QuantSpec | None, roundtrip: set[str] = frozenset(),
         transposed: set[str] = frozenset()) -> list[Item]:
    items = []
    for name, info in index.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        module = module if module in adapted else None
        if name in to_quantize:
            prefix = name[: -len("weight")]
            shapes = quant.serialized_shapes(info.shape, qspec)
            tail = quant.quant_state_key(qspec)
            items.append(Item(info, module, True, [Entry(prefix + k, d, s) for k, (d, s) in shapes.items()],
                              prefix + tail if tail else None))
        else:
            dtype = out_dtype if info.dtype.is_floating_point else info.dtype
            items.append(Item(info, module, False, [Entry(name, dtype, info.shape)], roundtrip=name in roundtrip,
                              transposed=name in transposed))
    return items


@dataclass
class Survival:
    """Over every adapted weight quantized again: Q0 = quant(W_base) (the export of a zero adapter), Q1 =
    quant(W_base + ΔW) (what is stored), ΔW the adapter's change. `kept` = <D1 - D0, ΔW> / <ΔW, ΔW> with D =
    dequant(Q): 1 when the stored weights moved by the whole change, 0 when they are the base's; `changed` = the
    fraction of codes (4-bit or int8) that differ from the base's."""

    dot: float = 0.0
    norm2: float = 0.0
    changed_n: int = 0
    total: int = 0

    def add(self, W_base: torch.Tensor, merged: torch.Tensor, qspec: quant.QuantSpec) -> None:
        shape = tuple(merged.shape)
        q0 = quant.quantize(W_base.to(merged.device, merged.dtype), qspec)
        q1 = quant.quantize(merged, qspec)
        D0, D1 = (quant.dequantize(q, qspec, shape, torch.float32) for q in (q0, q1))
        dW = merged.float() - W_base.to(merged.device).float()
        self.dot += float(((D1 - D0).double() * dW.double()).sum())
        self.norm2 += float(dW.double().square().sum())
        if qspec.type == "int8":
            self.changed_n += int((q0["qweight"] != q1["qweight"]).sum())
        else:  # two 4-bit codes per byte (an odd count pads the last byte with the same zero code in both)
            x = q0["qweight"] ^ q1["qweight"]
            self.changed_n += int(((x & 0x0F) != 0).sum() + ((x >> 4) != 0).sum())
        self.total += merged.numel()

    @property
    def kept(self) -> float:
        return self.dot / self.norm2 if self.norm2 > 0 else 1.0

    @property
    def changed(self) -> float:
        return self.changed_n / self.total if self.total else 0.0


def write_weights(tmp: Path, items: list[Item], shards: list[list[int]], merge: Merge, out_dtype: torch.dtype,
                  qspec: quant.QuantSpec | None, label: str, progress: bool,
                  survival: Survival | None = None) -> int:
    """Every item into its shard under `tmp` (+ the index for several shards). Returns the bytes written."""
    from tqdm.auto import tqdm

    names, weight_map, total, written = shard_names(len(shards)), {}, 0, 0
    bar = tqdm(total=sum(it.nbytes for it in items), unit="B", unit_scale=True, desc=f"export {label}",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for k, idxs in enumerate(shards):
        group = [items[i] for i in idxs]
        bar.set_postfix_str(f"shard {k + 1}/{len(shards)}")
        writer = ShardWriter(tmp / names[k], [e for it in group for e in it.entries],
                             [it.tail for it in group if it.tail], TAIL_MAX)
        try:
            for it in group:
                _emit(it, writer, merge, out_dtype, qspec, survival)
                bar.update(it.nbytes)
            written += writer.close()
        finally:
            writer.abort()
        for it in group:
            weight_map |= {e.name: names[k] for e in it.entries} | ({it.tail: names[k]} if it.tail else {})
            total += sum(e.nbytes for e in it.entries) + (writer.tail_data[it.tail].numel() if it.tail else 0)
    bar.close()
    if len(shards) > 1:
        write_index(tmp, weight_map, total)
    return written


def _emit(it: Item, writer: ShardWriter, merge: Merge, out_dtype: torch.dtype, qspec: quant.QuantSpec | None,
          survival: Survival | None) -> None:
    """Compute one source tensor's outputs and write them (rows as they come when nothing needs the whole)."""
    info, src = it.info, merge.src
    if it.transposed:  # a Conv1D weight, (in, out): merged as the (out, in) Linear training ran, written back
        W = merge.base(read_tensor(info).t().contiguous(), info.name, it.module)
        if it.module is not None:
            W = merged_weight(W, src.stack, it.module, out_dtype)
        writer.write(info.name, W.to(out_dtype).t().contiguous(), 0)
        return
    if it.module is None and not it.quantize and not it.roundtrip:  # a plain copy, cast in blocks of rows
        entry = it.entries[0]
        scale = methods.bias_scale(src.stack, info.name[: -len(".bias")]) if info.name.endswith(".bias") else None
        for i, j in row_blocks(info.shape, info.dtype.itemsize):
            t = read_tensor(info, (i, j))
            writer.write(entry.name, (t if scale is None else t.float() * scale[i:j]).to(entry.dtype), i)
        return
    codes = info.decoded
    if it.quantize and it.module is None and getattr(codes, "spec", None) is not None and _same(codes.spec, qspec):
        # an unadapted Linear of a pre-quantized base, stored as it is quantized: its very codes, not re-quantized
        _write_quantized(it, writer, quant.serialized(codes.buffers(), qspec, info.shape, qspec.compute_dtype))
        return
    W = merge.base(read_tensor(info), info.name, it.module)
    if it.module is None and not it.quantize:  # an unadapted weight training quantized: dequant(Q), cast
        writer.write(info.name, W.to(out_dtype), 0)
        return
    if it.module is not None:
        if not it.quantize:
            for i, rows in merge_rows(W, src.stack, it.module, out_dtype):
                writer.write(info.name, rows, i)
            return
        W_base, W = W, merged_weight(W, src.stack, it.module, out_dtype).to(merge.device)
        if survival is not None:
            survival.add(W_base, W, qspec)
    else:  # the base weight as training quantized it: cast to the frozen dtype, minus a LoftQ offset
        W = loftq.base_weight(W.to(merge.device, out_dtype), src.offset(info.name[: -len(".weight")]))
    _write_quantized(it, writer, quant.serialize(W, qspec, qspec.compute_dtype))


def _write_quantized(it: Item, writer: ShardWriter, tensors: dict[str, torch.Tensor]) -> None:
    for suffix, t in tensors.items():
        name = it.info.name[: -len("weight")] + suffix
        (writer.write_tail if name == it.tail else writer.write)(name, t)


def _same(a: quant.QuantSpec, b: quant.QuantSpec) -> bool:
    return (a.type, a.blocksize, a.double_quant) == (b.type, b.blocksize, b.double_quant)
