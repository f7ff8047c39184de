"""`export --format merged` of a mixture-of-experts base: the merged model in transformers' own layout.

Training saw the experts as one Linear per expert and projection (model/moe.py), quantized slice by slice, over
tensors transformers' conversion rules produced from the Hub layout (model/convert.py). The export walks the same
road: the base is read one decoder layer at a time and converted by the same rules, then every weight becomes what
the training-time model multiplied by, merged:

    expert stack (E, ., .)   per expert e: W_e -> dequant(quant(W_e)) (the run's settings) -> + s · B_e @ A_e in
                             fp32 -> cast once; written back into the stack (gpt-oss' (E, in, out) transposed back)
    Linear weight            dequant(quant(W)) (+ the adapter, when adapted), as the dense export does
    anything else            copied, cast to --dtype

The folder holds the converted names (`mlp.experts.gate_up_proj` (E, 2I, H)): transformers loads them as they
are (its rules rewrite only the Hub names). Tensors are written as they are computed (shards.ShardWriter, every
shard open at once): peak memory is one layer's converted tensors plus its merged copy, never the whole model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..adapters import methods
from ..errors import ExportError
from ..model.convert import Conversion
from ..model.load import load_config
from ..model.moe import PROJECTIONS, is_expert_stack
from .merge import merge_base_weight
from .shards import Entry, ShardWriter, plan_shards, read_tensor, shard_names, write_index
from .source import Source


MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")  # config.json keys of the MoE families


def maybe_moe(base: Path) -> bool:
    """config.json names experts (cheap: the model is built only then)."""
    import json

    try:
        raw = json.loads((base / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any(raw.get(k) for k in MOE_KEYS)


def meta_model(base: Path) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(load_config(base))


def has_experts(model: nn.Module) -> bool:
    return any(is_expert_stack(m) for m in model.modules())


def check_fits(src: Source, model: nn.Module, base: Path) -> None:
    """Every adapted module is a Linear of the model or one expert's projection, with B @ A (LoRA, DoRA) or IA3's
    vector (its output or, scaling the input, its input size) of its shape."""
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for n, m in model.named_modules():
        if is_expert_stack(m):
            t = bool(getattr(m, "is_transposed", False))
            for proj in PROJECTIONS:
                e_count, a, b = getattr(m, proj).shape
                shapes |= {f"{n}.{e}.{proj}": (b, a) if t else (a, b) for e in range(e_count)}
    bad = []
    for adapter in src.stack:
        for name in adapter.modules():
            if adapter.kind == "ia3":
                n, side = adapter.ia3_vector(name).numel(), int(adapter.feedforward(name))
                if name not in shapes or shapes[name][side] != n:
                    bad.append(f"{name} (IA3 vector of {n}, base {shapes.get(name, 'missing')})")
                continue
            A, B = adapter.pair(name)
            if shapes.get(name) != (B.shape[0], A.shape[1]):
                bad.append(f"{name} (adapter {(B.shape[0], A.shape[1])}, base {shapes.get(name, 'missing')})")
    if bad:
        raise ExportError(f"the adapter does not fit the base {base}: {len(bad)} modules, e.g. {', '.join(bad[:2])}. "
                          "Pass the model it was trained on with --base.")


def _merged(W: torch.Tensor, name: str, src: Source, quantized: bool, merge_base: str, frozen: torch.dtype,
            out_dtype: torch.dtype, device: str) -> torch.Tensor:
    """One (out, in) weight as the run computed with it: dequant(Q) when training quantized it, plus the adapter."""
    if quantized:
        W = merge_base_weight(W.contiguous(), src.trained_with, frozen, merge_base, device, src.offset(name))
    if name in src.modules():
        return methods.merge_rows(W, src.stack, name, (0, W.shape[0]), out_dtype)
    return W.to(out_dtype)


def write(src: Source, base: Path, model: nn.Module, index: dict, tmp: Path, out_dtype: torch.dtype,
          frozen: torch.dtype, merge_base: str, device: str, max_shard: int) -> int:
    """Write the merged weights into `tmp` (shards + index); returns the bytes written."""
    from ..model.load import _layer_order

    conversion = Conversion(model)
    meta = model.state_dict()
    head = model.get_output_embeddings()
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
    stacks = {n: m for n, m in model.named_modules() if is_expert_stack(m)}
    targets = sorted({conversion.target_of(k) for k in index} & set(meta))
    entries = [Entry(n, out_dtype if meta[n].dtype.is_floating_point else meta[n].dtype, tuple(meta[n].shape))
               for n in targets]
    groups = plan_shards([e.nbytes for e in entries], max_shard)
    names = shard_names(len(groups))
    where = {entries[i].name: k for k, g in enumerate(groups) for i in g}
    writers = [ShardWriter(tmp / names[k], [entries[i] for i in g]) for k, g in enumerate(groups)]
    trained_quantized = src.trained_with.type != "none"
    try:
        reads = [(k, (lambda info=info: read_tensor(info))) for k, info in index.items()]
        for _, items in _layer_order(reads):
            for name, t in conversion.convert(model, items):
                if name not in where:
                    continue  # a checkpoint tensor the model does not have (load skips it too)
                module, _, leaf = name.rpartition(".")
                if module in stacks and leaf in PROJECTIONS:
                    tr = bool(getattr(stacks[module], "is_transposed", False))
                    out = torch.empty(t.shape, dtype=out_dtype)
                    for e in range(t.shape[0]):
                        w = _merged(t[e].t() if tr else t[e], f"{module}.{e}.{leaf}", src, trained_quantized,
                                    merge_base, frozen, out_dtype, device)
                        out[e] = w.t() if tr else w
                elif module in linears and leaf == "weight":
                    out = _merged(t, module, src, trained_quantized, merge_base, frozen, out_dtype, device)
                elif module in linears and leaf == "bias" and methods.bias_scale(src.stack, module) is not None:
                    out = (t.float() * methods.bias_scale(src.stack, module)).to(out_dtype)  # IA3: l ⊙ (W x + b)
                else:
                    out = t.to(out_dtype) if t.dtype.is_floating_point else t
                writers[where[name]].write(name, out.contiguous())
        written = sum(w.close() for w in writers)
    finally:
        for w in writers:
            w.abort()
    if len(groups) > 1:
        write_index(tmp, {e.name: names[where[e.name]] for e in entries}, sum(e.nbytes for e in entries))
    return written


def refuse_format(fmt: str) -> None:
    raise ExportError(f"--format {fmt} of a mixture-of-experts model is not supported yet: export --format merged "
                      "(16-bit, transformers' layout) or --format adapter (PEFT, target_parameters).")

