"""`qlora-kit export`: the formats as a table (FORMATS: one small object per --format saying what it needs and how
it writes) and export(): the checks every format shares, then the format's writer.

    adapter    adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained` loads.
    merged     W' = W_base + s · B @ A, added in fp32 and cast once to --dtype (DoRA: m ⊙ (W_base + s·B A) / its row
               norms; IA3: rows or columns scaled by l; a stack: each in order, methods.merge_rows); config,
               generation config and tokenizer files copied from the base; safetensors shards of at most
               --max-shard-size + index.
    quantized-adapter   the base's Linear weights quantized exactly as training quantized them (the run's 4-bit
               settings, frozen dtype, LoftQ offsets), in bitsandbytes' serialisation (`from_pretrained` loads it
               4-bit), and the PEFT adapter in adapter/: `PeftModel.from_pretrained(model, DIR/adapter)` is the
               training-time model (quantized base + adapter).
    quantized  the merged weights of every Linear but lm_head quantized again (the run's nf4/fp4/int8 settings,
               nf4 otherwise) in the bitsandbytes/transformers on-disk format: `from_pretrained` loads it 4/8-bit.
               A QLoRA adapter's change is mostly smaller than a 4-bit step, so re-quantizing gives back the base's
               codes: what survived is measured (hf_folder.Survival) and an export keeping less than KEPT_MIN of it
               is refused unless allow_lossy.
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from . import moe_merged
from .gguf import adapter as gguf_adapter, writer as gguf_export
from ..adapters import peft_format
from ..quant import bnb as quant
from ..errors import ExportError
from .files import (atomic_folder, check_free_space, copy_tokenizer, linear_weights, transposed_weights,
                    write_config, writing)
from .hf_folder import Survival, plan, write_weights
from .merge import (  # noqa: F401 (ex.merge_base_weight, ex.unadapted_quantized)
    EMBEDDING_MODULES, Merge, merge_base_weight, merge_rows, merged_weight, unadapted_quantized)
from ..model.load import frozen_dtype
from ..run.folder import adapter_source
from .shards import TensorInfo, max_shard_bytes, plan_shards
from ..terms import QuantizedType
from .source import Source, base_folder, check_fits, open_source, weight_index  # noqa: F401  (ex.open_source)

KEPT_MIN = 0.10
"""--format quantized refuses (without --allow-lossy) an export whose re-quantized weights keep less than this
fraction of the adapter's change (hf_folder.Survival.kept): a model that answers like the base."""
ADAPTER_SUBFOLDER = "adapter"  # --format quantized-adapter: the PEFT adapter beside the quantized base


@dataclass(frozen=True)
class Options:
    format: str
    """A name in FORMATS."""
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
    """GGUF formats: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1, or the K-quants q2_k ... q6_k (gguf/kquant.py) with
    the llama-cpp extra."""
    progress: bool = True
    allow_lossy: bool = False
    """--format quantized: write it even when re-quantizing keeps almost nothing of the adapter (KEPT_MIN)."""


@dataclass
class Result:
    out: Path
    files: list[str]
    weight_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    survival: Survival | None = None  # --format quantized: what re-quantizing kept of the adapter's change
    format: str = ""


@dataclass
class Job:
    """One export, once the source, the base and the fit are checked: what every format's writer reads."""

    source: Path
    opts: Options
    src: Source
    base: Path | None
    index: dict[str, TensorInfo] | None
    notes: list[str]
    t0: float
    transposed: frozenset[str] = frozenset()  # Conv1D weights (GPT-2): stored (in, out), trained as (out, in)
    moe: nn.Module | None = None  # a mixture of experts: the converted model on meta (moe_merged writes it)

    @property
    def out(self) -> Path:
        return Path(self.opts.out)

    @property
    def device(self) -> str:
        return self.opts.device if self.opts.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"

    def raw_config(self) -> dict:
        try:
            config = json.loads((self.base / "config.json").read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise ExportError(f"{self.base}/config.json cannot be read ({e}); "
                              "pass a Hugging Face model folder with --base.") from None
        config.pop("quantization_config", None)  # pre-quantized: weight_index reads its codes (source.py)
        return config

    def frozen(self, config: dict) -> torch.dtype:
        """The dtype training held the unquantized weights in (and cast each Linear weight to before quantizing)."""
        return frozen_dtype(self.src.model_cfg.dtype, config.get("dtype") or config.get("torch_dtype"))

    def merge(self, frozen: torch.dtype, roundtrip: bool) -> Merge:
        rt = unadapted_quantized(self.src, self.base, self.index, self.opts.merge_base) if roundtrip else set()
        return Merge(self.src, self.opts.merge_base, frozen, self.device, frozenset(rt))

    def result(self, files: list[str], written: int, **kw) -> Result:
        return Result(self.out, files, written, time.perf_counter() - self.t0, self.notes, format=self.opts.format,
                      **kw)


# ---- the formats ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    """One --format: what it needs and how it writes."""

    name: str
    help: str
    needs_base: bool = True  # reads the base's weights (else only its headers, when the base is here)
    one_file: bool = False  # --out names a file (GGUF), not a folder

    def check(self, opts: Options) -> None:
        """Option checks before anything is read."""

    def write(self, job: Job) -> Result:
        raise NotImplementedError


@dataclass(frozen=True)
class AdapterFormat(Format):
    def write(self, job: Job) -> Result:
        with writing(job.out), atomic_folder(job.out, job.opts.force) as tmp:
            write_adapter(job.src, tmp, job.opts.dtype, job.base)
        return job.result(sorted(p.name for p in job.out.iterdir()), 0)


@dataclass(frozen=True)
class FolderFormat(Format):
    """A Hugging Face model folder: weights (hf_folder), config, generation config, tokenizer."""

    merged: bool = True  # the adapter merged into the weights (else the base as trained + the adapter beside)
    quantized: bool = False  # the Linear weights stored in bitsandbytes' format

    def write(self, job: Job) -> Result:
        if self.quantized and job.transposed:
            raise ExportError(f"--format {self.name}: this base stores {len(job.transposed)} layers as transformers "
                              f"Conv1D (e.g. {sorted(job.transposed)[0]}, weight (in, out)), which bitsandbytes' "
                              "format does not hold; export --format merged (16-bit) or --format adapter (PEFT).")
        config = job.raw_config()
        frozen = job.frozen(config)
        out_dtype = quant.DTYPES[job.opts.dtype or "bf16"] if self.merged else frozen
        if job.moe is not None:  # merged per expert, in transformers' fused layout (export() let only merged by)
            with writing(job.out), atomic_folder(job.out, job.opts.force) as tmp:
                written = moe_merged.write(job.src, job.base, job.moe, job.index, tmp, out_dtype, frozen,
                                           job.opts.merge_base, job.device, max_shard_bytes(job.opts.max_shard_size))
                write_config(job.base, tmp, out_dtype, None)
                job.notes.extend(copy_tokenizer(job.base, tmp))
            return job.result(sorted(p.name for p in job.out.iterdir()), written)
        qspec = self.qspec(job, out_dtype)
        to_quantize = linear_weights(job.base) & set(job.index) if qspec is not None else set()
        if qspec is not None and qspec.type != "int8":
            bad = [n for n in to_quantize if job.index[n].shape[1] % qspec.blocksize]
            if bad:
                job.notes.append(
                    f"{len(bad)} weights (e.g. {bad[0]}) have in_features not a multiple of blocksize "
                    f"{qspec.blocksize}: the file is right, but bitsandbytes' CPU kernels (0.50) compute such weights "
                    "wrongly or fail; run this model on CUDA (docs/ARCHITECTURE.md, 'bitsandbytes hazards').")
        merge = job.merge(frozen, roundtrip=self.merged and not self.quantized)
        items = plan(job.index, job.src.modules() if self.merged else set(), to_quantize, out_dtype, qspec,
                     merge.roundtrip, job.transposed)
        shards = plan_shards([it.nbytes for it in items], max_shard_bytes(job.opts.max_shard_size))
        adapter_bytes = 0 if self.merged else sum(t.numel() * t.element_size() for a in job.src.stack
                                                   for t in a.tensors.values())
        check_free_space(job.out, sum(it.nbytes for it in items) + adapter_bytes + (16 << 20))
        survival = Survival() if self.merged and qspec is not None else None
        with writing(job.out), atomic_folder(job.out, job.opts.force) as tmp:
            written = write_weights(tmp, items, shards, merge, out_dtype, qspec, self.name, job.opts.progress,
                                    survival)
            if survival is not None:
                refuse_lossy(survival, job.opts.allow_lossy)
            write_config(job.base, tmp, out_dtype, qspec)
            job.notes.extend(copy_tokenizer(job.base, tmp))
            if not self.merged:
                write_adapter(job.src, tmp / ADAPTER_SUBFOLDER, None, job.base)
        return job.result(sorted(p.name for p in job.out.iterdir()), written, survival=survival)

    def qspec(self, job: Job, out_dtype: torch.dtype) -> quant.QuantSpec | None:
        if not self.quantized:
            return None
        t = job.src.trained_with
        if not self.merged:  # the very quantization training used, computing in training's compute dtype
            return t
        return (dataclasses.replace(t, compute_dtype=out_dtype) if t.type != "none"
                else quant.QuantSpec(job.opts.quant or "nf4", compute_dtype=out_dtype))

    def check(self, opts: Options) -> None:
        if not self.merged and opts.dtype is not None:
            raise ExportError(f"--format {self.name} stores the base as training held it (its frozen dtype and "
                              "quantization) and the adapter as trained; drop --dtype.")
        if not self.merged and opts.merge_base != "dequantized":
            raise ExportError(f"--format {self.name} merges nothing; drop --merge-base.")


@dataclass(frozen=True)
class QuantizedAdapterFormat(FolderFormat):
    merged: bool = False
    quantized: bool = True

    def write(self, job: Job) -> Result:
        t = job.src.trained_with
        if t.type not in ("nf4", "fp4"):
            raise ExportError(f"--format {self.name} stores the 4-bit base the adapter was trained on; this adapter "
                              f"was trained on a {t.type} base. Export --format adapter (with the base) or merged.")
        if len(job.src.stack) > 1 or job.src.adapter.kind == "ia3":
            raise ExportError(f"--format {self.name}: PEFT loads one LoRA/DoRA adapter over a quantized base; this is "
                              f"a {'+'.join(a.method for a in job.src.stack)} adapter. Export it --format merged.")
        return super().write(job)


@dataclass(frozen=True)
class GgufFormat(Format):
    one_file: bool = True
    adapter: bool = False  # llama.cpp's LoRA adapter GGUF instead of the merged model

    def check(self, opts: Options) -> None:
        gguf_export.check_type(opts.gguf_type, adapter=self.adapter)
        mf = gguf_export.ollama.modelfile_path(Path(opts.out))
        if not self.adapter and mf.exists() and not opts.force:
            raise ExportError(f"{mf} already exists (the Ollama Modelfile written beside the GGUF); pass --force to "
                              "replace it, or choose another --out.")

    def write(self, job: Job) -> Result:
        if self.adapter:
            with writing(job.out):
                written, more = gguf_adapter.write_adapter(job.src, job.base, job.out, job.opts.gguf_type)
            return _with(job, [job.out.name], written, more)
        merge = job.merge(job.frozen(job.raw_config()), roundtrip=True)
        with writing(job.out):
            written, more = gguf_export.write_model(merge, job.base, job.index, job.out, job.opts.gguf_type,
                                                    job.opts.progress, adapter_source(job.source)[1])
        return _with(job, [job.out.name, gguf_export.ollama.modelfile_path(job.out).name], written, more)


def _with(job: Job, files: list[str], written: int, notes: list[str]) -> Result:
    job.notes.extend(notes)
    return job.result(files, written)


FORMATS: dict[str, Format] = {f.name: f for f in (
    AdapterFormat("adapter", "PEFT folder (adapter_config.json + adapter_model.safetensors)", needs_base=False),
    FolderFormat("merged", "a full 16/32-bit model: W_base + the adapter, cast once to --dtype"),
    QuantizedAdapterFormat(
        "quantized-adapter", "the 4-bit base exactly as training quantized it (bitsandbytes' format, as transformers "
        "loads it) + the PEFT adapter in adapter/: the training-time model"),
    FolderFormat("quantized", "merged, then quantized again (4/8-bit): loses most of a QLoRA adapter's change "
                 "(refused unless --allow-lossy when almost nothing survives)", quantized=True),
    GgufFormat("gguf", "the merged model as one GGUF file (+ Ollama Modelfile)"),
    GgufFormat("gguf-adapter", "the LoRA as a llama.cpp adapter GGUF, for a GGUF of the ORIGINAL base", adapter=True),
)}


def refuse_lossy(survival: Survival, allowed: bool) -> None:
    """Stop a re-quantized export that kept almost none of the adapter's change (before its folder appears)."""
    if survival.kept < KEPT_MIN and not allowed:
        raise ExportError(
            f"--format quantized: re-quantizing the merged weights keeps {survival.kept:.1%} of the adapter's change "
            f"({survival.changed:.1%} of the quantized codes differ from the base's): the export would answer like "
            "the base. Export --format quantized-adapter (the 4-bit base with the adapter beside it: the training-time "
            "model), or pass --allow-lossy to write this one anyway.")


# ---- the export ---------------------------------------------------------------------------------------------------


def export(source: str | Path, opts: Options) -> Result:
    t0 = time.perf_counter()
    fmt = FORMATS.get(opts.format)
    if fmt is None:
        raise ExportError(f"--format {opts.format!r} is not one of {', '.join(FORMATS)}.")
    out = Path(opts.out)
    fmt.check(opts)
    if fmt.one_file and out.is_dir() and not out.is_symlink():
        raise ExportError(f"--out {out} is a folder; --format {fmt.name} writes one file: name it, e.g. "
                          f"{out / 'model.gguf'}.")
    if (out.exists() or out.is_symlink()) and not opts.force:
        raise ExportError(f"{out} already exists; pass --force to replace it, or choose another --out.")
    max_shard_bytes(opts.max_shard_size)  # a bad size fails before anything is read
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda: no CUDA GPU is visible; use --device cpu (or auto).")
    src = open_source(source, opts.base, opts.quant)
    base = base_folder(src.base_name, required=fmt.needs_base or opts.base is not None)
    for p in (Path(source), base):
        if p is not None and (out.resolve() == p.resolve() or out.resolve() in p.resolve().parents):
            raise ExportError(f"--out {out} would overwrite the input {p}; choose another folder.")
    if base is not None:
        src, index, notes = weight_index(src, base, opts.merge_base)
        notes = notes if fmt.name in ("merged", "quantized", "gguf") else []  # the pre-quantized note: on merging
    else:
        index, notes = None, [f"not checked against the base ({src.base_name} is not available here)"]
    moe = moe_merged.meta_model(base) if index is not None and moe_merged.maybe_moe(base) else None
    moe = moe if moe is not None and moe_merged.has_experts(moe) else None
    gguf = opts.format.startswith("gguf")  # GGUF reads the layout from config.json itself (gguf/families.py)
    transposed = frozenset(transposed_weights(base) & set(index)) if index is not None and not gguf else frozenset()
    if moe is not None:  # per-expert adapters over a Hub-layout checkpoint: checked against the converted model
        moe_merged.check_fits(src, moe, base)
        # GGUF stacks the experts itself (gguf/arch.py, gguf/experts.py), expert adapters included
        if opts.format not in ("adapter", "merged") and not opts.format.startswith("gguf"):
            moe_merged.refuse_format(opts.format)
    elif index is not None:  # adapters see a Conv1D weight (GPT-2) as the (out, in) Linear training ran
        check_fits(src.stack, gguf_export.fit_index(index, base) if gguf else
                   {n: dataclasses.replace(t, shape=t.shape[::-1]) if n in transposed else t for n, t in index.items()},
                   base)
    return fmt.write(Job(Path(source), opts, src, base, index, notes, t0, transposed, moe))


def write_adapter(src: Source, tmp: Path, dtype: str | None, base: Path | None) -> None:
    """One PEFT folder per method, in the stacked layout of peft_format (root, then ia3/). With the base at hand its
    model type decides which Linears are written as PEFT target parameters (expert_format), else the adapter's own
    record does."""
    config = base / "config.json" if base is not None else None
    model_type = json.loads(config.read_text()).get("model_type") if config is not None and config.is_file() else None
    for k, a in enumerate(src.stack):
        tensors = {k: v.to(quant.DTYPES[dtype]) for k, v in a.tensors.items()} if dtype else a.tensors
        where = tmp / peft_format.IA3_SUBFOLDER if k > 0 else tmp
        if a.kind == "ia3":
            peft_format.save_ia3(where, tensors, feedforward=[m for m in a.modules() if a.feedforward(m)],
                                 base_model=src.base_name)
            continue
        drop = ("target_modules", "base_model_name_or_path") + (("target_parameters",) if model_type else ())
        extra = {k: v for k, v in a.config.items() if k not in drop}
        peft_format.save_adapter(where, tensors, r=a.r, alpha=a.alpha, dropout=float(a.config.get("lora_dropout", 0.0)),
                                 rslora=a.rslora, base_model=src.base_name, extra=extra, model_type=model_type)
