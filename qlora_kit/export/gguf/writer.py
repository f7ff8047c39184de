"""`export --format gguf` / `gguf-adapter`: one GGUF file for llama.cpp, Ollama and LM Studio, written with the
`gguf` package (no llama.cpp checkout or build).

    gguf          the merged model: the same W_base + s·B@A as `--format merged` (dequantized base by default), in
                  fp32, then stored as --gguf-type. 2-D weights take the type; 1-D tensors (norms, biases) stay f32
                  as llama.cpp expects; a weight whose row length is not a multiple of the type's block (32) falls
                  back to f16, as llama.cpp's converter does. K-quants (q2_k ... q6_k): blocks made by
                  llama.cpp's own ggml quantizer from the xllamacpp wheel, llama.cpp's type mix (`gguf_kquant`);
                  without it but with llama-cpp-python, an f16 GGUF through its llama_model_quantize.
    gguf-adapter  llama.cpp's LoRA GGUF (general.type adapter, adapter.type lora, adapter.lora.alpha; tensors
                  blk.N.<name>.weight.lora_a (r, in) / .lora_b (out, r)) for `llama-cli -m BASE.gguf --lora A.gguf`
                  and Ollama's ADAPTER (experts: stacked (E, r, in) / (E, out, r) pairs, `gguf_experts`).
                  It adds s·B@A to whatever base GGUF it is given: a GGUF of the ORIGINAL
                  base. A QLoRA adapter was trained against dequant(quant(W)), so the exact model is the merged GGUF.

Streaming: every tensor's type, shape and size are fixed from the safetensors headers before any data exists, so
the header is written first and tensors follow one at a time (peak memory about one fp32 weight, its quantized
copy, and the adapter). The file is written to `.NAME.tmp-PID` beside --out and renamed when complete; free space
is checked first. Layout changes are in `gguf_arch` (q/k row permutation); tokenizer keys in `gguf_vocab`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ... import atomic
from . import arch as gguf_arch, experts as gguf_experts, kquant as gguf_kquant, vocab as gguf_vocab, ollama
from ...errors import ExportError
from .kquant import KQUANTS
from ..files import check_free_space
from ..merge import Merge, merged_weight
from ..shards import TensorInfo, read_tensor, row_blocks, tensor_index
from ...terms import lora_scale

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # what the gguf package writes itself
ADAPTER_TYPES = ("f32", "f16", "bf16")
# kept f32 whatever the type, as llama.cpp's converter does: learned positions, RoPE factor tensors
F32_NAMES = ("position_embd.", "rope_freqs.", "rope_factors_")


def display_name(base: Path) -> str:
    """general.name: the base folder's name plus a suffix. transformers' GGUF loader reads a llama GGUF named
    exactly "mistral" as a `mistral` architecture gguf-py does not have; no suffixed name can be that."""
    return f"{base.name} (qlora-kit)"


def check_type(kind: str, adapter: bool) -> None:
    """Refuse an unusable --gguf-type before anything is read or written."""
    allowed = ADAPTER_TYPES if adapter else TYPES + tuple(KQUANTS)
    if kind not in allowed:
        raise ExportError(f"--gguf-type {kind!r} is not one of {', '.join(allowed)}"
                          + (" (a LoRA adapter GGUF is stored unquantized)." if adapter else "."))
    if kind in KQUANTS and not gguf_kquant.available():
        try:
            import llama_cpp  # noqa: F401  (the older route: llama-cpp-python, compiled from source)
        except Exception as e:  # ImportError, or a broken native library
            raise ExportError(f"--gguf-type {kind} is a K-quant, made by llama.cpp's own quantizer, which is not "
                              f"installed ({type(e).__name__}). Install it: {gguf_kquant.EXTRA}; or pick one of "
                              f"{', '.join(TYPES)}.") from None


def fit_index(index: dict[str, TensorInfo], base: Path) -> dict[str, TensorInfo]:
    """The base's tensor headers as the adapter sees them: Conv1D weights (stored (in, out)) as (out, in). From
    config.json alone (llama.cpp's names), so a config transformers would not build is still refused by name."""
    names = gguf_arch.TensorNames(gguf_arch.arch_of(json.loads((base / "config.json").read_text(encoding="utf-8"))))
    return {n: dataclasses.replace(t, shape=t.shape[::-1]) if len(t.shape) == 2 and names.transposed(n) else t
            for n, t in index.items()}


def _qtype(kind: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, kind.upper())


@dataclass(frozen=True)
class Planned:
    """One tensor of the output file."""

    info: TensorInfo | None  # the source tensor (its header), or None for a computed one (`value`)
    name: str  # GGUF name
    kind: str  # f32 | f16 | bf16 | q8_0 ...
    module: str | None  # adapted module (merged in), or None
    shape: tuple[int, ...]  # in Hugging Face (rows, cols) order, after any transpose
    transposed: bool = False  # GPT-2 Conv1D: the checkpoint stores (in, out)
    shift: float = 0.0  # added to the values (Gemma norms)
    rows: Callable[[torch.Tensor], torch.Tensor] | None = None  # output-row reordering (gguf_arch.TensorNames.rows)
    value: torch.Tensor | None = None
    experts: gguf_experts.Stack | None = None  # MoE: the experts stacked into this (E, out, in) tensor

    @property
    def nbytes(self) -> int:
        import gguf

        return int(np.prod(gguf.quants.quant_shape_to_byte_shape(self.shape, _qtype(self.kind))))


def plan(index: dict[str, TensorInfo], names: gguf_arch.TensorNames, kind: str, adapted: set[str]
         ) -> tuple[list[Planned], list[str]]:
    import gguf

    out, fallback = [], []
    index, experts = gguf_arch.group_experts(index)
    gguf_names = {hf: names(hf) for hf in index}
    gguf_experts.check_family(names.arch.hf, adapted)
    groups = {gguf_names[k]: v for k, v in experts.items() if gguf_names[k] is not None}
    extra = gguf_arch.extra_tensors(names.arch)
    n_layers = names.arch.n_layers
    tied = "output.weight" not in gguf_names.values()
    n_expert = len(next(iter(experts.values()))) if experts else 0
    for hf, info in [*index.items(), *((n, None) for n in extra)]:
        name = gguf_names[hf] if info is not None else hf
        if name is None:
            continue
        transposed = info is not None and len(info.shape) == 2 and names.transposed(hf)
        shape = tuple(extra[hf].shape) if info is None else info.shape[::-1] if transposed else info.shape
        stack = gguf_experts.stack(name, groups, adapted) if hf in experts else None
        shape = (len(stack.parts), *shape) if stack is not None else shape
        t = kind if len(shape) >= 2 and not name.startswith(F32_NAMES) else "f32"
        if t in KQUANTS and gguf_kquant.keeps_type(name, shape):  # not quantized by llama.cpp's quantizer either
            t = "f32"
        elif t in KQUANTS:  # llama.cpp's per-tensor mix, then its fallback for rows not made of 256-weight blocks
            t = gguf_kquant.tensor_kind(kind, name, n_layers, tied, names.arch.name, n_expert,
                                        names.arch.n_head // names.arch.n_head_kv)
            if gguf_kquant.row_fallback(t, shape[-1]) != t:
                t = gguf_kquant.row_fallback(t, shape[-1])
                fallback.append(hf)
        if len(shape) >= 2 and shape[-1] % gguf.GGML_QUANT_SIZES[_qtype(t)][0]:
            t = "f16"
            fallback.append(hf)
        out.append(Planned(info, name, t, _module(hf, adapted), shape, transposed, names.shift(hf), names.rows(hf),
                           extra.get(hf), stack))
    block = 256 if kind in KQUANTS else gguf.GGML_QUANT_SIZES[_qtype(kind)][0]
    notes = [f"{len(set(fallback))} weights (e.g. {fallback[0]}) have rows not a multiple of {block} and are stored in "
             f"a wider type than {kind}, as llama.cpp does"] if fallback else []
    return out, notes


def _module(hf: str, adapted: set[str]) -> str | None:
    return hf[: -len(".weight")] if hf.endswith(".weight") and hf[: -len(".weight")] in adapted else None


def encode(W: torch.Tensor, kind: str) -> np.ndarray:
    """(rows, cols) fp32 -> the bytes GGUF stores (F32/F16 as float arrays, the others as uint8), rows kept."""
    import gguf

    if kind == "f32":
        return W.float().numpy()
    if kind == "f16":
        return W.to(torch.float16).numpy()
    if kind == "bf16":  # round to nearest even, as gguf's own BF16.quantize (finite values)
        return W.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    if kind in gguf_kquant.BLOCK_TYPES:  # llama.cpp's ggml makes the K blocks
        return gguf_kquant.quantize(W.float().numpy(), kind)
    return gguf.quants.quantize(W.float().numpy(), _qtype(kind))


def _tensor(p: Planned, merge: Merge) -> torch.Tensor:
    """The output tensor in fp32 (merged if adapted, dequant(Q) if in merge.roundtrip; layout changes of
    gguf_arch)."""
    if p.value is not None:
        return p.value.float()
    if p.experts is not None:  # (n_expert, out, in): each expert as training held it (gguf_experts)
        return gguf_experts.weight(p.experts, merge)
    W = read_tensor(p.info)
    if p.transposed:  # (in, out) -> (out, in) before merging: lora B @ A is (out, in)
        W = W.t().contiguous()
    W = merge.base(W, p.info.name, p.module)
    if p.module is not None:  # every method of the stack, in order (methods.merge_rows), as --format merged
        W = merged_weight(W, merge.src.stack, p.module, torch.float32)
    W = W.float() + p.shift if p.shift else W.float()
    return p.rows(W) if p.rows is not None else W


def _write_blocks(writer, p: Planned, W: torch.Tensor) -> None:
    """Encode in blocks of rows into one preallocated output array: the fp32 temporaries of a quantizer stay at
    ~64 MB whatever the weight."""
    if W.dim() < 2:
        writer.write_tensor_data(encode(W, p.kind))
        return
    if W.dim() == 3:  # MoE experts: each (out, in) matrix encoded, then stacked
        writer.write_tensor_data(np.stack([encode(x, p.kind) for x in W]))
        return
    parts = row_blocks(tuple(W.shape), 4, 64 << 20)
    first = encode(W[parts[0][0]:parts[0][1]], p.kind)
    if len(parts) == 1:
        writer.write_tensor_data(first)
        return
    out = np.empty((W.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[: len(first)] = first
    for i, j in parts[1:]:
        out[i:j] = encode(W[i:j], p.kind)
    writer.write_tensor_data(out)


def _add_info(writer, name: str, shape: tuple[int, ...], kind: str, nbytes: int) -> None:
    import gguf

    if kind in ("f32", "f16"):
        writer.add_tensor_info(name, shape, np.float32 if kind == "f32" else np.float16, nbytes)
    else:  # uint8 bytes: the writer takes the byte shape and derives the element shape
        qt = _qtype(kind)
        writer.add_tensor_info(name, gguf.quants.quant_shape_to_byte_shape(shape, qt), np.uint8, nbytes, raw_dtype=qt)


def _file_type(kind: str) -> int:
    import gguf

    if kind in KQUANTS:
        return KQUANTS[kind].file_type
    return gguf.LlamaFileType.ALL_F32 if kind == "f32" else getattr(gguf.LlamaFileType, f"MOSTLY_{kind.upper()}")


def write_model(merge: Merge, base: Path, index: dict[str, TensorInfo], out: Path, kind: str, progress: bool,
                recipe=None) -> tuple[int, list[str]]:
    """The merged GGUF (and its Ollama Modelfile): every weight as `merge` computes it, the same merge as
    --format merged. Returns (bytes written, notes)."""
    import gguf
    from tqdm.auto import tqdm

    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    arch = gguf_arch.arch_of(config)
    # K-quants: blocks from llama.cpp's ggml (xllamacpp); else llama-cpp-python quantizes an f16 file afterwards
    via_f16 = kind in KQUANTS and not gguf_kquant.available()
    store = "f16" if via_f16 else kind
    names = gguf_arch.TensorNames(arch)
    tensors, notes = plan(index, names, store, merge.src.modules())
    total = sum(p.nbytes for p in tensors)
    need = total * (2 if via_f16 else 1) + (64 << 20)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(out, need)
    f16 = atomic.temp_name(out, "f16") if via_f16 else None
    try:
        with atomic.atomic_file(out) as tmp:
            writer = gguf.GGUFWriter(None, arch.name)
            try:
                writer.add_type(gguf.GGUFType.MODEL)
                writer.add_name(display_name(base))
                writer.add_file_type(_file_type(store))
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
                gguf_arch.add_hparams(writer, arch, config["vocab_size"])
                tok = gguf_vocab.add_tokenizer(writer, base, config["vocab_size"])
                for p in tensors:
                    _add_info(writer, p.name, p.shape, p.kind, p.nbytes)
                writer.write_header_to_file(path=f16 or tmp)
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                bar = tqdm(total=total, unit="B", unit_scale=True, desc="export gguf", disable=not progress,
                           dynamic_ncols=True)
                for p in tensors:
                    _write_blocks(writer, p, _tensor(p, merge))
                    bar.update(p.nbytes)
                bar.close()
            finally:
                writer.close()
            if f16 is not None:  # the f16 file only feeds llama.cpp's quantizer
                _kquantize(f16, tmp, kind)
    finally:
        if f16 is not None:
            f16.unlink(missing_ok=True)
    atomic.write_text(ollama.modelfile_path(out), ollama.modelfile(out.name, tok, recipe))
    return out.stat().st_size, notes


def _kquantize(src: Path, dst: Path, kind: str) -> None:
    """llama.cpp's own quantizer (llama-cpp-python's binding of llama_model_quantize) on an f16 GGUF."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = KQUANTS[kind].file_type
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        dst.unlink(missing_ok=True)
        raise ExportError(f"llama.cpp's quantizer failed on {src.name} -> {kind} (return code {rc}).")


def write_adapter(src, base: Path, out: Path, kind: str) -> tuple[int, list[str]]:
    """llama.cpp's LoRA adapter GGUF. Per-module scales (rsLoRA, alpha_pattern) that alpha / r cannot express are
    folded into lora_b, so llama.cpp's single `alpha` gives every module its trained scale."""
    import gguf

    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    arch = gguf_arch.arch_of(config)
    names = gguf_arch.TensorNames(arch)
    a = src.adapter
    if len(src.stack) > 1 or a.method != "lora":
        raise ExportError(f"--format gguf-adapter: llama.cpp adapters are plain LoRA; this is a "
                          f"{'+'.join(x.method for x in src.stack)} adapter. Export it merged: --format gguf.")
    gguf_experts.check_family(arch.hf, a.modules())

    def fold(m: str, B: torch.Tensor) -> torch.Tensor:  # llama.cpp applies alpha / r to every pair
        f = a.module_scaling(m) / lora_scale(a.alpha, a.pair(m)[0].shape[0], rslora=False)
        return B.float() * f if f != 1.0 else B.float()

    tensors: list[tuple[str, torch.Tensor]] = []
    for m in a.modules():
        if gguf_experts.MODULE.match(m):
            continue  # stacked per layer below
        A, B = a.pair(m)
        B = fold(m, B)
        rows = names.rows(f"{m}.weight")
        B = rows(B) if rows is not None else B
        name = names(f"{m}.weight")
        tensors += [(f"{name}.lora_a", A.float()), (f"{name}.lora_b", B)]
    if gguf_experts.adapted(a.modules()):  # the base's expert stacks, (E, out, in) from the checkpoint's headers
        _, groups = gguf_arch.group_experts(tensor_index(base))
        shapes = {names(k): (len(v), *v[0].shape) for k, v in groups.items()}
        n_expert = len(next(iter(groups.values()))) if groups else 0
        tensors += gguf_experts.adapter_tensors(a, n_expert, shapes, fold)
    nbytes = sum(t.numel() * (4 if kind == "f32" else 2) for _, t in tensors)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(out, nbytes + (1 << 20))
    with atomic.atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(None, arch.name)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(a.alpha))
            writer.add_name(f"{display_name(base)} LoRA")
            for name, t in tensors:
                _add_info(writer, name, tuple(t.shape), kind, t.numel() * (4 if kind == "f32" else 2))
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _, t in tensors:
                writer.write_tensor_data(encode(t, kind))
        finally:
            writer.close()
    notes = ["this adapter applies to a GGUF of the ORIGINAL base; a QLoRA adapter was trained against the "
             "4-bit-rounded base, so for the exact trained model export --format gguf (merged)"] \
        if src.trained_with.type != "none" else []
    return out.stat().st_size, notes

