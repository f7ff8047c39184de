"""LoRA: a low-rank update beside a frozen (quantized or plain) Linear.

    x ──► base(x) ─────────────────────┐      W' = W + s · B @ A      (Hu et al. 2021, arXiv 2106.09685, eq. 3)
    │                                  ├─► y   A: (r, in)  Kaiming-uniform (or gaussian)
    └─► dropout ─► A ─► B ─► × s ──────┘      B: (out, r) zero, so an untrained adapter changes nothing
                                              s = alpha / r, or alpha / sqrt(r) with rsLoRA (arXiv 2312.03732)

Names are the export format (docs/ARCHITECTURE.md, "Names are the export format"): wrapping `...q_proj` gives
parameters `...q_proj.lora_A.weight` and `...q_proj.lora_B.weight`, exactly PEFT's names after its
`base_model.model.` prefix. This module imports torch only; it does not know about quantization (the base is any
module with in_features / out_features).
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import torch
from torch import nn

from ..lowmem.dropout_replay import dropped_linear
from ..terms import lora_scale


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: float
    dropout: float = 0.0
    init: Literal["kaiming", "gaussian", "loftq"] = "kaiming"  # loftq: kaiming here, then train.prepare copies
    # LoftQ's A and B in (loftq.Initializer.apply)
    rslora: bool = False
    dtype: torch.dtype = torch.bfloat16

    @property
    def scaling(self) -> float:
        return lora_scale(self.alpha, self.r, self.rslora)


class LoRALinear(nn.Module):
    """y = base(x) + s · B(A(dropout(x))). Only lora_A and lora_B train; the base stays frozen."""

    def __init__(self, base: nn.Module, spec: LoraSpec):
        super().__init__()
        self.base, self.spec, self.scaling = base, spec, spec.scaling
        self.in_features, self.out_features = base.in_features, base.out_features
        device = next(iter(base.parameters()), next(iter(base.buffers()), torch.empty(0))).device
        self.lora_A = nn.Linear(self.in_features, spec.r, bias=False, dtype=spec.dtype, device=device)
        self.lora_B = nn.Linear(spec.r, self.out_features, bias=False, dtype=spec.dtype, device=device)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.spec.init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / self.spec.r)
            else:  # what nn.Linear and PEFT do by default
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    # Training with dropout: no dropped copy of x per adapter, only a bool mask (CPU) or the RNG state (CUDA)
    # (dropout_replay.py; the same results). A class switch so benchmarks can measure the plain path.
    replay_dropout = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in)
        y = self.base(x)  # (..., out), frozen
        xa = x.to(self.lora_A.weight.dtype)
        if self.replay_dropout and self.training and self.spec.dropout > 0 and torch.is_grad_enabled():
            h = dropped_linear(xa, self.lora_A.weight, self.spec.dropout)  # (..., r) adapter dtype
        else:
            h = self.lora_A(self.dropout(xa))  # (..., r) adapter dtype
        return y + (self.lora_B(h) * self.scaling).to(y.dtype)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return delta(self.lora_A.weight, self.lora_B.weight, self.scaling, dtype)

    def extra_repr(self) -> str:
        return f"r={self.spec.r}, alpha={self.spec.alpha}, scaling={self.scaling:g}"


def delta(A: torch.Tensor, B: torch.Tensor, scaling: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """s · B @ A, (out, r) @ (r, in) -> (out, in), computed in `dtype` (fp32 for exact merges)."""
    return (B.to(dtype) @ A.to(dtype)) * scaling


def merge(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, out_dtype: torch.dtype) -> torch.Tensor:
    """W + s · B @ A, added in fp32, then cast once: the merge is a pure function over tensors (W is copied, never
    changed). One fused addmm_ on W's fp32 copy: a (rows, in) block is written once, where W.float() + s·(B@A)
    wrote four temporaries (the export's merge ran 2-3x slower in them); the same gemm, so the same fp32 values
    here (bench/merge_bench.py; at most an ulp apart on a BLAS that fuses the alpha multiply-add)."""
    return W.to(torch.float32, copy=True).addmm_(B.float(), A.float(), alpha=scaling).to(out_dtype)


def is_linear_like(module: nn.Module) -> bool:
    """An nn.Linear or a frozen base with the same interface (quant.QuantLinear); never an adapter wrapper
    (LoRALinear, multi_lora.MultiLoRALinear: they hold their base in `.base`, which is what counts)."""
    if hasattr(module, "base"):
        return False
    return isinstance(module, nn.Linear) or (
        hasattr(module, "in_features") and hasattr(module, "out_features") and type(module).__name__.endswith("Linear")
    )


def linear_names(model: nn.Module, exclude: Sequence[str] = ("lm_head",)) -> list[str]:
    """Full names of every Linear-like module, minus `exclude` (matched on the last name component)."""
    return [n for n, m in model.named_modules() if is_linear_like(m) and n.split(".")[-1] not in exclude]


def match_targets(names: Iterable[str], targets: str | Sequence[str]) -> list[str]:
    """`all-linear` -> all; a list -> names whose last component(s) equal an entry (PEFT's suffix rule);
    another string -> a regex that must match the full name (PEFT's `re.fullmatch` rule)."""
    names = list(names)
    if targets == "all-linear":
        return names
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return [n for n in names if pattern.fullmatch(n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def unmatched(names: Iterable[str], targets: str | Sequence[str]) -> list[str]:
    """The entries of `targets` that match none of `names` (a regex string: itself, when it matches nothing): a
    recipe naming a module the model lacks is a mistake, never a silent partial adapter."""
    names = list(names)
    if targets == "all-linear":
        return [] if names else ["all-linear"]
    if isinstance(targets, str):
        return [] if match_targets(names, targets) else [targets]
    return [t for t in targets if not match_targets(names, [t])]


def inject(model: nn.Module, targets: str | Sequence[str], spec: LoraSpec, layer: type | None = None) -> list[str]:
    """Wrap each targeted Linear in a LoRALinear (or `layer`, e.g. dora.DoRALinear), in place; freeze everything
    else. Returns the wrapped names.

    Raises ValueError with the available names when nothing matches (the caller turns it into a user error)."""
    chosen = match_targets(linear_names(model), targets)
    missing = unmatched(linear_names(model), targets)
    if not chosen or missing:
        short = sorted({n.split(".")[-1] for n in linear_names(model)})
        what = f"lora.targets {targets!r}" if not chosen else f"lora.targets entries {missing!r}"
        raise ValueError(f"{what} matched no Linear module. Linear names in this model: {short}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, (layer or LoRALinear)(getattr(parent, child), spec))
    return chosen


@contextmanager
def disabled(model: nn.Module):
    """Within the block every adapter contributes exactly nothing (scaling 0): the base model's answers."""
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    saved = [m.scaling for m in mods]
    for m in mods:
        m.scaling = 0.0
    try:
        yield
    finally:
        for m, s in zip(mods, saved):
            m.scaling = s


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{'<module>.lora_A.weight': (r, in), '<module>.lora_B.weight': (out, r)} for every LoRALinear."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            out[f"{name}.lora_A.weight"] = m.lora_A.weight
            out[f"{name}.lora_B.weight"] = m.lora_B.weight
    return out


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into the model's LoRALinear modules; every key must exist with the same shape."""
    copy_state(adapter_state_dict(model), tensors)


def copy_state(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into the model's own tensors `own` (same keys, same shapes, else ValueError), in place."""
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        raise ValueError(f"adapter keys do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for k, t in tensors.items():
            if own[k].shape != t.shape:
                raise ValueError(f"{k}: adapter has shape {tuple(t.shape)}, model expects {tuple(own[k].shape)}")
            own[k].copy_(t)


@dataclass(frozen=True)
class ParamReport:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} of {self.total:,} ({self.percent:.3f}%)"


def param_report(model: nn.Module) -> ParamReport:
    """Counts logical weights: a quantized (out, in) weight counts out*in however few bytes it takes.
    Tied weights (embeddings = lm_head) count once."""
    seen, trainable, total = set(), 0, 0
    for m in model.modules():
        packed = is_linear_like(m) and not isinstance(m, nn.Linear)  # a quantized base: packed codes + constants
        for name, p in m.named_parameters(recurse=False):
            if id(p) in seen or (packed and name != "bias"):
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        if packed:  # its weight counts as the (out, in) weight it stands for
            total += m.in_features * m.out_features
    return ParamReport(trainable, total)
