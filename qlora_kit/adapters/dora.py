"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353), over a frozen (quantized) base.

    W' = m ⊙ (W + s·B A) / ||W + s·B A||_row          m: (out,) trainable, initialised to ||W||_row
                                                      ||·||_row: L2 norm of each OUTPUT row (over in), as PEFT
    y  = W' x + b = g ⊙ (W x) + g ⊙ (s·B A x) + b     g = m / ||W + s·B A||_row  (out,)

The norm is a constant in backward (the paper's section 4.3 and PEFT: `weight_norm.detach()`), so no (out, in)
tensor is kept for autograd, and it is computed WITHOUT forming W + s·B A (W is frozen, rows are independent):

    ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2s <W_i, (BA)_i> + s^2 ||(BA)_i||^2
                         = w2_i      + 2s Σ_k (W A^T)_ik B_ik + s^2 Σ_k (B (A A^T))_ik B_ik

w2 (out,) fp32 is computed once from the dequantized weight when the layer is built (the frozen base never
changes); for a quantized base, W A^T (out, r) comes from its own forward applied to the r rows of A
(base(A) - bias = A W^T), so dequant(Q) is formed inside its usual matmul and no extra (out, in) copy stays alive.
An untrained adapter (B = 0, m = sqrt(w2)) gives g = 1 exactly: the base model, bit for bit.

Names are PEFT's: `<module>.lora_A.weight`, `<module>.lora_B.weight`, `<module>.lora_magnitude_vector` (the key
PEFT writes; in memory PEFT adds `.default.weight`). The magnitude is kept in fp32 whatever the adapter dtype: g is
~1, and a bf16 g would resolve magnitude changes no finer than 0.4%.
"""

from __future__ import annotations

import torch
from torch import nn

from . import lora


def base_weight(base: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) weight the base multiplies by: dequant(Q) for a quant.QuantLinear, .weight for nn.Linear."""
    if hasattr(base, "dequantize"):
        return base.dequantize().to(dtype)
    if isinstance(getattr(base, "weight", None), torch.Tensor):
        return base.weight.detach().to(dtype)
    with torch.no_grad():  # any other Linear-like module: its response to the identity is W^T (+ bias)
        eye = torch.eye(base.in_features, device=next(base.buffers(), next(base.parameters())).device)
        bias = getattr(base, "bias", None)
        WT = base(eye)
        return (WT - (bias if bias is not None else 0)).T.to(dtype)


def merge(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, magnitude: torch.Tensor,
          out_dtype: torch.dtype) -> torch.Tensor:
    """m ⊙ (W + s·B A) / ||W + s·B A||_row in fp32, cast once. Rows are independent, so W may be a block of rows
    (with the matching rows of B and m)."""
    V = W.float() + lora.delta(A, B, scaling)  # (rows, in) fp32
    return (V * (magnitude.float() / torch.linalg.vector_norm(V, dim=1))[:, None]).to(out_dtype)


class DoRALinear(lora.LoRALinear):
    """A LoRALinear whose update is decomposed into direction and magnitude. Trains lora_A, lora_B and
    lora_magnitude_vector; scaling 0 (lora.disabled) gives the base alone, as for LoRA."""

    def __init__(self, base: nn.Module, spec: lora.LoraSpec):
        super().__init__(base, spec)
        with torch.no_grad():
            w2 = base_weight(base).square().sum(1)  # (out,) fp32: ||W_i||^2 of the dequantized weight
        self.register_buffer("w2", w2, persistent=False)
        self.lora_magnitude_vector = nn.Parameter(w2.sqrt())  # (out,) fp32 = ||W_i||: an untrained adapter is W

    def _bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W + s·B A||_row (out,) fp32 by the expansion in the module docstring; no (out, in) temporary."""
        A, B, s = self.lora_A.weight, self.lora_B.weight, self.scaling
        if isinstance(getattr(self.base, "weight", None), torch.Tensor):  # a plain weight: A W^T in fp32
            WAt = self.base.weight.float() @ A.float().T
        else:  # quantized: its own matmul dequantizes, (r, out) = A W^T + bias
            WAt = self.base(A)
            WAt = (WAt if self._bias() is None else WAt - self._bias().to(WAt.dtype)).float().T
        Bf, Af = B.float(), A.float()  # WAt (out, r) fp32
        n2 = self.w2 + 2 * s * (WAt * Bf).sum(1) + s * s * ((Bf @ (Af @ Af.T)) * Bf).sum(1)
        return n2.clamp_min(0).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in)
        y = self.base(x)  # (..., out) = W x + b, frozen
        if self.scaling == 0:
            return y
        g = self.lora_magnitude_vector / self.weight_norm()  # (out,) fp32; gradient reaches m only
        xd = self.dropout(x.to(self.lora_A.weight.dtype))
        h = self.lora_B(self.lora_A(xd)) * self.scaling  # (..., out) adapter dtype
        if isinstance(self.dropout, nn.Identity) or not self.training:
            Wx = y if self._bias() is None else y - self._bias().to(y.dtype)
        else:  # the paper's form with dropout: the magnitude rescales W applied to the SAME dropped input
            Wx = self.base(xd.to(x.dtype))
            Wx = Wx if self._bias() is None else Wx - self._bias().to(Wx.dtype)
        # g - 1 in fp32 before the cast: g is ~1 and its small deviations are the magnitude's whole effect
        return y + ((g - 1).to(y.dtype) * Wx + g.to(y.dtype) * h.to(y.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora"



def magnitude_stats(m: torch.Tensor, start: torch.Tensor | None) -> dict:
    """DoRA's magnitude m (out,) and, given the base's row norms ||W_i|| (where m started), its relative change
    m_i / ||W_i|| - 1 per row: the part of the update the direction matrix B A cannot express."""
    m = m.double()
    out = {"mean": float(m.mean()), "min": float(m.min()), "max": float(m.max())}
    if start is not None:
        rel = m / start.double().clamp_min(1e-30) - 1
        out |= {"mean_abs_rel_change": float(rel.abs().mean()), "max_abs_rel_change": float(rel.abs().max()),
                "mean_rel_change": float(rel.mean())}
    return out
