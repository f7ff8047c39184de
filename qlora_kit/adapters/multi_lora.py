"""Several named LoRA adapters over ONE frozen base, and a batch whose rows each use a different adapter.

    x (B, T, in) ──► base(x) ───────────────────────────────────────────────┐
       │                                                                     ├─► y (B, T, out)
       ├─► rows routed to "a": x[rows_a] ─► A_a ─► B_a ─► × s_a ── index_add ┤
       └─► rows routed to "b": x[rows_b] ─► A_b ─► B_b ─► × s_b ── index_add ┘   rows routed to None: base only

The base (a quant.QuantLinear or a plain nn.Linear) is the one module training used and is held once, however many
adapters sit beside it. Adapters may differ in rank, scale and target set: an adapter that does not target a module
adds nothing there for its rows, exactly as a model carrying only that adapter (lora.LoRALinear, s = alpha / r).

Routing is per batch, not per module: `with route(model, ["a", "b", None]): model.generate(...)` tells every
MultiLoRALinear which rows belong to which adapter, and the layers take it from there (the usual tools switch the
active adapter for the whole batch; a mixed-task batch is what they leave open). Rows are the batch dimension, so
anything that reshapes it (beam search, num_return_sequences) is refused rather than routed wrongly.

Names stay Hugging Face's (docs/ARCHITECTURE.md, "Names are the export format"):
`...q_proj.lora_A.<adapter>.weight`, the layout PEFT itself uses in memory for named adapters. This module imports
torch only.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Mapping, Sequence

import torch
from torch import nn

from ..errors import ModelError
from ..terms import lora_scale

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
RESERVED = ("base",)  # the route name for "no adapter" on the command line


class MultiLoRALinear(nn.Module):
    """y = base(x) + for each adapter k present in the batch: rows of k get s_k · B_k(A_k(x_rows)).

    lora_A[k]: (r_k, in), lora_B[k]: (out, r_k), both in the adapter dtype; frozen (this is for inference)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self._groups: dict[str, torch.Tensor] | None = None  # set by route(): adapter -> row indices (n_k,) int64
        self._rows = 0

    def add(self, name: str, A: torch.Tensor, B: torch.Tensor, scaling: float, dtype: torch.dtype) -> None:
        """Attach adapter `name`: A (r, in), B (out, r). Shapes are checked against the base."""
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[1] != self.in_features \
                or B.shape[0] != self.out_features:
            raise ModelError(f"adapter {name!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not fit a "
                             f"Linear of in={self.in_features}, out={self.out_features}; it was trained on another "
                             "model. Pass the base it was trained on.")
        device = _device(self.base)
        a = nn.Linear(A.shape[1], A.shape[0], bias=False, dtype=dtype, device=device).requires_grad_(False)
        b = nn.Linear(B.shape[1], B.shape[0], bias=False, dtype=dtype, device=device).requires_grad_(False)
        with torch.no_grad():
            a.weight.copy_(A)
            b.weight.copy_(B)
        self.lora_A[name], self.lora_B[name], self.scaling[name] = a, b, scaling

    def adapters(self) -> list[str]:
        return list(self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, ..., in)
        if self._groups is None:
            raise RuntimeError("a MultiLoRALinear was called outside multi_lora.route(model, rows): "
                               "say which adapter each row uses")
        if x.shape[0] != self._rows:
            raise RuntimeError(f"the batch has {x.shape[0]} rows but the route names {self._rows}; beam search and "
                               "num_return_sequences > 1 reshape the batch and are not supported")
        y = self.base(x)  # (B, ..., out), frozen, computed once for every row
        for name, rows in self._groups.items():
            if name not in self.lora_A:
                continue  # this adapter does not target this module: base only for its rows
            A, Bm = self.lora_A[name], self.lora_B[name]
            whole = rows.numel() == self._rows  # every row uses this adapter: no gather / scatter
            xs = x if whole else x.index_select(0, rows)  # (n_k, ..., in)
            h = (Bm(A(xs.to(A.weight.dtype))) * self.scaling[name]).to(y.dtype)  # (n_k, ..., out)
            y = y + h if whole else y.index_add(0, rows, h)
        return y

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: r={self.lora_A[k].out_features}, scaling={self.scaling[k]:g}" for k in self.lora_A)


def _device(module: nn.Module) -> torch.device:
    return next(iter(module.parameters()), next(iter(module.buffers()), torch.empty(0))).device


def check_name(name: str) -> str:
    if not NAME.fullmatch(name) or name in RESERVED:
        raise ModelError(f"adapter name {name!r}: use letters, digits, '_', '.', '-' (not starting with '.' or '-'), "
                         f"and not {', '.join(RESERVED)} (reserved for the base model alone).")
    return name


def add_adapter(model: nn.Module, name: str, pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], alpha: float,
                rslora: bool = False, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Attach adapter `name` to `model` in place: `pairs` maps full module names to (A (r, in), B (out, r)); the
    scale is alpha / r (alpha / sqrt(r) with rsLoRA) with r read per module from A. Each targeted Linear is wrapped
    in a MultiLoRALinear the first time; later adapters join the same wrapper, so the base is never copied.
    Freezes every parameter. Returns the modules adapted. Errors (ModelError) name what does not fit."""
    check_name(name)
    if name in adapters(model):
        raise ModelError(f"an adapter named {name!r} is already loaded; give each adapter its own name.")
    missing = [m for m in pairs if not _has(model, m)]
    if missing:
        raise ModelError(f"adapter {name!r} targets modules the base does not have, e.g. {missing[:3]}: it was "
                         "trained on a different model; pass the base it was trained on.")
    for p in model.parameters():
        p.requires_grad_(False)
    for module, (A, B) in sorted(pairs.items()):
        target = model.get_submodule(module)
        if not isinstance(target, MultiLoRALinear):
            if not (hasattr(target, "in_features") and hasattr(target, "out_features")):
                raise ModelError(f"adapter {name!r} targets {module}, which is a {type(target).__name__}, not a "
                                 "Linear layer; it was trained on a different model.")
            parent_name, _, child = module.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            target = MultiLoRALinear(target)
            setattr(parent, child, target)
        r = A.shape[0]
        target.add(name, A, B, lora_scale(alpha, r, rslora), dtype)
    return sorted(pairs)


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def layers(model: nn.Module) -> list[MultiLoRALinear]:
    return [m for m in model.modules() if isinstance(m, MultiLoRALinear)]


def adapters(model: nn.Module) -> list[str]:
    """Names of the adapters loaded in `model`, in the order they were added."""
    seen: dict[str, None] = {}
    for m in layers(model):
        seen.update(dict.fromkeys(m.adapters()))
    return list(seen)


@contextmanager
def route(model: nn.Module, rows: Sequence[str | None] | str | None, batch_size: int | None = None):
    """Within the block, row i of every batch uses adapter rows[i] (None: the base alone).

    A single name (or None) with `batch_size` routes every row the same way. Unknown names raise KeyError (a
    caller's slip, checked before anything runs)."""
    if rows is None or isinstance(rows, str):
        if batch_size is None:
            raise TypeError("route(model, name) needs batch_size")
        rows = [rows] * batch_size
    rows = list(rows)
    known = adapters(model)
    unknown = sorted({r for r in rows if r is not None and r not in known})
    if unknown:
        raise KeyError(f"no adapter named {unknown[0]!r} is loaded (loaded: {', '.join(known) or 'none'})")
    mods = layers(model)
    device = _device(model)
    groups = {k: torch.tensor([i for i, r in enumerate(rows) if r == k], dtype=torch.long, device=device)
              for k in dict.fromkeys(r for r in rows if r is not None)}
    saved = [(m._groups, m._rows) for m in mods]
    for m in mods:
        m._groups, m._rows = groups, len(rows)
    try:
        yield
    finally:
        for m, (g, n) in zip(mods, saved):
            m._groups, m._rows = g, n
