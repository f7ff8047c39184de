"""`export --format gguf-adapter`: llama.cpp's LoRA adapter GGUF (general.type adapter, adapter.type lora,
adapter.lora.alpha; tensors blk.N.<name>.weight.lora_a (r, in) / .lora_b (out, r), experts' stacked (E, r, in) /
(E, out, r) pairs from `gguf_experts`) for `llama-cli -m BASE.gguf --lora A.gguf` and Ollama's ADAPTER. It adds
s·B@A to whatever base GGUF it is given: a GGUF of the ORIGINAL base. A QLoRA adapter was trained against
dequant(quant(W)), so the exact model is the merged GGUF (`writer`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ... import atomic
from . import arch as gguf_arch, experts as gguf_experts, writer as gguf_writer
from ...errors import ExportError
from ..files import check_free_space
from ..shards import tensor_index
from ...terms import lora_scale


def _adapter_name(names: gguf_arch.TensorNames, module: str, shape: tuple[int, int]) -> str:
    """The GGUF weight an adapted module's LoRA applies to, or an ExportError when llama.cpp's file has no single
    such weight (DeepSeek's kv_b_proj is written as two reshaped tensors)."""
    pieces = names.pieces(f"{module}.weight", shape)
    if len(pieces) != 1 or pieces[0][2] is not None:
        raise ExportError(f"--format gguf-adapter: {module} is written to llama.cpp as "
                          f"{' and '.join(p[0] for p in pieces) or 'nothing'}, reshaped, so a LoRA on it has no "
                          "llama.cpp adapter tensor. Export it merged: --format gguf.")
    name, only = pieces[0][0], names.arch.fam.lora
    if only is not None and name.split(".")[-2] not in only:
        raise ExportError(f"--format gguf-adapter: llama.cpp's {names.arch.name} graph applies LoRA adapters only to "
                          f"{', '.join(only)}; it multiplies {name} ({module}) directly, so this adapter's LoRA on it "
                          "would be ignored. Export it merged (--format gguf), or train the adapter only on the "
                          f"modules written as {', '.join(only)}.")
    return name


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
        name = _adapter_name(names, m, (B.shape[0], A.shape[1]))
        tensors += [(f"{name}.lora_a", A.float()), (f"{name}.lora_b", B)]
    if gguf_experts.adapted(a.modules()):  # the base's expert stacks, (E, out, in) from the checkpoint's headers
        index, groups = gguf_arch.group_experts(tensor_index(base))
        shapes = {names(k): (len(v), *v[0].shape) for k, v in groups.items()}
        n_expert = len(next(iter(groups.values()))) if groups else 0
        interleaved = arch.hf in gguf_experts.INTERLEAVED
        if interleaved:  # gpt-oss: one stored (E, in, out) stack per projection, cut into llama.cpp's tensors
            stored = [(k, t.shape) for k, t in index.items() if gguf_experts.FUSED.match(k)]
            shapes = {n: s for k, shape in stored for n, s, _ in names.pieces(k, shape)}
            n_expert = stored[0][1][0] if stored else 0
        tensors += gguf_experts.adapter_tensors(a, n_expert, shapes, fold, interleaved)
    nbytes = sum(t.numel() * (4 if kind == "f32" else 2) for _, t in tensors)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(out, nbytes + (1 << 20))
    with atomic.atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(None, arch.name)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(a.alpha))
            writer.add_name(f"{gguf_writer.display_name(base)} LoRA")
            for name, t in tensors:
                gguf_writer.add_info(writer, name, tuple(t.shape), kind, t.numel() * (4 if kind == "f32" else 2))
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _, t in tensors:
                writer.write_tensor_data(gguf_writer.encode(t, kind))
        finally:
            writer.close()
    notes = ["this adapter applies to a GGUF of the ORIGINAL base; a QLoRA adapter was trained against the "
             "4-bit-rounded base, so for the exact trained model export --format gguf (merged)"] \
        if src.trained_with.type != "none" else []
    return out.stat().st_size, notes

