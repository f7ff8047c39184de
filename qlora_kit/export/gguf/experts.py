"""Mixture-of-experts LoRA in GGUF: training's per-expert adapters as llama.cpp's stacked expert tensors.

Training holds each routed expert e of layer L as two Linears (model/moe.py): `...layers.L.mlp.experts.e.gate_up_proj`
(2I, H) with rows [gate; up], and `...experts.e.down_proj` (H, I), each with its own LoRA pair A_e (r, in), B_e (out, r)
and quantized slice by slice. llama.cpp holds one 3-D tensor per kind and layer: ffn_gate_exps and ffn_up_exps
(E, I, H), ffn_down_exps (E, H, I) (numpy order), stacked from the checkpoint's per-expert gate/up/down weights.

    merged GGUF   per expert: the fused [gate_e; up_e] (2I, H), as training multiplied by it (dequant(quant(.)) of
                  the fused slice for the dequantized merge base: the 4-bit blocks and absmax statistics span
                  both halves), plus s·B_e @ A_e over those rows; then the half the tensor holds
    adapter GGUF  as llama.cpp's convert_lora_to_gguf.py writes expert LoRA: <tensor>.lora_a (E, r, in) and
                  <tensor>.lora_b (E, out, r), the per-expert pairs stacked; llama.cpp's graph multiplies them for
                  the routed experts only (build_lora_mm_id, ggml_mul_mat_id). gate and up share A_e: B_e @ A_e
                  splits by rows exactly, gate's B rows [0, I) and up's [I, 2I). An expert without an adapter
                  gets zero A and B (no change), as PEFT's fused layout would hold it.

gpt-oss stores one (E, in, out) tensor per projection, gate and up in alternating columns of gate_up_proj; training
holds expert e's gate_up_proj as that slice transposed, (2I, H) with gate rows 0::2 and up rows 1::2 (model/moe.py).
Its merged GGUF takes each whole (2I, H) slice through dequant(quant(.)) and s·B_e @ A_e, then the gate or up rows;
its adapter GGUF splits B_e's rows the same way (gate 0::2, up 1::2: B @ A's rows split exactly), A_e shared.

Only the families whose expert LoRA is verified this way are written (Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss, and
DeepSeek-V2/V3, whose deepseek2 graph runs its routed experts through the same build_moe_ffn); another MoE family
with expert adapters is refused by name. DeepSeek's checkpoint holds per-expert gate_proj/up_proj/down_proj as
Mixtral's and the Qwen MoEs' do, and training fuses them the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ...errors import ExportError
from ..merge import merge_base_weight
from ..shards import TensorInfo, read_tensor

FAMILIES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")  # per-expert tensors, [gate; up] rows
INTERLEAVED = ("GptOssForCausalLM",)  # one (E, in, out) tensor per projection, gate/up in alternating columns
# expert LoRA written (merged and adapter GGUF), verified against PEFT and llama.cpp
LORA_FAMILIES = (*FAMILIES, *INTERLEAVED, "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
MODULE = re.compile(r"^.*\.layers\.(?P<layer>\d+)\..*\.experts\.(?P<e>\d+)\.(?P<proj>gate_up_proj|down_proj)$")
FUSED = re.compile(r"^.*\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$")  # gpt-oss's stored stacks
TENSOR = re.compile(r"^blk\.(?P<layer>\d+)\.ffn_(?P<kind>gate|up|down)_exps\.weight$")
# llama.cpp's tensor kind -> (training's projection, the half of its rows it holds: 0 gate, 1 up, None all)
PART = {"gate": ("gate_up_proj", 0), "up": ("gate_up_proj", 1), "down": ("down_proj", None)}


def adapted(modules) -> dict[tuple[int, str], dict[int, str]]:
    """{(layer, projection): {expert: module}} of the adapted expert modules among `modules`."""
    out: dict[tuple[int, str], dict[int, str]] = {}
    for m in modules:
        g = MODULE.match(m)
        if g is not None:
            out.setdefault((int(g["layer"]), g["proj"]), {})[int(g["e"])] = m
    return out


def check_family(hf: str, modules) -> None:
    if hf not in LORA_FAMILIES and adapted(modules):
        raise ExportError(f"GGUF export: adapters on the experts of a {hf} are not written here (only for "
                          f"{', '.join(LORA_FAMILIES)}, whose expert LoRA is verified against PEFT and llama.cpp). "
                          "Export --format merged or adapter, or train the adapter without the experts.")


@dataclass(frozen=True)
class Stack:
    """One llama.cpp expert tensor of a merged GGUF: where each expert's rows come from and how training held them."""

    parts: tuple[TensorInfo, ...]  # the checkpoint's per-expert weights of this kind, expert order
    partners: tuple[TensorInfo, ...]  # gate/up: the other half's, so the fused slice can be rebuilt; () for down
    half: int | None  # 0: gate rows of gate_up_proj, 1: up rows, None: down_proj
    modules: tuple[str | None, ...]  # training's adapted module per expert, None where not adapted
    quantized: bool = True  # a projection training quantized (False: another per-expert tensor, stacked as it is)
    interleaved: bool = False  # gpt-oss: parts is the one stored (E, in, out) tensor, merged whole (then `take`n)


def stack(gguf_name: str, groups: dict[str, list[TensorInfo]], modules) -> Stack:
    """The Stack of GGUF tensor `gguf_name` (blk.L.ffn_*_exps.weight), from `groups` (GGUF name -> the checkpoint's
    per-expert headers, expert order) and the adapted module names."""
    group = groups[gguf_name]
    partner = groups.get(gguf_name.replace("_gate_", "_up_") if "_gate_" in gguf_name else
                         gguf_name.replace("_up_", "_gate_"))
    g = TENSOR.match(gguf_name)
    if g is None:  # not a gate/up/down projection (no adapter reaches it): the checkpoint's tensors stacked
        return Stack(tuple(group), (), None, (None,) * len(group), quantized=False)
    proj, half = PART[g["kind"]]
    if half is not None and (partner is None or len(partner) != len(group)):
        raise ExportError(f"GGUF export: {gguf_name} has no matching {'up' if half == 0 else 'gate'} experts in the "
                          "checkpoint; training's fused gate_up_proj cannot be rebuilt.")
    mods = adapted(modules).get((int(g["layer"]), proj), {})
    return Stack(tuple(group), () if half is None else tuple(partner), half,
                 tuple(mods.get(e) for e in range(len(group))))


def interleaved_stack(hf_arch: str, hf_name: str, gguf_name: str, info: TensorInfo, modules) -> Stack | None:
    """The Stack of GGUF tensor `gguf_name` cut from gpt-oss's stored (E, in, out) expert tensor `hf_name`, or None
    for any other tensor (biases, other families)."""
    g = TENSOR.match(gguf_name)
    if hf_arch not in INTERLEAVED or g is None or FUSED.match(hf_name) is None:
        return None
    proj, half = PART[g["kind"]]
    mods = adapted(modules).get((int(g["layer"]), proj), {})
    return Stack((info,), (), half, tuple(mods.get(e) for e in range(info.shape[0])), interleaved=True)


def weight(s: Stack, merge) -> torch.Tensor:
    """(E, out, in) fp32: every expert's rows as the run computed with them (module docstring); gpt-oss's in the
    stored (E, in, out) layout, whole, for the plan's `take` to cut."""
    from ...adapters import methods

    roundtrip = merge.merge_base == "dequantized" and merge.src.trained_with.type != "none"
    if s.interleaved:
        return _interleaved(s, merge, roundtrip)
    out = []
    for e, info in enumerate(s.parts):
        W, module = read_tensor(info), s.modules[e]
        rows = (0, W.shape[0]) if s.half is None else (s.half * W.shape[0], (s.half + 1) * W.shape[0])
        if roundtrip and s.quantized:  # the slice training quantized: [gate; up], one set of blocks and statistics
            fused = W if s.half is None else torch.cat([W, read_tensor(s.partners[e])] if s.half == 0 else
                                                       [read_tensor(s.partners[e]), W])
            fused = merge_base_weight(fused, merge.src.trained_with, merge.frozen, merge.merge_base, merge.device,
                                      merge.src.offset(module))
            W = fused[rows[0]:rows[1]]
        # this tensor's rows [i, j) of the projection's merged weight: LoRA rows split exactly
        out.append(methods.merge_rows(W, merge.src.stack, module, rows, torch.float32) if module else W.float())
    return torch.stack(out)


def _interleaved(s: Stack, merge, roundtrip: bool) -> torch.Tensor:
    """gpt-oss: the stored (E, in, out) tensor, fp32, each expert as the run computed with it: training's (out, in)
    slice (gate_up: gate/up rows interleaved, quantized as one) merged whole and put back. The plan's `take` cuts
    llama.cpp's tensor from it as from the checkpoint's (families_moe.gpt_oss_split)."""
    from ...adapters import methods

    stored = read_tensor(s.parts[0])
    out = torch.empty(stored.shape, dtype=torch.float32)
    for e, module in enumerate(s.modules):
        W = stored[e].t().contiguous()
        if roundtrip:
            W = merge_base_weight(W, merge.src.trained_with, merge.frozen, merge.merge_base, merge.device,
                                  merge.src.offset(module))
        out[e] = (methods.merge_rows(W, merge.src.stack, module, (0, W.shape[0]), torch.float32) if module
                  else W.float()).t()
    return out


def adapter_tensors(a, n_expert: int, shapes: dict[str, tuple[int, ...]], fold, interleaved: bool = False
                    ) -> list[tuple[str, torch.Tensor]]:
    """The expert pairs of adapter `a` as llama.cpp's stacked LoRA tensors: [(name.lora_a (E, r, in)),
    (name.lora_b (E, out, r))] per expert tensor. `shapes`: GGUF name -> (E, out, in) of the base's expert tensors;
    fold(module, B) -> B with the module's scale relative to alpha / r folded in; `interleaved`: gate_up's B rows
    alternate gate/up (gpt-oss), else [gate; up] halves."""
    import gguf

    out = []
    for (layer, proj), experts in sorted(adapted(a.modules()).items()):
        bad = [e for e in experts if e >= n_expert]
        if bad:
            raise ExportError(f"--format gguf-adapter: expert {bad[0]} of layer {layer} is adapted, but the base has "
                              f"{n_expert} experts. Pass the model it was trained on with --base.")
        ranks = {a.pair(m)[0].shape[0] for m in experts.values()}
        if len(ranks) > 1:
            raise ExportError(f"--format gguf-adapter: the experts of layer {layer} {proj} have LoRA ranks "
                              f"{sorted(ranks)}; llama.cpp stacks them into one tensor of one rank. Export it merged: "
                              "--format gguf.")
        kinds = ("gate", "up") if proj == "gate_up_proj" else ("down",)
        A0, B0 = a.pair(next(iter(experts.values())))
        r, inp, rows = A0.shape[0], A0.shape[1], B0.shape[0]
        As = torch.zeros(n_expert, r, inp)
        Bs = torch.zeros(n_expert, rows, r)
        for e, m in experts.items():
            A, B = a.pair(m)
            As[e], Bs[e] = A.float(), fold(m, B.float())
        for i, kind in enumerate(kinds):
            tensor = getattr(gguf.MODEL_TENSOR, f"FFN_{kind.upper()}_EXP")
            name = f"{gguf.TENSOR_NAMES[tensor].format(bid=layer)}.weight"
            B = Bs[:, i::len(kinds)] if interleaved else Bs[:, i * rows // len(kinds):(i + 1) * rows // len(kinds)]
            if shapes.get(name) != (n_expert, B.shape[1], inp):
                raise ExportError(f"--format gguf-adapter: the adapter's {proj} of layer {layer} makes {name} "
                                  f"{(n_expert, B.shape[1], inp)}, the base's is {shapes.get(name, 'missing')}. Pass "
                                  "the model it was trained on with --base.")
            out += [(f"{name}.lora_a", As.clone()), (f"{name}.lora_b", B.contiguous())]
    return out
