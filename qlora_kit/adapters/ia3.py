"""IA3: learned vectors that rescale activations (Liu et al. 2022, arXiv 2205.05638, "(IA)^3"), over a frozen base.

    output scaling (k_proj, v_proj):  y = l ⊙ (W x + b)      l: (out, 1)   merge: W' = l ⊙ W (rows), b' = l ⊙ b
    input scaling  (down_proj):       y = W (l ⊙ x) + b      l: (1, in)    merge: W' = W ⊙ l (columns)

l starts at ones, so an untrained adapter changes nothing; it is the only trainable tensor (out or in numbers per
module: about 10x fewer than LoRA r=1, which trains in + out). Shapes and names are PEFT's on disk:
`<module>.ia3_l` (out, 1) or (1, in); PEFT calls input scaling "feedforward".

The wrapped module may itself be an adapter (a LoRALinear/DoRALinear on the same module): IA3 then scales what it
computes, y = l ⊙ (W x + s·B A x); that order, LoRA first and IA3 over it, is the one `methods` documents and merges.
l is kept in fp32 (it is ~1; bf16 would round steps finer than 0.4% away); the product is taken in the input dtype.
"""

from __future__ import annotations

import torch
from torch import nn


class IA3Linear(nn.Module):
    def __init__(self, base: nn.Module, feedforward: bool):
        super().__init__()
        self.base, self.feedforward = base, feedforward
        self.in_features, self.out_features = base.in_features, base.out_features
        device = next(iter(base.buffers()), next(iter(base.parameters()), torch.empty(0))).device
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=torch.float32, device=device))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in)
        if not self.enabled:
            return self.base(x)
        if self.feedforward:
            return self.base(x * self.ia3_l[0].to(x.dtype))  # l (in,) broadcast over (..., in)
        y = self.base(x)  # (..., out)
        return y * self.ia3_l[:, 0].to(y.dtype)

    def extra_repr(self) -> str:
        return f"ia3 {'input' if self.feedforward else 'output'} scaling, {self.ia3_l.numel()} params"


def merge_rows(W: torch.Tensor, l: torch.Tensor, feedforward: bool,
               rows: tuple[int, int] | None = None) -> torch.Tensor:
    """W (a block of rows `rows` of the full weight, or all of it) scaled by l, in fp32. Input scaling scales
    columns (every row block sees all of l); output scaling scales rows (the block sees its rows of l)."""
    l = l.float()
    if feedforward:
        return W.float() * l.reshape(1, -1)
    lr = l.reshape(-1) if rows is None else l.reshape(-1)[rows[0]:rows[1]]
    return W.float() * lr[:, None]


def scale_stats(module: str, layer: int | None, l: torch.Tensor, feedforward: bool) -> dict:
    """IA3's learned scales l of one module: their distribution around 1 (untrained: all exactly 1)."""
    v = l.double().reshape(-1)
    q = torch.quantile(v, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return {"module": module, "layer": layer, "kind": module.rsplit(".", 1)[-1],
            "scales": "input" if feedforward else "output", "n": v.numel(), "mean": float(v.mean()),
            "std": float(v.std()) if v.numel() > 1 else 0.0, "min": float(v.min()), "max": float(v.max()),
            "p05": q[0], "median": q[1], "p95": q[2], "mean_abs_dev": float((v - 1).abs().mean())}
