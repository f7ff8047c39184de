"""LoRA on mixture-of-experts weights, in PEFT's on-disk layout for fused expert parameters.

Training adapts each expert's projection as its own Linear (model/moe.py): `...mlp.experts.3.gate_up_proj` gets
A_3 (r, in) and B_3 (out, r). PEFT adapts the fused (E, ., .) parameter itself (`target_parameters`, lora.ParamWrapper)
with one pair per parameter holding every expert:

    lora_A.weight (r*E, in)      expert e's A is rows [e*r, (e+1)*r)
    lora_B.weight (out, r*E)     expert e's B is columns e, E+e, 2E+e, ... (B.reshape(out, r, E)[:, :, e])
    delta_e = scaling * B_e @ A_e in (out, in) orientation (PEFT transposes it back for gpt-oss' (E, in, out))

PEFT wraps the parameters of one experts module in registration order (gate_up_proj, then down_proj), each wrapper
around the previous one, so the first targeted parameter's tensors sit under the most `base_layer.` hops:
`experts.base_layer.lora_A.weight` is gate_up_proj's and `experts.lora_A.weight` down_proj's when both are adapted.
`to_peft` and `from_peft` convert between the two namings; nothing else in qlora-kit sees the fused form.

PEFT 0.21 loads a LoRA adapter of a model type that transformers 5 converts from its v4 layout (DeepSeek-V2/V3,
Qwen3-MoE, ... map to qwen2_moe's rules) through a shim that re-reads target_modules names as the v4 per-expert
projections (`gate_proj`, `up_proj`, `down_proj`, `gate`; Mixtral's `w1`/`w2`/`w3`): it drops them from
target_modules, targets the fused expert parameters instead and doubles gate_up_proj's rank and alpha. A Linear of
that name outside the routed experts (DeepSeek's shared experts and dense first layers, a Qwen3-MoE
`mlp_only_layers` MLP) would then get no LoRA, and the routed experts' pair would not fit (a size mismatch).
`peft_reread` names them; `to_peft` lists such modules by full name as target_parameters (`<module>.weight`): PEFT
wraps a 2-D weight with the same A (r, in) / B (out, r) and scaling under the same keys, and no shim touches it.
"""

from __future__ import annotations

import re

import torch

from ..model.moe import PROJECTIONS

_EXPERT = re.compile(r"^(?P<module>.+\.experts)\.(?P<e>\d+)\.(?P<proj>" + "|".join(PROJECTIONS) +
                     r")\.lora_(?P<ab>[AB])\.weight$")


def is_expert_module(name: str) -> bool:
    """`...experts.N.gate_up_proj` / `...experts.N.down_proj`: one expert's projection (model/moe.py)."""
    return re.fullmatch(r".+\.experts\.\d+\.(" + "|".join(PROJECTIONS) + ")", name) is not None


# peft.utils.transformers_weight_conversion's _MOE_TARGET_MODULE_MAPPING (0.21): the names its shim re-reads,
# per transformers conversion pattern
_REREAD = {"qwen2_moe": ("gate", "gate_proj", "up_proj", "down_proj"), "mixtral": ("gate", "w1", "w2", "w3")}


def peft_reread(model_type: str | None) -> tuple[str, ...]:
    """Module leaf names PEFT's v4 shim re-reads for this model type (see the module docstring); () for others."""
    try:  # the table PEFT reads too (a private name of the pinned transformers; tests compare with PEFT's shim)
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN as patterns
    except ImportError:
        patterns = {"qwen3_moe": "qwen2_moe", "deepseek_v2": "qwen2_moe", "deepseek_v3": "qwen2_moe"}
    pattern = "mixtral" if model_type == "mixtral" else patterns.get(model_type or "")
    return _REREAD.get(pattern, ())


def as_parameter(name: str, reread: tuple[str, ...]) -> bool:
    """A non-expert Linear PEFT's shim would misread: written as a target parameter (`<name>.weight`)."""
    return name.rsplit(".", 1)[-1] in reread and not is_expert_module(name)


def _hops(targeted: list[str], proj: str) -> str:
    order = [p for p in PROJECTIONS if p in targeted]
    return "base_layer." * (len(order) - 1 - order.index(proj))


def to_peft(tensors: dict[str, torch.Tensor], reread: tuple[str, ...] = ()
            ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(tensors with every expert's pair fused into PEFT's per-parameter pair, target_parameters: the fused expert
    parameters, then `<module>.weight` of each module `as_parameter(module, reread)`). ValueError when only some
    experts of a projection are adapted, or layers differ in which projections are: PEFT adapts every expert of a
    parameter, with one target list for the whole model."""
    params = sorted({f"{k.rsplit('.lora_', 1)[0]}.weight" for k in tensors
                     if ".lora_" in k and as_parameter(k.rsplit(".lora_", 1)[0], reread)})
    out, groups = {}, {}
    for k, v in tensors.items():
        m = _EXPERT.match(k)
        if m is None:
            out[k] = v
            continue
        groups.setdefault((m["module"], m["proj"]), {}).setdefault(int(m["e"]), {})[m["ab"]] = v
    if not groups:
        return out, params
    targeted: dict[str, list[str]] = {}
    for module, proj in groups:
        targeted.setdefault(module, []).append(proj)
    shapes = {tuple(sorted(v)) for v in targeted.values()}
    if len(shapes) > 1:
        raise ValueError(f"experts are adapted in different projections per layer ({sorted(shapes)}); PEFT's "
                         "target_parameters names one set for every layer. Target the same projections everywhere")
    for (module, proj), experts in groups.items():
        n = max(experts) + 1
        if sorted(experts) != list(range(n)) or any(set(p) != {"A", "B"} for p in experts.values()):
            raise ValueError(f"{module}.{proj}: only some experts are adapted ({sorted(experts)}); PEFT adapts all "
                             "experts of a parameter or none. Target every expert (e.g. all-linear)")
        A = torch.cat([experts[e]["A"] for e in range(n)], dim=0)  # (r*E, in)
        B = torch.stack([experts[e]["B"] for e in range(n)], dim=2)  # (out, r, E)
        prefix = f"{module}.{_hops(targeted[module], proj)}"
        out[prefix + "lora_A.weight"] = A
        out[prefix + "lora_B.weight"] = B.reshape(B.shape[0], -1)  # (out, r*E), column j*E + e
    projs = sorted(shapes.pop())
    return out, [f"experts.{p}" for p in projs] + params


def from_peft(tensors: dict[str, torch.Tensor], target_parameters: list[str], r: int) -> dict[str, torch.Tensor]:
    """The inverse of `to_peft`: PEFT's fused expert pairs -> one pair per expert, named like training's modules.
    A 2-D `<module>.weight` target is a Linear's own pair, stored under the module's name: nothing to convert."""
    projs = [p.rsplit(".", 1)[-1] for p in target_parameters if not p.endswith(".weight")]
    bad = [p for p in projs if p not in PROJECTIONS]
    if bad:
        raise ValueError(f"target_parameters {target_parameters}: qlora-kit adapts expert parameters "
                         f"{list(PROJECTIONS)} only, not {bad}")
    fused = {}
    for proj in projs:
        suffix = f".experts.{_hops(projs, proj)}lora_A.weight"
        for k in tensors:
            if k.endswith(suffix):
                fused[(k[: -len(suffix)] + ".experts", proj)] = (k, k[: -len("lora_A.weight")] + "lora_B.weight")
    used = {k for pair in fused.values() for k in pair}
    out = {k: v for k, v in tensors.items() if k not in used}
    for (module, proj), (ka, kb) in fused.items():
        A, B = tensors[ka], tensors[kb]
        n = A.shape[0] // r
        Bs = B.reshape(B.shape[0], r, n)
        for e in range(n):
            out[f"{module}.{e}.{proj}.lora_A.weight"] = A[e * r:(e + 1) * r].contiguous()
            out[f"{module}.{e}.{proj}.lora_B.weight"] = Bs[:, :, e].contiguous()
    return out
