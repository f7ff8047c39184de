"""`export --format gguf` / `gguf-adapter`: one GGUF file for llama.cpp, Ollama and LM Studio, written with the
`gguf` package (no llama.cpp checkout or build).

    gguf          the merged model: the same W_base + s·B@A as `--format merged` (dequantized base by default), in
                  fp32, then stored as --gguf-type. 2-D weights take the type; 1-D tensors (norms, biases) and
                  the MoE routers stay f32 as llama.cpp's converter keeps them; a weight whose row length is not a
                  multiple of the type's block (32) falls back to f16, as llama.cpp's converter does. A tensor may
                  be written as pieces of a source tensor, cut after the merge (`take`: gpt-oss's gate_up, DeepSeek's
                  kv_b; families_moe); MoE experts are stacked as training held them (`gguf_experts`; gpt-oss's
                  stored (E, in, out) stacks are merged per expert there, whole, before `take`).
                  K-quants (q2_k ... q6_k): blocks made by llama.cpp's own ggml quantizer from the xllamacpp
                  wheel, llama.cpp's type mix (`gguf_kquant`); without it but with llama-cpp-python, an f16 GGUF
                  through its llama_model_quantize. mxfp4: llama.cpp's MXFP4_MOE mix (`gguf_kquant.mxfp4_kind`),
                  MXFP4 blocks from ggml with the xllamacpp wheel, else from the gguf package's quantizer (the
                  same bytes, tested), MoE models only.
    gguf-adapter  llama.cpp's LoRA GGUF: `gguf_adapter` (adapter.py), with this module's encoding and type checks.

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
from . import rope as gguf_rope
from ...errors import ExportError
from .kquant import KQUANTS
from ..files import check_free_space
from ..merge import Merge, merged_weight
from ..shards import TensorInfo, read_tensor, row_blocks

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # what the gguf package writes itself
MXFP4 = "mxfp4"  # llama.cpp's MXFP4_MOE file type: experts MXFP4, the rest Q8_0 (gguf_kquant.mxfp4_kind)
ADAPTER_TYPES = ("f32", "f16", "bf16")
# kept f32 whatever the type, as llama.cpp's converter does: learned positions, RoPE factor tensors
F32_NAMES = ("position_embd.", "rope_freqs.", "rope_factors_")
ROUTERS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")  # MoE routers: f32 as the converter keeps them


def display_name(base: Path) -> str:
    """general.name: the base folder's name plus a suffix. transformers' GGUF loader reads a llama GGUF named
    exactly "mistral" as a `mistral` architecture gguf-py does not have; no suffixed name can be that."""
    return f"{base.name} (qlora-kit)"


def check_type(kind: str, adapter: bool) -> None:
    """Refuse an unusable --gguf-type before anything is read or written."""
    allowed = ADAPTER_TYPES if adapter else TYPES + (MXFP4,) + tuple(KQUANTS)
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
    # the slice of the (merged) source written as this tensor: gate_up's gate columns, kv_b's k_b (families_moe)
    take: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        import gguf

        return int(np.prod(gguf.quants.quant_shape_to_byte_shape(self.shape, _qtype(self.kind))))


def plan(index: dict[str, TensorInfo], names: gguf_arch.TensorNames, kind: str, adapted: set[str]
         ) -> tuple[list[Planned], list[str]]:
    import gguf

    out, fallback = [], []
    index, experts = gguf_arch.group_experts(index)
    gguf_experts.check_family(names.arch.hf, adapted)
    extra = gguf_arch.extra_tensors(names.arch)
    n_layers = names.arch.n_layers
    # (HF name, header, GGUF name, shape, take, transposed): every piece of every source tensor, then the computed ones
    rows: list[tuple[str, TensorInfo | None, str, tuple[int, ...], Callable | None, bool]] = []
    groups: dict[str, list[TensorInfo]] = {}  # GGUF name -> the checkpoint's per-expert headers (gguf_experts.stack)
    for hf, info in index.items():
        transposed = len(info.shape) == 2 and names.transposed(hf)
        shape = info.shape[::-1] if transposed else info.shape
        shape = (len(experts[hf]), *shape) if hf in experts else shape
        for name, s, take in names.pieces(hf, shape):
            rows.append((hf, info, name, s, take, transposed))
            if hf in experts:
                groups[name] = experts[hf]
    rows += [(n, None, n, tuple(extra[n].shape), None, False) for n in extra]
    # llama.cpp's expert_count: the stacked (E, out, in) expert tensors' first dimension (gpt-oss's come fused)
    n_expert = max((r[3][0] for r in rows if len(r[3]) == 3 and "_exps." in r[2]), default=0)
    if kind == MXFP4 and not any(len(r[3]) == 3 and r[3][0] > 1 for r in rows):
        raise ExportError(f"--gguf-type mxfp4 is llama.cpp's MXFP4_MOE: only 3-D expert tensors become MXFP4, every "
                          f"other weight Q8_0, so on {names.arch.hf}, which has no experts, it would make nothing "
                          "MXFP4. Export --gguf-type q8_0 (the same file), or q4_0 / a K-quant for a smaller one.")
    tied = "output.weight" not in {r[2] for r in rows}
    for hf, info, name, shape, take, transposed in rows:
        stack = gguf_experts.stack(name, groups, adapted) if name in groups else \
            gguf_experts.interleaved_stack(names.arch.hf, hf, name, info, adapted)
        # f32 whatever the type, as llama.cpp's converter: 1-D tensors, biases (gpt-oss's (E, I) expert biases
        # among them), learned positions, RoPE factors, the expert routers
        t = kind if len(shape) >= 2 and name.endswith(".weight") and not name.startswith(F32_NAMES) \
            and not name.endswith(ROUTERS) else "f32"
        if t in (MXFP4, *KQUANTS) and gguf_kquant.keeps_type(name, shape):  # llama.cpp's quantizer keeps these too
            t = "f32"
        elif t == MXFP4:
            t = gguf_kquant.mxfp4_kind(name, shape, tied)
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
                           extra.get(hf), stack, take))
    block = 256 if kind in KQUANTS else gguf.GGML_QUANT_SIZES[_qtype(kind)][0]
    how = "llama.cpp's converter does (llama-quantize itself stops on them)" if kind == MXFP4 else "llama.cpp does"
    notes = [f"{len(set(fallback))} weights (e.g. {fallback[0]}) have rows not a multiple of {block} and are stored in "
             f"a wider type than {kind}, as {how}"] if fallback else []
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
    # llama.cpp's ggml makes the K blocks, and MXFP4's where installed: the gguf package's quantizer writes the same
    # bytes (tests/test_llama_cpp_moe.py) about 9x slower, single-threaded
    if kind in gguf_kquant.BLOCK_TYPES or (kind == MXFP4 and gguf_kquant.available()):
        return gguf_kquant.quantize(W.float().numpy(), kind)
    return gguf.quants.quantize(W.float().numpy(), _qtype(kind))


def _tensor(p: Planned, merge: Merge) -> torch.Tensor:
    """The output tensor in fp32 (merged if adapted, dequant(Q) if in merge.roundtrip; layout changes of
    gguf_arch)."""
    if p.value is not None:
        return p.value.float()
    if p.experts is not None:  # (n_expert, out, in): each expert as training held it (gguf_experts)
        W = gguf_experts.weight(p.experts, merge)
    else:
        W = _source(p, merge)
    W = p.take(W) if p.take is not None else W
    return p.rows(W) if p.rows is not None else W


def _source(p: Planned, merge: Merge) -> torch.Tensor:
    """One checkpoint tensor in fp32, merged as --format merged merges it, before `take` and `rows`."""
    W = read_tensor(p.info)
    if p.transposed:  # (in, out) -> (out, in) before merging: lora B @ A is (out, in)
        W = W.t().contiguous()
    W = merge.base(W, p.info.name, p.module)
    if p.module is not None:  # every method of the stack, in order (methods.merge_rows), as --format merged
        W = merged_weight(W, merge.src.stack, p.module, torch.float32)
    return W.float() + p.shift if p.shift else W.float()


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


def add_info(writer, name: str, shape: tuple[int, ...], kind: str, nbytes: int) -> None:
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
    if kind == MXFP4:
        return gguf.LlamaFileType.MOSTLY_MXFP4_MOE
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
    notes += gguf_rope.truncate_note(config, arch.head_dim)
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
                    add_info(writer, p.name, p.shape, p.kind, p.nbytes)
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
