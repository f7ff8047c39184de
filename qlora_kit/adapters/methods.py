"""The adaptation methods of a run, together: LoRA or DoRA (lora.py, dora.py) and IA3 (ia3.py) over one frozen base.

    recipe.lora (targets, dora)  ──► LoRALinear / DoRALinear on each target       (none when lora.targets is [])
    recipe.ia3  (outputs, inputs) ─► IA3Linear over each target, OUTSIDE any LoRA wrapper on the same module

On a module both adapt, y = l ⊙ ((W + s·B A) x) (output scaling) or (W + s·B A)(l ⊙ x) (input scaling): IA3 scales
what the LoRA-adapted layer computes. That is the order every consumer follows: `peft_format.load_stack` (root
folder, then ia3/), `attach` (generate), `merge_rows` (export: merge LoRA/DoRA into dequant(Q), then scale), and
PEFT (load the LoRA folder, merge_and_unload, load ia3/).

Parameter names are PEFT's without its prefix: the IA3 wrapper holds the LoRA wrapper as `.base`, and `peft_name`
drops those `.base` hops (`...k_proj.base.lora_A.weight` is `...k_proj.lora_A.weight`). Torch only.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from . import dora, expert_format, ia3, lora, peft_format
from ..config import IA3Config, LoraConfig


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(PEFT-style name, layer) of every LoRALinear / DoRALinear / IA3Linear in `model`."""
    for name, m in model.named_modules():
        if isinstance(m, (lora.LoRALinear, ia3.IA3Linear)):
            yield peft_name(name), m


def peft_name(name: str) -> str:
    """Drop the `.base` hops of stacked wrappers: the name under which PEFT stores the module's tensors."""
    parts = name.split(".")
    return ".".join(p for i, p in enumerate(parts) if not (p == "base" and i > 0))


def method_of(layer: nn.Module) -> str:
    return "ia3" if isinstance(layer, ia3.IA3Linear) else "dora" if isinstance(layer, dora.DoRALinear) else "lora"


def tensors_of(name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(layer, ia3.IA3Linear):
        return {f"{name}.ia3_l": layer.ia3_l}
    out = {f"{name}.lora_A.weight": layer.lora_A.weight, f"{name}.lora_B.weight": layer.lora_B.weight}
    if isinstance(layer, dora.DoRALinear):
        out[f"{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    return out


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor of every method, keyed by PEFT's names (no prefix): what checkpoints hold."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        out |= tensors_of(name, layer)
    return out


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors into the model's adapters; every key must exist with the same shape (ValueError otherwise)."""
    lora.copy_state(state_dict(model), tensors)


def _ia3_candidates(model: nn.Module, exclude: Sequence[str] = ("lm_head",)) -> list[str]:
    """Linear-like modules and LoRA wrappers (not the base inside a wrapper): what IA3 may scale."""
    wrapped = {n + ".base" for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}
    return [n for n, m in model.named_modules()
            if (lora.is_linear_like(m) or isinstance(m, lora.LoRALinear)) and n not in wrapped
            and n.split(".")[-1] not in exclude]


def inject_ia3(model: nn.Module, outputs, inputs) -> list[str]:
    """Wrap the modules matching `outputs` (output scaling) and `inputs` (input scaling) in IA3Linear, in place.
    ValueError (the caller's user error) when nothing matches or a module is in both."""
    names = _ia3_candidates(model)
    out_m, in_m = lora.match_targets(names, outputs), lora.match_targets(names, inputs)
    short = sorted({n.split(".")[-1] for n in names})
    for key, targets in (("outputs", outputs), ("inputs", inputs)):
        missing = lora.unmatched(names, targets)
        if missing:  # one list's miss must not leave the other list training alone
            raise ValueError(f"ia3.{key} entries {missing!r} matched no Linear module. Linear names in this "
                             f"model: {short}; set ia3.{key} to some of them ([] for none). (The defaults name "
                             "Llama's layers: inputs is the MLP's output layer, e.g. fc2 in Phi, c_proj in GPT-2.)")
    both = sorted(set(out_m) & set(in_m))
    if both:
        raise ValueError(f"ia3: {both[0]} matches both ia3.outputs and ia3.inputs; a module scales its output or "
                         "its input, not both. Remove it from one list")
    if not out_m and not in_m:
        raise ValueError(f"ia3.outputs {outputs!r} and ia3.inputs {inputs!r} matched no Linear module. Linear names "
                         f"in this model: {short}; set ia3.outputs / ia3.inputs to some of them")
    for name, ff in [(n, False) for n in out_m] + [(n, True) for n in in_m]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ia3.IA3Linear(getattr(parent, child), ff))
    return sorted(out_m + in_m)


def inject(model: nn.Module, c: LoraConfig, ia3_cfg: IA3Config | None, dtype: torch.dtype
           ) -> dict[str, list[str]]:
    """The recipe's methods (its lora and ia3 sections) on `model`, in place, base frozen: {method: adapted
    modules}. LoRA/DoRA go first, IA3 over them (the module docstring's order). ValueError names what did not match."""
    for p in model.parameters():
        p.requires_grad_(False)
    out: dict[str, list[str]] = {}
    if c.targets != []:
        spec = lora.LoraSpec(c.r, c.alpha, c.dropout, c.init, c.rslora, dtype)
        out["dora" if c.dora else "lora"] = lora.inject(model, c.targets, spec,
                                                        layer=dora.DoRALinear if c.dora else lora.LoRALinear)
    if ia3_cfg is not None:
        out["ia3"] = inject_ia3(model, ia3_cfg.outputs, ia3_cfg.inputs)
    _check_experts(model, out, c)
    return out


def _check_experts(model: nn.Module, adapted: dict[str, list[str]], c) -> None:
    """What PEFT's fused-expert LoRA (lora.ParamWrapper) cannot hold is refused before training, not lost at export:
    DoRA, IA3 and dropout on an expert, and a subset of one projection's experts (expert_format.to_peft); DoRA and
    dropout on a Linear PEFT's v4 shim misreads, which goes to PEFT as a ParamWrapper too (expert_format)."""
    _check_reread(model, adapted, c)
    experts = {m: [n for n in names if expert_format.is_expert_module(n)] for m, names in adapted.items()}
    if not any(experts.values()):
        return
    where = next(n for names in experts.values() for n in names)
    keys = {"dora": "lora.targets (or lora.dora: false)", "ia3": "ia3.outputs / ia3.inputs"}
    for method in ("dora", "ia3"):
        if experts.get(method):
            raise ValueError(f"{method} on mixture-of-experts weights ({experts[method][0]}): PEFT adapts fused expert "
                             "parameters with plain LoRA only, so the adapter could not be saved. Use plain LoRA on "
                             f"them, or leave the experts out of {keys[method]} (e.g. attention's q_proj, k_proj, "
                             "v_proj, o_proj, or a shared expert's projections)")
    if c.dropout > 0:
        raise ValueError(f"lora.dropout={c.dropout} with adapted experts ({where}): PEFT's LoRA on fused expert "
                         "parameters has no dropout (lora.ParamWrapper refuses it). Set lora.dropout: 0")
    chosen: dict[tuple[str, str], int] = {}
    for n in experts.get("lora", []):
        module, _, proj = n.rpartition(".")
        key = (module.rpartition(".")[0], proj)
        chosen[key] = chosen.get(key, 0) + 1
    for (module, proj), k in chosen.items():
        if k != len(model.get_submodule(module)):
            raise ValueError(f"{module}.*.{proj}: only some experts are adapted ({k} of "
                             f"{len(model.get_submodule(module))}); PEFT adapts all experts of a parameter or none. "
                             "Target every expert (e.g. all-linear)")
    placeholders = {f"{n}.lora_{ab}.weight": torch.zeros(1, 1) for n in experts.get("lora", []) for ab in "AB"}
    expert_format.to_peft(placeholders)  # ValueError for a partial or uneven expert selection


def _check_reread(model: nn.Module, adapted: dict[str, list[str]], c) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    reread = expert_format.peft_reread(model_type)
    chosen = [n for method in ("lora", "dora") for n in adapted.get(method, [])
              if expert_format.as_parameter(n, reread)]
    if not chosen or (c.dropout == 0 and not c.dora):
        return
    names = "/".join(n for n in reread if n != "gate")  # the router's name: never a Linear qlora-kit adapts
    what = f"lora.dora with {chosen[0]}" if c.dora else f"lora.dropout={c.dropout} with {chosen[0]}"
    raise ValueError(f"{what} adapted: PEFT 0.21 reads a {model_type} adapter's {names} "
                     "target_modules as the routed experts' old names, so qlora-kit writes these Linears as PEFT "
                     "target_parameters, which PEFT allows with plain LoRA and no dropout only. "
                     f"Set {'lora.dora: false' if c.dora else 'lora.dropout: 0'}, or leave the "
                     f"{names} Linears out of lora.targets")


def param_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per method, e.g. {'lora': 1_081_344, 'ia3': 110_592}."""
    counts: dict[str, int] = {}
    for name, layer in adapter_layers(model):
        n = sum(t.numel() for t in tensors_of(name, layer).values())
        counts[method_of(layer)] = counts.get(method_of(layer), 0) + n
    return counts


def describe_counts(counts: dict[str, int]) -> str:
    total = sum(counts.values()) or 1
    return ", ".join(f"{k} {v:,} ({100 * v / total:.1f}%)" for k, v in counts.items())


def save(folder, model: nn.Module, recipe) -> list:
    """The run's adapter folder(s): LoRA/DoRA at `folder` (PEFT LORA, use_dora for DoRA), IA3 at `folder` when it
    is the only method, else at folder/ia3 (peft_format's stacked layout). Returns the folders written."""
    from pathlib import Path

    folder = Path(folder)
    sd = state_dict(model)
    lora_t = {k: v for k, v in sd.items() if not k.endswith(".ia3_l")}
    ia3_t = {k: v for k, v in sd.items() if k.endswith(".ia3_l")}
    written = []
    c = recipe.lora
    if lora_t:
        written.append(peft_format.save_adapter(folder, lora_t, r=c.r, alpha=c.alpha, dropout=c.dropout,
                                                rslora=c.rslora, base_model=recipe.model.path, init=c.init,
                                                extra={"use_dora": True} if c.dora else None,
                                                model_type=getattr(model.config, "model_type", None)))
    if ia3_t:
        ff = [name for name, layer in adapter_layers(model) if isinstance(layer, ia3.IA3Linear) and layer.feedforward]
        where = folder / peft_format.IA3_SUBFOLDER if lora_t else folder
        written.append(peft_format.save_ia3(where, ia3_t, feedforward=ff, base_model=recipe.model.path))
    return written


def attach(model: nn.Module, stack: list[peft_format.Adapter], dtype: torch.dtype) -> None:
    """Put a stack of adapters read from disk (load_stack) on `model`, in order, with their tensors (inference).
    ValueError when a module is missing or a shape does not fit."""
    for adapter in stack:
        present = set(_ia3_candidates(model) if adapter.kind == "ia3" else lora.linear_names(model))
        missing = [m for m in adapter.modules() if m not in present]
        if missing:
            raise ValueError(f"the adapter targets modules the base does not have, e.g. {missing[:3]}")
        for m in adapter.modules():
            if adapter.kind == "ia3":
                parent_name, _, child = m.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, ia3.IA3Linear(getattr(parent, child), adapter.feedforward(m)))
                continue
            r = adapter.pair(m)[0].shape[0]
            layer = dora.DoRALinear if adapter.dora else lora.LoRALinear
            lora.inject(model, [m], lora.LoraSpec(r, adapter.alpha, 0.0, "kaiming", adapter.rslora, dtype), layer=layer)
            model.get_submodule(m).scaling = adapter.module_scaling(m)
    for p in model.parameters():
        p.requires_grad_(False)
    tensors = {k: v for a in stack for k, v in a.tensors.items()}
    load_state(model, tensors)


def merge_rows(W: torch.Tensor, stack: list[peft_format.Adapter], module: str, rows: tuple[int, int],
               out_dtype: torch.dtype) -> torch.Tensor:
    """Rows [i, j) of the merged weight of `module`: W (the block of dequant(Q) or the original weight) with each
    adapter of the stack applied in order, in fp32, cast once. Every method is row-separable: LoRA adds rows of
    B @ A, DoRA normalises each row, IA3 scales rows (outputs) or columns (inputs)."""
    i, j = rows
    V = W  # each method returns a new fp32 block (lora.merge copies W once); never changes W
    for a in stack:
        if not a.has(module):
            continue
        if a.kind == "ia3":
            V = ia3.merge_rows(V, a.ia3_vector(module), a.feedforward(module), rows)
            continue
        A, B = a.pair(module)
        s = a.module_scaling(module)
        V = dora.merge(V, A, B[i:j], s, a.magnitude(module)[i:j], torch.float32) if a.dora else lora.merge(
            V, A, B[i:j], s, torch.float32)
    return V.to(torch.float32).to(out_dtype)  # fp32 first: an unmerged block takes the same single rounding


def bias_scale(stack: list[peft_format.Adapter], module: str) -> torch.Tensor | None:
    """IA3 output scaling scales the bias too (y = l ⊙ (W x + b)): l (out,) fp32 for `module`'s bias, or None."""
    scale = None
    for a in stack:
        if a.kind == "ia3" and module in a.modules() and not a.feedforward(module):
            l = a.ia3_vector(module).float().reshape(-1)
            scale = l if scale is None else scale * l
    return scale


@contextmanager
def disabled(model: nn.Module):
    """Within the block every adapter of every method contributes nothing: the base model's answers."""
    layers = [m for m in model.modules() if isinstance(m, ia3.IA3Linear)]
    for m in layers:
        m.enabled = False
    try:
        with lora.disabled(model):
            yield
    finally:
        for m in layers:
            m.enabled = True
