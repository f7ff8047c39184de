"""`qlora-kit export`: a PEFT adapter folder, a merged Hugging Face model, or a merged model quantized again.

    adapter    adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained` loads.
    merged     W' = W_base + s · B @ A, added in fp32 and cast once to --dtype (DoRA: m ⊙ (W_base + s·B A) / its row
               norms; IA3: rows or columns scaled by l; a stack: each in order, methods.merge_rows); config,
               generation config and tokenizer files copied from the base; safetensors shards of at most
               --max-shard-size + index.
    quantized  the merged weights of every Linear but lm_head quantized again (the run's nf4/fp4/int8 settings,
               nf4 otherwise) in the bitsandbytes/transformers on-disk format: `from_pretrained` loads it 4/8-bit.
    gguf, gguf-adapter   one GGUF file for llama.cpp / Ollama (the merged model, or the LoRA adapter), written by
               `gguf_export` after the same source, base and fit checks (docs in that module).

Which W_base (--merge-base):
    dequantized  (default) dequant(quant(W)), recomputed from the checkpoint with the run's quantization settings:
                 exactly the weights the adapter was trained against, so the merged model computes what the
                 training-time model (quantized base + adapter) computed. Pick it for any QLoRA adapter.
    original     W from the checkpoint. Exact for an adapter trained on the unquantized base (quant.type none, a
                 plain PEFT LoRA). For a QLoRA adapter it swaps the base the adapter learned to correct for one it
                 never saw (off by the 4-bit error, ~10% of each weight's norm); the model drifts from the one
                 you evaluated. Use it only when you want that, e.g. to compare the two.
A bare adapter folder does not say how it was trained: --quant (default nf4, blocksize 64, double quant, the QLoRA
paper's settings) names it for the dequantized base. With quant.type none the two bases are the same. The codes are
recomputed on --device (auto: CUDA when present, like training's default), from the same 16-bit values.

Memory and speed: source tensors are read one at a time (`shards.read_tensor`, nothing memory-mapped) and each
output tensor is written into its shard as soon as it is computed (`shards.ShardWriter`), in row blocks where it
can. Peak memory is the adapter plus a few copies of the largest adapted weight, whatever the model or shard size.
Writes go to `.DIR.tmp-PID` beside DIR, renamed at the end: an interrupted export leaves no DIR (and an existing
DIR, replaced with --force, survives a failed export).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from . import moe_merged
from .gguf import writer as gguf_export
from ..adapters import methods, peft_format
from ..quant import bnb as quant
from ..errors import ExportError
from .files import atomic_folder, copy_tokenizer, linear_weights, write_config, writing
from .merge import (  # noqa: F401 (ex.merge_base_weight, ex.unadapted_quantized)
    EMBEDDING_MODULES, merge_base_weight, merge_rows, merged_weight, unadapted_quantized)
from ..model.load import frozen_dtype
from ..run.folder import adapter_source
from .shards import Entry, ShardWriter, TensorInfo, max_shard_bytes, plan_shards, read_tensor, row_blocks, shard_names
from .shards import tensor_index, write_index
from ..terms import QuantizedType
from .source import Source, base_folder, check_fits, open_source  # noqa: F401  (ex.open_source)

Format = Literal["adapter", "merged", "quantized", "gguf", "gguf-adapter"]
TAIL_MAX = 1024  # bytes reserved per 4-bit quant-state JSON blob (~170 used)


@dataclass(frozen=True)
class Options:
    format: Format
    out: Path
    base: str | None = None
    """Base model folder or built-in name; default: the run's recipe, or the adapter's base_model_name_or_path."""
    merge_base: Literal["dequantized", "original"] = "dequantized"
    dtype: Literal["bf16", "fp16", "fp32"] | None = None
    """Output dtype (merged/quantized: default bf16; adapter: default the adapter's own)."""
    max_shard_size: str | int = "2GB"
    force: bool = False
    quant: QuantizedType | None = None
    """How a bare adapter folder was trained (dequantized merge base), and the requantization type."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where weights are quantized (dequantized base, requantization): auto = CUDA when present, as training."""
    gguf_type: str = "f16"
    """GGUF formats: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1, or q4_k_m q5_k_m q6_k with the llama-cpp extra."""
    progress: bool = True


@dataclass
class Result:
    out: Path
    files: list[str]
    weight_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def free_bytes(path: Path) -> int:
    """Free space on the filesystem holding `path` (module-level so tests can simulate a full disk)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


@dataclass
class Item:
    """One source tensor and the output tensors it becomes."""

    info: TensorInfo
    module: str | None  # adapted module name, or None
    quantize: bool
    entries: list[Entry]
    tail: str | None = None
    roundtrip: bool = False  # a Linear weight training quantized but no adapter touches: written as dequant(Q)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries) + (TAIL_MAX if self.tail else 0)


def plan(index: dict[str, TensorInfo], adapted: set[str], to_quantize: set[str], out_dtype: torch.dtype,
         qspec: quant.QuantSpec | None, roundtrip: set[str] = frozenset()) -> list[Item]:
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
            items.append(Item(info, module, False, [Entry(name, dtype, info.shape)], roundtrip=name in roundtrip))
    return items


# ---- the export ---------------------------------------------------------------------------------------------------


def export(source: str | Path, opts: Options) -> Result:
    t0 = time.perf_counter()
    out = Path(opts.out)
    gguf = opts.format in ("gguf", "gguf-adapter")
    if gguf:
        gguf_export.check_type(opts.gguf_type, adapter=opts.format == "gguf-adapter")
        if out.is_dir() and not out.is_symlink():
            raise ExportError(f"--out {out} is a folder; --format {opts.format} writes one file: name it, e.g. "
                              f"{out / 'model.gguf'}.")
        mf = gguf_export.ollama.modelfile_path(out)
        if opts.format == "gguf" and mf.exists() and not opts.force:
            raise ExportError(f"{mf} already exists (the Ollama Modelfile written beside the GGUF); pass --force to "
                              "replace it, or choose another --out.")
    if (out.exists() or out.is_symlink()) and not opts.force:
        raise ExportError(f"{out} already exists; pass --force to replace it, or choose another --out.")
    max_shard = max_shard_bytes(opts.max_shard_size)
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda: no CUDA GPU is visible; use --device cpu (or auto).")
    src = open_source(source, opts.base, opts.quant)
    base = base_folder(src.base_name, required=opts.format != "adapter" or opts.base is not None)
    for p in (Path(source), base):
        if p is not None and (out.resolve() == p.resolve() or out.resolve() in p.resolve().parents):
            raise ExportError(f"--out {out} would overwrite the input {p}; choose another folder.")
    index = tensor_index(base) if base is not None else None
    notes = [] if index is not None else [f"not checked against the base ({src.base_name} is not available here)"]
    moe = moe_merged.meta_model(base) if index is not None and moe_merged.maybe_moe(base) else None
    moe = moe if moe is not None and moe_merged.has_experts(moe) else None
    if moe is not None:  # per-expert adapters over a Hub-layout checkpoint: checked against the converted model
        moe_merged.check_fits(src, moe, base)
        if opts.format not in ("adapter", "merged"):
            moe_merged.refuse_format(opts.format)
    elif index is not None:
        check_fits(src.stack, index, base)
    if opts.format == "gguf-adapter":
        with writing(out):
            written, more = gguf_export.write_adapter(src, base, out, opts.gguf_type, free_bytes)
        return Result(out, [out.name], written, time.perf_counter() - t0, notes + more)
    if opts.format == "adapter":
        with writing(out), atomic_folder(out, opts.force) as tmp:
            _write_adapter(src, tmp, opts)
        return Result(out, sorted(p.name for p in out.iterdir()), 0, time.perf_counter() - t0, notes)

    try:
        raw_config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ExportError(f"{base}/config.json cannot be read ({e}); "
                          "pass a Hugging Face model folder with --base.") from None
    if raw_config.get("quantization_config"):
        raise ExportError(f"the base {base} is already quantized "
                          f"({raw_config['quantization_config'].get('quant_method')}); "
                          "pass the original 16-bit checkpoint with --base.")
    out_dtype = quant.DTYPES[opts.dtype or "bf16"]
    frozen = frozen_dtype(src.model_cfg.dtype, raw_config.get("dtype") or raw_config.get("torch_dtype"))
    device = opts.device if opts.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if gguf:
        with writing(out):
            written, more = gguf_export.write_model(src, base, index, out, opts.gguf_type, opts.merge_base, frozen,
                                                    device, free_bytes, opts.progress, adapter_source(source)[1],
                                                    unadapted_quantized(src, base, index, opts.merge_base))
        files = [out.name, gguf_export.ollama.modelfile_path(out).name]
        return Result(out, files, written, time.perf_counter() - t0, notes + more)
    if moe is not None:
        with writing(out), atomic_folder(out, opts.force) as tmp:
            written = moe_merged.write(src, base, moe, index, tmp, out_dtype, frozen, opts.merge_base, device,
                                       max_shard)
            write_config(base, tmp, out_dtype, None)
            notes += copy_tokenizer(base, tmp)
        return Result(out, sorted(p.name for p in out.iterdir()), written, time.perf_counter() - t0, notes)
    qspec, to_quantize = None, set()
    if opts.format == "quantized":
        t = src.trained_with
        qspec = (dataclasses.replace(t, compute_dtype=out_dtype) if t.type != "none"
                 else quant.QuantSpec(opts.quant or "nf4", compute_dtype=out_dtype))
        to_quantize = linear_weights(base) & set(index)
        bad = [n for n in to_quantize if qspec.type != "int8" and index[n].shape[1] % qspec.blocksize]
        if bad:
            notes.append(f"{len(bad)} weights (e.g. {bad[0]}) have in_features not a multiple of blocksize "
                         f"{qspec.blocksize}: the file is right, but bitsandbytes' CPU kernels (0.50) compute such "
                         "weights wrongly or fail; run this model on CUDA (docs/ARCHITECTURE.md, 'bitsandbytes "
                         "hazards').")
    roundtrip = unadapted_quantized(src, base, index, opts.merge_base) if opts.format == "merged" else set()
    items = plan(index, src.modules(), to_quantize, out_dtype, qspec, roundtrip)
    shards = plan_shards([it.nbytes for it in items], max_shard)
    need = sum(it.nbytes for it in items) + (16 << 20)
    if free_bytes(out.parent) < need:
        raise ExportError(f"not enough disk space for {out}: the export needs about {need / 1e9:.2f} GB, "
                          f"{free_bytes(out.parent) / 1e9:.2f} GB are free. Free some space or choose another --out.")
    with writing(out), atomic_folder(out, opts.force) as tmp:
        written = _write_weights(tmp, items, shards, src, opts, frozen, out_dtype, qspec, device)
        write_config(base, tmp, out_dtype, qspec)
        notes += copy_tokenizer(base, tmp)
    return Result(out, sorted(p.name for p in out.iterdir()), written, time.perf_counter() - t0, notes)


def _write_weights(tmp: Path, items: list[Item], shards: list[list[int]], src: Source, opts: Options,
                   frozen: torch.dtype, out_dtype: torch.dtype, qspec: quant.QuantSpec | None, device: str) -> int:
    from tqdm.auto import tqdm

    names, weight_map, total, written = shard_names(len(shards)), {}, 0, 0
    bar = tqdm(total=sum(it.nbytes for it in items), unit="B", unit_scale=True, desc=f"export {opts.format}",
               disable=not opts.progress, file=sys.stderr, dynamic_ncols=True)
    for k, idxs in enumerate(shards):
        group = [items[i] for i in idxs]
        bar.set_postfix_str(f"shard {k + 1}/{len(shards)}")
        writer = ShardWriter(tmp / names[k], [e for it in group for e in it.entries],
                             [it.tail for it in group if it.tail], TAIL_MAX)
        try:
            for it in group:
                _emit(it, writer, src, opts.merge_base, frozen, out_dtype, qspec, device)
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


def _emit(it: Item, writer: ShardWriter, src: Source, merge_base: str, frozen: torch.dtype, out_dtype: torch.dtype,
          qspec: quant.QuantSpec | None, device: str) -> None:
    """Compute one source tensor's outputs and write them (rows as they come when nothing needs the whole)."""
    info = it.info
    if it.module is None and not it.quantize and not it.roundtrip:  # a plain copy, cast in blocks of rows
        entry = it.entries[0]
        scale = methods.bias_scale(src.stack, info.name[: -len(".bias")]) if info.name.endswith(".bias") else None
        for i, j in row_blocks(info.shape, info.dtype.itemsize):
            t = read_tensor(info, (i, j))
            writer.write(entry.name, (t if scale is None else t.float() * scale[i:j]).to(entry.dtype), i)
        return
    W = read_tensor(info)
    if it.roundtrip or it.module is not None:
        W = merge_base_weight(W, src.trained_with, frozen, merge_base, device, src.offset(it.module))
    if it.module is None and not it.quantize:  # an unadapted weight training quantized: dequant(Q), cast
        writer.write(info.name, W.to(out_dtype), 0)
        return
    if it.module is not None:
        if not it.quantize:
            for i, rows in merge_rows(W, src.stack, it.module, out_dtype):
                writer.write(info.name, rows, i)
            return
        W = merged_weight(W, src.stack, it.module, out_dtype)
    for suffix, t in quant.serialize(W.to(device, out_dtype), qspec, out_dtype).items():
        name = info.name[: -len("weight")] + suffix
        (writer.write_tail if name == it.tail else writer.write)(name, t)


def _write_adapter(src: Source, tmp: Path, opts: Options) -> None:
    """One PEFT folder per method, in the stacked layout of peft_format (root, then ia3/)."""
    for k, a in enumerate(src.stack):
        tensors = {k: v.to(quant.DTYPES[opts.dtype]) for k, v in a.tensors.items()} if opts.dtype else a.tensors
        where = tmp / peft_format.IA3_SUBFOLDER if k > 0 else tmp
        if a.kind == "ia3":
            peft_format.save_ia3(where, tensors, feedforward=[m for m in a.modules() if a.feedforward(m)],
                                 base_model=src.base_name)
            continue
        extra = {k: v for k, v in a.config.items() if k not in ("target_modules", "base_model_name_or_path")}
        peft_format.save_adapter(where, tensors, r=a.r, alpha=a.alpha, dropout=float(a.config.get("lora_dropout", 0.0)),
                                 rslora=a.rslora, base_model=src.base_name, extra=extra)
