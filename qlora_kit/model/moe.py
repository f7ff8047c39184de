"""Mixture-of-experts layers with one frozen (quantized) Linear per expert and projection.

transformers 5 holds a layer's routed experts as 3-D parameters on one module (MixtralExperts, Qwen2MoeExperts,
Qwen3MoeExperts, DeepseekV2/V3Experts, GptOssExperts):

    gate_up_proj (E, 2I, H), down_proj (E, H, I)                 (E, out, in): Mixtral, Qwen-MoE, DeepSeek
    gate_up_proj (E, H, 2I) + bias (E, 2I), down_proj (E, I, H)   is_transposed, gate/up interleaved: gpt-oss

`Experts` replaces such a module (same forward signature: hidden (T, H), top_k_index (T, k), top_k_weights (T, k))
with a ModuleList of `Expert`s, each holding `gate_up_proj` (2I, H) and `down_proj` (H, I) as ordinary Linear-like
modules: QuantLinear when quantizing (each expert's (out, in) slice quantized on its own: blockwise codes, double
quantized absmax), a frozen nn.Linear otherwise. So every expert is "a Linear" to the rest of the code: `all-linear`
reaches `...mlp.experts.3.gate_up_proj`, LoRA wraps it like any Linear, and only the experts that got tokens run,
one at a time, each dequantizing its own weight inside its matmul (QuantLinear's forward and backward), never the
whole (E, out, in) stack. The router (a TopKRouter module, not a Linear) stays frozen and unquantized.

The arithmetic is transformers' eager expert loop's, row for row (same gate/up split, activation, routing-weight
product, and rows added in its order), so the layer computes what the original module computes with the same
weights, bit for bit. Only the bookkeeping is per layer instead of per expert: the (token, slot) pairs are sorted by
expert once (a stable sort keeps transformers' order within each expert), gathered once, and each hit expert's
projections run on its contiguous slice; the activation, the routing-weight product and the index_add_ run once over
all N routed rows.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError

PROJECTIONS = ("gate_up_proj", "down_proj")


def is_expert_stack(module: nn.Module) -> bool:
    """A transformers experts module: 3-D gate_up_proj and down_proj parameters (one slice per expert)."""
    return all(isinstance(getattr(module, p, None), nn.Parameter) and getattr(module, p).dim() == 3
               for p in PROJECTIONS)


class Expert(nn.Module):
    """One expert: gate_up_proj (2I, H) and down_proj (H, I), each Linear-like (nn.Linear or QuantLinear)."""

    def __init__(self, gate_up: nn.Module, down: nn.Module):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up, down


class Experts(nn.ModuleList):
    """The routed experts of one MoE layer; drop-in for transformers' experts module (see the module docstring)."""

    def __init__(self, original: nn.Module, dtype: torch.dtype):
        gu, dn = original.gate_up_proj, original.down_proj
        self.transposed = bool(getattr(original, "is_transposed", False))
        num, *gu_shape = gu.shape
        dn_shape = list(dn.shape[1:])
        if self.transposed:  # stored (E, in, out): the Linear weight is each slice transposed
            gu_shape, dn_shape = gu_shape[::-1], dn_shape[::-1]
        with torch.device("meta"):  # placeholders until the checkpoint's tensors arrive (load.py)
            experts = [Expert(nn.Linear(gu_shape[1], gu_shape[0], bias=False, dtype=dtype),
                              nn.Linear(dn_shape[1], dn_shape[0], bias=False, dtype=dtype)) for _ in range(num)]
        super().__init__(experts)
        self.num_experts = num
        self.concatenated = bool(getattr(original, "is_concatenated", True))
        self.has_bias = bool(getattr(original, "has_bias", False))
        if self.has_bias:  # gpt-oss: (E, out) biases, added after each expert's matmul as transformers does
            self.gate_up_proj_bias = nn.Parameter(torch.empty(num, gu_shape[0], device="meta", dtype=dtype),
                                                  requires_grad=False)
            self.down_proj_bias = nn.Parameter(torch.empty(num, dn_shape[0], device="meta", dtype=dtype),
                                               requires_grad=False)
        if self.concatenated:  # rows [gate; up] of gate_up_proj, act_fn(gate) * up
            self.__dict__["act_fn"] = original.act_fn  # a parameterless module, kept out of the expert list
        elif hasattr(type(original), "_apply_gate"):  # gpt-oss: interleaved, clamped, its own gate (its code)
            self._apply_gate_fn = type(original)._apply_gate
            self.alpha, self.limit = original.alpha, original.limit
        else:
            raise ModelError(f"{type(original).__name__}: an experts module with interleaved gate/up weights and no "
                             "known gate function; qlora-kit cannot run it exactly. Please report the model type.")
        self.original_class = type(original).__name__

    def set_weight(self, projection: str, stacked: torch.Tensor, make) -> None:
        """Install every expert's slice of a checkpoint's (E, ., .) tensor: make((out, in) weight) returns the frozen
        Linear-like module (quantized or not); one slice at a time, so only one extra expert weight exists."""
        if projection not in PROJECTIONS:
            raise KeyError(projection)
        if stacked.dim() != 3 or stacked.shape[0] != self.num_experts:
            raise ModelError(f"{projection}: expected ({self.num_experts}, ., .) expert weights, got "
                             f"{tuple(stacked.shape)}; the folder's config and weights do not match.")
        for e in range(self.num_experts):
            w = stacked[e].t() if self.transposed else stacked[e]
            old = getattr(self[e], projection)
            if tuple(w.shape) != (old.out_features, old.in_features):
                raise ModelError(f"{projection}: expert weight {tuple(w.shape)} does not fit the config's "
                                 f"{(old.out_features, old.in_features)}; the folder's config and weights "
                                 "do not match.")
            setattr(self[e], projection, make(w, e))  # a view: transposed slices keep their stored layout

    def route(self, top_k_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """top_k_index (T, k) -> (token, slot, counts): the N valid (token, slot) pairs grouped by expert in index
        order, each group in transformers' loop order (slot-major, then token: `torch.where(top_k_index.t() == e)`),
        and counts (E,) the group sizes. One stable sort per layer instead of a mask per expert."""
        T = top_k_index.shape[0]
        flat = top_k_index.t().reshape(-1)  # (k*T,) position p = slot * T + token
        valid = (flat >= 0) & (flat < self.num_experts)  # -1 (or an out-of-range id) marks "no expert"
        order = torch.argsort(torch.where(valid, flat, self.num_experts), stable=True)
        counts = torch.bincount(flat[valid], minlength=self.num_experts).tolist()
        order = order[: sum(counts)]  # invalid positions sort last: drop them
        return order % T, torch.div(order, T, rounding_mode="floor"), counts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """Per layer, not per expert: one gather of the routed rows (N, H), each hit expert's projection on its
        contiguous slice, one activation, one routing-weight product, one index_add_. Each row sees the same
        operations as in transformers' loop and the rows are added in its order (expert by expert, slot-major),
        so the result is the same."""
        final = torch.zeros_like(hidden_states)  # (T, H)
        with torch.no_grad():
            token, slot, counts = self.route(top_k_index)
        if not token.numel():
            return final
        hit = [(e, n) for e, n in enumerate(counts) if n]  # experts with no token do no work at all
        x = hidden_states[token].split([n for _, n in hit])  # per hit expert: (n_e, H) views of one gather
        gate_up = torch.cat([self[e].gate_up_proj(xe) for (e, _), xe in zip(hit, x)])  # (N, 2I)
        ids = None
        if self.has_bias:  # each row's own expert's bias (E, out)[ids]
            ids = torch.repeat_interleave(torch.tensor([e for e, _ in hit]), torch.tensor([n for _, n in hit]))
            gate_up = gate_up + self.gate_up_proj_bias[ids.to(gate_up.device)]
        if self.concatenated:
            gate, up = gate_up.chunk(2, dim=-1)
            h = self.act_fn(gate) * up  # (N, I)
        else:
            h = self._apply_gate_fn(self, gate_up)
        h = h.split([n for _, n in hit])
        out = torch.cat([self[e].down_proj(he) for (e, _), he in zip(hit, h)])  # (N, H)
        if self.has_bias:
            out = out + self.down_proj_bias[ids.to(out.device)]
        out = out * top_k_weights[token, slot, None]
        return final.index_add_(0, token, out.to(final.dtype))

    def extra_repr(self) -> str:
        return f"{self.original_class}: {self.num_experts} experts"


def replace_expert_stacks(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Swap every transformers experts module for an `Experts` (meta placeholders), in place; returns their names.
    Refuses a 3-D weight outside a known experts module: it would otherwise stay unquantized and unadapted."""
    names = [n for n, m in model.named_modules() if is_expert_stack(m)]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Experts(model.get_submodule(name), dtype))
    odd = [n for n, p in model.named_parameters() if p.dim() == 3]
    if odd:
        raise ModelError(f"{odd[0]} is a 3-D weight outside any experts module qlora-kit knows ({len(odd)} such); "
                         "it would stay unquantized and unadapted. This architecture is not supported yet.")
    return names
